"""Progress lines for the calibrated PTQ loops (GPTQ, AWQ), which take minutes over a model's layer groups: long
work says how far it is and about how long is left, through a `log` callable the caller chooses (None: silent)."""
from __future__ import annotations

import time
from typing import Callable


class GroupProgress:
    """`step(name)` after each of `total` layer groups logs "<what>: layer group i/total (name): s elapsed, about
    s left" (the estimate: mean seconds per group so far x groups left)."""

    def __init__(self, what: str, total: int, log: Callable[[str], None] | None):
        self.what, self.total, self.log = what, total, log
        self.done, self.start = 0, time.perf_counter()

    def step(self, name: str) -> None:
        self.done += 1
        if self.log is None:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        self.log(f"{self.what}: layer group {self.done}/{self.total} ({name}) done: {elapsed:.0f} s elapsed, "
                 f"about {left:.0f} s left")
