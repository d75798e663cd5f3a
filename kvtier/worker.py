"""Worker side: moves bytes as the scheduler's metadata says, off the forward path.

Threads:
- one *copy thread* runs GPU<->DRAM copies in order (the copy engine itself may
  use many threads or a CUDA stream); the forward pass never waits for it,
  except when a preemption frees GPU blocks that a queued copy still reads;
- an *I/O pool* writes DRAM slots through to the disk store and reads records
  back into DRAM slots, verifying each before it can reach the GPU.

Stores: after the step's forward (``wait_for_save``) the newly full blocks are
gathered into their DRAM slots, then written through to disk. Loads: records
are read into their slots in parallel, then scattered into the request's GPU
blocks; blocks that failed (missing, corrupt, wrong namespace, I/O error) are
reported to vLLM, which recomputes them. Completions go back to the scheduler
through ``KVTierWorkerMeta`` and vLLM's finished-sending/receiving sets.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
import xxhash

from kvtier.config import KVTierConfig
from kvtier.copy import HostPool, KVLayout, make_copy_engine
from kvtier.metadata import NO_SLOT, KVTierMetadata, KVTierWorkerMeta, LoadJob, StoreJob
from kvtier.slots import SlotGeometry
from kvtier.store import HEADER_BYTES, DiskStore, RecordError, pack_header

log = logging.getLogger("vllm.kvtier.worker")

DISK_BACKOFF_S = 5.0   # after ENOSPC/EIO, skip writes this long (backpressure)
# Fault injection for tests: every disk read sleeps this long (a slow tier).
READ_DELAY_S = float(os.environ.get("KVTIER_FAULT_READ_DELAY_S", "0") or 0)


class KVTierWorker:
    def __init__(self, cfg: KVTierConfig, namespace: bytes, rank: int, tp_size: int,
                 geometry: SlotGeometry):
        self.cfg = cfg
        self.namespace = namespace
        self.rank = rank
        self.tp_size = tp_size
        self.geometry = geometry
        self.layout: KVLayout | None = None
        self.pool: HostPool | None = None
        self.engines: list = []   # one copy engine per KV cache group
        self.store: DiskStore | None = None
        self.cuda = False

        self._lock = threading.Lock()
        self._out = KVTierWorkerMeta()
        self._finished_loads: set[str] = set()
        self._invalid_blocks: set[int] = set()
        self._pending_gathers: dict[str, int] = {}   # req -> store jobs not yet in DRAM
        self._finishing: set[str] = set()
        self._queued_gathers = 0
        self._gathers_idle = threading.Condition(self._lock)
        self._pending_writes = 0
        self._disk_backoff_until = 0.0

        self._copy_q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._copy_thread: threading.Thread | None = None
        self._io: ThreadPoolExecutor | None = None

    # -- set-up --------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], num_blocks: int,
                           layout_name: str, groups: Sequence[Sequence[str]] = ()) -> None:
        """``groups``: each KV cache group's layer names (kvtier.groups); empty = one
        group of every layer. A group's block is one DRAM slot, one disk record."""
        groups = [tuple(g) for g in groups] or [tuple(kv_caches)]
        self.pool = None
        self.engines = []
        for layers in groups:
            sub = {name: kv_caches[name] for name in layers}
            layout = KVLayout.from_kv_caches(sub, num_blocks, layout_name)
            if layout.block_bytes != self.geometry.payload_bytes:
                raise RuntimeError(
                    f"kvtier: a KV block of layers {layers[0]}.. is {layout.block_bytes} bytes "
                    f"on this worker but the scheduler planned {self.geometry.payload_bytes}; "
                    "unsupported KV layout")
            if self.pool is None:
                self.layout = layout
                self.cuda = layout.device.startswith("cuda")
                self.pool = HostPool(self.geometry.num_slots, self.geometry.slot_bytes,
                                     pin=self.cuda)
            self.engines.append(make_copy_engine(layout, sub, self.pool, HEADER_BYTES))
        if self.cfg.disk_enabled:
            self.store = DiskStore(self.cfg.disk_path, self.namespace, self.rank, self.tp_size,
                                   o_direct=self.cfg.o_direct, fsync=self.cfg.fsync)
            self.store.sweep_temp()
        self._copy_thread = threading.Thread(target=self._copy_loop, name="kvtier-copy",
                                             daemon=True)
        self._copy_thread.start()
        self._io = ThreadPoolExecutor(self.cfg.io_threads, thread_name_prefix="kvtier-io")
        log.info("kvtier worker rank %d: %d DRAM slots x %d B (%s engine), disk: %s%s",
                 self.rank, self.geometry.num_slots, self.geometry.slot_bytes,
                 getattr(self.engines[0], "name", "?"),
                 self.store.dir if self.store else "off",
                 " (O_DIRECT)" if self.store and self.store.o_direct else "")

    # -- entry points (vLLM's worker hooks) ------------------------------------
    def handle_preemptions(self, meta: KVTierMetadata) -> None:
        if meta.flush_gathers:
            self.flush_gathers()

    def submit_stores(self, meta: KVTierMetadata) -> None:
        """After the forward: queue the step's newly full blocks for offload."""
        if not meta.stores or not self.engines:
            return
        fence = torch.cuda.current_stream().record_event() if self.cuda else None
        with self._lock:
            for job in meta.stores:
                self._pending_gathers[job.req_id] = self._pending_gathers.get(job.req_id, 0) + 1
            self._queued_gathers += len(meta.stores)
        for job in meta.stores:
            self._copy_q.put(lambda job=job: self._run_store(job, fence))

    def submit_loads(self, meta: KVTierMetadata) -> None:
        for job in meta.loads:
            self._start_load(job)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            self._finishing |= {r for r in finished_req_ids if r in self._pending_gathers}
            sending = {r for r in self._finishing if self._pending_gathers[r] == 0}
            for r in sending:
                del self._pending_gathers[r]
            self._finishing -= sending
            recving, self._finished_loads = self._finished_loads, set()
        return sending or None, recving or None

    def take_invalid_blocks(self) -> set[int]:
        with self._lock:
            out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def take_worker_meta(self) -> KVTierWorkerMeta | None:
        with self._lock:
            out, self._out = self._out, KVTierWorkerMeta()
        return None if out.empty() else out

    def flush_gathers(self) -> None:
        """Block until every queued GPU->DRAM copy is done (GPU blocks may be freed)."""
        with self._gathers_idle:
            self._gathers_idle.wait_for(lambda: self._queued_gathers == 0)

    def shutdown(self) -> None:
        """Finish queued copies and disk writes (promised durable), then stop."""
        if self._copy_thread is not None:
            self._copy_q.put(None)
            self._copy_thread.join()
            self._copy_thread = None
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        for engine in self.engines:   # before the pool: a pinned pool must outlive them
            if hasattr(engine, "close"):
                engine.close()
        if self.pool is not None:
            self.pool.close()

    # -- stores --------------------------------------------------------------
    def _copy_loop(self) -> None:
        while True:
            task = self._copy_q.get()
            if task is None:
                return
            try:
                task()
            except Exception:  # a bug: keep the engine alive, never serve the bytes
                log.exception("kvtier copy task failed")

    def _run_store(self, job: StoreJob, fence) -> None:
        ok = True
        try:
            if fence is not None:
                fence.synchronize()
            for group, items in by_group(job.items):
                self.engines[group].gather([it.block for it in items], [it.slot for it in items])
        except Exception:
            log.exception("kvtier: gather failed; dropping %d blocks", len(job.items))
            ok = False
        with self._gathers_idle:
            self._queued_gathers -= 1
            self._pending_gathers[job.req_id] -= 1
            if ok:
                self._out.stored[job.job_id] = self._out.stored.get(job.job_id, 0) + 1
            else:
                self._count(self._out.store_failed, job.job_id)
                self._count(self._out.fail_reasons, "gather", len(job.items))
                for it in job.items:   # the scheduler waits for every rank's write result
                    if it.to_disk:
                        self._count(self._out.write_failed, it.key)
            self._gathers_idle.notify_all()
        if ok and self.store is not None:
            for it in job.items:
                if it.to_disk:
                    self._queue_write(it.key, it.slot)

    def _queue_write(self, key: bytes, slot: int) -> None:
        now = time.monotonic()
        with self._lock:
            busy = self._pending_writes >= self.cfg.io_threads * 64
            if now < self._disk_backoff_until or busy:
                self._count(self._out.write_failed, key)
                self._count(self._out.fail_reasons, "backpressure")
                return
            self._pending_writes += 1
        self._io.submit(self._write, key, slot)

    def _write(self, key: bytes, slot: int) -> None:
        rec = self.pool.slot(slot)
        plen = self.geometry.payload_bytes
        ok = False
        try:
            checksum = xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + plen])
            pack_header(rec, self.namespace, key, self.rank, self.tp_size, plen, checksum)
            self.store.write(key, rec[:self.geometry.record_bytes])
            ok = True
        except OSError as e:
            log.warning("kvtier: disk write failed (%s); skipping disk stores for %.0f s",
                        e, DISK_BACKOFF_S)
            with self._lock:
                self._disk_backoff_until = time.monotonic() + DISK_BACKOFF_S
                self._count(self._out.fail_reasons, "write_error")
        except Exception:
            log.exception("kvtier: disk write failed")
        with self._lock:
            self._pending_writes -= 1
            self._count(self._out.written if ok else self._out.write_failed, key)

    # -- loads ---------------------------------------------------------------
    def _start_load(self, job: LoadJob) -> None:
        t0 = time.perf_counter()
        reads = [it for it in job.items if it.from_disk and it.slot != NO_SLOT]
        failed: set[int] = {i for i, it in enumerate(job.items) if it.slot == NO_SLOT}
        if failed:
            with self._lock:
                self._count(self._out.fail_reasons, "no_staging_slot", len(failed))
        if not reads or self.store is None:
            failed |= {i for i, it in enumerate(job.items) if it.from_disk}
            self._copy_q.put(lambda: self._finish_load(job, failed))
            return
        state = {"left": len(reads)}
        index = {id(it): i for i, it in enumerate(job.items)}
        lock = threading.Lock()

        def read_one(it):
            reason = None
            if READ_DELAY_S:
                time.sleep(READ_DELAY_S)
            try:
                self.store.read(it.key, self.pool.slot(it.slot), self.geometry.payload_bytes)
            except RecordError as e:
                reason = e.reason
            except OSError:
                reason = "io_error"
            with lock:
                if reason is not None:
                    failed.add(index[id(it)])
                    with self._lock:
                        self._count(self._out.fail_reasons, reason)
                state["left"] -= 1
                last = state["left"] == 0
            if reason is not None and reason != "missing":
                log.warning("kvtier: record %s unusable (%s): recomputing", it.key.hex(), reason)
            if last:
                with self._lock:
                    self._out.load_timings.append(
                        ("disk", len(reads) * self.geometry.record_bytes, time.perf_counter() - t0))
                self._copy_q.put(lambda: self._finish_load(job, failed))

        for it in reads:
            self._io.submit(read_one, it)

    def _finish_load(self, job: LoadJob, failed: set[int]) -> None:
        good = [it for i, it in enumerate(job.items) if i not in failed]
        t0 = time.perf_counter()
        try:
            for group, items in by_group(good):
                self.engines[group].scatter([it.slot for it in items], [it.block for it in items])
        except Exception:
            log.exception("kvtier: scatter failed; recomputing %d blocks", len(good))
            with self._lock:
                self._count(self._out.fail_reasons, "scatter", len(good))
            failed = set(range(len(job.items)))
            good = []
        secs = time.perf_counter() - t0
        with self._lock:
            if good:   # DRAM -> GPU phase (disk reads are timed on their own)
                self._out.load_timings.append(("dram", len(good) * self.layout.block_bytes, secs))
            for i in failed:
                it = job.items[i]
                self._invalid_blocks.add(it.block)
                self._count(self._out.load_failed, it.key)
            self._finished_loads.add(job.req_id)

    @staticmethod
    def _count(d: dict, k, n: int = 1) -> None:
        d[k] = d.get(k, 0) + n


def by_group(items):
    """``(group, items)`` pairs: each KV cache group has its own layers and engine."""
    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    return groups.items()
