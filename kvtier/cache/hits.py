"""Finding a prefix hit: the longest run of a request's blocks that kvtier can
load, and what it needs block by block.

Every full-attention KV cache group needs each block of the hit; a sliding-
window group only the blocks its window sees at the hit's end. Blocks come from
the ledger (kvtier.cache.ledger: READY in DRAM, STAGING - a read in flight the
load joins -, READY on disk) or, on an index miss, from a probe of a shared
store. A tier whose load is measured slower than recomputing is not used
(kvtier.cache.cost). Pure: the caller passes the keys, the clock and the probe.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from kvtier.cache.cost import LoadCostModel
from kvtier.cache.groups import KVGroup
from kvtier.cache.ledger import Block, Ledger, State

DRAM, DISK, REMOTE = "dram", "disk", "remote"
ONES = b"\x01"
MISSED_PROBES_PER_LOOKUP = 4   # shared-store file checks that found nothing, per lookup


class Hit(NamedTuple):
    block: int      # index of the block in the request
    group: int      # KV cache group
    key: bytes      # the group's record key
    tier: str       # where the bytes come from: DRAM, DISK (a record, or a read in
                    # flight that the load joins), or REMOTE (a disk record adopted from
                    # the cluster tier: read from there, then kept on disk)
    entry: Block    # the ledger block the load reads (pinned)

    @property
    def ledger_tier(self) -> str:
        """The tier ``entry`` belongs to."""
        return self.entry.tier

    @property
    def record(self) -> bool:
        """A record on disk (not a DRAM block)."""
        return self.ledger_tier == DISK


class HitSearch:
    def __init__(self, ledger: Ledger, groups: tuple[KVGroup, ...], cost: LoadCostModel,
                 block_size: int, record_bytes: int, always: bool,
                 declined: Callable[[str, int], None],
                 probe: Callable[[bytes, float], Block | None] | None = None,
                 remote: Callable[[list[bytes], float], list[Block | None]] | None = None):
        """``record_bytes``: one block of one rank; ``always``: never decline a tier;
        ``declined(tier, blocks)``: told when a tier is declined; ``probe(key, now)``:
        a record another process published, adopted into the ledger (or None);
        ``remote(keys, now)``: the same for several keys at once, from the cluster tier."""
        self.ledger = ledger
        self.groups = groups
        self.full_groups = [g for g in groups if not g.windowed]
        self.window_groups = [g for g in groups if g.windowed]
        self.cost = cost
        self.block_size = block_size
        self.record_bytes = record_bytes
        self.always = always
        self.declined = declined
        self.probe = probe
        self.remote = remote

    def longest(self, keys_of, start: int, limit: int, now: float) -> list[Hit]:
        """What the longest loadable hit after ``start`` needs, block by block.

        Every full-attention group needs each block of the hit; a sliding-window
        group only the last blocks its window sees, so the hit ends at the
        furthest point where those are present too. A tier whose load would be
        slower than recomputing is not used (``_slow_tier``). Each (block, group)
        is looked up at most twice: linear in the prompt's length. ``keys_of(g, n)``:
        the record keys of group ``g``'s first ``n`` (or more) blocks."""
        where = {g.index: [None] * limit for g in self.groups}   # found: its Block
        seen = {g.index: bytearray(limit) for g in self.groups}     # 1: looked up
        probes = [MISSED_PROBES_PER_LOOKUP]
        adopted: list[Block] = []   # from the cluster tier: forgotten unless in the hit
        locate_many = self.ledger.locate_many

        def look(g: KVGroup, lo: int, hi: int) -> list:
            """Where blocks ``[lo, hi)`` of group ``g`` load from (None: missing);
            a range with any block not yet seen is looked up whole (the same answer
            for the ones seen)."""
            w, s = where[g.index], seen[g.index]
            if s.find(0, lo, hi) >= 0:
                keys = keys_of(g.index, hi)[lo:hi]
                found = locate_many(keys, now)
                if self.probe is not None:
                    found = [f or self._probe(k, now, probes) for f, k in zip(found, keys)]
                if self.remote is not None and None in found:
                    miss = [j for j, f in enumerate(found) if f is None]
                    for j, block in zip(miss, self.remote([keys[j] for j in miss], now)):
                        if block is not None:
                            found[j] = block
                            adopted.append(block)
                w[lo:hi] = found
                s[lo:hi] = ONES * (hi - lo)
            return w

        end = start
        if len(self.full_groups) == 1:   # the common case: in bulk, chunks growing to a miss
            g, step = self.full_groups[0], 32
            while end < limit:
                hi = min(limit, end + step)
                seg = look(g, end, hi)[end:hi]
                if not all(seg):
                    end += seg.index(None)
                    break
                end, step = hi, 2 * step
        else:
            while end < limit and all(look(g, end, end + 1)[end] for g in self.full_groups):
                end += 1
        declined = set()
        while end > start:
            end = self._fit_windows(start, end, look)
            if end <= start:
                break
            hits = []
            for g in self.groups:
                w = where[g.index]
                for i in g.needed(start, end):
                    entry = w[i]
                    if entry.tier == DISK:
                        t = REMOTE if entry.remote else DISK
                    else:   # a DRAM block; STAGING: the load joins a read in flight
                        t = DISK if entry.state is State.STAGING else DRAM
                    hits.append(Hit(i, g.index, entry.key, t, entry))
            if len(self.groups) > 1:
                hits.sort(key=lambda h: (h.block, h.group))
            slow = self._slow_tier(hits, now)
            if slow is None:
                self._forget(adopted, hits)
                return hits
            cut = next(h.block for h in hits if h.tier == slow)
            if slow not in declined:
                self.declined(slow, end - cut)
                declined.add(slow)
            end = cut
        self._forget(adopted, [])
        return []

    def _forget(self, adopted: list[Block], hits: list[Hit]) -> None:
        """Cluster-tier adoptions the hit does not use leave the index."""
        if adopted:
            used = {id(h.entry) for h in hits}
            for block in adopted:
                if id(block) not in used:
                    self.ledger.forget_adopted(block)

    def _fit_windows(self, start: int, end: int, look) -> int:
        """The furthest hit end <= ``end`` for which every sliding-window group has
        the blocks its window needs: the largest ``e`` whose blocks
        ``[max(start, e - window), e)`` are all present. The window at ``end`` is
        looked up first; only when it is broken is the rest looked up (in bulk)."""
        changed = True
        while changed and end > start:
            changed = False
            for g in self.window_groups:
                lo = max(start, end - g.window_blocks)
                w = look(g, lo, end)
                if all(w[lo:end]):
                    continue
                w = look(g, start, end)
                present = bytes(map(bool, w[start:end]))
                run = present.rfind(b"\x01" * g.window_blocks)   # the last whole window
                e = start + max(run + g.window_blocks if run >= 0 else 0,
                                len(present) - len(present.lstrip(b"\x01")))
                if e != end:
                    end, changed = e, True
        return end

    def _slow_tier(self, hits: list[Hit], now: float) -> str | None:
        """A tier whose load would be slower than recomputing (never a slower hit)."""
        if self.always:
            return None
        per_rank = self.record_bytes
        for tier in (REMOTE, DISK, DRAM):
            n = sum(1 for h in hits if h.tier == tier)
            blocks = len({h.block for h in hits if h.tier == tier})
            if n and not self.cost.worth_loading(tier, n * per_rank, blocks * self.block_size,
                                                 now):
                return tier
        return None

    def _probe(self, key: bytes, now: float, probes: list[int]) -> Block | None:
        """An index miss: another process may have published the record (a shared
        store). A few misses per lookup at most: each costs a stat per rank."""
        if probes[0] > 0 and self.probe is not None and self.ledger.writable(key):
            block = self.probe(key, now)
            if block is not None:
                return block
            probes[0] -= 1
        return None

