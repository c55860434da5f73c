"""Progress lines for the calibrated PTQ loops (GPTQ, AWQ), which take minutes over a model's layer groups, and for
quant.report's per-layer KL over many windows: long work says how far it is and about how long is left, through a
`log` callable the caller chooses (None: silent)."""
from __future__ import annotations

import time
from typing import Callable


class GroupProgress:
    """`step(name)` after each of `total` units of work (layer groups unless `unit` says otherwise) logs "<what>:
    <unit> i/total (name) done: s elapsed, about s left" (the estimate: mean seconds per unit so far x units left);
    with `every_s`, at most one line per `every_s` seconds, and none for work done sooner."""

    def __init__(self, what: str, total: int, log: Callable[[str], None] | None, unit: str = "layer group",
                 every_s: float = 0.0):
        self.what, self.total, self.log, self.unit, self.every_s = what, total, log, unit, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def step(self, name: str) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.log is None or now - self.last < self.every_s:
            return
        self.last, elapsed = now, now - self.start
        left = elapsed / self.done * (self.total - self.done)
        self.log(f"{self.what}: {self.unit} {self.done:,}/{self.total:,} ({name}) done: {elapsed:.0f} s elapsed, "
                 f"about {left:.0f} s left")
