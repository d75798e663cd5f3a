"""Units: TTLs and capacities as the command line takes them, and as it prints them."""

from __future__ import annotations

import math
import re
from typing import Callable


from kvtier.plan.traces import PlanError

_BYTE_UNITS = {"b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
               "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}
_NUM_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_INF = ("inf", "infinite", "unbounded", "none", "∞")


def parse_ttl(text: str) -> float:
    """Seconds: ``60``, ``5m``, ``1h``, ``2d``, ``inf``."""
    t = text.strip().lower()
    if t in _INF:
        return math.inf
    m = _NUM_RE.match(t)
    mult = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    if not m or m.group(2) not in mult:
        raise PlanError(f"cannot read TTL {text!r}: use seconds, 5m, 1h or inf")
    v = float(m.group(1)) * mult[m.group(2)]
    if not v > 0:
        raise PlanError(f"TTL {text!r} must be > 0")
    return v


def parse_capacity(text: str, kv_bytes: int | None, plain: str = "tokens") -> float:
    """Tokens from ``5e6`` (a plain number: tokens, or bytes when ``plain == "bytes"``),
    ``5e6tok``, a byte size (``64GiB``, ``512MB``: needs the KV bytes per token) or ``inf``."""
    t = text.strip().lower()
    if t in _INF:
        return math.inf
    m = _NUM_RE.match(t)
    if not m:
        raise PlanError(f"cannot read size {text!r}")
    v, unit = float(m.group(1)), m.group(2)
    if unit in ("tok", "tokens") or (unit == "" and plain == "tokens"):
        return v
    if unit and unit not in _BYTE_UNITS:
        raise PlanError(f"cannot read size {text!r}: unknown unit {unit!r}")
    if not kv_bytes:
        raise PlanError(f"size {text!r} is in bytes: give --kv-bytes-per-token or --model-config")
    return float(math.floor(v * _BYTE_UNITS.get(unit, 1) / kv_bytes))


def _list(text: str, conv: Callable[[str], float]) -> list[float]:
    vals = [conv(x) for x in text.split(",") if x.strip()]
    if not vals:
        raise PlanError(f"empty list {text!r}")
    return vals


# --------------------------------------------------------------------------- output
def fmt_ttl(s: float | None) -> str:
    if s is None or math.isinf(s):
        return "inf"
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n and s % n == 0:
            return f"{s / n:g} {unit}"
    return f"{s:g} s"


def fmt_tokens(n: float | None) -> str:
    if n is None or math.isinf(n):
        return "unbounded"
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.3g}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float | None) -> str:
    if n is None or math.isinf(n):
        return "unbounded"
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"
