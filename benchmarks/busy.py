"""How busy the machine was during a timed window, and with what.

A comparison that runs its configurations one after the other on a shared
machine can be slowed, one configuration and not the next, by work that is
not its own. :class:`BusyMeter` reads, at the start and end of a window, the
CPU time of the whole machine (``/proc/stat``), of the measured process trees
(e.g. a server and its children) and of this process (the load generator), so
a figure can carry how much of the machine *other* work took while it was
measured. Linux only; elsewhere the figures are None.
"""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float | None:
    """CPU seconds all CPUs spent not idle since boot (user, nice, system, irq,
    softirq, steal; iowait counts as idle)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


class BusyMeter:
    """``start()`` then ``stop()`` around a window; ``stop()`` returns the
    window's wall seconds, the CPU seconds of the measured trees (``pids``) and
    of this process, what the rest of the machine used (``others_cpu_s``), that
    as a share of all CPUs over the window, and the 1-min load average at both
    ends."""

    def __init__(self, pids: list[int]):
        self.pids = list(pids)

    def _sample(self) -> dict:
        return {"t": time.monotonic(), "machine": machine_busy_s(),
                "trees": sum(tree_cpu_s(p) for p in self.pids),
                "self": time.process_time(), "load": _loadavg()}

    def start(self) -> None:
        self.a = self._sample()

    def stop(self) -> dict:
        b, a = self._sample(), self.a
        wall = b["t"] - a["t"]
        trees, me = b["trees"] - a["trees"], b["self"] - a["self"]
        out = {"wall_s": round(wall, 2), "measured_cpu_s": round(trees, 1),
               "loadgen_cpu_s": round(me, 1), "others_cpu_s": None,
               "others_cpu_share": None, "load_avg_start": a["load"],
               "load_avg_end": b["load"]}
        if a["machine"] is not None and b["machine"] is not None and wall > 0:
            others = max(0.0, (b["machine"] - a["machine"]) - trees - me)
            out["others_cpu_s"] = round(others, 1)
            out["others_cpu_share"] = round(others / (wall * (os.cpu_count() or 1)), 3)
        return out


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
