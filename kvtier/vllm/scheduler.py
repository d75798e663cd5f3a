"""Scheduler side: turns vLLM's scheduling decisions into work for the workers.

It keeps each request's chained block keys and asks the ledger
(kvtier.cache.ledger, the single source of truth for block state) what to do:

- lookup (``get_num_new_matched_tokens``): the longest run of blocks after
  vLLM's local hit that the ledger can serve, from DRAM (ready, or being read
  from disk for another request: the load joins that read) or from disk; the
  blocks are pinned until vLLM allocates pages for them;
- load plan (``update_state_after_alloc``): DRAM blocks scatter from their
  slot; disk blocks are read into a new DRAM staging block (promoted when every
  rank read it) or, when DRAM is short, streamed through a few scratch slots;
- stores (``build_connector_meta``): every block that becomes full this step
  and is in no tier gets a DRAM block and, with the disk tier on, a disk
  reservation (write-through);
- completions (``update_connector_output``): the ledger's transitions, once
  every TP rank has answered for the thing.

Everything here runs under one lock (vLLM's scheduler thread, plus the sweeper
thread that removes files and expires blocks while the engine is idle).

Why one module of ~650 lines: it is one class, the scheduler half of vLLM's
connector API, ten hooks each a short transaction on the ledger; the policy it
calls is elsewhere (kvtier.cache: ledger, hits, cost; kvtier.store.sweeper).
Split further, one request's life would be spread over files.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from kvtier.config import KVTierConfig
from kvtier.cache.groups import FULL, NULL_BLOCK, KVGroup, group_key, group_keys
from kvtier.cache.admission import DiskAdmission
from kvtier.cache.cost import LoadCostModel
from kvtier.cache.keys import KeyChain, KeyMemo, root_key
from kvtier.cache.hits import DISK, DRAM, REMOTE, Hit, HitSearch
from kvtier.cache.ledger import Block, Ledger, State
from kvtier.cache.retention import Retention, retention_of
from kvtier.vllm.metadata import (FROM_SLOT, NO_SLOT, READ, STREAM, WRITE_ONLY, KVTierMetadata,
                                  KVTierWorkerMeta, LoadItem, LoadJob, StoreItem, StoreJob)
from kvtier.vllm.metrics import CHECKSUM_REASONS, StatsRecorder
from kvtier.vllm.namespace import adapter_identity
from kvtier.store.slots import SlotGeometry
from kvtier.store.disk import DiskStore, store_options
from kvtier.store.remote import RemoteStore
from kvtier.store.sweeper import Sweeper


if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvtier.scheduler")

PREFILL_STEP_TOKENS = 256   # steps with fewer tokens are decode-bound: no prefill rate
STREAM_SLOTS = 16           # scratch slots a streamed disk load reuses
STARVED_LOG_S = 30.0        # how often a lookup deferred for want of a slot is logged
REMOTE_ROOM_RECORDS = 8192   # disk room kept for the next step's cluster-tier hits
KEY_MEMO_BLOCKS = 1 << 18      # blocks whose kvtier keys vLLM's hashes find (prefixes seen before)
# A block with no free DRAM slot to be stored through (all held by copies and
# writes in flight) waits for one, in order: a prefix is only as useful as its
# first missing block. A finished request's pages are held for that at most:
STORE_WAIT_S = 2.0


def file_touch_interval(ttl: float) -> float:
    """How stale a record's mtime (its last use across restarts) may get."""
    return min(60.0, ttl / 8)


@dataclass
class PendingHit:
    num_computed: int
    hits: list[Hit]   # what the hit needs after the local hit, block by block
    scratch: list[int] = field(default_factory=list)   # a slot to stream disk blocks through


@dataclass
class LoadPlan:
    req_id: str
    items: list[LoadItem]
    tokens_by_tier: dict[str, int]
    dram_readers: list[Block] = field(default_factory=list)   # pins released at the end
    disk_readers: list[Block] = field(default_factory=list)
    scratch: list[int] = field(default_factory=list)


@dataclass
class ReqState:
    request: "Request"
    chain: KeyChain
    block_ids: list[list[int]] = field(default_factory=list)   # per KV cache group
    handled_blocks: int = 0      # blocks [0, n) stored, present, or skipped
    computed_blocks: int = 0     # full blocks computed so far (to be stored)
    computed_at_preemption: int = 0   # vLLM's preemption count when they were
    finished_at: float = 0.0     # finished with blocks waiting for DRAM slots: since
    store_jobs: int = 0          # store jobs not yet answered by every rank
    load: LoadPlan | None = None  # a load in flight
    group_keys: dict[int, list] = field(default_factory=dict)   # group -> record keys (lazy)
    retention: Retention = Retention(0.0, False)   # what the request asked for
    tenant: str = ""             # its cache_salt
    local_tokens: int = 0        # vLLM's own prefix hit at the last lookup
    loaded: dict[str, int] = field(default_factory=dict)   # tokens kvtier loads, by tier
    # vLLM's preemption count of the request when kvtier last planned it a load
    # (None: never). See get_num_new_matched_tokens.
    loaded_at_preemption: int | None = None
    stored_blocks: int = 0       # blocks of group 0 this request stored
    pins_refused: set = field(default_factory=set)   # keys whose pin went over the budget

    def key(self, i: int, g: int) -> bytes:
        """The record key of block ``i`` in KV cache group ``g``."""
        return self.chain.keys[i] if g == 0 else self.keys_of(g, i + 1)[i]

    def keys_of(self, g: int, n: int) -> list[bytes]:
        """Group ``g``'s record keys of (at least) the first ``n`` blocks, derived
        in bulk (a window scan walks many of them; hashing one costs less than a
        memo of them would)."""
        if g == 0:
            return self.chain.keys
        keys = self.group_keys.setdefault(g, [])
        if len(keys) < n:
            keys += group_keys(self.chain.keys[len(keys):n], g)
        return keys


@dataclass
class Resolution:
    """Answers of the TP ranks for one thing: ok and failed counts."""
    ok: int = 0
    failed: int = 0


@dataclass
class Pending:
    """A fill in flight (a store job's copies, a record write, a staged read)."""
    blocks: list[Block]                 # the ledger blocks it resolves
    res: Resolution = field(default_factory=Resolution)
    readers: list[Block] = field(default_factory=list)   # DRAM blocks it reads (pins)
    req_id: str | None = None


class KVTierScheduler:
    def __init__(self, cfg: KVTierConfig, namespace: bytes, tp_size: int, block_size: int,
                 geometry: SlotGeometry, clock: Callable[[], float] = time.time,
                 groups: tuple[KVGroup, ...] = FULL, start_sweeper: bool = True,
                 memo_keys: bool = False, events: bool = False,
                 hash_block_size: int | None = None):
        """``hash_block_size``: the tokens per vLLM block hash (its
        ``prefix_match_unit``; default: ``block_size``)."""
        self.cfg = cfg
        self.groups = groups
        self.full_groups = [g for g in groups if not g.windowed]
        self.window_groups = [g for g in groups if g.windowed]
        self._flush_next = False   # window blocks were stored: they may be freed next step
        self.namespace = namespace
        self.tp_size = tp_size
        self.block_size = block_size
        # vLLM hashes every hash_block_size tokens; 0: at a size that does not
        # divide kvtier's blocks (its hashes are not used).
        hbs = hash_block_size or block_size
        self._hash_block_size = hbs if block_size % hbs == 0 else 0
        self.geometry = geometry
        self.clock = clock
        self.stats = StatsRecorder()
        self.recovered_blocks = 0
        self.cost = LoadCostModel()
        self._step: tuple[float, int] | None = None   # (start, prompt tokens) of this step
        self._lock = threading.RLock()

        self.record_size = geometry.record_bytes * tp_size   # one block, all ranks
        self.max_staging = max(1, geometry.num_slots // 2)   # DRAM blocks filling from disk
        self.rank_stores: list[DiskStore] = []
        disk_budget = 0
        spare = 0
        if cfg.disk_enabled:
            # Evicted records wait in free/ for writes to overwrite (faster than
            # new files): up to 1/16 of the budget, 64 per rank, counted in it.
            spare = min(64, cfg.disk_bytes // self.record_size // 16)
            disk_budget = cfg.disk_bytes - spare * self.record_size
        self.ledger_has_disk = disk_budget > 0
        self.ledger = Ledger(geometry.num_slots, disk_budget, self.record_size, cfg.ttl_seconds,
                             file_touch_interval(cfg.ttl_seconds),
                             max_kept_bytes=self._kept_units(cfg.max_pinned_bytes, geometry),
                             max_kept_bytes_per_tenant=self._kept_units(
                                 cfg.max_pinned_bytes_per_tenant, geometry))
        self.sweeper: Sweeper | None = None
        if self.ledger.disk is not None:
            self.rank_stores = [DiskStore(cfg.disk_path, namespace, r, tp_size,
                                          o_direct="off", free_files=spare, **store_options(cfg))
                                for r in range(tp_size)]
            self.sweeper = Sweeper(self.rank_stores, self.ledger, self._lock, clock)
            found = self.sweeper.recover()
            self.recovered_blocks = found["blocks"]
            self.stats.inc("kvtier_orphan_records_total", found["orphans"])
            if start_sweeper:
                self.sweeper.start()

        # The cluster tier (cfg.remote): looked up on index misses; a block found there
        # is adopted as a disk record, read from the cluster at its first load and
        # kept on disk (kvtier.store.remote). Adoptions never evict (a lookup must not
        # evict what it found): each step keeps room for REMOTE_ROOM_RECORDS of them.
        self.remote: RemoteStore | None = None
        if cfg.remote is not None and self.rank_stores:
            self.remote = RemoteStore.of(cfg.remote)
            self._remote_room = max(1, min(REMOTE_ROOM_RECORDS,
                                           disk_budget // self.record_size // 8))

        self._reqs: dict[str, ReqState] = {}
        self._pending_hits: dict[str, PendingHit] = {}
        self._starved_logged = -STARVED_LOG_S
        self._loads: dict[str, LoadPlan] = {}
        self._new_loads: list[LoadJob] = []
        self._await_sending: set[str] = set()   # to tell the workers, next step
        self._held_pages: set[str] = set()      # finished requests whose pages kvtier holds
        self._finishing: dict[str, ReqState] = {}   # finished, blocks wait for DRAM slots
        self._dram_blocked = False
        self._events: list = []                  # KV events to publish (take_events)
        self._store_jobs: dict[int, Pending] = {}
        self._writes: dict[bytes, Pending] = {}
        self._stages: dict[bytes, Pending] = {}
        self._staging = 0
        self._next_job = 0
        # Which blocks get a disk record, and when (cfg.disk_admission). Blocks in
        # DRAM that the policy wants written after all (a second use; DRAM about to
        # evict them) are written from their slot: ``_write_back``.
        self.admission = DiskAdmission(cfg.disk_admission, cfg.ttl_seconds,
                                       remember=4 * max(1, disk_budget // self.record_size))
        self._write_backs: list[bytes] = []
        # vLLM hashes every block of a request anyway (its own prefix cache). Where
        # that hash is collision-resistant (sha256: memo_keys), a block vLLM hashed
        # the same as one seen before has the same kvtier key: the chain of a
        # resent prefix is looked up, not hashed again (a 128K-token prompt: 4,096
        # SHA-256 calls). Bounded: a prefix not used for a while is forgotten.
        self._key_memo = KeyMemo(KEY_MEMO_BLOCKS) if memo_keys else None
        self._adapters: dict[tuple[str, str], str] = {}   # LoRA (name, path) -> key part
        # KV events for routers (vLLM's --kv-events-config): a block's vLLM hash
        # rides on its ledger block; its arrivals and departures become events.
        self.ledger.track = events
        self.hits = HitSearch(self.ledger, groups, self.cost, block_size, geometry.record_bytes,
                              cfg.load_policy == "always",
                              lambda tier, n: self.stats.inc("kvtier_declined_loads_total", n,
                                                             tier=tier),
                              self._probe_shared if self.rank_stores else None,
                              self._probe_remote if self.remote is not None else None)

    # ------------------------------------------------------------ KV events
    def _ext(self, st: ReqState, i: int, group: int):
        """Block ``i`` of the request as vLLM names it in its KV events (its own
        block hash), or None when events are off or vLLM has not hashed it."""
        if not self.ledger.track:
            return None
        hashes = self._block_hashes(st.request) or ()
        if i >= len(hashes):
            return None
        bs = self.block_size
        lora = st.request.lora_request.lora_name if st.request.lora_request else None
        return (hashes[i], hashes[i - 1] if i else None,
                list(st.request.all_token_ids[i * bs:(i + 1) * bs]), group, lora)

    def _event(self, stored: bool, tier: str, block: Block):
        from vllm.distributed.kv_events import (MEDIUM_CPU, MEDIUM_STORAGE, BlockRemoved,
                                                BlockStored)
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
        h, parent, tokens, group, lora = block.ext
        medium = MEDIUM_CPU if tier == DRAM else MEDIUM_STORAGE
        if not stored:
            return BlockRemoved(block_hashes=[maybe_convert_block_hash(h)], medium=medium,
                                group_idx=group)
        return BlockStored(block_hashes=[maybe_convert_block_hash(h)],
                           parent_block_hash=None if parent is None
                           else maybe_convert_block_hash(parent),
                           token_ids=tokens, block_size=self.block_size, lora_id=None,
                           medium=medium, lora_name=lora, group_idx=group)

    def take_events(self) -> list:
        """vLLM KV events for kvtier's tiers since the last call: BlockStored when a
        block is ready in DRAM ("CPU") or on disk ("STORAGE"), BlockRemoved when it
        leaves (evicted, expired, dropped). Blocks recovered from disk at start-up
        are announced when a request first names them (vLLM's hash is unknown
        before). The event format has no expiry time."""
        with self._lock:
            out, self._events = self._events, []
            for stored, tier, block in self.ledger.take_changes():
                if block.ext is not None:
                    out.append(self._event(stored, tier, block))
            return out

    def _kept_units(self, nbytes: int, geometry: SlotGeometry) -> int:
        """The pin budget in the ledger's units: bytes of records (the disk tier),
        or DRAM slots without one."""
        if self.ledger_has_disk:
            return nbytes
        return nbytes // (geometry.slot_bytes * self.tp_size)

    def _flush_removals(self) -> None:
        if self.sweeper is not None:
            self.sweeper.flush()

    def drain_sweeper(self) -> None:
        """Do the queued file work now, on this thread (tests)."""
        if self.sweeper is not None:
            self.sweeper.drain()

    # ---------------------------------------------------------------- lookup
    def _state(self, request: "Request") -> ReqState | None:
        st = self._reqs.get(request.request_id)
        if st is None:
            if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds",
                                                                 None) is not None:
                return None   # KV depends on more than token ids: never cache
            salt = getattr(request, "cache_salt", None)
            root = root_key(self.namespace, salt, self._adapter(request.lora_request))
            retention = retention_of(getattr(request, "kv_transfer_params", None),
                                     self.cfg.ttl_seconds, self.cfg.max_ttl_seconds)
            if retention.error:
                log.warning("kvtier: request %s: %s (served on the defaults)",
                            request.request_id, retention.error)
                self.stats.inc("kvtier_bad_request_params_total")
            st = ReqState(request, KeyChain(root, self.block_size), retention=retention,
                          tenant=salt or "")
            self._reqs[request.request_id] = st
        return st

    def _adapter(self, lora) -> str | None:
        """A LoRA adapter's part of the root key: its name, path and files'
        fingerprint, read once per adapter in this process."""
        if lora is None:
            return None
        ident = self._adapters.get((lora.lora_name, lora.lora_path))
        if ident is None:
            ident = adapter_identity(lora.lora_name, lora.lora_path)
            self._adapters[(lora.lora_name, lora.lora_path)] = ident
        return ident

    def _block_hashes(self, request: "Request"):
        """vLLM's hash of each of the request's kvtier blocks (None: unusable).
        Hashed finer than the block, block i's is the last one inside it (vLLM's
        hashes chain): vLLM's own view of them at a coarser block, indexed lazily."""
        hashes = getattr(request, "block_hashes", None)
        hbs = self._hash_block_size
        if not hashes or hbs == self.block_size:
            return hashes
        if not hbs:
            return None
        from vllm.v1.core.kv_cache_utils import BlockHashListWithBlockSize
        return BlockHashListWithBlockSize(hashes, hbs, self.block_size)

    def _keys(self, st: ReqState, n: int) -> list[bytes]:
        """The keys of the request's first ``n`` blocks (memoized by vLLM's hashes)."""
        chain, memo = st.chain, self._key_memo
        have = len(chain.keys)
        if have >= n:
            return chain.keys
        # The prompt's ids are a plain list (read without a copy); all_token_ids
        # (a read-only view) once the blocks run into the output.
        ids = getattr(st.request, "prompt_token_ids", None)
        if ids is None or len(ids) < n * self.block_size:
            ids = st.request.all_token_ids
        hashes = self._block_hashes(st.request) if memo is not None else None
        if memo is None or not hashes or len(hashes) < n:
            return chain.extend(ids, n)
        chain.keys += memo.leading(chain.root, hashes, have, n)
        known = len(chain.keys)
        chain.extend(ids, n)
        memo.remember(chain.root, hashes, chain.keys, known, n)
        return chain.keys

    def _unpin_hits(self, pending: PendingHit | None, keep=lambda hit: False) -> None:
        if pending is None:
            return
        for hit in pending.hits:
            if not keep(hit):
                self._unpin(hit.ledger_tier, hit.entry)
                self.ledger.forget_adopted(hit.entry)   # a cluster hit not taken

    def _drop_pending(self, pending: PendingHit | None) -> None:
        """A lookup's hit will not be loaded: its pins and slot go."""
        if pending is not None:
            self._unpin_hits(pending)
            self.ledger.give_scratch(pending.scratch)
            pending.scratch = []

    def _unpin(self, tier: str, block: Block) -> None:
        """Release a pin of ``block`` (``tier``: the ledger tier it belongs to)."""
        if tier == DRAM:
            self.ledger.unpin_dram(block)
        else:
            self.ledger.unpin_disk(block)

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        with self._lock:
            self._drop_pending(self._pending_hits.pop(request.request_id, None))
            st = self._state(request)
            bs = self.block_size
            if st is not None:
                st.local_tokens = num_computed_tokens
            if st is None or num_computed_tokens % bs or st.load is not None:
                return 0, False
            if st.loaded_at_preemption == getattr(request, "num_preemptions", 0):
                # Asked again after a load, not preempted since: that load failed
                # from its first block (vLLM freed the pages and starts over). The
                # same load may fail the same way (a dying disk) and vLLM would
                # reschedule it forever; and it reserves the request's pages against
                # its own new load, so with a full GPU cache nothing runs. Recompute.
                if st.loaded:   # once per request (vLLM asks every step it waits)
                    self.stats.inc("kvtier_reload_refused_total")
                    st.loaded = {}   # it got nothing from kvtier (its report says so)
                return 0, False
            max_blocks = (request.num_tokens - 1) // bs   # the last token is recomputed
            start = num_computed_tokens // bs
            if max_blocks <= start:
                return 0, False
            self._keys(st, max_blocks)
            now = self.clock()
            self.stats.inc("kvtier_lookups_total")
            self.stats.inc("kvtier_lookup_tokens_total", (max_blocks - start) * bs)
            hits = self.hits.longest(st.keys_of, start, max_blocks, now)
            self._flush_removals()
            end = hits[-1].block + 1 if hits else start
            if end - start < max(1, self.cfg.min_hit_blocks):
                return 0, False
            for hit in hits:
                self.ledger.pin(hit.entry)
            pending = PendingHit(num_computed_tokens, hits)
            if any(h.record for h in hits):
                # A disk read needs a DRAM slot at least: with every slot held by
                # loads and stores in flight, ask again next step (never a
                # failed load for want of a slot).
                pending.scratch = self.ledger.take_scratch(1, now)
                if not pending.scratch:
                    self._drop_pending(pending)
                    self.stats.inc("kvtier_deferred_lookups_total")
                    self._log_starved(request.request_id, now)
                    return None, False
            self._pending_hits[request.request_id] = pending
            return (end - start) * bs, True

    def _log_starved(self, req_id: str, now: float) -> None:
        """A disk hit found no DRAM slot (the lookup is deferred): say who holds
        the slots, at most every ``STARVED_LOG_S`` (a stuck engine says why)."""
        if now - self._starved_logged < STARVED_LOG_S:
            return
        self._starved_logged = now
        dram = self.ledger.dram
        pinned = sum(1 for key in dram.keys() if dram.peek(key).value.pins)
        log.info("kvtier: no DRAM slot for the disk hit of %s (lookup deferred): %d slots, "
                 "%d in the DRAM tier (%d pinned), %d held by fills and scratch; %d loads "
                 "in flight, %d store jobs, %d writes, %d stages, %d lookups pending",
                 req_id, self.ledger.num_slots, len(self.ledger.dram), pinned,
                 self.ledger.held_slots, len(self._loads), len(self._store_jobs),
                 len(self._writes), len(self._stages), len(self._pending_hits))

    def _probe_shared(self, key: bytes, now: float) -> Block | None:
        """Index miss: another process may have published the block (shared store)."""
        mtime = None
        for s in self.rank_stores:
            m = s.mtime(key)
            if m is None:
                return None
            mtime = m if mtime is None else min(mtime, m)
        return self.ledger.adopt(key, mtime, now)

    def _probe_remote(self, keys: list[bytes], now: float) -> list[Block | None]:
        """Index misses: which blocks the cluster tier holds (every rank's record),
        adopted as disk records to be read from there."""
        n = len(self.rank_stores)
        found = self.remote.exists([s.remote_name(k) for k in keys for s in self.rank_stores])
        if found is None:
            self.stats.inc("kvtier_remote_errors_total", op="lookup")
            return [None] * len(keys)
        return [self.ledger.adopt(k, now, now, remote=True) if all(found[i * n:(i + 1) * n])
                else None for i, k in enumerate(keys)]

    def update_state_after_alloc(self, request: "Request", blocks,
                                 num_external_tokens: int) -> None:
        with self._lock:
            pending = self._pending_hits.pop(request.request_id, None)
            st = self._reqs.get(request.request_id)
            if num_external_tokens == 0 or pending is None or st is None:
                self._drop_pending(pending)
                return
            start = pending.num_computed // self.block_size
            end = start + num_external_tokens // self.block_size
            gpu = blocks.get_block_ids()

            def used(hit: Hit) -> bool:   # vLLM gave the block a real page to fill
                return hit.block < end and not (self.groups[hit.group].windowed
                                                 and gpu[hit.group][hit.block] == NULL_BLOCK)
            self._unpin_hits(pending, keep=used)
            now = self.clock()
            plan = LoadPlan(request.request_id, [], {DRAM: 0, DISK: 0, REMOTE: 0})
            covered = set()
            block_tier: dict[int, str] = {}
            streamed: list[tuple[Hit, int]] = []
            for hit in filter(used, pending.hits):
                self._use(hit.key, now, st)
                page = gpu[hit.group][hit.block]
                covered.add((hit.block, hit.group))
                if hit.tier != DRAM:
                    block_tier[hit.block] = hit.tier
                entry = hit.entry
                if hit.record:
                    # A record on disk: read it into a DRAM block of its own (unless
                    # another request's read of it started since the lookup: join it).
                    dram = self.ledger.dram_block(hit.key, now)
                    if dram is not None:   # READY, or STAGING: join that read
                        self.ledger.unpin_disk(entry)
                        plan.dram_readers.append(self.ledger.pin(dram))
                        plan.items.append(LoadItem(hit.key, page, dram.slot, FROM_SLOT,
                                                   hit.group))
                        continue
                    plan.disk_readers.append(entry)
                    entry.remote = False   # this load reads it through to disk
                    if self.ledger.track and entry.ext is None:   # recovered from disk:
                        entry.ext = self._ext(st, hit.block, hit.group)   # named now
                        self._events.append(self._event(True, DISK, entry))
                    if self._staging < self.max_staging:
                        dram = self.ledger.begin_stage(hit.key, now)
                    if dram is not None:
                        dram.ext = entry.ext
                        self._staging += 1
                        self._stages[hit.key] = Pending([dram])
                        plan.dram_readers.append(self.ledger.pin(dram))   # the scatter reads it
                        plan.items.append(LoadItem(hit.key, page, dram.slot, READ, hit.group))
                        continue
                    streamed.append((hit, page))
                    continue
                plan.dram_readers.append(entry)   # READY, or STAGING (joins the read)
                plan.items.append(LoadItem(hit.key, page, entry.slot, FROM_SLOT, hit.group))
            if streamed:
                plan.scratch, pending.scratch = pending.scratch, []
                plan.scratch += self.ledger.take_scratch(
                    min(len(streamed), STREAM_SLOTS) - len(plan.scratch), now)
                for j, (hit, page) in enumerate(streamed):
                    slot = plan.scratch[j % len(plan.scratch)] if plan.scratch else NO_SLOT
                    plan.items.append(LoadItem(hit.key, page, slot, STREAM, hit.group))
                self.stats.inc("kvtier_streamed_blocks_total", len(streamed))
            self.ledger.give_scratch(pending.scratch)
            # vLLM accepted fewer tokens than offered: a window group may now need
            # blocks the hit did not include. They fail (recompute from there).
            for g in self.window_groups:
                for i in range(start, end):
                    if (i, g.index) not in covered and gpu[g.index][i] != NULL_BLOCK:
                        plan.items.append(LoadItem(b"", gpu[g.index][i], NO_SLOT, FROM_SLOT,
                                                   g.index))
            for i in range(start, end):
                plan.tokens_by_tier[block_tier.get(i, DRAM)] += self.block_size
            for tier, tokens in plan.tokens_by_tier.items():
                self.stats.inc("kvtier_hit_tokens_total", tokens, tier=tier)
            st.loaded = dict(plan.tokens_by_tier)
            st.loaded_at_preemption = getattr(request, "num_preemptions", 0)
            st.load = plan
            self._loads[request.request_id] = plan
            self._new_loads.append(LoadJob(request.request_id, plan.items))

    def hit_sources(self, request: "Request", num_external_tokens: int) -> dict[str, int]:
        plan = self._loads.get(request.request_id)
        if plan is None or num_external_tokens == 0:
            return {}
        out, left = {}, num_external_tokens
        for tier in (DRAM, DISK, REMOTE):
            take = min(left, plan.tokens_by_tier[tier])
            if take:
                out[tier] = take
                left -= take
        if left:
            out[DISK] = out.get(DISK, 0) + left
        return out

    def _use(self, key: bytes, now: float, st: ReqState | None = None,
             again: bool = True) -> bool:
        """A use of ``key`` by request ``st``: LRU and TTL refreshed in every tier
        (at least the TTL the request asked for; kept if it pins), and the record's
        mtime (its last use after a restart) when it is due; False if no tier has it.
        ``again``: a new use (a hit, another request storing it), not the refresh
        at the end of the request that stored it: the disk admission counts it."""
        ttl = st.retention.ttl if st is not None else 0.0
        present = self.ledger.touch(key, now, ttl)
        if present and st is not None and st.retention.pin:
            self._keep(key, now, st)
        block = self.ledger.disk_block(key, now) if present else None
        if again and present and block is None and self.ledger.disk is not None \
                and self.admission.at_hit(key, now):
            self._write_backs.append(key)
        if block is not None and block.state is State.READY and self.ledger.touch_due(block, now):
            self.sweeper.touch(key, now)
        return present

    def _keep(self, key: bytes, now: float, st: ReqState) -> None:
        """Pin ``key`` for the request's TTL, within the budget (refusals counted)."""
        if self.ledger.keep(key, now + st.retention.ttl, st.tenant, now) is False \
                and key not in st.pins_refused:
            st.pins_refused.add(key)
            self.stats.inc("kvtier_pins_refused_total")

    # ---------------------------------------------------------------- stores
    def build_connector_meta(self, so) -> KVTierMetadata:
        with self._lock:
            # A hit vLLM did not allocate pages for this step (no room, no token
            # budget) lets go of its pins and slot now; vLLM asks again next step.
            # Held across steps, its slot could starve a request that holds GPU
            # pages and waits for one, while vLLM keeps pages reserved for that
            # request: neither could move (a stall seen in the stress test).
            for pending in self._pending_hits.values():
                self._drop_pending(pending)
            self._pending_hits.clear()
            meta = KVTierMetadata(loads=self._new_loads,
                                  flush_gathers=bool(so.preempted_req_ids) or self._flush_next,
                                  await_sending=self._await_sending,
                                  idle_step=so.total_num_scheduled_tokens == 0)
            self._new_loads = []
            self._await_sending = set()
            self._flush_next = False
            now = self.clock()
            self._step = (time.perf_counter(), so.total_num_scheduled_tokens)
            self._dram_blocked = False   # set by the step's first store that finds no slot
            for req_id, st in list(self._finishing.items()):   # their pages are held
                self._store_blocks(meta, req_id, st, now)
                if st.handled_blocks < st.computed_blocks and now - st.finished_at < STORE_WAIT_S:
                    continue
                self._give_up_stores(st)
                del self._finishing[req_id]
                self._end_use(st, now)            # the blocks stored since: LRU order
                self._await_sending.add(req_id)   # next step: after this step's copies
            for req in so.scheduled_new_reqs:
                self._plan_stores(meta, req.req_id, req.block_ids, True,
                                  req.num_computed_tokens, so, now)
            cached = so.scheduled_cached_reqs
            for i, req_id in enumerate(cached.req_ids):
                self._plan_stores(meta, req_id, cached.new_block_ids[i],
                                  req_id in cached.resumed_req_ids,
                                  cached.num_computed_tokens[i], so, now)
            if self.ledger.disk is not None:
                if self.admission.writes_back:
                    self._write_backs += self.ledger.dirty_lru(self._write_back_window(), now)
                self._write_back(meta, now)
            if self.remote is not None:   # no lookup holds unpinned blocks here
                self.ledger.make_disk_room(self._remote_room, now)
            self._flush_removals()
            return meta

    def _write_back_window(self) -> int:
        """on_dram_evict: DRAM blocks this near eviction are written before it
        comes (the LRU's oldest eighth, and at least what a step may store)."""
        return max(8, self.ledger.num_slots // 8)

    def _write_back(self, meta: KVTierMetadata, now: float) -> None:
        """Write READY DRAM blocks without a record from their slots (no GPU copy):
        a second use (second_use) or DRAM about to evict them (on_dram_evict). At
        most as many as the workers' write queues take; the rest wait a step."""
        keys, self._write_backs = self._write_backs, []
        room = self.cfg.io_threads * 8 - len(self._writes)
        items: list[StoreItem] = []
        for key in dict.fromkeys(keys):
            dram = self.ledger.dram_block(key, now)
            if dram is None:
                continue
            if dram.state is not State.READY or not self.ledger.writable(key):
                if dram.state is State.STORING or self.ledger.removing(key):
                    self._write_backs.append(key)   # after its copy / the old record's removal
                continue
            if room <= 0:
                self._write_backs.append(key)
                continue
            disk, reuse = self.ledger.begin_write(key, now)
            if disk is None:
                self.stats.inc("kvtier_skipped_stores_total", reason="disk_full")
                continue
            room -= 1
            disk.ext = dram.ext
            self._writes[key] = Pending([disk], readers=[self.ledger.pin(dram)])
            items.append(StoreItem(key, WRITE_ONLY, dram.slot, True, 0, reuse))
        if items:
            job = self._next_job
            self._next_job += 1
            self._store_jobs[job] = Pending([])
            meta.stores.append(StoreJob(job, "", items))

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
        # (after a preemption, what the resumed request has computed again)
        st.computed_blocks = min([done // self.block_size] + [len(ids) for ids in st.block_ids])
        st.computed_at_preemption = getattr(request, "num_preemptions", 0)
        self._store_blocks(meta, req_id, st, now)

    def _store_blocks(self, meta: KVTierMetadata, req_id: str, st: ReqState,
                      now: float) -> None:
        """Store jobs for ``st``'s computed blocks not yet handled, in order. Without a
        free DRAM slot the rest waits for a later step (its pages hold the KV: a
        running request's, or a finished one's, held), unless a sliding window may
        free a page meanwhile: then that block is skipped."""
        n_full = st.computed_blocks
        wait = not self.window_groups
        if n_full <= st.handled_blocks or (wait and self._dram_blocked):
            return
        self._keys(st, n_full)
        items: list[StoreItem] = []
        fills: list[Block] = []
        handled = n_full
        for i in range(st.handled_blocks, n_full):
            if handled < n_full:
                break
            for g in self.groups:
                page = st.block_ids[g.index][i]
                if g.windowed and page == NULL_BLOCK:   # left the window before it was stored
                    continue
                key = st.key(i, g.index)
                if self._use(key, now, st):
                    continue
                ttl = st.retention.ttl
                dram = self.ledger.begin_store(key, now, ttl)
                if dram is None and wait:
                    # every slot held by work in flight: this block and the rest wait
                    # (and other requests' stores this step do not look again)
                    handled, self._dram_blocked = i, True
                    break
                if dram is None:
                    self.stats.inc("kvtier_skipped_stores_total", reason="dram_full")
                    continue
                ext = self._ext(st, i, g.index)
                dram.ext = ext
                fills.append(dram)
                to_disk, reuse = False, None
                if self.ledger.disk is not None and self.admission.at_store(key, now):
                    disk, reuse = self.ledger.begin_write(key, now, ttl)
                    to_disk = disk is not None
                    if to_disk:   # the write reads the slot
                        disk.ext = ext
                        self._writes[key] = Pending([disk], readers=[self.ledger.pin(dram)])
                    elif self.ledger.removing(key):
                        # Its old record (found bad) is being removed: written from
                        # the DRAM slot once that is done (_write_back).
                        self._write_backs.append(key)
                    else:
                        self.stats.inc("kvtier_skipped_stores_total", reason="disk_full")
                items.append(StoreItem(key, page, dram.slot, to_disk, g.index, reuse))
                if g.index == 0:
                    st.stored_blocks += 1
                if st.retention.pin:
                    self._keep(key, now, st)
                if g.windowed:
                    self._flush_next = True   # the page may leave the window next step
        st.handled_blocks = handled
        if items:
            job = self._next_job
            self._next_job += 1
            self._store_jobs[job] = Pending(fills, req_id=req_id)
            meta.stores.append(StoreJob(job, req_id, items))
            st.store_jobs += 1

    def _give_up_stores(self, st: ReqState) -> None:
        """A finished request's blocks that found no DRAM slot within STORE_WAIT_S
        are not stored."""
        left = st.computed_blocks - st.handled_blocks
        if left > 0:
            self.stats.inc("kvtier_skipped_stores_total", left * len(self.groups),
                           reason="dram_full")
            st.handled_blocks = st.computed_blocks

    # ----------------------------------------------------------- completions
    def update_connector_output(self, output) -> None:
        with self._lock:
            meta = getattr(output, "kv_connector_worker_meta", None)
            if isinstance(meta, KVTierWorkerMeta):
                self._apply_worker_meta(meta)
            for req_id in output.finished_recving or ():
                self._finish_load(req_id)
            self._held_pages.difference_update(getattr(output, "finished_sending", None) or ())
            self._flush_removals()

    def has_pending_work(self) -> bool:
        """Copies, writes or reads in flight: the engine must keep stepping (vLLM's
        has_pending_push_work) so that their answers arrive and free their slots
        now, not when the next request comes."""
        with self._lock:
            return bool(self._store_jobs or self._writes or self._stages or self._loads
                        or self._finishing or self._await_sending)

    def has_pending_block_frees(self) -> bool:
        """Finished requests' pages that kvtier's copies still read: they come back
        within a step or two (vLLM waits for them instead of preempting)."""
        with self._lock:
            return bool(self._held_pages)

    def _answer(self, table: dict, key, ok: int, failed: int) -> Pending | None:
        """Count ranks' answers for ``table[key]``; the Pending once all have answered."""
        p = table.get(key)
        if p is None:
            log.error("kvtier: an answer for %r that is not in flight (ignored)", key)
            return None
        p.res.ok += ok
        p.res.failed += failed
        if p.res.ok + p.res.failed < self.tp_size:
            return None
        del table[key]
        return p

    def _apply_worker_meta(self, meta: KVTierWorkerMeta) -> None:
        L = self.ledger
        for job in set(meta.stored) | set(meta.store_failed):
            p = self._answer(self._store_jobs, job, meta.stored.get(job, 0),
                             meta.store_failed.get(job, 0))
            if p is None:
                continue
            st = self._reqs.get(p.req_id)
            if st is not None:
                st.store_jobs -= 1
            ok = p.res.failed == 0
            for block in p.blocks:
                L.end_store(block, ok)
            if ok and p.blocks:
                self.stats.inc("kvtier_stored_blocks_total", len(p.blocks), tier=DRAM)
                self.stats.inc("kvtier_stored_bytes_total", len(p.blocks) * self.record_size,
                               tier=DRAM)
        for key in set(meta.written) | set(meta.write_failed):
            p = self._answer(self._writes, key, meta.written.get(key, 0),
                             meta.write_failed.get(key, 0))
            if p is None:
                continue
            for dram in p.readers:
                L.unpin_dram(dram)
            ok = p.res.failed == 0
            L.end_write(p.blocks[0], ok)
            if ok:
                self.stats.inc("kvtier_stored_blocks_total", tier=DISK)
                self.stats.inc("kvtier_stored_bytes_total", self.record_size, tier=DISK)
        for key in set(meta.staged) | set(meta.stage_failed):
            p = self._answer(self._stages, key, meta.staged.get(key, 0),
                             meta.stage_failed.get(key, 0))
            if p is not None:
                self._staging -= 1
                L.end_stage(p.blocks[0], p.res.failed == 0)
        for key in meta.bad_records:   # a read proved the record bad on some rank
            block = L.disk_block(key, self.clock())
            if block is not None and block.state is State.READY:
                L.drop_disk(block)
        for reason, n in meta.fail_reasons.items():
            if reason in ("backpressure", "gather", "store_full"):
                self.stats.inc("kvtier_skipped_stores_total", n, reason=reason)
            elif reason == "remote_put_skipped":   # too many puts waiting on the cluster
                self.stats.inc("kvtier_skipped_stores_total", n, reason="remote_backpressure")
            elif reason == "remote_put_unavailable":   # not connected, or backing off
                self.stats.inc("kvtier_skipped_stores_total", n, reason="remote_unavailable")
            elif reason == "write_error":
                self.stats.inc("kvtier_io_errors_total", n)
            elif reason in ("remote_put", "remote_get"):
                self.stats.inc("kvtier_remote_errors_total", n, op=reason[len("remote_"):])

            else:
                self.stats.inc("kvtier_load_failures_total", n, reason=reason)
                if reason in CHECKSUM_REASONS:
                    self.stats.inc("kvtier_checksum_failures_total", n)
                    if reason == "bad_mac":   # written without the store's secret
                        self.stats.inc("kvtier_bad_mac_records_total", n)
                elif reason == "io_error":
                    self.stats.inc("kvtier_io_errors_total", n)
        if meta.remote_stored:   # records of single ranks
            self.stats.inc("kvtier_stored_blocks_total", meta.remote_stored / self.tp_size,
                           tier=REMOTE)
            self.stats.inc("kvtier_stored_bytes_total",
                           meta.remote_stored * self.geometry.record_bytes, tier=REMOTE)
        for kind, ranks in meta.copy_engines.items():   # each rank's, once at start-up
            self.stats.add("kvtier_copy_engine_info", ranks, copy_engine=kind)
        for tier, nbytes, secs in meta.load_timings:
            self.stats.inc("kvtier_loaded_bytes_total", nbytes, tier=tier)
            self.stats.observe("kvtier_load_seconds", secs, tier=tier)
            self.cost.observe_load(tier, nbytes, secs)

    def _finish_load(self, req_id: str) -> None:
        """Every rank finished the request's load: release what it held."""
        plan = self._loads.pop(req_id, None)
        if plan is None:
            return
        st = self._reqs.get(req_id)
        if st is not None and st.load is plan:
            st.load = None
        for block in plan.dram_readers:
            self.ledger.unpin_dram(block)
        for block in plan.disk_readers:
            self.ledger.unpin_disk(block)
        self.ledger.give_scratch(plan.scratch)

    def request_finished(self, request: "Request") -> tuple[bool, dict | None]:
        """(keep, report). keep: vLLM keeps the request's blocks until the workers
        report it in finished_sending (store copies may still read them). report:
        what the request got, for the response's ``kv_transfer_params``."""
        with self._lock:
            self._drop_pending(self._pending_hits.pop(request.request_id, None))
            st = self._reqs.pop(request.request_id, None)
            if st is None:
                return False, None
            now = self.clock()
            self._end_use(st, now)
            report = self._report(st)
            if st.load is not None:
                # Aborted while its load is in flight: vLLM frees the blocks when the
                # load is reported finished (finished_recving), never before.
                self._give_up_stores(st)
                return False, report
            if st.computed_at_preemption != getattr(request, "num_preemptions", 0):
                # Preempted since its blocks were computed (its pages freed), also
                # outside a schedule (vLLM's reset_prefix_cache of running requests)
                st.computed_blocks = min(st.computed_blocks, st.handled_blocks)
            if st.handled_blocks < st.computed_blocks:
                # Blocks that wait for a DRAM slot: stored from its pages, held until
                # they are (build_connector_meta), at most STORE_WAIT_S. (Its report,
                # made now, counts the stores planned so far.)
                st.finished_at = now
                self._finishing[request.request_id] = st
                self._held_pages.add(request.request_id)
                return True, report
            if st.store_jobs:
                self._await_sending.add(request.request_id)
                self._held_pages.add(request.request_id)
                return True, report
            return False, report

    def _end_use(self, st: ReqState, now: float) -> None:
        """A use ends at completion. Refresh the last block first so that the
        prefix's first block, the one every continuation needs, leaves last."""
        for key in reversed(st.chain.keys[:st.handled_blocks]):
            for g in reversed(self.groups):
                self._use(group_key(key, g.index), now, st, again=False)

    def _report(self, st: ReqState) -> dict:
        """Like a provider's cache_read/cache_creation tokens: where the prompt's KV
        came from, what was stored, the TTL granted (and any refused pin or bad
        parameter)."""
        r = st.retention
        out = {"cached_tokens": {"gpu": st.local_tokens, "dram": st.loaded.get(DRAM, 0),
                                 "disk": st.loaded.get(DISK, 0),
                                 "remote": st.loaded.get(REMOTE, 0)},
               "stored_tokens": st.stored_blocks * self.block_size,
               "ttl_seconds": r.ttl, "pinned": r.pin and not st.pins_refused}
        if st.pins_refused:
            out["pin_refused_blocks"] = len(st.pins_refused)
        if r.error:
            out["error"] = r.error
        return {"kvtier": out}

    # ------------------------------------------------------------- reporting
    def take_stats(self):
        """Metrics for vLLM's /metrics (see kvtier.vllm.metrics): counters, occupancy.

        vLLM calls this once per step, after the step ran: the step's duration
        and token count feed the prefill-rate estimate of the cost model.
        """
        with self._lock:
            if self._step is not None:
                t0, tokens = self._step
                self._step = None
                if tokens >= PREFILL_STEP_TOKENS:
                    self.cost.observe_prefill(tokens, time.perf_counter() - t0)
            L = self.ledger
            for tier in (L.dram, L.disk):
                if tier is None:
                    continue
                for cause, n in tier.stats.evictions.items():
                    self.stats.counters.setdefault("kvtier_evictions_total", {})[
                        f"cause={cause},tier={tier.name}"] = n
                size = self.geometry.slot_bytes * self.tp_size if tier is L.dram else 1
                self.stats.set("kvtier_occupancy_bytes", tier.used * size, tier=tier.name)
                self.stats.set("kvtier_capacity_bytes", tier.capacity * size, tier=tier.name)
                self.stats.set("kvtier_blocks", len(tier), tier=tier.name)
            kept = L.kept_by_tenant(self.clock())
            unit = 1 if self.ledger_has_disk else self.geometry.slot_bytes * self.tp_size
            self.stats.set("kvtier_pinned_bytes", sum(kept.values()) * unit)
            return self.stats.take()

    # ------------------------------------------------------------- invariants
    def check_invariants(self, idle: bool = False) -> None:
        """Assert what must always hold (tests): the ledger's own invariants, pins
        accounted for by in-flight work, nothing unready that nothing fills."""
        L = self.ledger
        L.check()
        expect: dict[int, int] = {}   # id(block) -> pins that in-flight work holds

        def hold(b: Block):
            expect[id(b)] = expect.get(id(b), 0) + 1
        for p in self._pending_hits.values():
            for h in p.hits:
                hold(h.entry)
        for plan in self._loads.values():
            for b in plan.dram_readers + plan.disk_readers:
                hold(b)
        for table in (self._store_jobs, self._writes, self._stages):
            for p in table.values():
                for b in p.blocks + p.readers:
                    hold(b)
        for _, b in L.blocks():
            assert b.pins == expect.get(id(b), 0), (b, expect.get(id(b), 0))
            if b.state is not State.READY:
                assert b.pins >= 1, f"{b} is not ready and nothing fills it"
        if idle:
            assert not expect, f"pins held while idle: {self._pending_hits} {self._loads} {self._store_jobs} {self._writes} {self._stages}"
            assert L.held_slots == 0 and self._staging == 0
            assert not self._held_pages and not self.has_pending_work()
