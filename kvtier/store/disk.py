"""The disk tier: one file per (block key, TP rank), content-addressed; the
record format is kvtier.store.record.

Layout under ``disk_path``::

    <namespace hex>/rank<R>/<key[0:2] hex>/<key hex>     published records
    <namespace hex>/rank<R>/tmp/                         records being written

Publication is atomic: write to ``tmp/``, optionally fsync, ``rename`` into
place. A crash leaves complete records or nothing (plus temp files that the
next start sweeps). Records are immutable and named by content, so several
processes (other ranks, other instances, other nodes on a shared filesystem
with atomic rename) can write the same key concurrently: the last rename wins
with identical bytes.

Directories are 0700 and files 0600. Keys are fixed-size digests rendered as
hex, so no key can become a path traversal.

Safe file handling (kvtier.store.safety): the store refuses to open on
directories someone else could write (``UnsafeStore``, saying why); a symlink
or a FIFO planted as a record is a miss ("not_regular") and is removed, never
followed nor waited on; a reused file (free/, an evicted record) is written
over only if it is a plain file of ours; scans never follow links.

With a secret (``secret_file``: kvtier.store.secret) the namespace directory
and every record's file name are keyed, and records are authenticated (a MAC
over header and payload, kvtier.store.record): a record written without the
secret is a miss ("bad_mac"), never served. With ``shared`` the store's disk
budget holds for every engine on it together (kvtier.store.budget): every
create, rename and unlink goes through the store's usage ledger.

I/O: through the native engine (kvtier.store.native, csrc/io/io_*) when the
extension has it, else in Python (kvtier.store.pyio); same files, same checks.
The native engine does a record's whole open/write/fsync/rename (or open/read)
with the GIL released, and takes batches (``write_batch``/``read_batch``: a
store or load job at once, spread over its threads).

Why one module of ~540 lines: it is one class, the store's file protocol
(names, local and shared writes, reads and their checks, removals, free files,
scans), whose parts must agree on every name and rule; the I/O itself
(pyio, native), the rules (safety, record, secret) and the shared budget
(budget, claim) are modules of their own.
"""

from __future__ import annotations

import errno
import gc
import logging
import mmap
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import xxhash

from kvtier.cache.keys import KEY_BYTES
from kvtier.copy.engine import PAGE
from kvtier.store.budget import BudgetExceeded, StoreBudget
from kvtier.store.record import (HEADER_BYTES, RecordError, check_mac, check_record, pack_header,
                                 record_bytes)
from kvtier.store import pyio
from kvtier.store.remote import record_name
from kvtier.store.native import EngineHandle, pick_backend, scan_records
from kvtier.store.native import IoEngine as _IoEngine  # noqa: F401 (whether this build has it)
from kvtier.store.safety import (UnsafeStore, check_dir, check_shards, make_dir, not_regular_error,
                                 own_plain_file)
from kvtier.store.secret import StoreKeys, keys_for

log = logging.getLogger("vllm.kvtier.store")


def store_options(cfg) -> dict:
    """DiskStore's security and sharing arguments from a KVTierConfig."""
    return {"secret_file": cfg.secret_file or None, "shared": cfg.shared,
            "budget_bytes": cfg.disk_bytes}


@dataclass(frozen=True)
class RecordInfo:
    key: bytes
    rank: int
    size: int       # bytes on disk
    mtime: float    # last use (we touch records on hits)


class DiskStore:
    """Files of one namespace and one rank. Thread-safe.

    ``io_threads``: threads of a batch (``write_batch``/``read_batch``);
    ``free_files``: how many removed records ``remove`` keeps in ``free/`` for
    writes to overwrite (0: unlink them). A new file costs the filesystem a block
    allocation at write time (ext4: unwritten extents converted at completion,
    ~1/3 of O_DIRECT write bandwidth); writing over an evicted record's blocks
    does not. The files are within the budget: the scheduler, which evicts,
    keeps ``free_files`` records of its disk budget for them.
    ``native_io``: ``auto`` | ``threads`` | ``off`` (default: the
    ``KVTIER_NATIVE_IO`` environment variable, else ``auto``). ``io_backend``
    says what is used: ``"threads"`` (native) or ``"python"``.
    """

    def __init__(self, root: str | os.PathLike, namespace: bytes, rank: int, tp_size: int,
                 o_direct: str = "auto", fsync: bool = False, io_threads: int = 4,
                 native_io: str | None = None, free_files: int = 0,
                 secret_file: str | os.PathLike | None = None, keys: StoreKeys | None = None,
                 shared: bool = False, budget_bytes: int = 0):
        if len(namespace) != KEY_BYTES:
            raise ValueError("namespace digest must be 16 bytes")
        self.root = Path(root)
        self.namespace = namespace
        self.rank = rank
        self.tp_size = tp_size
        self.fsync = fsync
        self.io_threads = max(1, int(io_threads))
        self.keys = keys if keys is not None else keys_for(secret_file) if secret_file else None
        # What the store calls the namespace (its directory, its records' headers).
        self.namespace_id = (self.keys.namespace_id(namespace) if self.keys is not None
                             else namespace)
        self.dir = self.root / self.namespace_id.hex() / f"rank{rank}"
        self.tmp = self.dir / "tmp"
        self.free = self.dir / "free"
        self.free_files = max(0, int(free_files))
        self._free_names: list[str] = []   # known free files, taken by writes
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_dir(self.root, top=True)
        for d in (self.root / self.namespace_id.hex(), self.dir, self.tmp):
            make_dir(d)
        try:
            make_dir(self.free)
        except UnsafeStore:
            raise
        except OSError:   # e.g. a store of an older kvtier on a read-only mount
            self.free_files = 0
        check_shards(self.dir)
        self.budget = StoreBudget.of(self.root, budget_bytes) if shared else None
        # Temp files carry the writer's lease on a shared store (its reservation
        # covers them; a dead writer's are reaped), else its pid.
        self._tmp_tag = self.budget.lease if self.budget is not None else None
        self.o_direct = self._probe_o_direct(o_direct)
        self.io_backend = pick_backend(native_io)
        # Reads and writes each have their own engine (threads and queue): a read
        # never waits behind queued write-through batches.
        native = self.io_backend == "threads"
        self._engine = EngineHandle(self.io_threads) if native else None
        self._read_engine = EngineHandle(self.io_threads) if native else None
        self._pool_lock = threading.Lock()
        self._py_pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start the I/O engine's threads now rather than in the first read."""
        if self._io is not None:
            self._io.read_records([])
            self._rio.read_records([])

    @property
    def _io(self):
        """The native engine of writes (None: Python I/O)."""
        return self._engine.get() if self._engine is not None else None

    @property
    def _rio(self):
        """The native engine of reads (None: Python I/O)."""
        return self._read_engine.get() if self._read_engine is not None else None

    # -- paths ---------------------------------------------------------------
    def name(self, key: bytes) -> bytes:
        """The 16 bytes ``key``'s record is named by (the key itself without a secret)."""
        if len(key) != KEY_BYTES:
            raise ValueError("bad key length")
        return self.keys.name(key) if self.keys is not None else key

    def path(self, key: bytes) -> Path:
        h = self.name(key).hex()
        return self.dir / h[:2] / h

    def _probe_o_direct(self, mode: str) -> bool:
        """Whether O_DIRECT works here: open and write one aligned page with it."""
        if mode == "off" or not hasattr(os, "O_DIRECT"):
            return False
        probe = self.tmp / f".probe-{os.getpid()}-{time.monotonic_ns()}"
        page = mmap.mmap(-1, PAGE)   # page-aligned
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY
                         | os.O_DIRECT, 0o600)
            try:
                os.pwrite(fd, page, 0)
            finally:
                os.close(fd)
            return True
        except OSError as e:
            if mode == "on":
                raise OSError(e.errno, f"kvtier: O_DIRECT not supported on {self.root} ({e})")
            log.warning("kvtier: %s does not allow O_DIRECT (%s); using buffered I/O",
                        self.root, e.strerror)
            return False
        finally:
            page.close()
            probe.unlink(missing_ok=True)

    def _tmp_path(self, key: bytes) -> Path:
        tag = self._tmp_tag or os.getpid()
        return self.tmp / f"{self.name(key).hex()}.{tag}.{time.monotonic_ns()}"

    def _direct_ok(self, addr: int, nbytes: int) -> bool:
        """O_DIRECT for this buffer: on, and address and length page-aligned."""
        return self.o_direct and addr % PAGE == 0 and nbytes % PAGE == 0

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._py_pool is None:
                self._py_pool = ThreadPoolExecutor(self.io_threads,
                                                   thread_name_prefix="kvtier-store")
        return self._py_pool

    def _py_map(self, fn, items):
        """Python fallback of a batch: the items over ``io_threads`` threads."""
        if len(items) <= 1 or self.io_threads == 1:
            return [fn(*it) for it in items]
        return list(self._pool().map(lambda it: fn(*it), items))

    # -- write ---------------------------------------------------------------
    def seal(self, record, key: bytes, payload_len: int, created: float | None = None) -> None:
        """Write ``record``'s header (a slot: header then payload) for ``key``: the
        payload checksum, and with a secret the keyed names and the MAC."""
        checksum = xxhash.xxh3_64_intdigest(record[HEADER_BYTES:HEADER_BYTES + payload_len])
        pack_header(record, self.namespace_id, self.name(key), self.rank, self.tp_size,
                    payload_len, checksum, created, keys=self.keys)

    def write(self, key: bytes, record, reuse: bytes | None = None) -> int:
        """Publish ``record`` (header + padded payload, a page-aligned uint8 array).
        ``reuse``: an evicted record's key whose file this write takes over (writes
        over it); else a free file if there is one, else a new file.

        Raises OSError (ENOSPC, EIO, EROFS...; BudgetExceeded on a shared store
        without room) leaving nothing behind.
        """
        (r,) = self.write_batch([(key, record, reuse)])
        if isinstance(r, BaseException):
            raise r
        return r

    def write_batch(self, items: Sequence[tuple]) -> list:
        """Publish several records at once: ``[(key, record[, reuse key])]`` -> per
        item the bytes written, or the OSError that left nothing of it behind."""
        items = [(it[0], it[1], it[2] if len(it) > 2 else None) for it in items]
        if self.budget is not None:
            return self._write_batch_shared(items)
        if self._io is None:
            return self._py_map(self._write_py_safe, items)
        reqs, keep, tmps = [], [], []
        for key, record, reuse in items:
            buf = pyio.bytes_view(record, writable=False)
            keep.append(buf)
            addr = buf.ctypes.data
            tmp = self._tmp_path(key)
            tmps.append(tmp)
            reqs.append((str(tmp), str(self.path(key)), addr, buf.nbytes,
                         self._direct_ok(addr, buf.nbytes), self._reuse_path(reuse)))
        errs = self._io.write_records(reqs, self.fsync)
        return [buf.nbytes if e == 0 else OSError(e, os.strerror(e), str(tmp))
                for e, buf, tmp in zip(errs, keep, tmps)]

    def _reuse_path(self, reuse: bytes | None) -> str:
        return str(self.path(reuse)) if reuse is not None else self._take_free()

    def _write_batch_shared(self, items: list[tuple]) -> list:
        """A shared store's writes: the files to take over are renamed and the new
        bytes reserved under the store lock, the records written (native engine or
        Python), then published under the lock (kvtier.store.budget)."""
        budget = self.budget
        plans: list = []   # per item: (tmp, reserved bytes, reused) or an exception
        keep = []
        with budget.locked() as st:
            for key, record, reuse in items:
                buf = pyio.bytes_view(record, writable=False)
                keep.append(buf)
                tmp = self._tmp_path(key)
                src = self._reuse_path(reuse)
                got = budget.take_over(st, Path(src), tmp, buf.nbytes) if src else None
                if got is not None:
                    plans.append((tmp, got, True))
                elif budget.admit(st, buf.nbytes):
                    plans.append((tmp, buf.nbytes, False))
                else:
                    plans.append(BudgetExceeded(buf.nbytes, f" ({self.root})"))
        todo = [i for i, p in enumerate(plans) if not isinstance(p, BaseException)]
        errs: dict[int, BaseException] = {}
        if self._io is not None:
            reqs = []
            for i in todo:
                tmp, _, reused = plans[i]
                addr = keep[i].ctypes.data
                reqs.append((str(tmp), "", addr, keep[i].nbytes,
                             self._direct_ok(addr, keep[i].nbytes), str(tmp) if reused else ""))
            for i, e in zip(todo, self._io.write_records(reqs, self.fsync) if reqs else []):
                if e:
                    errs[i] = OSError(e, os.strerror(e), str(plans[i][0]))
        else:
            def fill(i):
                tmp, _, reused = plans[i]
                try:
                    pyio.fill_tmp(tmp, keep[i], reused, self._direct_ok, self.fsync)
                except OSError as e:
                    return e
                return None
            for i, e in zip(todo, self._py_map(fill, [(i,) for i in todo])):
                if e is not None:
                    errs[i] = e
        out: list = [None] * len(items)
        dirs = set()
        with budget.locked() as st:
            for i, plan in enumerate(plans):
                if isinstance(plan, BaseException):
                    out[i] = plan
                    continue
                tmp, reserved, _ = plan
                if i in errs:   # the writer removed its temp file
                    budget.release(st, reserved)
                    out[i] = errs[i]
                    continue
                final = self.path(items[i][0])
                try:
                    budget.publish(st, tmp, final, reserved)
                    out[i] = keep[i].nbytes
                    dirs.add(final.parent)
                except OSError as e:
                    out[i] = e
        if self.fsync:
            for d in dirs:
                pyio.fsync_dir(d)
        return out

    def _write_py_safe(self, key: bytes, record, reuse: bytes | None = None):
        try:
            return self._write_py(key, record, reuse)
        except OSError as e:
            return e

    def _write_py(self, key: bytes, record, reuse_key: bytes | None = None) -> int:
        return pyio.write_record(self._tmp_path(key), self.path(key), record,
                                 self._reuse_path(reuse_key), self._direct_ok, self.fsync)

    # -- read ----------------------------------------------------------------
    def read(self, key: bytes, into, payload_len: int) -> None:
        """Read and validate ``key``'s record into ``into`` (>= record size).

        Raises RecordError (reason "missing" when there is no record) or OSError.
        """
        (r,) = self.read_batch([(key, into, payload_len)])
        if r is not None:
            raise r

    def read_batch(self, items: Sequence[tuple[bytes, object, int]]) -> list:
        """Read and validate several records: ``[(key, into, payload_len)]`` -> per
        item None (valid, in ``into``), a RecordError or an OSError. The items' buffers
        must not overlap (they are filled concurrently)."""
        if self._rio is None:
            return self._py_map(self._read_py_safe, items)
        if self.keys is None or len(items) <= 2 * self.io_threads or self.io_threads == 1:
            return self._read_native(items)
        # Authenticated records, many: a part's MACs are checked on the pool's
        # threads while the native engine reads the next part (hashing and I/O
        # overlap instead of following each other).
        out, macs = [], []
        step = 2 * self.io_threads
        for start in range(0, len(items), step):
            out.extend(self._read_native(items[start:start + step], macs, start))
        for i, fut in macs:
            out[i] = fut.result()
        return out

    def _read_native(self, items, macs: list | None = None, offset: int = 0) -> list:
        """``read_batch`` through the native engine. With a secret, the MACs are
        checked here (``macs`` None) or handed to the pool: ``(index, future)``
        appended to ``macs``."""
        reqs, keep, native = [], [], []
        for key, into, payload_len in items:
            want = record_bytes(payload_len)
            buf = pyio.bytes_view(into, writable=True)
            if buf.nbytes < want:   # (a hostile length): the Python path's checks, no overrun
                native.append(False)
                continue
            native.append(True)
            keep.append(buf)
            addr = buf.ctypes.data
            reqs.append((str(self.path(key)), addr, want, self._direct_ok(addr, want),
                         HEADER_BYTES, payload_len))
        results = iter(zip(reqs, self._rio.read_records(reqs)))
        out = []
        todo = []   # items whose MAC is still to check (off this thread, in parallel)
        for (key, into, payload_len), nat in zip(items, native):
            if not nat:
                out.append(self._read_py_safe(key, into, payload_len))
                continue
            req, (err, got, size, digest, not_regular) = next(results)
            want = req[2]
            try:
                if err == errno.ENOENT:
                    raise RecordError("missing", self.path(key).name)
                if not_regular or (err and not_regular_error(OSError(err, ""), req[0])):
                    raise RecordError("not_regular", f"{req[0]} is not a regular file")
                if err:
                    raise OSError(err, os.strerror(err), req[0])
                if size < want:
                    raise RecordError("truncated", f"{size} bytes < {want}")
                check_record(into, self.namespace_id, self.name(key), self.rank, self.tp_size,
                             payload_len, got, payload_digest=digest, keys=self.keys, mac=False)
                out.append(None)
                if self.keys is not None:
                    todo.append((len(out) - 1, into, payload_len))
            except (RecordError, OSError) as e:
                out.append(e)
        if macs is not None:
            pool = self._pool()
            macs.extend((offset + i, pool.submit(self._mac_error, i, into, plen))
                        for i, into, plen in todo)
        elif todo:
            for (i, _, _), e in zip(todo, self._py_map(self._mac_error, todo)):
                out[i] = e
        return out

    def check(self, key: bytes, into, payload_len: int, size: int) -> None:
        """Validate a record of ``key`` that came from elsewhere (the cluster tier) as a
        read of this store would: RecordError unless it is exactly this block's."""
        check_record(into, self.namespace_id, self.name(key), self.rank, self.tp_size,
                     payload_len, size, keys=self.keys)

    def remote_name(self, key: bytes) -> str:
        """``key``'s record in the cluster tier (kvtier.store.remote)."""
        return record_name(self.namespace_id, self.name(key), self.rank, self.tp_size)

    def _mac_error(self, i: int, into, payload_len: int) -> RecordError | None:
        try:
            check_mac(into, self.keys, payload_len)
            return None
        except RecordError as e:
            return e

    def _read_py_safe(self, key: bytes, into, payload_len: int):
        try:
            self._read_py(key, into, payload_len)
            return None
        except (RecordError, OSError) as e:
            return e

    def _read_py(self, key: bytes, into, payload_len: int) -> None:
        got = pyio.read_record(self.path(key), into, record_bytes(payload_len), self._direct_ok)
        check_record(into, self.namespace_id, self.name(key), self.rank, self.tp_size,
                     payload_len, got, keys=self.keys)

    def touch(self, key: bytes, when: float | None = None) -> None:
        try:
            os.utime(self.path(key), (when, when) if when else None, follow_symlinks=False)
        except OSError:
            pass

    def remove(self, key: bytes) -> bool:
        """Unpublish ``key``'s record: into ``free/`` while it holds fewer than
        ``free_files`` (a later write overwrites it), else unlinked. Anything but a
        plain file of ours (a planted symlink, FIFO, hard link) is unlinked."""
        path = self.path(key)
        if self.budget is not None:
            with self.budget.locked() as st:
                dest = self._free_slot(path)
                if dest is not None and self.budget.rename(st, path, dest):
                    return True
                return self.budget.unlink(st, path)
        try:
            dest = self._free_slot(path)
            if dest is not None:
                os.rename(path, dest)
            else:
                path.unlink()
            return True
        except FileNotFoundError:
            return False

    def _free_slot(self, path: Path) -> Path | None:
        """Where ``remove`` keeps ``path`` for a later write (None: unlink it)."""
        if not self.free_files:
            return None
        try:
            if not own_plain_file(os.lstat(path)) or len(os.listdir(self.free)) >= self.free_files:
                return None
        except OSError:
            return None
        return self.free / f"{path.name}.{os.getpid()}.{time.monotonic_ns()}"

    def _take_free(self) -> str:
        """A free file for a write to overwrite ("" none). Another writer may take
        the same one first: the rename then fails and the write makes a new file."""
        names = self._free_names
        try:
            return str(self.free / names.pop())
        except IndexError:
            pass
        try:
            names.extend(os.listdir(self.free))
            return str(self.free / names.pop())
        except (OSError, IndexError):
            return ""

    def exists(self, key: bytes) -> bool:
        return self.mtime(key) is not None

    def mtime(self, key: bytes) -> float | None:
        """The record's mtime (its last use), None if there is no regular file."""
        try:
            st = os.stat(self.path(key), follow_symlinks=False)
        except OSError:
            return None
        return st.st_mtime if stat.S_ISREG(st.st_mode) else None

    def temp_files(self) -> list[tuple[str, int]]:
        """``(path, size)`` of the files in ``tmp/`` (writes in flight, or a crash's)."""
        out = []
        try:
            for f in os.scandir(self.tmp):
                try:
                    out.append((f.path, f.stat(follow_symlinks=False).st_size))
                except OSError:
                    pass
        except OSError:
            pass
        return out

    # -- recovery ------------------------------------------------------------
    def scan(self) -> Iterator[RecordInfo]:
        """Published records of this rank (no content read: validated on load): regular
        files at ``path(key)`` for some key (lowercase hex, in their own shard)."""
        keys, sizes, mtimes = self._scan_lists()
        # One object per record, none of them in a reference cycle: with the
        # cyclic GC paused while they are made, a 100k-record scan does not
        # set off full collections over the host process's (vLLM's) heap.
        paused = gc.isenabled()
        gc.disable()
        try:
            rank = self.rank
            infos = [RecordInfo(k, rank, s, m) for k, s, m in zip(keys, sizes, mtimes)]
        finally:
            if paused:
                gc.enable()
        yield from infos

    def scan_mtimes(self) -> dict[bytes, float]:
        """``{key: mtime}`` of ``scan()``'s records, without a RecordInfo per record:
        the restart index rebuild of a large store (100k records) in one call."""
        keys, _, mtimes = self._scan_lists()
        return dict(zip(keys, mtimes))

    def _scan_lists(self) -> tuple[list[bytes], list[int], list[float]]:
        keys, sizes, mtimes = self._scan_names()
        if self.keys is not None:   # names -> keys (the keyed permutation's inverse)
            key_of = self.keys.key_of
            keys = [key_of(n) for n in keys]
        return keys, sizes, mtimes

    def _scan_names(self) -> tuple[list[bytes], list[int], list[float]]:
        if self.io_backend != "python":
            err, blob, sizes, mtimes = scan_records(str(self.dir), KEY_BYTES, self.io_threads)
            if err and err != errno.ENOENT:
                raise OSError(err, os.strerror(err), str(self.dir))
            keys = [blob[i:i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
            return keys, sizes, mtimes
        return pyio.scan_names(self.dir, KEY_BYTES)

    def sweep_temp(self, older_than: float = 600.0) -> int:
        """Remove temp files left by crashed writers (live writers' are younger; on a
        shared store a live process's are never removed: its budget covers them)."""
        n = 0
        cutoff = time.time() - older_than
        for f in os.scandir(self.tmp):
            try:
                if f.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                if self.budget is None:
                    os.unlink(f.path)
                    n += 1
                    continue
                with self.budget.locked() as st:
                    if not self.budget.is_live_temp(st, f.name):
                        n += self.budget.unlink(st, Path(f.path))
            except OSError:
                pass
        return n


def is_space_error(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
