"""Where and when a benchmark figure was measured: date, commit, machine.

Every benchmark puts :func:`stamp` in its JSON output, so a figure copied into
the docs carries the date (UTC), the commit (``+dirty`` when tracked files
differ from it) and the machine it was measured on.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    head = _git("rev-parse", "--short=10", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return (f"{cpu_model()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, "
            f"Linux {platform.release()}")


def stamp() -> dict:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "commit": commit(), "machine": machine(),
            "load_avg_1min_at_start": None if load is None else round(load, 2)}


def line(st: dict) -> str:
    """One line for a table caption."""
    return f"{st['date_utc']} UTC, commit {st['commit']}, {st['machine']}"
