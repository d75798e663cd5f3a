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

I/O: through the native engine (``kvtier._copy_engine.IoEngine``, csrc/io/io_*)
when the extension has it, else in Python; same files, same checks. The
native engine does a record's whole open/write/fsync/rename (or open/read)
with the GIL released, and takes batches (``write_batch``/``read_batch``: a
store or load job at once, spread over its threads). The
``KVTIER_NATIVE_IO`` environment variable (or ``DiskStore(native_io=...)``)
picks: ``auto`` (default), ``threads`` (native, required), ``off`` (Python).
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

import numpy as np

from kvtier.cache.keys import KEY_BYTES
from kvtier.copy.engine import PAGE
from kvtier.store.record import HEADER_BYTES, RecordError, check_record, record_bytes

log = logging.getLogger("vllm.kvtier.store")

try:
    from kvtier import _copy_engine as _native
    _IoEngine = _native.IoEngine
    _scan_records = _native.scan_records
except (ImportError, AttributeError):   # not built, or built before csrc/io/io_engine.cpp
    _native = _IoEngine = _scan_records = None

NATIVE_IO_MODES = ("auto", "threads", "off")
_FORKED_ENGINES: list = []   # engines inherited through fork(): kept, never joined

def _refuse_non_file(mode: int, path) -> None:
    """A record path that holds no regular file: OSError, EISDIR for a directory
    (else EINVAL), as the native reader reports it. Not a record fault: nothing
    about a record is proven, and the path is left alone."""
    if not stat.S_ISREG(mode):
        err = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
        raise OSError(err, os.strerror(err), str(path))


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
                 native_io: str | None = None, free_files: int = 0):
        if len(namespace) != KEY_BYTES:
            raise ValueError("namespace digest must be 16 bytes")
        self.root = Path(root)
        self.namespace = namespace
        self.rank = rank
        self.tp_size = tp_size
        self.fsync = fsync
        self.io_threads = max(1, int(io_threads))
        self.dir = self.root / namespace.hex() / f"rank{rank}"
        self.tmp = self.dir / "tmp"
        self.free = self.dir / "free"
        self.free_files = max(0, int(free_files))
        self._free_names: list[str] = []   # known free files, taken by writes
        for d in (self.root, self.root / namespace.hex(), self.dir, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.free.mkdir(mode=0o700, exist_ok=True)
        except OSError:   # e.g. a store of an older kvtier on a read-only mount
            self.free_files = 0
        self.o_direct = self._probe_o_direct(o_direct)
        self.io_backend = self._pick_backend(native_io)
        self._engine = None   # (IoEngine, pid), made on first use (the scheduler's stores do no I/O)
        self._engine_lock = threading.Lock()
        self._py_pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start the I/O engine's threads now rather than in the first read."""
        if self._io is not None:
            self._io.read_records([])

    @staticmethod
    def _pick_backend(mode: str | None) -> str:
        """"threads" (native engine) or "python", from ``native_io``."""
        mode = (mode or os.environ.get("KVTIER_NATIVE_IO") or "auto").strip().lower()
        if mode in ("0", "false", "no", "python"):
            mode = "off"
        if mode not in NATIVE_IO_MODES:
            raise ValueError(f"kvtier: native I/O mode {mode!r}: expected one of {NATIVE_IO_MODES}")
        if mode == "off":
            return "python"
        if _IoEngine is None:
            if mode != "auto":
                raise RuntimeError(f"kvtier: native I/O {mode!r} asked for, but the "
                                   "kvtier._copy_engine extension has no IoEngine")
            return "python"
        return "threads"

    @property
    def _io(self):
        """The native engine (None: Python I/O); one per process (after a fork the
        parent's engine, whose threads stayed behind, is set aside, never destroyed)."""
        if self.io_backend == "python":
            return None
        engine = self._engine
        if engine is None or engine[1] != os.getpid():
            with self._engine_lock:
                engine = self._engine
                if engine is not None and engine[1] != os.getpid():
                    _FORKED_ENGINES.append(engine[0])
                    engine = None
                if engine is None:
                    engine = (_IoEngine(self.io_threads), os.getpid())
                    self._engine = engine
        return engine[0]

    # -- paths ---------------------------------------------------------------
    def path(self, key: bytes) -> Path:
        h = key.hex()
        if len(key) != KEY_BYTES:
            raise ValueError("bad key length")
        return self.dir / h[:2] / h

    def _probe_o_direct(self, mode: str) -> bool:
        """Whether O_DIRECT works here: open and write one aligned page with it."""
        if mode == "off" or not hasattr(os, "O_DIRECT"):
            return False
        probe = self.tmp / f".probe-{os.getpid()}-{time.monotonic_ns()}"
        page = mmap.mmap(-1, PAGE)   # page-aligned
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
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
        return self.tmp / f"{key.hex()}.{os.getpid()}.{time.monotonic_ns()}"

    def _direct_ok(self, addr: int, nbytes: int) -> bool:
        """O_DIRECT for this buffer: on, and address and length page-aligned."""
        return self.o_direct and addr % PAGE == 0 and nbytes % PAGE == 0

    def _py_map(self, fn, items):
        """Python fallback of a batch: the items over ``io_threads`` threads."""
        if len(items) <= 1 or self.io_threads == 1:
            return [fn(*it) for it in items]
        with self._engine_lock:
            if self._py_pool is None:
                self._py_pool = ThreadPoolExecutor(self.io_threads,
                                                   thread_name_prefix="kvtier-store")
        return list(self._py_pool.map(lambda it: fn(*it), items))

    # -- write ---------------------------------------------------------------
    def write(self, key: bytes, record, reuse: bytes | None = None) -> int:
        """Publish ``record`` (header + padded payload, a page-aligned uint8 array).
        ``reuse``: an evicted record's key whose file this write takes over (writes
        over it); else a free file if there is one, else a new file.

        Raises OSError (ENOSPC, EIO, EROFS...) leaving nothing behind.
        """
        (r,) = self.write_batch([(key, record, reuse)])
        if isinstance(r, BaseException):
            raise r
        return r

    def write_batch(self, items: Sequence[tuple]) -> list:
        """Publish several records at once: ``[(key, record[, reuse key])]`` -> per
        item the bytes written, or the OSError that left nothing of it behind."""
        items = [(it[0], it[1], it[2] if len(it) > 2 else None) for it in items]
        if self._io is None:
            return self._py_map(self._write_py_safe, items)
        reqs, keep, tmps = [], [], []
        for key, record, reuse in items:
            buf = _bytes_view(record, writable=False)
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

    def _write_py_safe(self, key: bytes, record, reuse: bytes | None = None):
        try:
            return self._write_py(key, record, reuse)
        except OSError as e:
            return e

    def _write_py(self, key: bytes, record, reuse_key: bytes | None = None) -> int:
        final = self.path(key)
        tmp = self._tmp_path(key)
        view = memoryview(record).cast("B")
        addr = _bytes_view(record, writable=False).ctypes.data
        direct = os.O_DIRECT if self._direct_ok(addr, len(view)) else 0
        fd = None
        reuse = self._reuse_path(reuse_key)
        if reuse:
            try:
                os.rename(reuse, tmp)
                fd = os.open(tmp, os.O_WRONLY | direct)
            except OSError:   # taken by another writer: a new file
                tmp.unlink(missing_ok=True)
                fd = None
        reused = fd is not None
        if fd is None:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | direct, 0o600)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            if reused and os.fstat(fd).st_size > len(view):
                os.ftruncate(fd, len(view))
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            try:
                os.replace(tmp, final)
            except FileNotFoundError:
                final.parent.mkdir(mode=0o700, exist_ok=True)
                os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:   # the rename is durable only once the directory is
            dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return len(view)

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
        if self._io is None:
            return self._py_map(self._read_py_safe, items)
        reqs, keep, native = [], [], []
        for key, into, payload_len in items:
            want = record_bytes(payload_len)
            buf = _bytes_view(into, writable=True)
            if buf.nbytes < want:   # (a hostile length): the Python path's checks, no overrun
                native.append(False)
                continue
            native.append(True)
            keep.append(buf)
            addr = buf.ctypes.data
            reqs.append((str(self.path(key)), addr, want, self._direct_ok(addr, want),
                         HEADER_BYTES, payload_len))
        results = iter(zip(reqs, self._io.read_records(reqs)))
        out = []
        for (key, into, payload_len), nat in zip(items, native):
            if not nat:
                out.append(self._read_py_safe(key, into, payload_len))
                continue
            req, (err, got, size, digest) = next(results)
            want = req[2]
            try:
                if err == errno.ENOENT:
                    raise RecordError("missing", self.path(key).name)
                if err:
                    raise OSError(err, os.strerror(err), req[0])
                if size < want:
                    raise RecordError("truncated", f"{size} bytes < {want}")
                check_record(into, self.namespace, key, self.rank, self.tp_size, payload_len, got,
                             payload_digest=digest)
                out.append(None)
            except (RecordError, OSError) as e:
                out.append(e)
        return out

    def _read_py_safe(self, key: bytes, into, payload_len: int):
        try:
            self._read_py(key, into, payload_len)
            return None
        except (RecordError, OSError) as e:
            return e

    def _read_py(self, key: bytes, into, payload_len: int) -> None:
        want = record_bytes(payload_len)
        addr = _bytes_view(into, writable=True).ctypes.data
        direct = self._direct_ok(addr, want)
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except FileNotFoundError:
            raise RecordError("missing", path.name) from None
        except OSError as e:   # O_DIRECT refuses to open a directory: EINVAL
            if e.errno == errno.EINVAL and direct:
                _refuse_non_file(os.stat(path).st_mode, path)
            raise
        try:
            st = os.fstat(fd)
            _refuse_non_file(st.st_mode, path)
            size = st.st_size
            if size < want:
                raise RecordError("truncated", f"{size} bytes < {want}")
            view = memoryview(into).cast("B")[:want]
            got = 0
            while got < want:
                n = os.preadv(fd, [view[got:]], got)
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        check_record(into, self.namespace, key, self.rank, self.tp_size, payload_len, got)

    def touch(self, key: bytes, when: float | None = None) -> None:
        try:
            os.utime(self.path(key), (when, when) if when else None)
        except OSError:
            pass

    def remove(self, key: bytes) -> bool:
        """Unpublish ``key``'s record: into ``free/`` while it holds fewer than
        ``free_files`` (a later write overwrites it), else unlinked."""
        path = self.path(key)
        try:
            if self.free_files and len(os.listdir(self.free)) < self.free_files:
                os.rename(path, self.free / f"{key.hex()}.{os.getpid()}.{time.monotonic_ns()}")
            else:
                path.unlink()
            return True
        except FileNotFoundError:
            return False

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
        if self.io_backend != "python":
            err, blob, sizes, mtimes = _scan_records(str(self.dir), KEY_BYTES, self.io_threads)
            if err and err != errno.ENOENT:
                raise OSError(err, os.strerror(err), str(self.dir))
            keys = [blob[i:i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
            return keys, sizes, mtimes
        keys, sizes, mtimes = [], [], []
        try:
            subdirs = list(os.scandir(self.dir))
        except FileNotFoundError:
            return keys, sizes, mtimes
        for sub in subdirs:
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                name = f.name
                if len(name) != 2 * KEY_BYTES or name[:2] != sub.name or name != name.lower():
                    continue
                try:
                    key = bytes.fromhex(name)
                    st = f.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    continue
                if len(key) != KEY_BYTES or not stat.S_ISREG(st.st_mode):
                    continue
                keys.append(key)
                sizes.append(st.st_size)
                mtimes.append(st.st_mtime)
        return keys, sizes, mtimes

    def sweep_temp(self, older_than: float = 600.0) -> int:
        """Remove temp files left by crashed writers (live writers' are younger)."""
        n = 0
        cutoff = time.time() - older_than
        for f in os.scandir(self.tmp):
            try:
                if f.stat().st_mtime < cutoff:
                    os.unlink(f.path)
                    n += 1
            except OSError:
                pass
        return n


def _bytes_view(obj, writable: bool) -> np.ndarray:
    """``obj``'s bytes as a flat uint8 array sharing its memory (for its address)."""
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 1 \
            and obj.flags.c_contiguous:
        a = obj
    else:
        m = memoryview(obj)
        if not m.c_contiguous:
            raise ValueError("record buffers must be contiguous")
        a = np.frombuffer(m.cast("B") if m.format != "B" or m.ndim != 1 else m, dtype=np.uint8)
    if writable and not a.flags.writeable:
        raise ValueError("read buffer is read-only")
    return a


def is_space_error(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
