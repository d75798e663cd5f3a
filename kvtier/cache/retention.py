"""What a request may ask of kvtier about how long its prefix should live.

A request carries ``kv_transfer_params: {"kvtier": {"ttl": "5m" | "1h" |
seconds, "pin": true | false}}`` (vLLM passes ``kv_transfer_params`` from the
OpenAI request body to the connector). The blocks it stores or hits get at least
that TTL, refreshed on every hit; the operator's ``ttl_seconds`` is the floor
and ``max_ttl_seconds`` the cap. ``pin`` keeps its blocks out of LRU eviction
until their TTL ends, within the operator's ``max_pinned_bytes`` (and per
``cache_salt`` tenant, ``max_pinned_bytes_per_tenant``); over budget the request
is served and the pin refused. A bad value is ignored (the request is served on
the defaults) and reported back in the response.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_UNIT = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


@dataclass(frozen=True)
class Retention:
    ttl: float          # seconds this request's blocks live after each use
    pin: bool           # keep them out of LRU eviction for that long
    asked: Any = None   # what the request asked for (reported back)
    error: str = ""     # why the request's value was not taken


def duration(value) -> float:
    """Seconds from ``300``, ``"300"``, ``"5m"``, ``"1h"``, ``"inf"``; ValueError else."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        seconds = math.inf
    else:
        m = _DURATION.match(value) if isinstance(value, str) else None
        if not m:
            raise ValueError(f"expected seconds or a duration such as '5m' or '1h', "
                             f"got {value!r}")
        seconds = float(m.group(1)) * _UNIT[m.group(2) and m.group(2).lower()]
    if not seconds > 0:
        raise ValueError(f"a TTL must be > 0, got {value!r}")
    return seconds


def retention_of(params: dict | None, default_ttl: float, max_ttl: float) -> Retention:
    """The retention a request's ``kv_transfer_params`` ask for, within the
    operator's bounds: TTL = clamp(asked, default_ttl, max_ttl)."""
    asked = (params or {}).get("kvtier") if isinstance(params, dict) else None
    if asked is None:
        return Retention(default_ttl, False)
    if not isinstance(asked, dict):
        return Retention(default_ttl, False, asked, "kvtier: expected an object with 'ttl' "
                         "and/or 'pin'")
    unknown = sorted(set(asked) - {"ttl", "pin"})
    if unknown:
        return Retention(default_ttl, False, asked, f"kvtier: unknown key(s) {unknown}; "
                         "accepted: 'ttl', 'pin'")
    pin = asked.get("pin", False)
    if not isinstance(pin, bool):
        return Retention(default_ttl, False, asked, f"kvtier 'pin': expected true or false, "
                         f"got {pin!r}")
    ttl = default_ttl
    if "ttl" in asked:
        try:
            ttl = duration(asked["ttl"])
        except ValueError as e:
            return Retention(default_ttl, False, asked, f"kvtier 'ttl': {e}")
    return Retention(min(max(ttl, default_ttl), max_ttl), pin, asked)
