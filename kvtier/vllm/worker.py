"""Worker side: moves bytes as the scheduler's metadata says, off the forward path.

Threads:
- one *copy thread* runs GPU<->DRAM copies in order (the copy engine itself may
  use many threads or a CUDA stream); the forward pass never waits for it,
  except when a preemption frees GPU blocks that a queued copy still reads;
- a *read pool* reads records into DRAM slots, verifying each before it can
  reach the GPU; a separate *write pool* writes slots through to disk, so a
  load never queues behind write-through (the store's native engine, too,
  has separate threads for reads and writes).

Stores: after the step's forward (``wait_for_save``) the newly full blocks are
gathered into their DRAM slots, then written through to disk. Loads: the
job's DRAM hits are scattered into the request's GPU blocks at once; its
records are read into their slots in chunks, each chunk scattered as soon as
it is read and checked while the next ones are still read (reads and copies
overlap); a long hit streamed through a few scratch slots goes in waves (read,
scatter, reuse the slots). Blocks that failed (missing, corrupt, wrong
namespace, I/O error, anything unexpected) are reported to vLLM, which
recomputes them.

This rank knows which key each slot holds (``_slot_key``: set when a copy or a
read into the slot succeeded, cleared when one starts or fails). A scatter
from a slot that does not hold the expected key fails the block instead: a
bookkeeping error can cost a recompute, never wrong KV. A load that joins
another request's read of the same record waits for that read.

Which vLLM stream each copy is ordered against, and how. vLLM queues its
forward, and the zeroing of newly allocated pages (``_zero_block_ids`` in
``_update_states``), on its compute stream: the current stream of the thread
that calls the connector's hooks. The hooks that queue copies record a CUDA
event on that stream (``_fence``) and hand it to the copy engine as
``after=``; the engine's own stream waits for it on the device
(``cudaStreamWaitEvent``; the torch fallback: ``wait_event``). The copy thread
never waits for the compute stream, and nothing assumes "the caller has
synchronized".
- A gather waits for the event of ``wait_for_save``: recorded after the step's
  forward, which wrote the pages it reads.
- A scatter (every wave of a load) waits for the event of ``start_load_kv``:
  vLLM calls it after ``_update_states`` queued the zeroing of the step's new
  pages, and (kvtier's loads are asynchronous) after it queued the step's
  forward, so the scatter lands after the zeroing, not under it, and after any
  earlier forward that still used a reused page.
- The other way round nothing is needed on the stream: a page a gather reads
  stays allocated until this worker reports the request in finished_sending or
  the step's ``flush_gathers`` returned (host-side waits), and vLLM reads a
  loaded page only after finished_recving, which is reported once the scatter
  is complete.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kvtier.config import KVTierConfig
from kvtier.copy.engine import HostPool, KVLayout
from kvtier.copy.choose import make_copy_engine
from kvtier.vllm.metadata import (FROM_SLOT, NO_SLOT, READ, STREAM, WRITE_ONLY, KVTierMetadata,
                                  KVTierWorkerMeta, LoadJob, StoreItem, StoreJob)
from kvtier.store.slots import SlotGeometry
from kvtier.store.budget import BudgetExceeded
from kvtier.store.disk import DiskStore, store_options
from kvtier.store.record import HEADER_BYTES, RECORD_FAULTS, RecordError
from kvtier.store.remote import RemoteStore

log = logging.getLogger("vllm.kvtier.worker")


class _SlotMismatch(Exception):
    """A write's slot does not hold its block on this rank."""

DISK_BACKOFF_S = 5.0   # after ENOSPC/EIO, skip writes this long (backpressure)
WRITE_QUEUE_PER_THREAD = 64


def _env_float(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


# Fault injection for tests (faults this machine cannot cause for real):
# every disk read sleeps this long (a slow tier); this fraction of reads fails
# with EIO; KVTIER_FAULT_SCRAMBLE=1 flips the bytes of every record read after its
# checks passed (wrong KV: the negative control of the output-equality tests).
READ_DELAY_S = _env_float("KVTIER_FAULT_READ_DELAY_S")
READ_ERROR_RATE = _env_float("KVTIER_FAULT_READ_ERROR_RATE")
SCRAMBLE = os.environ.get("KVTIER_FAULT_SCRAMBLE") == "1"

# An idle step (nothing computed) waits this long at most for a transfer to end.
IDLE_STEP_WAIT_S = 0.005

# A wave's reads go in up to this many chunks (at least 2 x io_threads records
# each): each chunk is scattered while the next ones are still being read.
READ_CHUNKS = 8
REMOTE_THREADS = 2   # cluster-tier gets, and puts: each their own threads
PUT_QUEUE = 256      # records waiting to be published (copies); more are not published
STUCK_LOAD_S = 60.0   # a load running this long is logged (with its state)


@dataclass
class _Load:
    """One load job on this rank: its waves, and what failed so far."""
    job: LoadJob
    waves: list[list[int]]          # item indices; wave k+1 reuses wave k's scratch slots
    failed: set[int]
    t0: float
    fence: object = None            # scatters wait for this CUDA event (see the docstring)
    read_bytes: int = 0
    read_secs: float = 0.0          # time the waves' own reads took (start to last chunk)
    read_end: float = 0.0
    scatter_bytes: int = 0
    scatter_secs: float = 0.0       # time in scatters (DRAM -> GPU)
    wave_t0: float = 0.0
    wave: int = 0
    left: int = 0                   # parts of the wave still running (see _run_wave)
    joined: list[int] = field(default_factory=list)   # items another load is reading
    from_remote: set[int] = field(default_factory=set)   # items read from the cluster tier
    remote_bytes: int = 0           # of read_secs' reads: from the cluster tier
    lock: threading.Lock = field(default_factory=threading.Lock)


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
        self.remote: RemoteStore | None = None   # the cluster tier (cfg.remote)
        self.cuda = False

        self._lock = threading.Lock()
        self._out = KVTierWorkerMeta()
        self._finished_loads: set[str] = set()
        self._failed_loads: set[str] = set()   # of _finished_loads: failed as a whole
        self._invalid_blocks: set[int] = set()
        self._slot_key: list[bytes | None] = [None] * geometry.num_slots
        self._filling: dict[int, list[Callable[[], None]]] = {}   # slot -> waiters of its read
        self._loads: dict[int, _Load] = {}      # loads in flight (by id: a request may have two)
        self._stuck_check = 0.0
        self._req_copies: dict[str, int] = {}   # req -> gathers and loads not yet done
        self._awaiting: set[str] = set()        # finished reqs to report in finished_sending
        self._queued_gathers = 0
        self._ended = threading.Condition(self._lock)   # a copy, read or write ended
        self._pending_writes = 0
        self._pending_puts = 0
        self._disk_backoff_until = 0.0
        self._rng = random.Random(rank)

        self._copy_q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._copy_thread: threading.Thread | None = None
        self._reads: ThreadPoolExecutor | None = None
        self._writes: ThreadPoolExecutor | None = None
        self._remote_reads: ThreadPoolExecutor | None = None   # the cluster tier's own
        self._remote_puts: ThreadPoolExecutor | None = None

    # -- set-up --------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], num_blocks: int,
                           layout_name: str, groups: Sequence[Sequence[str]] = ()) -> None:
        """``groups``: each KV cache group's layer names (kvtier.cache.groups); empty = one
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
        # The scheduler exports it as kvtier_copy_engine_info (a torch engine on a
        # GPU: the native one failed its self-check, make_copy_engine logged why).
        self._out.copy_engines = {kind: 1 for kind in {e.kind for e in self.engines}}
        if not self.pool.pinned:
            self.pool.prefault()   # first touches would otherwise land in the first loads
        if self.cfg.disk_enabled:
            self.store = DiskStore(self.cfg.disk_path, self.namespace, self.rank, self.tp_size,
                                   o_direct=self.cfg.o_direct, fsync=self.cfg.fsync,
                                   io_threads=self.cfg.io_threads, **store_options(self.cfg))
            self.store.start()
            if self.cfg.remote is not None:
                self.remote = RemoteStore.of(self.cfg.remote)
                self.remote.register(self.pool.base_ptr,
                                     self.geometry.num_slots * self.geometry.slot_bytes)
                self._remote_reads = ThreadPoolExecutor(REMOTE_THREADS,
                                                        thread_name_prefix="kvtier-remote-get")
                self._remote_puts = ThreadPoolExecutor(REMOTE_THREADS,
                                                       thread_name_prefix="kvtier-remote-put")
        self._copy_thread = threading.Thread(target=self._copy_loop, name="kvtier-copy",
                                             daemon=True)
        self._copy_thread.start()
        self._reads = ThreadPoolExecutor(self.cfg.io_threads, thread_name_prefix="kvtier-read")
        self._writes = ThreadPoolExecutor(self.cfg.io_threads, thread_name_prefix="kvtier-write")
        log.info("kvtier worker rank %d: %d DRAM slots x %d B (%s engine), disk: %s%s",
                 self.rank, self.geometry.num_slots, self.geometry.slot_bytes,
                 getattr(self.engines[0], "name", "?"),
                 self.store.dir if self.store else "off",
                 " (O_DIRECT)" if self.store and self.store.o_direct else "")

    # -- entry points (vLLM's worker hooks) ------------------------------------
    def handle_preemptions(self, meta: KVTierMetadata) -> None:
        if meta.flush_gathers:
            self.flush_gathers()

    def _fence(self):
        return torch.cuda.current_stream().record_event() if self.cuda else None

    def submit_stores(self, meta: KVTierMetadata) -> None:
        """After the forward: queue the step's newly full blocks for offload."""
        if not meta.stores or not self.engines:
            return
        fence = self._fence()
        with self._lock:
            for job in meta.stores:
                self._req_copies[job.req_id] = self._req_copies.get(job.req_id, 0) + 1
                for it in job.items:
                    if it.block != WRITE_ONLY:
                        self._slot_key[it.slot] = None   # being overwritten
            self._queued_gathers += len(meta.stores)
        for job in meta.stores:
            self._copy_q.put(lambda job=job: self._run_store(job, fence))

    def submit_loads(self, meta: KVTierMetadata) -> None:
        with self._lock:
            self._awaiting |= meta.await_sending
        if not meta.loads:
            return
        fence = self._fence()
        for job in meta.loads:
            self._start_load(job, fence)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving, _ = self.transfer_results(finished_req_ids)
        return sending or None, recving or None

    def transfer_results(self, finished_req_ids: set[str], idle_step: bool = False
                         ) -> tuple[set[str], set[str], set[str]]:
        """Requests whose pages kvtier no longer reads (finished sending), whose
        loads are done (finished receiving), and those of them that failed as a
        whole (a hybrid model's failed loads: see _end_wave); taken at once.

        ``idle_step``: the step computed nothing (vLLM steps only to collect
        results). Then, while something is in flight and nothing is ready to
        report, wait up to IDLE_STEP_WAIT_S for something to end. Returning at
        once made vLLM step again at once: its worker's main thread spun between
        empty steps, releasing the GIL only for an instant each time, and the
        copy, read and write threads could wait minutes for the GIL (seen: a
        write holding a shared store's lock starved, the store's other engines
        blocked on that lock, and the spinning engine slowed a second engine on
        the same cores until vLLM's 300 s step timeout killed it)."""
        with self._lock:
            if idle_step and self._in_flight():
                self._ended.wait_for(self._reportable, IDLE_STEP_WAIT_S)
            sending = self._done_sending()
            self._awaiting -= sending
            recving, self._finished_loads = self._finished_loads, set()
            failed, self._failed_loads = self._failed_loads, set()
            now = time.perf_counter()
            if self._loads and now - self._stuck_check > STUCK_LOAD_S:
                self._stuck_check = now
                for load in self._loads.values():
                    if now - load.t0 > STUCK_LOAD_S:
                        log.warning("kvtier: the load of %s has run %.0f s: wave %d of %d, "
                                    "%d parts left, %d joined, %d failed", load.job.req_id,
                                    now - load.t0, load.wave + 1, len(load.waves), load.left,
                                    len(load.joined), len(load.failed))
        return sending, recving, failed

    def _in_flight(self) -> bool:
        return bool(self._req_copies or self._queued_gathers or self._pending_writes
                    or self._pending_puts)

    def _done_sending(self) -> set[str]:
        """Finished requests whose pages no copy reads any more."""
        return {r for r in self._awaiting if not self._req_copies.get(r)}

    def _reportable(self) -> bool:
        return bool(self._finished_loads or not self._out.empty() or self._done_sending())

    def take_invalid_blocks(self) -> set[int]:
        with self._lock:
            out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def take_worker_meta(self) -> KVTierWorkerMeta | None:
        with self._lock:
            out, self._out = self._out, KVTierWorkerMeta()
        return None if out.empty() else out

    def idle(self) -> bool:
        """No copy, read or write in flight (tests)."""
        with self._lock:
            return not (self._in_flight() or self._filling)

    def flush_gathers(self) -> None:
        """Block until every queued GPU->DRAM copy is done (GPU blocks may be freed)."""
        with self._ended:
            self._ended.wait_for(lambda: self._queued_gathers == 0)

    def shutdown(self) -> None:
        """Finish queued copies and disk writes (promised durable), then stop."""
        if self._copy_thread is not None:
            self._copy_q.put(None)
            self._copy_thread.join()
            self._copy_thread = None
        for pool in (self._reads, self._remote_reads, self._writes, self._remote_puts):
            if pool is not None:
                pool.shutdown(wait=True)
        self._reads = self._writes = self._remote_reads = self._remote_puts = None
        for engine in self.engines:   # before the pool: a pinned pool must outlive them
            if hasattr(engine, "close"):
                engine.close()
        if self.pool is not None:
            self.pool.close()

    # -- bookkeeping -----------------------------------------------------------
    def _copy_loop(self) -> None:
        while True:
            task = self._copy_q.get()
            if task is None:
                return
            try:
                task()
            except Exception:  # a bug: keep the engine alive, never serve the bytes
                log.exception("kvtier copy task failed")

    @staticmethod
    def _count(d: dict, k, n: int = 1) -> None:
        d[k] = d.get(k, 0) + n

    def _copy_done(self, req_id: str) -> None:
        """With the lock held: one of the request's copies (a gather, a load) ended."""
        n = self._req_copies[req_id] - 1
        if n:
            self._req_copies[req_id] = n
        else:
            del self._req_copies[req_id]

    # -- stores --------------------------------------------------------------
    def _run_store(self, job: StoreJob, fence) -> None:
        ok = True
        copies = [it for it in job.items if it.block != WRITE_ONLY]
        try:
            for group, items in by_group(copies):
                self.engines[group].gather([it.block for it in items], [it.slot for it in items],
                                           after=fence)
        except Exception:
            log.exception("kvtier: gather failed; dropping %d blocks", len(copies))
            ok = False
        writes = [it for it in job.items if it.to_disk]
        with self._ended:
            self._queued_gathers -= 1
            self._copy_done(job.req_id)
            if ok:
                for it in copies:
                    self._slot_key[it.slot] = it.key
                self._count(self._out.stored, job.job_id)
            else:
                self._count(self._out.store_failed, job.job_id)
                self._count(self._out.fail_reasons, "gather", len(copies))
            # Writes are counted in flight before the gather is seen done (idle()).
            busy = (self._pending_writes + len(writes)
                    > self.cfg.io_threads * WRITE_QUEUE_PER_THREAD)
            skip = (not ok or self.store is None or busy
                    or time.monotonic() < self._disk_backoff_until)
            if not skip:
                self._pending_writes += len(writes)
            self._ended.notify_all()
        for it in writes:
            if skip:   # the scheduler waits for every rank's write answer
                self._write_skipped(it, "backpressure" if ok and self.store is not None
                                    else None)
            else:
                self._writes.submit(self._write, it)

    def _write_skipped(self, it: StoreItem, reason: str | None = None) -> None:
        """A write that will not happen: answer for it, and free the file it was
        to take over (the scheduler counts that file as this write's)."""
        if it.reuse is not None and self.store is not None:
            try:
                self.store.remove(it.reuse)
            except OSError as e:
                log.warning("kvtier: removing record %s failed: %s", it.reuse.hex(), e)
        with self._lock:
            self._count(self._out.write_failed, it.key)
            if reason:
                self._count(self._out.fail_reasons, reason)
            self._ended.notify_all()

    def _write(self, it: StoreItem) -> None:
        rec = self.pool.slot(it.slot)
        plen = self.geometry.payload_bytes
        ok = False
        try:
            if self._slot_key[it.slot] != it.key:   # never write bytes of another block
                raise _SlotMismatch(f"slot {it.slot} does not hold block {it.key.hex()} "
                                    f"on rank {self.rank}: not written")
            self.store.seal(rec, it.key, plen)   # header, checksum (and MAC: secret_file)
            self.store.write(it.key, rec[:self.geometry.record_bytes], reuse=it.reuse)
            ok = True
            if self.remote is not None:
                self._publish(it.key, rec)
        except BudgetExceeded:   # a shared store without room: no backoff (it is trimmed)
            with self._lock:
                self._count(self._out.fail_reasons, "store_full")
        except OSError as e:
            log.warning("kvtier: disk write failed (%s); skipping disk stores for %.0f s",
                        e, DISK_BACKOFF_S)
            with self._lock:
                self._disk_backoff_until = time.monotonic() + DISK_BACKOFF_S
                self._count(self._out.fail_reasons, "write_error")
        except _SlotMismatch as e:
            log.warning("kvtier: %s", e)
        except Exception:
            log.exception("kvtier: disk write failed")
        if not ok and it.reuse is not None:
            try:   # the write may have failed before it took the file over
                self.store.remove(it.reuse)
            except OSError:
                pass
        with self._lock:
            self._pending_writes -= 1
            self._count(self._out.written if ok else self._out.write_failed, it.key)
            self._ended.notify_all()

    # -- loads ---------------------------------------------------------------
    def _start_load(self, job: LoadJob, fence) -> None:
        items = job.items
        failed = {i for i, it in enumerate(items) if it.slot == NO_SLOT}
        stream = [i for i, it in enumerate(items) if it.kind == STREAM and i not in failed]
        width = max(1, len({items[i].slot for i in stream}))
        first = [i for i, it in enumerate(items) if it.kind != STREAM and i not in failed]
        waves = [first + stream[:width]] + [stream[k:k + width]
                                            for k in range(width, len(stream), width)]
        load = _Load(job, waves, failed, time.perf_counter(), fence)
        with self._lock:
            self._req_copies[job.req_id] = self._req_copies.get(job.req_id, 0) + 1
            self._loads[id(load)] = load
            if failed:
                self._count(self._out.fail_reasons, "no_staging_slot",
                            sum(1 for i in failed if items[i].key))
        self._run_wave(load)

    def _run_wave(self, load: _Load) -> None:
        """Start the wave: scatter its DRAM hits now, read its records in chunks
        (each chunk scattered as soon as it is read and checked, while the next
        ones are read), wait for the reads it joins; end it when all are done."""
        items = load.job.items
        wave = load.waves[load.wave]
        reads = [i for i in wave if items[i].kind in (READ, STREAM)]
        if reads and self.store is None:
            load.failed.update(reads)
            reads = []
        in_reads = set(reads)
        with self._lock:
            load.joined = [i for i in wave if items[i].kind == FROM_SLOT
                           and items[i].slot in self._filling]
            in_dram = [i for i in wave if i not in in_reads and items[i].kind == FROM_SLOT
                       and items[i].slot not in self._filling]
            for i in reads:
                slot = items[i].slot
                self._slot_key[slot] = None
                self._filling.setdefault(slot, [])
            step = max(2 * self.cfg.io_threads, -(-len(reads) // READ_CHUNKS))
            chunks = [reads[k:k + step] for k in range(0, len(reads), step)]
            load.left = len(chunks) + len(load.joined) + bool(in_dram) + 1   # +1: this call
            load.wave_t0 = load.read_end = time.perf_counter()
            for i in load.joined:
                self._filling[items[i].slot].append(lambda: self._wave_part_done(load))
        if in_dram:
            self._copy_q.put(lambda: self._scatter_part(load, in_dram))
        for chunk in chunks:
            self._reads.submit(self._read_chunk, load, chunk)
        self._wave_part_done(load)

    def _wave_part_done(self, load: _Load, n: int = 1) -> None:
        with load.lock:
            load.left -= n
            last = load.left == 0
        if last:
            self._copy_q.put(lambda: self._end_wave(load))

    def _read_chunk(self, load: _Load, reads: list[int]) -> None:
        """Read records into their slots in one batch (the native engine spreads
        it over its threads, the GIL released throughout), check each, then hand
        the good ones to the copy thread."""
        items = load.job.items
        plen = self.geometry.payload_bytes
        try:
            if READ_DELAY_S:
                time.sleep(READ_DELAY_S)
            results = self.store.read_batch(
                [(items[i].key, self.pool.slot(items[i].slot), plen) for i in reads])
        except Exception as e:   # a bug: every block is recomputed, the load still ends
            log.exception("kvtier: reading %d records failed", len(reads))
            results = [e] * len(reads)
        if self.remote is not None and any(
                isinstance(r, RecordError) and r.reason == "missing" for r in results):
            # From the cluster, on threads of its own: a hung cluster (each call
            # waits up to ~30 s) never holds up reads of the disk.
            self._remote_reads.submit(self._read_chunk_remote, load, reads, results)
            return
        self._chunk_read(load, reads, results)

    def _read_chunk_remote(self, load: _Load, reads: list[int], results: list) -> None:
        try:
            results = self._read_remote(load, reads, results)
        except Exception:   # a bug: what the cluster would have given is recomputed
            log.exception("kvtier: reading %d records from the cluster failed", len(reads))
        self._chunk_read(load, reads, results)

    def _chunk_read(self, load: _Load, reads: list[int], results: list) -> None:
        """A chunk's reads are done: record what each gave, wake the loads that
        joined them, hand the good ones to the copy thread."""
        items = load.job.items
        plen = self.geometry.payload_bytes
        done = time.perf_counter()
        waiters = []
        with self._lock:
            for i, res in zip(reads, results):
                it = items[i]
                if res is None and READ_ERROR_RATE and self._rng.random() < READ_ERROR_RATE:
                    res = OSError(5, "injected read fault (KVTIER_FAULT_READ_ERROR_RATE)")
                reason = (None if res is None else res.reason if isinstance(res, RecordError)
                          else "io_error" if isinstance(res, OSError) else "internal")
                if reason is None:
                    if SCRAMBLE:   # the whole payload: wrong KV, for negative controls
                        self.pool.slot(it.slot)[HEADER_BYTES:HEADER_BYTES + plen] ^= 0x5A
                    self._slot_key[it.slot] = it.key
                    if i not in load.from_remote:   # the cluster's are timed apart
                        load.read_bytes += self.geometry.record_bytes
                else:
                    load.failed.add(i)
                    self._count(self._out.fail_reasons, reason)
                    if reason in RECORD_FAULTS:
                        self._count(self._out.bad_records, it.key)
                    if reason != "missing":
                        log.warning("kvtier: record %s unusable (%s): recomputing",
                                    it.key.hex(), reason)
                if it.kind == READ:
                    self._count(self._out.staged if reason is None else self._out.stage_failed,
                                it.key)
                waiters += self._filling.pop(it.slot, [])
            self._ended.notify_all()   # staged / stage_failed to report
        with load.lock:
            load.read_end = max(load.read_end, done)
        for wake in waiters:
            wake()
        self._copy_q.put(lambda: self._scatter_part(load, reads))
        for i in load.from_remote.intersection(reads):   # kept on disk too
            if i not in load.failed:
                self._keep_on_disk(items[i].key, items[i].slot)

    def _read_remote(self, load: _Load, reads: list[int], results: list) -> list:
        """Records this disk lacks (adopted from the cluster tier, or read through
        already but not written yet): from the cluster, validated as a disk read
        (a bad one is removed there), then kept on disk."""
        missing = [j for j, res in enumerate(results)
                   if isinstance(res, RecordError) and res.reason == "missing"]
        if not missing:
            return results
        items = load.job.items
        plen, size = self.geometry.payload_bytes, self.geometry.record_bytes
        keys = [items[reads[j]].key for j in missing]
        slots = [self.pool.slot(items[reads[j]].slot) for j in missing]
        names = [self.store.remote_name(k) for k in keys]
        got = self.remote.get_into(names, [s.ctypes.data for s in slots], size)
        results = list(results)
        nbytes = 0
        for j, key, name, into, rc in zip(missing, keys, names, slots, got):
            if isinstance(rc, str):   # missing, error, skipped: the block is recomputed
                continue
            try:
                self.store.check(key, into, plen, rc)
            except RecordError as e:   # corrupt, foreign, planted: never served
                results[j] = e
                self.remote.remove(name)
                continue
            results[j] = None
            nbytes += size
            load.from_remote.add(reads[j])
        with self._lock:
            load.remote_bytes += nbytes
            if "error" in got:   # one failed call
                self._count(self._out.fail_reasons, "remote_get")
        return results

    def _publish(self, key: bytes, rec) -> None:
        """Put a copy of a written record into the cluster tier, on threads of its own
        (a hung cluster holds no slot and no disk write), unless too many wait."""
        with self._lock:
            if self._pending_puts >= PUT_QUEUE:
                self._count(self._out.fail_reasons, "remote_put_skipped")
                return
            self._pending_puts += 1
        self._remote_puts.submit(self._put, key, rec[:self.geometry.record_bytes].copy())

    def _put(self, key: bytes, record) -> None:
        try:
            (put,) = self.remote.put_from([self.store.remote_name(key)], [record.ctypes.data],
                                          record.nbytes)
        except Exception:
            log.exception("kvtier: publishing record %s failed", key.hex())
            put = "error"
        with self._lock:
            self._pending_puts -= 1
            self._ended.notify_all()
            if put == "ok":
                self._out.remote_stored += 1
            elif put == "error":
                self._count(self._out.fail_reasons, "remote_put")
            else:   # the tier is not connected yet, or backs off after an error
                self._count(self._out.fail_reasons, "remote_put_unavailable")

    def _keep_on_disk(self, key: bytes, slot: int) -> None:
        """Write a record read from the cluster tier from its slot to disk (the
        ledger counts it there already), unless the write queues are full."""
        with self._lock:
            if self._pending_writes >= self.cfg.io_threads * WRITE_QUEUE_PER_THREAD:
                return
            self._pending_writes += 1
        self._writes.submit(self._write_kept, key, slot)

    def _write_kept(self, key: bytes, slot: int) -> None:
        """No copy of the slot: written only while the slot holds ``key``, and removed
        if a refill of the slot began meanwhile (it clears ``_slot_key`` first);
        a later read that finds no file reads the cluster again."""
        try:
            if self._slot_key[slot] == key:
                self.store.write(key, self.pool.slot(slot)[:self.geometry.record_bytes])
                if self._slot_key[slot] != key:
                    self.store.remove(key)
        except Exception as e:
            log.debug("kvtier: keeping record %s on disk failed: %s", key.hex(), e)
        finally:
            with self._lock:
                self._pending_writes -= 1

    def _scatter_part(self, load: _Load, idxs: list[int]) -> None:
        self._scatter(load, idxs)
        self._wave_part_done(load)

    def _scatter(self, load: _Load, idxs: list[int]) -> None:
        """On the copy thread: copy the items' slots into their GPU pages; only
        items whose slot holds their key on this rank."""
        items = load.job.items
        good = []
        with self._lock:
            for i in idxs:
                if i in load.failed:
                    continue
                if self._slot_key[items[i].slot] != items[i].key:
                    # A joined read failed on this rank, or (a bug) the slot holds
                    # something else: recompute, never scatter foreign bytes.
                    load.failed.add(i)
                    self._count(self._out.fail_reasons, "slot_mismatch")
                    continue
                good.append(items[i])
        if not good:
            return
        t0 = time.perf_counter()
        try:
            for group, its in by_group(good):
                self.engines[group].scatter([it.slot for it in its], [it.block for it in its],
                                            after=load.fence)
        except Exception:
            log.exception("kvtier: scatter failed; recomputing %d blocks", len(good))
            with self._lock:
                self._count(self._out.fail_reasons, "scatter", len(good))
                load.failed.update(idxs)
            return
        load.scatter_secs += time.perf_counter() - t0
        load.scatter_bytes += len(good) * self.layout.block_bytes

    def _end_wave(self, load: _Load) -> None:
        """On the copy thread, once the wave's reads, joins and scatters are done."""
        self._scatter(load, load.joined)   # the reads it joined are complete now
        load.read_secs += load.read_end - load.wave_t0
        load.wave += 1
        if load.wave < len(load.waves):
            self._run_wave(load)
            return
        items = load.job.items
        log.debug("kvtier: load of %s done: %d items, %d failed, %d waves, reads %.1f ms, "
                  "%.1f ms in all", load.job.req_id, len(items), len(load.failed),
                  len(load.waves), load.read_secs * 1e3, (time.perf_counter() - load.t0) * 1e3)
        with self._lock:
            if load.read_bytes:   # disk -> DRAM phase
                self._out.load_timings.append(("disk", load.read_bytes, load.read_secs))
            if load.remote_bytes:   # cluster -> DRAM (in the same waves as any disk reads)
                self._out.load_timings.append(("remote", load.remote_bytes, load.read_secs))
            if load.scatter_bytes:   # DRAM -> GPU phase
                self._out.load_timings.append(("dram", load.scatter_bytes, load.scatter_secs))
            if load.failed and len(self.engines) > 1:
                # Block ids are per KV cache group: vLLM cannot map block-level
                # failures of a hybrid model back to requests (it raises). The
                # request's whole load fails instead (vLLM recomputes it).
                self._failed_loads.add(load.job.req_id)
            else:
                for i in load.failed:
                    self._invalid_blocks.add(items[i].block)
            self._finished_loads.add(load.job.req_id)
            self._copy_done(load.job.req_id)
            del self._loads[id(load)]
            self._ended.notify_all()


def by_group(items):
    """``(group, items)`` pairs: each KV cache group has its own layers and engine."""
    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    return groups.items()
