"""One cache level: which keys it holds, LRU within a TTL under a capacity.

``Tier`` is one cache level: entries with a size and a last-use time, a
capacity, a TTL that runs from the last use, LRU eviction among unpinned
entries. The connector's scheduler half composes a DRAM tier (whose entries own
a DRAM slot) and a disk tier (kvtier.cache.ledger); the planner replays traces through the very same
class, so the planner's answers cannot drift from the product's behaviour.

Time is passed in (``now``), never read here: the connector passes wall-clock
time, the planner passes trace time. Calls must come in non-decreasing time.

Retention per entry: an entry may carry a TTL longer than the tier's (a request
that said how long it will be back: never shorter, so the tier's TTL is the
shortest and LRU order still bounds the expiry scan), and may be *kept* until a
time: out of LRU eviction until then (a pinned prefix). A kept entry still
expires at the end of its TTL.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

EVICT_CAPACITY = "capacity"
EVICT_TTL = "ttl"
EVICT_DROPPED = "dropped"   # removed on purpose (failed read, reset)


@dataclass
class Entry:
    size: int
    last_use: float
    pins: int = 0
    value: Any = None       # tier-specific payload (e.g. the DRAM slot)
    ttl: float = 0.0        # > the tier's: this entry's own TTL (0: the tier's)
    keep_until: float = -math.inf   # not evicted by LRU before this time
    # Moved to the MRU end unused (a kept entry an eviction scan passed): it
    # expires here all the same, whatever its place (math.inf: no such move).
    deadline: float = math.inf


@dataclass
class TierStats:
    hits: int = 0
    inserts: int = 0
    inserted: float = 0     # the sizes inserted, summed
    evictions: dict[str, int] = field(default_factory=lambda: {EVICT_CAPACITY: 0, EVICT_TTL: 0,
                                                               EVICT_DROPPED: 0})
    rejected: int = 0       # inserts refused: no room that could be freed


EvictHook = Callable[[Hashable, Entry, str], None]


class Tier:
    """An LRU-within-TTL cache of keys with sizes, under a capacity."""

    def __init__(self, name: str, capacity: float, ttl: float = math.inf,
                 on_evict: EvictHook | None = None):
        if capacity < 0:
            raise ValueError(f"tier {name}: capacity must be >= 0")
        if not ttl > 0:
            raise ValueError(f"tier {name}: ttl must be > 0")
        self.name = name
        self.capacity = capacity
        self.ttl = ttl
        self.used = 0
        self.stats = TierStats()
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()  # LRU first
        self._on_evict = on_evict
        self._clock = -math.inf
        self._quiet_until = -math.inf   # expire() finds nothing before this time
        # (deadline, seq, key, entry) of entries moved unused (make_room); stale
        # items (used, removed since) are dropped when they come up.
        self._deadlines: list[tuple[float, int, Hashable, Entry]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> Iterable[Hashable]:
        return self._entries.keys()

    def _advance(self, now: float) -> float:
        if now > self._clock:
            self._clock = now
        return self._clock

    def ttl_of(self, entry: Entry) -> float:
        return entry.ttl if entry.ttl > self.ttl else self.ttl

    def expired(self, entry: Entry, now: float) -> bool:
        return entry.pins == 0 and (now - entry.last_use >= self.ttl_of(entry)
                                    or now >= entry.deadline)

    def get(self, key: Hashable, now: float) -> Entry | None:
        """The live entry for ``key`` (None if absent or expired; expired ones go)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.expired(entry, self._advance(now)):
            self._remove(key, EVICT_TTL)
            return None
        return entry

    def live(self, key: Hashable, now: float) -> Entry | None:
        """The entry for ``key`` unless absent or expired; changes nothing (the
        hot path of lookups: expired entries go in ``get``/``expire``)."""
        entry = self._entries.get(key)
        return entry if entry is not None and not self.expired(entry, now) else None

    def all_live(self, now: float) -> bool:
        """No entry is expired at ``now``: the least recently used one was used
        within the TTL (entries are in last-use order; the tier's TTL is the
        shortest), and no entry moved unused has reached its deadline. O(1)
        (amortized)."""
        for entry in self._entries.values():
            if now - entry.last_use >= self.ttl:
                return False
            break
        return self._next_deadline() > now

    def _next_deadline(self) -> float:
        """The earliest deadline of an entry moved unused (stale items dropped)."""
        heap = self._deadlines
        while heap:
            d, _, key, entry = heap[0]
            if entry.deadline == d and self._entries.get(key) is entry:
                return d
            heapq.heappop(heap)
        return math.inf

    def peek(self, key: Hashable) -> Entry | None:
        return self._entries.get(key)

    def touch(self, key: Hashable, now: float, ttl: float = 0.0) -> bool:
        """A use: the entry's last use is now (its TTL restarts), LRU position
        last; ``ttl``: at least this TTL from now on."""
        entry = self.get(key, now)
        if entry is None:
            return False
        entry.last_use = self._clock
        entry.deadline = math.inf   # used: its TTL runs from now
        if ttl > entry.ttl:
            entry.ttl = ttl
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return True

    def pin(self, key: Hashable) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: Hashable) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def make_room(self, size: int, now: float) -> bool:
        """Evict expired, then LRU unpinned entries not kept until ``size`` fits.

        A kept entry the scan walks past moves to the MRU end, so the next scans
        do not walk it again (left at the LRU end, 20,000 kept records made every
        write into a full disk tier walk all of them: 2.2 ms a record). Its last
        use becomes now (LRU order stays last-use order) and it expires when it
        would have where it was (``deadline``)."""
        now = self._advance(now)
        self.expire(now)
        if size > self.capacity:
            return False
        if self.used + size <= self.capacity:
            return True
        victims = []
        kept = []
        freed = 0
        for key, entry in self._entries.items():
            if entry.pins:
                continue
            if entry.keep_until > now:
                kept.append(key)
                continue
            victims.append(key)
            freed += entry.size
            if self.used - freed + size <= self.capacity:
                break
        for key in kept:
            entry = self._entries[key]
            end = entry.last_use + self.ttl_of(entry)
            if end < entry.deadline:
                entry.deadline = end
                heapq.heappush(self._deadlines, (end, next(self._seq), key, entry))
            entry.last_use = now
            self._entries.move_to_end(key)
        if self.used - freed + size > self.capacity:
            return False
        for key in victims:
            self._remove(key, EVICT_CAPACITY)
        return True

    def add(self, key: Hashable, size: int, now: float, value: Any = None,
            pinned: bool = False, evict: bool = True, ttl: float = 0.0) -> Entry | None:
        """Insert (or refresh) ``key``; None when no room can be made (``evict=False``:
        when it does not fit as things are). ``ttl``: at least this TTL."""
        now = self._advance(now)
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_use = now
            entry.deadline = math.inf   # used: its TTL runs from now
            if ttl > entry.ttl:
                entry.ttl = ttl
            self._entries.move_to_end(key)
            if pinned:
                entry.pins += 1
            return entry
        fits = self.make_room(size, now) if evict else self.used + size <= self.capacity
        if not fits:
            self.stats.rejected += 1
            return None
        entry = Entry(size=size, last_use=now, pins=1 if pinned else 0, value=value, ttl=ttl)
        self._entries[key] = entry
        self.used += size
        self.stats.inserts += 1
        self.stats.inserted += size
        return entry

    def discard(self, key: Hashable, cause: str = EVICT_DROPPED) -> None:
        if key in self._entries:
            self._remove(key, cause)

    def detach(self, key: Hashable, cause: str | None = EVICT_DROPPED) -> Entry:
        """Take ``key`` out of the tier, pinned or not, without the eviction hook: the
        caller now owns what the entry held (and accounts for it). ``cause`` None:
        not an eviction (not counted)."""
        entry = self._entries.pop(key)
        self.used -= entry.size
        if cause is not None:
            self.stats.evictions[cause] = self.stats.evictions.get(cause, 0) + 1
        return entry

    def expire(self, now: float) -> int:
        """Drop unpinned entries idle for >= their TTL. Cost: O(expired + pinned or
        longer-lived entries at the head), and nothing until one of those may
        expire (a walk of 20,000 longer-lived entries at every write took 2 ms):
        the walk notes the earliest time any entry may expire (``_quiet_until``;
        one added later: a TTL from now at least). Touches and pins only delay
        expiry; a pinned entry past its TTL is walked again at every call."""
        if math.isinf(self.ttl):
            return 0
        now = self._advance(now)
        if now < self._quiet_until:
            return 0
        gone = {}
        quiet = now + self.ttl
        for key, entry in self._entries.items():
            if now - entry.last_use < self.ttl:
                quiet = min(quiet, entry.last_use + self.ttl)
                break   # LRU order = last-use order, the tier's TTL the shortest
            end = min(entry.last_use + self.ttl_of(entry), entry.deadline)
            if now >= end and not entry.pins:
                gone[key] = True
            else:
                quiet = min(quiet, end)
        held = []   # past their deadline, pinned: again at the next call
        while self._next_deadline() <= now:
            item = heapq.heappop(self._deadlines)
            if item[3].pins:
                held.append(item)
            else:
                gone[item[2]] = True
        for item in held:
            heapq.heappush(self._deadlines, item)
        self._quiet_until = min(quiet, self._next_deadline())
        for key in gone:
            self._remove(key, EVICT_TTL)
        return len(gone)

    def _remove(self, key: Hashable, cause: str) -> None:
        entry = self._entries.pop(key)
        self.used -= entry.size
        self.stats.evictions[cause] = self.stats.evictions.get(cause, 0) + 1
        if self._on_evict is not None:
            self._on_evict(key, entry, cause)
