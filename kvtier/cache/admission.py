"""Disk admission: which blocks get a disk record, and when.

Every disk write costs NVMe bandwidth and endurance; a block that is never used
again gains nothing from its record. The policies (``disk_admission``):

- ``write_through``: every new block is written when it is stored in DRAM.
  Durable at once (a restart finds every block), the most bytes written.
- ``second_use``: a block is written on its second use (stored or hit again
  within its TTL); a block used once stays in DRAM only. A restart loses the
  blocks seen once.
- ``on_dram_evict``: write-back. A block is written when DRAM is about to evict
  it while it is still within its TTL; blocks that expire in DRAM or are used
  again and again from DRAM are never written. A restart loses what DRAM held
  and had not written.

The scheduler and the planner (``kvtier plan --disk-admission``) ask the same
object, so what an operator sizes is what runs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Hashable

from kvtier.config import DISK_ADMISSIONS as POLICIES


class DiskAdmission:
    """The policy's answers. ``remember``: how many once-used keys ``second_use``
    keeps in mind (oldest forgotten first), each for at most ``ttl`` seconds."""

    def __init__(self, policy: str = "write_through", ttl: float = math.inf,
                 remember: int = 1 << 20):
        if policy not in POLICIES:
            raise ValueError(f"disk_admission must be one of {', '.join(POLICIES)}, "
                             f"not {policy!r}")
        self.policy = policy
        self.ttl = ttl
        self.remember = max(1, int(remember))
        self._seen: OrderedDict[Hashable, float] = OrderedDict()   # key -> last use

    @property
    def writes_back(self) -> bool:
        """Blocks are written when DRAM is about to evict them."""
        return self.policy == "on_dram_evict"

    def at_store(self, key: Hashable, now: float) -> bool:
        """A new block enters DRAM: write its record now?"""
        if self.policy == "write_through":
            return True
        if self.policy == "second_use":
            return self._used_before(key, now)
        return False

    def at_hit(self, key: Hashable, now: float) -> bool:
        """A block in DRAM without a record is used again: write it now?"""
        if self.policy == "second_use":
            self._seen.pop(key, None)
            return True
        return False

    def at_dram_evict(self, expired: bool) -> bool:
        """DRAM evicts (or is about to evict) a block without a record: write it?"""
        return self.policy == "on_dram_evict" and not expired

    def _used_before(self, key: Hashable, now: float) -> bool:
        last = self._seen.pop(key, None)
        if last is not None and now - last < self.ttl:
            return True
        self._seen[key] = now
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return False
