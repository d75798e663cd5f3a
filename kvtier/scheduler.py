"""Scheduler side: decides what to store, what to load, from which tier.

It keeps each request's chained block keys, a DRAM tier (entries own a DRAM
slot) and a disk tier (entries are records on disk, all ranks), and turns
vLLM's scheduling decisions into ``KVTierMetadata`` for the workers:

- lookup (``get_num_new_matched_tokens``): the longest run of blocks after
  vLLM's local hit that is ready in DRAM or on disk; loaded asynchronously;
- stores (``build_connector_meta``): every block that becomes full this step
  and is in no tier yet gets a DRAM slot (LRU-within-TTL eviction) and, when
  the disk tier is on, a disk reservation (write-through);
- completions (``update_connector_output``): an entry becomes *ready* only once
  every TP rank reported its bytes in place; failed loads drop the entry.

Entries are pinned while a worker may touch their bytes, so a slot or a record
is never reused or deleted under an in-flight copy.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple

from kvtier.config import KVTierConfig
from kvtier.groups import FULL, NULL_BLOCK, KVGroup, group_key
from kvtier.index import EVICT_DROPPED, EVICT_TTL, Entry, LoadCostModel, SlotAllocator, Tier
from kvtier.keys import KeyChain, root_key
from kvtier.metrics import CHECKSUM_REASONS, StatsRecorder
from kvtier.metadata import (NO_SLOT, KVTierMetadata, KVTierWorkerMeta, LoadItem, LoadJob,
                             StoreItem, StoreJob)
from kvtier.slots import SlotGeometry
from kvtier.store import DiskStore

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvtier.scheduler")

DRAM, DISK = "dram", "disk"
FILE_TOUCH_EVERY_S = 60.0
PREFILL_STEP_TOKENS = 256   # steps with fewer tokens are decode-bound: no prefill rate


@dataclass
class DramBlock:
    slot: int
    ready: bool = False


@dataclass
class ReqState:
    request: "Request"
    chain: KeyChain
    block_ids: list[list[int]] = field(default_factory=list)   # per KV cache group
    handled_blocks: int = 0     # blocks [0, n) stored, present, or skipped
    had_stores: bool = False


class Hit(NamedTuple):
    block: int      # index of the block in the request
    group: int      # KV cache group
    key: bytes      # the group's record key
    tier: str


@dataclass
class PendingHit:
    num_computed: int
    hits: list[Hit]   # what the hit needs after the local hit, block by block


@dataclass
class LoadPlan:
    items: list[LoadItem]
    tokens_by_tier: dict[str, int]


@dataclass
class Resolution:
    """Completion of one thing done by every rank: ok and failed counts."""
    ok: int = 0
    failed: int = 0


class KVTierScheduler:
    def __init__(self, cfg: KVTierConfig, namespace: bytes, tp_size: int, block_size: int,
                 geometry: SlotGeometry, clock: Callable[[], float] = time.time,
                 groups: tuple[KVGroup, ...] = FULL):
        self.cfg = cfg
        self.groups = groups
        self.full_groups = [g for g in groups if not g.windowed]
        self.window_groups = [g for g in groups if g.windowed]
        self._flush_next = False   # window blocks were stored: they may be freed next step
        self.namespace = namespace
        self.tp_size = tp_size
        self.block_size = block_size
        self.geometry = geometry
        self.clock = clock
        self.stats = StatsRecorder()
        self.recovered_blocks = 0
        self.cost = LoadCostModel()
        self._step: tuple[float, int] | None = None   # (start, prompt tokens) of this step
        self._lock = threading.RLock()

        self.slots = SlotAllocator(geometry.num_slots)
        self.max_staged = max(1, geometry.num_slots // 2)   # disk blocks per load
        self.dram = Tier(DRAM, geometry.num_slots, cfg.ttl_seconds, on_evict=self._dram_evicted)
        self.record_size = geometry.record_bytes * tp_size   # one block, all ranks
        self.disk: Tier | None = None
        self.rank_stores: list[DiskStore] = []
        self._sweep_q: queue.Queue = queue.Queue()
        if cfg.disk_enabled:
            # Evicted records wait in free/ for writes to overwrite them (faster
            # than new files): up to 1/16 of the budget, 64 per rank, counted in it.
            spare = min(64, cfg.disk_bytes // self.record_size // 16)
            self.disk = Tier(DISK, cfg.disk_bytes - spare * self.record_size, cfg.ttl_seconds,
                             on_evict=self._disk_evicted)
            self.rank_stores = [DiskStore(cfg.disk_path, namespace, r, tp_size,
                                          o_direct="off", free_files=spare)
                                for r in range(tp_size)]
            self._recover()
            threading.Thread(target=self._sweeper, name="kvtier-sweeper", daemon=True).start()

        self._reqs: dict[str, ReqState] = {}
        self._pending_hits: dict[str, PendingHit] = {}
        self._loads: dict[str, LoadPlan] = {}
        self._new_loads: list[LoadJob] = []
        self._store_jobs: dict[int, tuple[list[StoreItem], Resolution]] = {}
        self._writes: dict[bytes, Resolution] = {}
        self._failed_keys: set[bytes] = set()
        self._next_job = 0

    # ------------------------------------------------------------------ tiers
    def _dram_evicted(self, key, entry: Entry, cause: str) -> None:
        self.slots.give(entry.value.slot)

    def _disk_evicted(self, key, entry: Entry, cause: str) -> None:
        self._sweep_q.put(("remove", key))

    def _admit_dram(self, key: bytes, now: float) -> int | None:
        """A new, pinned, not-ready DRAM entry for ``key``; its slot (None: full)."""
        if key in self.dram:
            return None
        entry = self.dram.add(key, 1, now, value=DramBlock(NO_SLOT), pinned=True)
        if entry is None:
            return None
        entry.value.slot = self.slots.take()
        return entry.value.slot

    def _touch(self, key: bytes, now: float) -> bool:
        """Record a use of ``key`` in every tier holding it; False if none does."""
        in_dram = self.dram.touch(key, now)
        in_disk = False
        if self.disk is not None:
            entry = self.disk.peek(key)
            stale = entry is not None and now - entry.last_use > FILE_TOUCH_EVERY_S
            in_disk = self.disk.touch(key, now)
            if in_disk and stale:   # last use survives restarts as the file's mtime
                self._sweep_q.put(("touch", key))
        return in_dram or in_disk

    def _drop(self, tier: Tier | None, key: bytes) -> None:
        """Never serve ``key`` from ``tier`` again; free it once nobody holds a pin."""
        entry = tier.peek(key) if tier is not None else None
        if entry is None:
            return
        entry.value.ready = False
        if entry.pins == 0:
            tier.discard(key, EVICT_DROPPED)

    def _ready(self, tier: Tier | None, key: bytes, now: float) -> bool:
        if tier is None:
            return False
        entry = tier.get(key, now)
        return entry is not None and entry.value.ready

    # ------------------------------------------------------------- recovery
    def _recover(self) -> None:
        """Rebuild the disk index from the directory: blocks every rank holds.

        The cyclic GC is paused: the rebuild allocates a few acyclic objects per
        block, and full collections over vLLM's heap were half the time at 100k."""
        t0 = time.perf_counter()
        now = self.clock()
        paused = gc.isenabled()
        gc.disable()
        try:
            per_rank = [s.scan_mtimes() for s in self.rank_stores]
            if len(per_rank) == 1:
                mtimes = per_rank[0]
            else:
                common = set(per_rank[0]).intersection(*per_rank[1:])
                mtimes = {k: min(r[k] for r in per_rank) for k in common}
            expired = 0
            for key in sorted(mtimes, key=mtimes.__getitem__):   # oldest first
                mtime = mtimes[key]
                if now - mtime >= self.cfg.ttl_seconds:
                    self._sweep_q.put(("remove", key))
                    expired += 1
                    continue
                entry = self.disk.add(key, self.record_size, mtime, value=DramBlock(NO_SLOT, True))
                if entry is None:
                    self._sweep_q.put(("remove", key))
        finally:
            if paused:
                gc.enable()
        self.recovered_blocks = len(self.disk)
        self.disk.stats.evictions[EVICT_TTL] += expired   # expired while the server was down
        for s in self.rank_stores:
            s.sweep_temp()
        log.info("kvtier: recovered %d blocks (%.1f GiB) from %s in %.2f s (%d expired)",
                 len(self.disk), self.disk.used / 2**30, self.cfg.disk_path,
                 time.perf_counter() - t0, expired)

    def _sweeper(self) -> None:
        """Background file work: removals of evicted/expired records, last-use touches,
        periodic expiry while the engine is idle."""
        while True:
            try:
                op, key = self._sweep_q.get(timeout=5.0)
            except queue.Empty:
                with self._lock:
                    now = self.clock()
                    self.dram.expire(now)
                    self.disk.expire(now)
                continue
            for s in self.rank_stores:
                if op == "remove":
                    s.remove(key)
                else:
                    s.touch(key)

    # ---------------------------------------------------------------- lookup
    def _state(self, request: "Request") -> ReqState | None:
        st = self._reqs.get(request.request_id)
        if st is None:
            if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds",
                                                                 None) is not None:
                return None   # KV depends on more than token ids: never cache
            lora = request.lora_request.lora_name if request.lora_request else None
            root = root_key(self.namespace, getattr(request, "cache_salt", None), lora)
            st = ReqState(request, KeyChain(root, self.block_size))
            self._reqs[request.request_id] = st
        return st

    def _unpin_hits(self, pending: PendingHit | None, keep=lambda hit: False) -> None:
        if pending is None:
            return
        for hit in pending.hits:
            if not keep(hit):
                (self.dram if hit.tier == DRAM else self.disk).unpin(hit.key)

    def _where(self, key: bytes, now: float) -> str | None:
        """The tier a ready copy of ``key`` is in (DRAM first), or None."""
        if self._ready(self.dram, key, now):
            return DRAM
        if self._ready(self.disk, key, now) or self._probe_shared(key, now):
            return DISK
        return None

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        with self._lock:
            self._unpin_hits(self._pending_hits.pop(request.request_id, None))
            st = self._state(request)
            bs = self.block_size
            if st is None or num_computed_tokens % bs:
                return 0, False
            max_blocks = (request.num_tokens - 1) // bs   # the last token is recomputed
            start = num_computed_tokens // bs
            if max_blocks <= start:
                return 0, False
            keys = st.chain.extend(request.all_token_ids[:max_blocks * bs])
            now = self.clock()
            self.stats.inc("kvtier_lookups_total")
            self.stats.inc("kvtier_lookup_tokens_total", (max_blocks - start) * bs)
            hits = self._longest_hit(keys, start, max_blocks, now)
            end = hits[-1].block + 1 if hits else start
            if end - start < max(1, self.cfg.min_hit_blocks):
                return 0, False
            for hit in hits:
                (self.dram if hit.tier == DRAM else self.disk).pin(hit.key)
            self._pending_hits[request.request_id] = PendingHit(num_computed_tokens, hits)
            return (end - start) * bs, True

    def _longest_hit(self, keys: list[bytes], start: int, limit: int, now: float) -> list[Hit]:
        """What the longest loadable hit after ``start`` needs, block by block.

        Every full-attention group needs each block of the hit; a sliding-window
        group only the last blocks its window sees, so the hit's end is the
        furthest point where those are present too. Disk blocks are staged
        through DRAM slots (never more than fit), and a tier whose load would be
        slower than recomputing is not used (``_slow_tier``)."""
        where = {}   # (block, group) -> tier | None, memoized

        def tier(i: int, g: KVGroup) -> str | None:
            if (i, g.index) not in where:
                where[i, g.index] = self._where(group_key(keys[i], g.index), now)
            return where[i, g.index]

        end = start
        while end < limit and all(tier(end, g) for g in self.full_groups):
            end += 1
        declined = set()
        while end > start:
            hits = [Hit(i, g.index, group_key(keys[i], g.index), tier(i, g))
                    for i in range(start, end) for g in self.groups if i in g.needed(start, end)]
            missing = next((h.block for h in hits if h.tier is None), None)
            if missing is not None:   # a window group lacks a block near this end
                end -= 1
                continue
            disk = [h for h in hits if h.tier == DISK]
            if len(disk) > self.max_staged:
                end = disk[self.max_staged].block
                continue
            slow = self._slow_tier(hits, now)
            if slow is not None:
                cut = next(h.block for h in hits if h.tier == slow)
                if slow not in declined:
                    self.stats.inc("kvtier_declined_loads_total", end - cut, tier=slow)
                    declined.add(slow)
                end = cut
                continue
            return hits
        return []

    def _slow_tier(self, hits: list[Hit], now: float) -> str | None:
        """A tier whose load would be slower than recomputing (never a slower hit)."""
        if self.cfg.load_policy == "always":
            return None
        per_rank = self.geometry.record_bytes
        for tier in (DISK, DRAM):
            n = sum(1 for h in hits if h.tier == tier)
            blocks = len({h.block for h in hits if h.tier == tier})
            if n and not self.cost.worth_loading(tier, n * per_rank, blocks * self.block_size,
                                                 now):
                return tier
        return None

    def _probe_shared(self, key: bytes, now: float) -> bool:
        """Index miss: another process may have published the block (shared store)."""
        if self.disk is None or key in self.disk:
            return False
        if not all(s.exists(key) for s in self.rank_stores):
            return False
        return self.disk.add(key, self.record_size, now, value=DramBlock(NO_SLOT, True)) \
            is not None

    def update_state_after_alloc(self, request: "Request", blocks,
                                 num_external_tokens: int) -> None:
        with self._lock:
            pending = self._pending_hits.pop(request.request_id, None)
            if num_external_tokens == 0 or pending is None:
                self._unpin_hits(pending)
                return
            start = pending.num_computed // self.block_size
            end = start + num_external_tokens // self.block_size
            gpu = blocks.get_block_ids()

            def used(hit: Hit) -> bool:   # vLLM gave the block a real page to fill
                return hit.block < end and not (self.groups[hit.group].windowed
                                                 and gpu[hit.group][hit.block] == NULL_BLOCK)
            self._unpin_hits(pending, keep=used)
            now = self.clock()
            items: list[LoadItem] = []
            covered = set()
            block_tier: dict[int, str] = {}
            for hit in filter(used, pending.hits):
                self._touch(hit.key, now)
                block = gpu[hit.group][hit.block]
                covered.add((hit.block, hit.group))
                if hit.tier == DRAM:
                    slot = self.dram.peek(hit.key).value.slot
                    items.append(LoadItem(hit.key, block, slot, False, hit.group))
                else:
                    slot = self._admit_dram(hit.key, now)
                    items.append(LoadItem(hit.key, block, NO_SLOT if slot is None else slot,
                                          True, hit.group))
                    block_tier[hit.block] = DISK
            # vLLM accepted fewer tokens than offered: a window group may now need
            # blocks the hit did not include. They fail (recompute from there).
            for g in self.window_groups:
                for i in range(start, end):
                    if (i, g.index) not in covered and gpu[g.index][i] != NULL_BLOCK:
                        items.append(LoadItem(b"", gpu[g.index][i], NO_SLOT, False, g.index))
            by_tier = {DRAM: 0, DISK: 0}
            for i in range(start, end):
                by_tier[block_tier.get(i, DRAM)] += self.block_size
            for tier, tokens in by_tier.items():
                self.stats.inc("kvtier_hit_tokens_total", tokens, tier=tier)
            self._loads[request.request_id] = LoadPlan(items, by_tier)
            self._new_loads.append(LoadJob(request.request_id, items))

    def hit_sources(self, request: "Request", num_external_tokens: int) -> dict[str, int]:
        plan = self._loads.get(request.request_id)
        if plan is None or num_external_tokens == 0:
            return {}
        out, left = {}, num_external_tokens
        for tier in (DRAM, DISK):
            take = min(left, plan.tokens_by_tier[tier])
            if take:
                out[tier] = take
                left -= take
        if left:
            out[DISK] = out.get(DISK, 0) + left
        return out

    # ---------------------------------------------------------------- stores
    def build_connector_meta(self, so) -> KVTierMetadata:
        with self._lock:
            meta = KVTierMetadata(loads=self._new_loads,
                                  flush_gathers=bool(so.preempted_req_ids) or self._flush_next)
            self._new_loads = []
            self._flush_next = False
            now = self.clock()
            self._step = (time.perf_counter(), so.total_num_scheduled_tokens)
            for req in so.scheduled_new_reqs:
                self._plan_stores(meta, req.req_id, req.block_ids, True,
                                  req.num_computed_tokens, so, now)
            cached = so.scheduled_cached_reqs
            for i, req_id in enumerate(cached.req_ids):
                self._plan_stores(meta, req_id, cached.new_block_ids[i],
                                  req_id in cached.resumed_req_ids,
                                  cached.num_computed_tokens[i], so, now)
            return meta

    def _plan_stores(self, meta: KVTierMetadata, req_id: str, new_block_ids, replace: bool,
                     num_computed: int, so, now: float) -> None:
        st = self._reqs.get(req_id)
        if st is None:
            return
        if new_block_ids is not None:
            if replace or not st.block_ids:
                st.block_ids = [list(ids) for ids in new_block_ids]
            else:
                for mine, ids in zip(st.block_ids, new_block_ids):
                    mine.extend(ids)
        request = st.request
        done = min(num_computed + so.num_scheduled_tokens.get(req_id, 0),
                   len(request.all_token_ids))
        if not self.cfg.store_decode_tokens:
            done = min(done, request.num_prompt_tokens)
        if len(st.block_ids) != len(self.groups):
            return   # no block table from vLLM yet
        n_full = min([done // self.block_size] + [len(ids) for ids in st.block_ids])
        if n_full <= st.handled_blocks:
            return
        keys = st.chain.extend(request.all_token_ids[:n_full * self.block_size])
        items: list[StoreItem] = []
        for i in range(st.handled_blocks, n_full):
            for g in self.groups:
                block = st.block_ids[g.index][i]
                if g.windowed and block == NULL_BLOCK:   # left the window before it was stored
                    continue
                key = group_key(keys[i], g.index)
                if self._touch(key, now):
                    continue
                slot = self._admit_dram(key, now)
                if slot is None:
                    self.stats.inc("kvtier_skipped_stores_total", reason="dram_full")
                    continue
                to_disk = False
                if self.disk is not None:
                    to_disk = self.disk.add(key, self.record_size, now,
                                            value=DramBlock(NO_SLOT), pinned=True) is not None
                    if to_disk:
                        self.dram.pin(key)   # the slot is read by the disk write
                    else:
                        self.stats.inc("kvtier_skipped_stores_total", reason="disk_full")
                items.append(StoreItem(key, block, slot, to_disk, g.index))
                if g.windowed:
                    self._flush_next = True   # the page may leave the window next step
        st.handled_blocks = n_full
        if items:
            job = self._next_job
            self._next_job += 1
            self._store_jobs[job] = (items, Resolution())
            meta.stores.append(StoreJob(job, req_id, items))
            st.had_stores = True

    # ----------------------------------------------------------- completions
    def update_connector_output(self, output) -> None:
        with self._lock:
            meta = getattr(output, "kv_connector_worker_meta", None)
            if isinstance(meta, KVTierWorkerMeta):
                self._apply_worker_meta(meta)
            for req_id in output.finished_recving or ():
                self._finish_load(req_id)

    def _resolve(self, table: dict, key, ok: int, failed: int):
        res = table.setdefault(key, Resolution())
        res.ok += ok
        res.failed += failed
        if res.ok + res.failed < self.tp_size:
            return None
        del table[key]
        return res.failed == 0

    def _apply_worker_meta(self, meta: KVTierWorkerMeta) -> None:
        for job in set(meta.stored) | set(meta.store_failed):
            items, res = self._store_jobs[job]
            res.ok += meta.stored.get(job, 0)
            res.failed += meta.store_failed.get(job, 0)
            if res.ok + res.failed < self.tp_size:
                continue
            del self._store_jobs[job]
            for it in items:
                self.dram.unpin(it.key)
                if res.failed:   # the write pin (if any) is released by the write's result
                    self._drop(self.dram, it.key)
                else:
                    self.dram.peek(it.key).value.ready = True
                    self.stats.inc("kvtier_stored_blocks_total", tier=DRAM)
                    self.stats.inc("kvtier_stored_bytes_total", self.record_size, tier=DRAM)
        for key in set(meta.written) | set(meta.write_failed):
            ok = self._resolve(self._writes, key, meta.written.get(key, 0),
                               meta.write_failed.get(key, 0))
            if ok is None:
                continue
            self.dram.unpin(key)
            if self.disk is None or key not in self.disk:
                continue
            self.disk.unpin(key)
            if ok:
                self.disk.peek(key).value.ready = True
                self.stats.inc("kvtier_stored_blocks_total", tier=DISK)
                self.stats.inc("kvtier_stored_bytes_total", self.record_size, tier=DISK)
            else:
                self._drop(self.disk, key)   # removes any rank's record too
        self._failed_keys.update(meta.load_failed)
        for reason, n in meta.fail_reasons.items():
            if reason in ("backpressure", "gather"):
                self.stats.inc("kvtier_skipped_stores_total", n, reason=reason)
            elif reason == "write_error":
                self.stats.inc("kvtier_io_errors_total", n)
            else:
                self.stats.inc("kvtier_load_failures_total", n, reason=reason)
                if reason in CHECKSUM_REASONS:
                    self.stats.inc("kvtier_checksum_failures_total", n)
                elif reason == "io_error":
                    self.stats.inc("kvtier_io_errors_total", n)
        for tier, nbytes, secs in meta.load_timings:
            self.stats.inc("kvtier_loaded_bytes_total", nbytes, tier=tier)
            self.stats.observe("kvtier_load_seconds", secs, tier=tier)
            self.cost.observe_load(tier, nbytes, secs)

    def _finish_load(self, req_id: str) -> None:
        plan = self._loads.pop(req_id, None)
        if plan is None:
            return
        for it in plan.items:
            failed = it.key in self._failed_keys
            if it.from_disk:
                self.disk.unpin(it.key)
                if failed:
                    self._drop(self.disk, it.key)
            if it.slot != NO_SLOT:
                self.dram.unpin(it.key)
                if failed:
                    self._drop(self.dram, it.key)
                elif it.from_disk:
                    self.dram.peek(it.key).value.ready = True   # promoted into DRAM
        self._failed_keys.difference_update(it.key for it in plan.items)

    def request_finished(self, request: "Request") -> bool:
        """True: blocks must stay allocated until the workers report the stores done."""
        with self._lock:
            self._unpin_hits(self._pending_hits.pop(request.request_id, None))
            st = self._reqs.pop(request.request_id, None)
            if st is None:
                return False
            # A use ends at completion. Refresh the last block first so that the
            # prefix's first block, the one every continuation needs, leaves last.
            now = self.clock()
            for key in reversed(st.chain.keys[:st.handled_blocks]):
                for g in reversed(self.groups):
                    self._touch(group_key(key, g.index), now)
            return st.had_stores

    # ------------------------------------------------------------- reporting
    def take_stats(self):
        """Metrics for vLLM's /metrics (see kvtier.metrics): counters, occupancy.

        vLLM calls this once per step, after the step ran: the step's duration
        and token count feed the prefill-rate estimate of the cost model.
        """
        with self._lock:
            if self._step is not None:
                t0, tokens = self._step
                self._step = None
                if tokens >= PREFILL_STEP_TOKENS:
                    self.cost.observe_prefill(tokens, time.perf_counter() - t0)
            for tier in (self.dram, self.disk):
                if tier is None:
                    continue
                for cause, n in tier.stats.evictions.items():
                    self.stats.counters.setdefault("kvtier_evictions_total", {})[
                        f"cause={cause},tier={tier.name}"] = n
                size = self.geometry.slot_bytes * self.tp_size if tier is self.dram else 1
                self.stats.set("kvtier_occupancy_bytes", tier.used * size, tier=tier.name)
                self.stats.set("kvtier_capacity_bytes", tier.capacity * size, tier=tier.name)
                self.stats.set("kvtier_blocks", len(tier), tier=tier.name)
            return self.stats.take()
