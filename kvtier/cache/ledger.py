"""The block lifecycle: the one place that knows what kvtier holds, and where.

Each (key, tier) is one ``Block`` in one state; states change only through
the transitions below, each a method. No vLLM, no I/O, no clock: time is
passed in, file work is handed out (``take_removals``).

DRAM blocks (each owns exactly one slot of the host pool)::

    absent --begin_store--> STORING --end_store(ok)--> READY
                                    --end_store(fail)--> dropped
    absent --begin_stage--> STAGING --end_stage(ok)--> READY   (a disk read, promoted)
                                    --end_stage(fail)--> dropped
    READY --LRU / TTL eviction (unpinned only), drop--> gone

Disk blocks (one record per TP rank)::

    absent --begin_write--> WRITING --end_write(ok)--> READY
                                    --end_write(fail)--> removing
    absent --adopt--> READY          (recovery; another process's record)
    READY --TTL eviction, drop--> removing --removed--> absent
    READY --LRU eviction for a write--> handed over: the write reuses the file

Readers pin a block *object* (never a key): a load's scatter pins its DRAM
block, a disk read its disk block, a disk write the DRAM block it reads. An
in-flight fill (STORING, STAGING, WRITING) holds a pin of its own. Pinned
blocks are never evicted. Dropping a pinned block *detaches* it: it leaves the
index at once (never served again; the key may be stored anew) and its slot or
file is released with its last pin. Released slots and files stay counted
against the capacity until they are really free, so neither budget is ever
exceeded: a DRAM slot has one owner at a time, and the disk holds at most
``disk_capacity`` bytes of records, pending removals included.

A disk write that needs room takes over the file of the block it evicts (the
worker renames it and writes over it): no unlink, no new allocation, and the
file count never goes over the budget. Keys being removed or handed over are
not written or adopted again until that is done.

Retention (what a request asked for, kvtier.cache.retention): a block may get a
TTL longer than the tier's (``ttl=`` of begin_store/begin_write/touch), and a
*kept* record stays out of LRU eviction until a time (``keep``), within a
budget of kept bytes overall and per tenant; over budget the keep is refused.
Keeps apply to the disk tier (the tier that holds a prefix for an hour), or to
DRAM when there is no disk tier.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

from kvtier.cache.tier import EVICT_CAPACITY, EVICT_DROPPED, EVICT_TTL, Entry, Tier

NO_SLOT = -1


class State(enum.Enum):
    STORING = "storing"   # DRAM: a GPU->slot copy in flight
    STAGING = "staging"   # DRAM: a disk->slot read in flight
    WRITING = "writing"   # disk: a slot->file write in flight
    READY = "ready"       # every rank confirmed the bytes


@dataclass(eq=False)
class Block:
    """One key in one tier. Identity matters: pins and results refer to this object.
    Its pins live on its tier entry (``Tier`` evicts only unpinned entries)."""
    key: bytes
    state: State
    entry: Entry = field(repr=False)
    slot: int = NO_SLOT            # DRAM: the slot it owns
    detached: bool = False         # dropped while pinned: out of the index
    touched: float = -math.inf     # disk: the record's mtime as last set
    reuse: bytes | None = None     # disk, WRITING: the evicted key whose file it takes over
    ext: object = None             # the caller's name for the block (e.g. vLLM's block hash)
    remote: bool = False           # disk: adopted from the cluster tier, not read here yet

    @property
    def tier(self) -> str:
        """"dram" (it owns a slot) or "disk"."""
        return "dram" if self.slot != NO_SLOT else "disk"

    @property
    def pins(self) -> int:
        """Readers, plus one while a fill (store, stage, write) is in flight."""
        return self.entry.pins

    @pins.setter
    def pins(self, n: int) -> None:
        self.entry.pins = n


@dataclass
class LedgerStats:
    dropped: dict[str, int] = field(default_factory=lambda: {"dram": 0, "disk": 0})
    handovers: int = 0


class Ledger:
    """DRAM slots and disk records: states, pins, LRU within TTL, budgets."""

    def __init__(self, num_slots: int, disk_bytes: int, record_size: int,
                 ttl: float = math.inf, file_touch_every: float = 60.0,
                 max_kept_bytes: float = 0, max_kept_bytes_per_tenant: float = 0):
        if num_slots < 1:
            raise ValueError("the DRAM tier needs at least one slot")
        self.num_slots = num_slots
        self.record_size = record_size
        self.file_touch_every = file_touch_every
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self.dram = Tier("dram", num_slots, ttl, on_evict=self._dram_evicted)
        self.disk: Tier | None = None
        if disk_bytes > 0:
            self.disk = Tier("disk", disk_bytes, ttl, on_evict=self._disk_evicted)
        self.disk_budget = disk_bytes
        self.held_slots = 0           # slots of detached blocks and scratch
        self.held_disk = 0            # bytes of detached blocks and pending removals
        self._removing: dict[bytes, int] = {}    # key -> bytes, queued for the sweeper
        self._handover: dict[bytes, bytes] = {}  # evicted key -> key whose write reuses it
        self._evicting_for: bytes | None = None  # a write making room: gets the victim's file
        self._victim: bytes | None = None
        self._removals: list[bytes] = []         # new removals for the sweeper
        self.max_kept = max_kept_bytes
        self.max_kept_tenant = max_kept_bytes_per_tenant or max_kept_bytes
        self.kept_bytes = 0.0
        self._kept: dict[bytes, tuple[str, Entry]] = {}   # key -> (tenant, entry) kept
        self._kept_by_tenant: dict[str, float] = {}
        # When kept entries may end: (keep_until when pushed, seq, key, entry), one
        # per kept entry (a longer keep is found at its pop and pushed again).
        self._keep_ends: list[tuple[float, int, bytes, Entry]] = []
        self._keep_seq = itertools.count()
        # Blocks that became READY in a tier, and blocks that left a tier's index,
        # since the last take_changes(): (tier, block). Off unless ``track = True``.
        self.track = False
        self._changes: list[tuple[bool, str, Block]] = []
        # What a load can read, by tier and key: DRAM blocks READY or STAGING, disk
        # blocks READY (each in its tier's index). Kept by the transitions below
        # (_arrived, _left), checked by check(): lookups map keys through it in bulk.
        self._servable: dict[str, dict[bytes, Block]] = {"dram": {}, "disk": {}}
        self.stats = LedgerStats()

    # ----------------------------------------------------------------- queries
    def dram_block(self, key: bytes, now: float) -> Block | None:
        """The live DRAM block of ``key`` (READY or STAGING), expiring it if due."""
        e = self.dram.get(key, now)
        return None if e is None else e.value

    def disk_block(self, key: bytes, now: float) -> Block | None:
        if self.disk is None:
            return None
        e = self.disk.get(key, now)
        return None if e is None else e.value

    def locate(self, key: bytes, now: float) -> tuple[str, Block] | None:
        """Where a load of ``key`` can come from, and the block it reads: "dram"
        (READY, or STAGING: the load joins the read in flight) or "disk" (READY)."""
        block = self.locate_many((key,), now)[0]
        if block is None:
            return None
        return block.tier, block

    def locate_many(self, keys, now: float) -> list[Block | None]:
        """The block ``locate`` finds for each key (its tier: a DRAM block owns a
        slot), the hot path of every lookup (a few per block): the servable
        blocks' index mapped over the keys. When a tier's least recently used
        entry is live, all of its entries are (LRU order is last-use order; the
        tier's TTL the shortest): no TTL check per key."""
        dram, disk = self.dram, self.disk
        found = list(map(self._servable["dram"].get, keys))
        if not dram.all_live(now):
            expired = dram.expired
            found = [b if b is None or not expired(b.entry, now) else None for b in found]
        if disk is not None and None in found:
            kget, kfresh, expired = self._servable["disk"].get, disk.all_live(now), disk.expired
            found = [b if b is not None else d if (d := kget(k)) is None or kfresh
                     or not expired(d.entry, now) else None
                     for b, k in zip(found, keys)]
        return found

    def servable(self, key: bytes, now: float) -> str | None:
        """The tier ``locate`` would load ``key`` from, or None."""
        where = self.locate(key, now)
        return where[0] if where else None

    def writable(self, key: bytes) -> bool:
        """A new record of ``key`` may be written (nothing of it is in flight)."""
        return (self.disk is not None and key not in self.disk and key not in self._removing
                and key not in self._handover)

    def removing(self, key: bytes) -> bool:
        """``key``'s old record is on its way out (a removal or a handover in
        flight): a new one may be written once that is done."""
        return key in self._removing or key in self._handover

    # ------------------------------------------------------------------- pins
    def pin(self, block: Block) -> Block:
        block.pins += 1
        return block

    def unpin_dram(self, block: Block) -> None:
        assert block.pins > 0, block
        block.pins -= 1
        if block.pins == 0 and block.detached:
            self._give_slot(block.slot)
            self.held_slots -= 1
            self._fit_dram()

    def unpin_disk(self, block: Block) -> None:
        assert block.pins > 0, block
        block.pins -= 1
        if block.pins == 0 and block.detached:
            self.held_disk -= self.record_size   # moves to _removing (held there)
            self._queue_removal(block.key)

    # ------------------------------------------------------------------ DRAM
    def _take_slot(self) -> int:
        return self._free_slots.pop()

    def _give_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    def _fit_dram(self) -> None:
        self.dram.capacity = self.num_slots - self.held_slots

    def _dram_evicted(self, key, entry: Entry, cause: str) -> None:
        # Only unpinned READY blocks are evicted (fills hold a pin).
        self._unkeep(key, entry)
        self._left("dram", entry.value)
        self._give_slot(entry.value.slot)

    def _new_dram(self, key: bytes, state: State, now: float, ttl: float = 0.0) -> Block | None:
        if key in self.dram:
            return None
        entry = self.dram.add(key, 1, now, value=None, pinned=True, ttl=ttl)
        if entry is None:
            return None
        entry.value = Block(key, state, entry, slot=self._take_slot())
        if state is State.STAGING:   # a load may join the read in flight (not READY)
            self._arrived("dram", entry.value, announce=False)
        return entry.value

    def begin_store(self, key: bytes, now: float, ttl: float = 0.0) -> Block | None:
        """absent -> STORING: a slot for a GPU->DRAM copy (None: no room / present)."""
        return self._new_dram(key, State.STORING, now, ttl)

    def end_store(self, block: Block, ok: bool) -> None:
        assert block.state is State.STORING
        self._end_fill(block, ok)

    def begin_stage(self, key: bytes, now: float) -> Block | None:
        """absent -> STAGING: a slot a disk read fills, then READY in DRAM."""
        return self._new_dram(key, State.STAGING, now)

    def end_stage(self, block: Block, ok: bool) -> None:
        assert block.state is State.STAGING
        self._end_fill(block, ok)

    def _end_fill(self, block: Block, ok: bool) -> None:
        if ok:
            block.state = State.READY
            self._arrived("dram", block)
        else:
            self.drop_dram(block)
        self.unpin_dram(block)   # the fill's own pin

    def drop_dram(self, block: Block) -> None:
        """Never serve this block again; its slot is free once unpinned."""
        if block.detached:
            return
        entry = self.dram.peek(block.key)
        if entry is None or entry.value is not block:
            return
        self.stats.dropped["dram"] += 1
        if block.pins == 0:
            self.dram.discard(block.key, EVICT_DROPPED)
            return
        self._unkeep(block.key, self.dram.detach(block.key, EVICT_DROPPED))
        self._left("dram", block)
        block.detached = True
        self.held_slots += 1
        self._fit_dram()

    def take_scratch(self, n: int, now: float) -> list[int]:
        """Up to ``n`` slots owned by the caller (a streamed load), evicting LRU blocks."""
        out = []
        while len(out) < n and self.dram.make_room(1, now):
            out.append(self._take_slot())
            self.held_slots += 1
            self._fit_dram()
        return out

    def give_scratch(self, slots: list[int]) -> None:
        for s in slots:
            self._give_slot(s)
        self.held_slots -= len(slots)
        self._fit_dram()

    # ------------------------------------------------------------------ disk
    def _disk_evicted(self, key, entry: Entry, cause: str) -> None:
        block: Block = entry.value
        self._unkeep(key, entry)
        self._left("disk", block)
        if cause == EVICT_CAPACITY and self._evicting_for is not None and self._victim is None:
            self._victim = key   # the write making room takes this file over
            self._handover[key] = self._evicting_for
            self.stats.handovers += 1
            return
        self._queue_removal(block.key)

    def _queue_removal(self, key: bytes, hold: bool = True) -> None:
        """Hand ``key``'s records to the sweeper; their bytes stay counted until it is
        done (``hold=False``: bytes beyond the budget found at start-up)."""
        size = self.record_size if hold else 0
        self._removing[key] = self._removing.get(key, 0) + size
        self.held_disk += size
        self._fit_disk()
        self._removals.append(key)

    def _fit_disk(self) -> None:
        self.disk.capacity = max(0, self.disk_budget - self.held_disk)

    def begin_write(self, key: bytes, now: float,
                    ttl: float = 0.0) -> tuple[Block | None, bytes | None]:
        """absent -> WRITING: reserve a record of ``key``; (block, key of the evicted
        record whose file the write takes over, or None). (None, None): no room."""
        if not self.writable(key):
            return None, None
        self._evicting_for, self._victim = key, None
        try:
            entry = self.disk.add(key, self.record_size, now, pinned=True, ttl=ttl)
        finally:
            victim, self._evicting_for, self._victim = self._victim, None, None
        if entry is None:
            return None, None
        entry.value = Block(key, State.WRITING, entry, touched=now, reuse=victim)
        return entry.value, victim

    def end_write(self, block: Block, ok: bool) -> None:
        """WRITING -> READY, or the record (any rank's) is removed. Every rank has
        consumed the handed-over file by now (written over, or removed)."""
        assert block.state is State.WRITING
        if block.reuse is not None:
            self._handover.pop(block.reuse, None)
            block.reuse = None
        if ok:
            block.state = State.READY
            self._arrived("disk", block)
        else:
            self.drop_disk(block)
        self.unpin_disk(block)

    def adopt(self, key: bytes, mtime: float, now: float, remote: bool = False) -> Block | None:
        """A record another process published (shared store; ``remote``: the cluster
        tier, read through to this disk tier at its first load) -> READY, if it is
        within its TTL and fits without evicting anything (lookups must not evict
        what they found: ``make_disk_room`` keeps room, between lookups)."""
        if not self.writable(key) or now - mtime >= self.disk.ttl:
            return None
        entry = self.disk.add(key, self.record_size, now, evict=False)
        if entry is None:
            return None
        entry.value = Block(key, State.READY, entry, touched=mtime, remote=remote)
        self._arrived("disk", entry.value, announce=False)
        return entry.value

    def forget_adopted(self, block: Block) -> None:
        """A block adopted from the cluster tier that no load will read (not in the
        hit, or the hit not taken): out of the index, as if never adopted (it has no
        file here), so the request that computes it stores it."""
        if block.remote and block.pins == 0 and not block.detached and self.disk is not None:
            entry = self.disk.peek(block.key)
            if entry is not None and entry.value is block:
                self.disk.detach(block.key, None)
                self._left("disk", block, announce=False)
                block.detached = True

    def make_disk_room(self, records: int, now: float) -> bool:
        """Evict (LRU, unpinned) until ``records`` more records fit: room for the next
        lookups' adoptions. Call it where no lookup holds unpinned blocks."""
        return self.disk.make_room(min(records, int(self.disk.capacity // self.record_size))
                                   * self.record_size, now)

    def recover(self, mtimes: dict[bytes, float], now: float) -> tuple[int, int]:
        """Rebuild the disk index at start-up from ``{key: mtime}`` of the records
        every rank holds: the most recently used that fit, in LRU order; the
        expired and the excess go to the sweeper. Returns (expired, excess).
        An mtime in the future counts as now (it must not push the clock ahead)."""
        order = sorted(mtimes, key=mtimes.__getitem__, reverse=True)   # newest first
        keep, expired, excess, room = [], 0, 0, self.disk.capacity
        for key in order:
            mtime = min(mtimes[key], now)
            if now - mtime >= self.disk.ttl:
                expired += 1
            elif room >= self.record_size:
                keep.append((key, mtime))
                room -= self.record_size
                continue
            else:
                excess += 1
            self._queue_removal(key, hold=False)
        for key, mtime in reversed(keep):   # oldest first: LRU order
            entry = self.disk.add(key, self.record_size, mtime, evict=False)
            entry.value = Block(key, State.READY, entry, touched=mtime)
            self._arrived("disk", entry.value, announce=False)
        self.disk.stats.evictions[EVICT_TTL] += expired
        self.disk.stats.evictions[EVICT_CAPACITY] += excess
        return expired, excess

    def drop_disk(self, block: Block) -> None:
        """Never serve this record again; its files go once unpinned."""
        if block.detached or self.disk is None:
            return
        entry = self.disk.peek(block.key)
        if entry is None or entry.value is not block:
            return
        self.stats.dropped["disk"] += 1
        self._unkeep(block.key, self.disk.detach(block.key, EVICT_DROPPED))
        self._left("disk", block)
        block.detached = True
        if block.pins == 0:
            self._queue_removal(block.key)
        else:   # its files stay until the last reader is done
            self.held_disk += self.record_size
            self._fit_disk()

    def set_disk_budget(self, nbytes: int, now: float) -> int:
        """Change the disk budget at run time (a shared store's share of its budget,
        kvtier.store.budget): a smaller one evicts least recently used records now
        (they stay counted, as pending removals, until the sweeper has removed them:
        only then does the ledger fit the new budget); pinned ones stay until
        unpinned, and kept ones (retention) until their keep ends, so the budget set
        is at least what pinned, kept and held records take. Returns the budget set."""
        if self.disk is None:
            return 0
        nbytes = int(nbytes)
        if nbytes < self.disk.used + self.held_disk:
            self._expire_keeps(now)
            stay = sum(e.size for e in self.disk._entries.values()
                       if e.pins or e.keep_until > now)
            nbytes = max(nbytes, stay + self.held_disk)
        self.disk_budget = nbytes
        self._fit_disk()
        self.disk.make_room(0, now)
        return self.disk_budget

    def hold_disk(self, nbytes: int) -> None:
        """Count (or, negative, stop counting) bytes on disk that are no record of
        this ledger's, e.g. temp files found at start-up."""
        self.held_disk += nbytes
        self._fit_disk()

    def _arrived(self, tier: str, block: Block, announce: bool = True) -> None:
        """``block`` can be loaded from ``tier`` now (READY; in DRAM also STAGING):
        into the servable index, and (``announce``) a KV event. A block dropped
        while its fill was in flight (detached) never is."""
        if block.detached:
            return
        self._servable[tier][block.key] = block
        if announce and self.track:
            self._changes.append((True, tier, block))

    def _left(self, tier: str, block: Block, announce: bool = True) -> None:
        """``block`` left ``tier``'s index: out of the servable index, and
        (``announce``) a KV event if it was READY there."""
        index = self._servable[tier]
        if index.get(block.key) is block:
            del index[block.key]
        if announce and self.track and block.state is State.READY:
            self._changes.append((False, tier, block))

    def take_changes(self) -> list[tuple[bool, str, Block]]:
        """(became ready, tier, block) since the last call: True when the block
        became READY in the tier, False when a READY block left it."""
        out, self._changes = self._changes, []
        return out

    def dirty_lru(self, window: int, now: float) -> list[bytes]:
        """Keys of READY DRAM blocks among the ``window`` next in line for eviction
        (LRU first; free slots are taken before anything is evicted) that have no
        disk record and may get one: write-back's due list. Runs every step: the
        window's keys with a record are passed over in C (5 ms a step for a
        4,096-block window in a Python loop)."""
        window -= len(self._free_slots)
        if window <= 0 or self.disk is None:
            return []
        entries = self.dram._entries
        head = itertools.islice(entries, window)
        out = []
        for key in itertools.filterfalse(self.disk._entries.__contains__, head):
            entry = entries[key]
            if entry.value.state is State.READY and not self.dram.expired(entry, now) \
                    and self.writable(key):
                out.append(key)
        return out

    def take_removals(self) -> list[bytes]:
        """Keys whose records the sweeper must remove (then call ``removed``)."""
        out, self._removals = self._removals, []
        return out

    def removed(self, key: bytes) -> None:
        """The sweeper removed every rank's record of ``key``."""
        size = self._removing.pop(key, 0)
        self.held_disk -= size
        self._fit_disk()

    def touch_due(self, block: Block, now: float) -> bool:
        """The record's mtime (its last use across restarts) needs refreshing."""
        if now - block.touched >= self.file_touch_every:
            block.touched = now
            return True
        return False

    # ------------------------------------------------------------ use & time
    def touch(self, key: bytes, now: float, ttl: float = 0.0) -> bool:
        """A use of ``key``: refresh its LRU position and TTL in every tier (at
        least ``ttl`` from now on)."""
        in_dram = self.dram.touch(key, now, ttl)
        in_disk = self.disk is not None and self.disk.touch(key, now, ttl)
        return in_dram or in_disk

    # ------------------------------------------------------------- retention
    def keep(self, key: bytes, until: float, tenant: str, now: float) -> bool | None:
        """Keep ``key``'s block out of LRU eviction until ``until`` (in the disk
        tier, or DRAM without one), within the kept-bytes budgets. True: kept;
        False: refused (over budget); None: no such block."""
        tier = self.disk if self.disk is not None else self.dram
        entry = tier.peek(key)
        if entry is None:
            return None
        if entry.keep_until >= until:
            return True
        self._expire_keeps(now)
        held = self._kept.get(key)
        need = 0 if held is not None else entry.size
        if need and (self.kept_bytes + need > self.max_kept
                     or self._kept_by_tenant.get(tenant, 0) + need > self.max_kept_tenant):
            return False
        entry.keep_until = until
        if held is None:
            self._kept[key] = (tenant, entry)
            heapq.heappush(self._keep_ends, (until, next(self._keep_seq), key, entry))
            self.kept_bytes += need
            self._kept_by_tenant[tenant] = self._kept_by_tenant.get(tenant, 0) + need
        return True

    def _unkeep(self, key, entry: Entry) -> None:
        held = self._kept.get(key)
        if held is None or held[1] is not entry:
            return
        del self._kept[key]
        tenant = held[0]
        self.kept_bytes -= entry.size
        self._kept_by_tenant[tenant] -= entry.size
        if self._kept_by_tenant[tenant] <= 0:
            del self._kept_by_tenant[tenant]

    def _expire_keeps(self, now: float) -> None:
        """Keeps whose time is over stop counting (their blocks stay, in LRU order).
        Costs what ends (a heap), not what is kept: keep() runs per block used."""
        ends = self._keep_ends
        while ends and ends[0][0] <= now:
            _, _, key, entry = heapq.heappop(ends)
            held = self._kept.get(key)
            if held is None or held[1] is not entry:
                continue   # unkept already (its block left the tier)
            if entry.keep_until <= now:
                self._unkeep(key, entry)
            else:          # kept longer since: ends later
                heapq.heappush(ends, (entry.keep_until, next(self._keep_seq), key, entry))

    def kept_by_tenant(self, now: float) -> dict[str, float]:
        self._expire_keeps(now)
        return dict(self._kept_by_tenant)

    def expire(self, now: float) -> None:
        self.dram.expire(now)
        if self.disk is not None:
            self.disk.expire(now)

    # ------------------------------------------------------------- invariants
    def blocks(self) -> Iterator[tuple[str, Block]]:
        for name, tier in (("dram", self.dram), ("disk", self.disk)):
            if tier is not None:
                for key in tier.keys():
                    yield name, tier.peek(key).value

    def check(self, live: Callable[[], Iterator[Block]] | None = None) -> None:
        """Assert the ledger's invariants (tests): slot ownership and budgets."""
        owned = [b.slot for _, b in self.blocks() if _ == "dram"]
        assert len(owned) == len(set(owned)), "a slot with two owners"
        assert not set(owned) & set(self._free_slots), "a free slot that is owned"
        assert len(owned) + len(self._free_slots) + self.held_slots == self.num_slots, \
            (len(owned), len(self._free_slots), self.held_slots, self.num_slots)
        assert self.dram.used <= self.dram.capacity
        if self.disk is not None:
            assert self.disk.used + self.held_disk <= self.disk_budget, \
                (self.disk.used, self.held_disk, self.disk_budget)
            assert self.held_disk >= sum(self._removing.values())
        for name, b in self.blocks():
            assert not b.detached and b.pins >= 0, b
        servable = {State.READY, State.STAGING}
        assert self._servable["dram"] == {b.key: b for t, b in self.blocks()
                                          if t == "dram" and b.state in servable}, "DRAM index"
        assert self._servable["disk"] == {b.key: b for t, b in self.blocks()
                                          if t == "disk" and b.state is State.READY}, "disk index"
        assert self.kept_bytes == sum(e.size for _, e in self._kept.values())
        assert self.kept_bytes <= self.max_kept
        for tenant, n in self._kept_by_tenant.items():
            assert n <= self.max_kept_tenant, (tenant, n)
