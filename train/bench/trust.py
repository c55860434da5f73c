"""Whether the bench's numbers can be trusted: the spread of each timed figure's repeats, and the machine's load
around each section. A busy machine (other processes competing for the cores) turns timings into noise; this module
says so, so the console, results.md and the plots can say it plainly instead of presenting noise as results.

The rule (`busy_reasons`): a section is unreliable when any timed figure's median over its repeats exceeds its
fastest repeat by more than `SPREAD_LIMIT` times, or when other processes used more than `OTHERS_CPU_PER_CORE` x the
cores over the section (the machine's CPU time from /proc/stat less the bench's own). Where /proc/stat is missing,
the load average less the bench's own CPU use is compared with `LOAD_PER_CORE` x the cores instead; it overstates
others' load, because the load average counts every runnable thread of the bench's own thread pools.
"""
from __future__ import annotations

import os
import statistics
import time

# median/min of a figure's repeats: competition for the cores slows the typical repeat, not just a few. Not max/min:
# the slowest of many repeats grows with their number, and single hiccups (page faults, a timer, the host) that do
# not move the median are common. On 2026-12-02, with other processes at 0.01-0.04 cores for the whole bench, a
# training step's 30 repeats had max/min 1.35-2.14 but median/min 1.05-1.22.
SPREAD_LIMIT = 1.3
LOAD_PER_CORE = 0.75  # other runnable processes per core beyond which the bench's threads queue for the CPU
OTHERS_CPU_PER_CORE = 0.25  # cores' worth of CPU time other processes may use before the bench's timings suffer


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


def machine_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (user, nice, system, irq, softirq, steal of /proc/stat's
    `cpu` line), or None where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class SectionLoad:
    """The load around one bench section: `start()` before it, `finish()` after it returns {'load_before',
    'load_after', 'own_cpu' (the bench's own CPU use over the section, in cores), 'others_cpu' (the machine's CPU
    use less the bench's own, in cores, at least 0; None without /proc/stat), 'others_load' (load_after less
    own_cpu, at least 0: a coarser estimate; None without a load average)}."""

    def start(self) -> "SectionLoad":
        self.load_before, self.cpu, self.wall = load_average(), cpu_seconds(), time.perf_counter()
        self.machine = machine_cpu_seconds()
        return self

    def finish(self) -> dict:
        wall = max(time.perf_counter() - self.wall, 1e-9)
        own_s = cpu_seconds() - self.cpu
        own, after, machine = own_s / wall, load_average(), machine_cpu_seconds()
        others_cpu = None if machine is None or self.machine is None else max(machine - self.machine - own_s, 0) / wall
        return {"load_before": self.load_before, "load_after": after, "own_cpu": round(own, 2),
                "others_cpu": None if others_cpu is None else round(others_cpu, 2),
                "others_load": None if after is None else round(max(after - own, 0.0), 2)}


def busy_reasons(spreads: dict[str, dict], load: dict, cpu_count: int) -> list[str]:
    """Why a section's timings are unreliable, one phrase per reason ([] = no sign of a busy machine).

    spreads: {figure name: `spread(...)`} of the section's timed figures; load: `SectionLoad.finish()`'s dict."""
    reasons = [f"{name}'s median repeat took {s['median'] / s['min']:.2f}x its fastest (median/min > {SPREAD_LIMIT})"
               for name, s in spreads.items() if s["min"] > 0 and s["median"] / s["min"] > SPREAD_LIMIT]
    if load.get("others_cpu") is not None:
        limit = OTHERS_CPU_PER_CORE * cpu_count
        if load["others_cpu"] > limit:
            reasons.append(f"other processes used {load['others_cpu']} cores > {limit:g} ({OTHERS_CPU_PER_CORE} x "
                           f"{cpu_count} cores)")
        return reasons
    limit = LOAD_PER_CORE * cpu_count
    if load.get("others_load") is not None and load["others_load"] > limit:
        reasons.append(f"load average {load['load_after']} less the bench's own {load['own_cpu']} cores = "
                       f"{load['others_load']} > {limit:g} ({LOAD_PER_CORE} x {cpu_count} cores)")
    return reasons


def busy_warning(reasons: list[str], marked: bool = True) -> str:
    """The one plain sentence the console and results.md print above a busy section's figures ('' when quiet);
    `marked`: the section's ratios carry a '?' (the bench's tables; serve_ab's lines do not)."""
    if not reasons:
        return ""
    return (f"BUSY MACHINE: these timings are unreliable and their ratios{' (marked ?)' if marked else ''} should "
            f"not be compared: " + "; ".join(reasons))
