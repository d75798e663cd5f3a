"""A miniature vLLM around the real connector halves, for lifecycle tests.

``MiniEngine`` drives the real ``KVTierScheduler`` and one real ``KVTierWorker``
per TP rank (CPU tensors as the "GPU" KV cache, a real ``DiskStore`` in a temp
directory) through the hooks and in the order vLLM calls them, with vLLM's own
``Request``, ``SchedulerOutput`` and ``KVConnectorOutput`` types. What it leaves
out is the model: the "forward" writes each computed block's page with bytes
derived from the block's key and the rank, so every page kvtier reloads can be
checked byte for byte (``violations``).

What vLLM does and the engine mirrors: lookups, page allocation, loads that
end with ``finished_recving`` (failed blocks recomputed), stores after the
forward, ``request_finished`` with delayed frees (``finished_sending``, or
``finished_recving`` for a request aborted while loading), preemption (pages
freed at once, the next step flushes), per-rank outputs aggregated like
``KVOutputAggregator`` (a rank's outputs can be held back a step), restarts.
Faults: a rank's next reads / gathers / writes fail.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvtier.config import KVTierConfig
from kvtier.cache.keys import KeyChain, root_key
from kvtier.vllm.scheduler import KVTierScheduler
from kvtier.store.slots import SlotGeometry
from kvtier.store.record import RecordError
from kvtier.vllm.worker import KVTierWorker

BS = 32
LAYERS, HEADS, CONTENT = 2, 1, 16
PAYLOAD = LAYERS * HEADS * BS * CONTENT          # bytes of one block, one rank
NS = bytes(range(16))


def content(key: bytes, rank: int) -> torch.Tensor:
    """The bytes a block's page holds on ``rank``: [layers, heads, BS, CONTENT]."""
    seed = hashlib.blake2b(key + bytes([rank]), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(seed, "little"))
    return torch.from_numpy(rng.integers(0, 256, (LAYERS, HEADS, BS, CONTENT), dtype=np.uint8))


@dataclass
class Blocks:
    ids: tuple

    def get_block_ids(self):
        return self.ids


@dataclass
class Req:
    vreq: object
    status: str = "waiting"   # waiting | loading | running | done
    pages: list[int] = field(default_factory=list)
    computed: int = 0         # tokens whose KV is in the pages
    loaded: int = 0           # tokens the connector loads
    scheduled_before: bool = False
    resumed: bool = False
    hold: set = field(default_factory=set)   # what must arrive before pages are freed
    aborted: bool = False
    max_tokens: int = 1
    invalid: set = field(default_factory=set)   # pages reported bad while loading


_LIVE: "weakref.WeakSet[MiniEngine]" = weakref.WeakSet()


def close_engines() -> None:
    """Shut down every MiniEngine still open (their copy threads and I/O pools)."""
    for e in list(_LIVE):
        e.close()


class MiniEngine:
    def __init__(self, root: Path, tp: int = 2, pages: int = 48, slots: int = 16,
                 disk_records: int | None = 64, ttl: float = 3600.0, io_threads: int = 2,
                 **config):
        self.root = Path(root)
        self.tp = tp
        self.num_pages = pages
        self.slots = slots
        self.ttl = ttl
        self.now = time.time()
        self.record = SlotGeometry(PAYLOAD, slots).record_bytes
        extra = {"dram_bytes": slots * self.record, "ttl_seconds": ttl, "io_threads": io_threads,
                 "disk_path": str(self.root / "store")}
        extra.update(config)
        if disk_records is None:
            extra["disk"] = False
        else:
            # the scheduler keeps 1/16 of the budget (>= 0 records) for free files
            extra["disk_bytes"] = disk_records * self.record * tp
        self.cfg = KVTierConfig.from_extra_config(extra)
        self.violations: list[str] = []
        self.load_failures = 0
        self.deferred = 0
        self.reports: dict[str, dict | None] = {}
        self.hits = {"tokens": 0, "loaded_ok": 0}
        self._faults: dict[tuple[int, str], list[str]] = {}
        self._held: dict[int, list] = {}      # rank -> outputs held back
        self.hold_back: set[int] = set()      # ranks whose next outputs are delayed a step
        self._start()

    # ---------------------------------------------------------------- set-up
    def _start(self) -> None:
        geometry = SlotGeometry(PAYLOAD, self.slots)
        self.sched = KVTierScheduler(self.cfg, NS, self.tp, BS, geometry,
                                     clock=lambda: self.now, start_sweeper=False)
        self.workers, self.kv = [], []
        for r in range(self.tp):
            w = KVTierWorker(self.cfg, NS, r, self.tp, geometry)
            caches = {f"l{i}": torch.zeros(self.num_pages, HEADS, BS, CONTENT, dtype=torch.uint8)
                      for i in range(LAYERS)}
            w.register_kv_caches(caches, self.num_pages, "sim")
            self._wrap_faults(w, r)
            self.workers.append(w)
            self.kv.append(caches)
        _LIVE.add(self)
        self.free_pages = list(range(self.num_pages - 1, 0, -1))   # page 0: vLLM's null block
        self.reqs: dict[str, Req] = {}
        self.finished_ids: set[str] = set()
        self.preempted: set[str] = set()
        self._pending_outputs = []
        self._held = {}
        self._counts = {"recv": {}, "send": {}}

    def _wrap_faults(self, w: KVTierWorker, rank: int) -> None:
        """A rank's next reads / gathers / writes fail as queued by ``fail``."""
        engine, store = w.engines[0], w.store

        def fault(kind):
            q = self._faults.get((rank, kind))
            return q.pop(0) if q else None

        def error(how, kind):
            if how == "io":
                return OSError(5, f"injected {kind} fault")
            if how in ("checksum", "missing"):
                return RecordError(how, "injected")
            return RuntimeError(f"injected {kind} bug")

        def faulty(kind, fn):
            def call(*a, **kw):
                how = fault(kind)
                if how is not None:
                    raise error(how, kind)
                return fn(*a, **kw)
            return call

        def read_batch(items, inner=store.read_batch if store else None):
            hows = [fault("read") for _ in items]
            if "bug" in hows:
                raise RuntimeError("injected read bug")
            out = inner(items)
            return [error(h, "read") if h else r for h, r in zip(hows, out)]
        engine.gather = faulty("gather", engine.gather)
        if store is not None:
            store.read_batch = read_batch
            store.write = faulty("write", store.write)

    def fail(self, rank: int, kind: str, how: str = "io", n: int = 1) -> None:
        self._faults.setdefault((rank, kind), []).extend([how] * n)

    def close(self) -> None:
        """The workers stop (queued copies and writes finish first)."""
        for w in self.workers:
            w.shutdown()
        self.workers = []
        _LIVE.discard(self)

    def restart(self, slots: int | None = None) -> None:
        """The engine dies (requests are lost) and starts again on the same store
        (``slots``: with another DRAM size)."""
        self.drain()
        self.close()
        self.sched.drain_sweeper()
        if slots is not None:
            self.slots = slots
            self.cfg = type(self.cfg).from_extra_config(
                {**self._extra(), "dram_bytes": slots * self.record})
        self._start()

    def _extra(self) -> dict:
        c = self.cfg
        return {"ttl_seconds": c.ttl_seconds, "io_threads": c.io_threads,
                "disk_path": c.disk_path, "disk_bytes": c.disk_bytes, "disk": c.disk,
                "disk_admission": c.disk_admission, "secret_file": c.secret_file,
                "shared": c.shared}

    # -------------------------------------------------------------- requests
    def add(self, rid: str, tokens: list[int], max_tokens: int = 1, salt: str | None = None,
            kvtier: dict | None = None) -> None:
        """A request; it decodes ``max_tokens`` tokens after its prefill. ``kvtier``:
        its kv_transfer_params' "kvtier" object (retention), as the API passes it."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request
        extra = {"kv_transfer_params": {"kvtier": kvtier}} if kvtier is not None else None
        sp = SamplingParams(max_tokens=max_tokens, extra_args=extra)
        self.reqs[rid] = Req(Request(rid, list(tokens), sp, None, cache_salt=salt),
                             max_tokens=max_tokens)

    def keys(self, rid: str) -> list[bytes]:
        vreq = self.reqs[rid].vreq
        return KeyChain(root_key(NS), BS).extend(vreq.all_token_ids)

    def active(self) -> list[str]:
        return [rid for rid, r in self.reqs.items() if r.status != "done"]

    def busy(self) -> bool:
        """Requests running, or finished ones whose pages vLLM still holds."""
        return any(r.status != "done" or r.pages is not None for r in self.reqs.values())

    def _free(self, req: Req) -> None:
        """Pages back to the pool; ``pages = None``: vLLM forgot the request."""
        self.free_pages.extend(req.pages)
        req.pages = None if req.status == "done" else []
        req.hold.clear()

    def _finish(self, rid: str) -> None:
        """vLLM's _free_request: the connector may keep the pages."""
        req = self.reqs[rid]
        if req.status == "loading":
            req.hold.add("recv")      # vLLM frees on finished_recving
        keep, self.reports[rid] = self.sched.request_finished(req.vreq)
        if keep:
            req.hold.add("send")
        req.status = "done"
        self.finished_ids.add(rid)
        if not req.hold:
            self._free(req)

    def abort(self, rid: str) -> None:
        req = self.reqs[rid]
        if req.status == "done":
            return
        req.aborted = True
        if req.status == "waiting":
            self.sched.request_finished(req.vreq)   # pins of a pending lookup
            req.status = "done"
            self.finished_ids.add(rid)
            self._free(req)
            return
        self._finish(rid)

    def preempt(self, rid: str) -> None:
        req = self.reqs[rid]
        if req.status != "running":
            return
        self._free(req)
        req.status, req.computed, req.loaded = "waiting", 0, 0
        req.resumed = True
        req.vreq.num_preemptions += 1   # as vLLM's _preempt_request
        self.preempted.add(rid)

    # ------------------------------------------------------------------ step
    def step(self, drain: bool = True) -> None:
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

        new, cached = [], CachedRequestData.make_empty()
        scheduled: dict[str, int] = {}
        for rid, req in self.reqs.items():
            if req.status != "waiting":
                continue
            vreq = req.vreq
            n, is_async = self.sched.get_num_new_matched_tokens(vreq, 0)
            if n is None:
                self.deferred += 1
                continue   # the connector asks to be asked again later
            assert n % BS == 0 and (n == 0) == (not is_async)
            need = math.ceil((vreq.num_prompt_tokens + req.max_tokens) / BS)
            if len(self.free_pages) < need:
                continue   # vLLM would ask again next step
            req.pages = [self.free_pages.pop() for _ in range(need)]
            self.sched.update_state_after_alloc(vreq, Blocks((list(req.pages),)), n)
            if n:
                req.status, req.loaded = "loading", n
                self.hits["tokens"] += n
            else:
                req.status = "running"
        for rid, req in self.reqs.items():
            if req.status != "running":
                continue
            todo = max(1, req.vreq.num_tokens - req.computed)   # a decode step: 1 token
            scheduled[rid] = todo
            ids = (list(req.pages),)
            if not req.scheduled_before:
                new.append(NewRequestData.from_request(req.vreq, ids))
                new[-1].num_computed_tokens = req.computed
            else:
                cached.req_ids.append(rid)
                cached.new_block_ids.append(ids if req.resumed else None)
                cached.num_computed_tokens.append(req.computed)
                cached.num_output_tokens.append(0)
                cached.new_token_ids.append([])
                if req.resumed:
                    cached.resumed_req_ids.add(rid)
            req.scheduled_before, req.resumed = True, False
        so = SchedulerOutput(scheduled_new_reqs=new, scheduled_cached_reqs=cached,
                             num_scheduled_tokens=scheduled,
                             total_num_scheduled_tokens=sum(scheduled.values()),
                             scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                             num_common_prefix_blocks=[0], finished_req_ids=self.finished_ids,
                             free_encoder_mm_hashes=[], preempted_req_ids=self.preempted)
        self.finished_ids, self.preempted = set(), set()
        meta = self.sched.build_connector_meta(so)
        for w in self.workers:
            w.handle_preemptions(meta)
            w.submit_loads(meta)
        self._forward(scheduled)
        for w in self.workers:
            w.submit_stores(meta)
        if drain:
            self.drain()
        outputs = []
        for r, w in enumerate(self.workers):
            out = (w.transfer_results(so.finished_req_ids, idle_step=meta.idle_step),
                   w.take_invalid_blocks(),
                   w.take_worker_meta())
            self._held.setdefault(r, []).append(out)
            if r not in self.hold_back:
                outputs.extend(self._held.pop(r))
        self.hold_back = set()
        self._deliver(outputs)
        for rid in scheduled:   # sample a token; done after max_tokens of them
            req = self.reqs[rid]
            if req.status == "running":
                req.vreq.append_output_token_ids(3 + len(req.vreq.output_token_ids))
                if len(req.vreq.output_token_ids) >= req.max_tokens:
                    self._finish(rid)
        self.sched.drain_sweeper()

    def _forward(self, scheduled: dict[str, int]) -> None:
        """Write the KV of each scheduled block: full and partial blocks alike."""
        for rid, n in scheduled.items():
            req = self.reqs[rid]
            keys = self.keys(rid)
            end = req.computed + n
            for i in range(req.computed // BS, math.ceil(end / BS)):
                key = keys[i] if i < len(keys) else b"partial" + rid.encode()
                for r in range(self.tp):
                    page = content(key, r)
                    for l in range(LAYERS):
                        self.kv[r][f"l{l}"][req.pages[i]] = page[l]
            req.computed = end

    def _deliver(self, outputs) -> None:
        """KVOutputAggregator, then the scheduler's update_from_output."""
        from vllm.v1.outputs import KVConnectorOutput
        sending, recving, invalid, meta = set(), set(), set(), None
        for (snd, rcv, failed), inv, wm in outputs:
            invalid |= inv
            for rid in failed:   # a whole load failed (vLLM: failed_recving)
                req = self.reqs.get(rid)
                if req is not None and req.pages:
                    invalid |= set(req.pages)
            if wm is not None:
                meta = wm if meta is None else meta.aggregate(wm)
            for kind, ids, done in (("send", snd, sending), ("recv", rcv, recving)):
                for rid in ids or ():
                    c = self._counts[kind][rid] = self._counts[kind].get(rid, 0) + 1
                    if c == self.tp:
                        del self._counts[kind][rid]
                        done.add(rid)
        out = KVConnectorOutput(finished_sending=sending or None, finished_recving=recving or None,
                                kv_connector_worker_meta=meta, invalid_block_ids=invalid)
        self.sched.update_connector_output(out)
        # As vLLM's scheduler (failed_recving_kv_req_ids): a bad page reported while
        # the load is still open on another rank is remembered until it finishes.
        for req in self.reqs.values():
            if req.status == "loading" and req.pages:
                req.invalid |= invalid & set(req.pages)
        # As vLLM's Scheduler._update_from_kv_xfer_finished: a finished request's
        # blocks are freed (and the request forgotten) on the first of the two.
        for rid in recving:
            req = self.reqs[rid]
            if req.pages is None:
                self.violations.append(f"{rid}: finished_recving after it was freed (engine crash)")
                continue
            if req.status == "done":
                self._free(req)
                continue
            self._check_loaded(rid, invalid)
        for rid in sending:
            req = self.reqs[rid]
            if req.pages is None or req.status != "done":
                self.violations.append(f"{rid}: finished_sending for a request vLLM does not "
                                       f"hold (engine crash)")
                continue
            self._free(req)

    def _check_loaded(self, rid: str, invalid: set[int]) -> None:
        """The request's load ended: every block not reported invalid must hold
        exactly the bytes of its key on every rank. Then it runs from the first bad one."""
        req = self.reqs[rid]
        keys = self.keys(rid)
        n = req.loaded // BS
        good = n
        invalid, req.invalid = invalid | req.invalid, set()
        for i in range(n):
            if req.pages[i] in invalid:
                good = min(good, i)
                continue
            for r in range(self.tp):
                want = content(keys[i], r)
                for l in range(LAYERS):
                    if not torch.equal(self.kv[r][f"l{l}"][req.pages[i]], want[l]):
                        self.violations.append(f"{rid} block {i} rank {r}: wrong KV")
        if good < n:
            self.load_failures += n - good
        if n and good == 0:   # as vLLM: nothing valid, the pages go, it is looked up again
            self._free(req)
            req.status, req.loaded, req.computed = "waiting", 0, 0
            return
        self.hits["loaded_ok"] += good * BS
        req.computed = good * BS
        req.status = "running"

    # --------------------------------------------------------------- waiting
    def drain(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(w.idle() for w in self.workers):
            if time.monotonic() > deadline:
                raise TimeoutError("kvtier workers did not go idle")
            time.sleep(0.001)

    def settle(self, steps: int = 50) -> None:
        """Step until every request is done and nothing is held back."""
        for _ in range(steps):
            if not self.busy():
                return
            self.step()
        raise AssertionError(f"requests did not finish: {[(r, self.reqs[r].status) for r in self.active()]}")

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "store").rglob("*") if p.is_file())

    def check(self) -> None:
        self.sched.check_invariants()
        assert not self.violations, self.violations
