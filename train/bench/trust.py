"""Whether the bench's numbers can be trusted: the spread of each timed figure's repeats, and the machine's load
around each section. A busy machine (other processes competing for the cores) turns timings into noise; this module
says so, so the console, results.md and the plots can say it plainly instead of presenting noise as results.

The rule (`busy_reasons`): a section is unreliable when any timed figure's max/min over its repeats exceeds
`SPREAD_LIMIT`, or when the load average, less the bench's own CPU use, exceeds `LOAD_PER_CORE` x the cores.
"""
from __future__ import annotations

import os
import statistics
import time

SPREAD_LIMIT = 1.5  # max/min of a figure's repeats; a quiet machine repeats a jitted step within a few percent
LOAD_PER_CORE = 0.75  # other runnable processes per core beyond which the bench's threads queue for the CPU


def spread(seconds) -> dict:
    """{'min', 'median', 'max', 'n'} of a figure's timed repeats (seconds)."""
    seconds = list(seconds)
    return {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds), "n": len(seconds)}


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, this one included), or None where the OS has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def cpu_seconds() -> float:
    """CPU seconds this process and its finished children have used (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class SectionLoad:
    """The load around one bench section: `start()` before it, `finish()` after it returns {'load_before',
    'load_after', 'own_cpu' (the bench's own CPU use over the section, in cores), 'others_load' (load_after less
    own_cpu, at least 0: an estimate of the other processes' load; None without a load average)}."""

    def start(self) -> "SectionLoad":
        self.load_before, self.cpu, self.wall = load_average(), cpu_seconds(), time.perf_counter()
        return self

    def finish(self) -> dict:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        own = (cpu_seconds() - self.cpu) / wall
        after = load_average()
        return {"load_before": self.load_before, "load_after": after, "own_cpu": round(own, 2),
                "others_load": None if after is None else round(max(after - own, 0.0), 2)}


def busy_reasons(spreads: dict[str, dict], load: dict, cpu_count: int) -> list[str]:
    """Why a section's timings are unreliable, one phrase per reason ([] = no sign of a busy machine).

    spreads: {figure name: `spread(...)`} of the section's timed figures; load: `SectionLoad.finish()`'s dict."""
    reasons = [f"{name} varied {s['max'] / s['min']:.1f}x between repeats (max/min > {SPREAD_LIMIT})"
               for name, s in spreads.items() if s["min"] > 0 and s["max"] / s["min"] > SPREAD_LIMIT]
    limit = LOAD_PER_CORE * cpu_count
    if load.get("others_load") is not None and load["others_load"] > limit:
        reasons.append(f"load average {load['load_after']} less the bench's own {load['own_cpu']} cores = "
                       f"{load['others_load']} > {limit:g} ({LOAD_PER_CORE} x {cpu_count} cores)")
    return reasons


def busy_warning(reasons: list[str]) -> str:
    """The one plain sentence the console and results.md print above a busy section's figures ('' when quiet)."""
    if not reasons:
        return ""
    return ("BUSY MACHINE: these timings are unreliable and their ratios (marked ?) should not be compared: "
            + "; ".join(reasons))
