"""The store's file operations in Python: what the native I/O engine
(csrc/io/io_*) does, for builds without it (or ``native_io: off``). Same files,
same rules (kvtier.store.safety): temp file, write, [fsync], rename; reads that
refuse anything but a regular file; scans that follow no link.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable

import numpy as np

from kvtier.store.record import RecordError
from kvtier.store.safety import OPEN_SAFE, not_regular_error, own_plain_file

# (address, length) -> whether O_DIRECT may be used for this buffer
DirectOk = Callable[[int, int], bool]


def bytes_view(obj, writable: bool) -> np.ndarray:
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


def fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def fill_tmp(tmp: Path, record, reused: bool, direct_ok: DirectOk, fsync: bool) -> None:
    """Write ``record`` into ``tmp``: over the file there (``reused``) if it is a
    plain file of ours, else a new file. On failure ``tmp`` is gone."""
    view = memoryview(record).cast("B")
    addr = bytes_view(record, writable=False).ctypes.data
    direct = os.O_DIRECT if direct_ok(addr, len(view)) else 0
    fd = None
    if reused:
        try:
            fd = os.open(tmp, os.O_WRONLY | OPEN_SAFE | direct)
            if not own_plain_file(os.fstat(fd)):
                os.close(fd)
                fd = None
        except OSError:
            fd = None
        if fd is None:   # a symlink, FIFO or hard link planted as a free file
            tmp.unlink(missing_ok=True)
    reused = fd is not None
    if fd is None:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | OPEN_SAFE | direct, 0o600)
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
        if reused and os.fstat(fd).st_size > len(view):
            os.ftruncate(fd, len(view))
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_record(tmp: Path, final: Path, record, reuse: str, direct_ok: DirectOk,
                 fsync: bool) -> int:
    """Publish ``record`` at ``final`` through ``tmp`` (``reuse``: a file to rename
    to ``tmp`` and write over, "" none). Raises OSError leaving nothing behind."""
    reused = False
    if reuse:
        try:
            os.rename(reuse, tmp)
            reused = True
        except OSError:   # taken by another writer: a new file
            pass
    fill_tmp(tmp, record, reused, direct_ok, fsync)
    try:
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:   # the rename is durable only once the directory is
        fsync_dir(final.parent)
    return memoryview(record).nbytes


def read_record(path: Path, into, want: int, direct_ok: DirectOk) -> int:
    """Read the first ``want`` bytes of the record at ``path`` into ``into``;
    returns the bytes read. Raises RecordError ("missing", "not_regular",
    "truncated") or OSError."""
    addr = bytes_view(into, writable=True).ctypes.data
    flags = os.O_RDONLY | OPEN_SAFE | (os.O_DIRECT if direct_ok(addr, want) else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise RecordError("missing", path.name) from None
    except OSError as e:
        if not_regular_error(e, path):
            raise RecordError("not_regular", f"{path} is not a regular file") from None
        if e.errno == errno.EINVAL and os.path.isdir(path):   # O_DIRECT refuses a directory
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):   # no record, and no fault of one: left alone
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st.st_mode):
            raise RecordError("not_regular", f"{path} is not a regular file")
        if st.st_size < want:
            raise RecordError("truncated", f"{st.st_size} bytes < {want}")
        view = memoryview(into).cast("B")[:want]
        got = 0
        while got < want:
            n = os.preadv(fd, [view[got:]], got)
            if n == 0:
                break
            got += n
        return got
    finally:
        os.close(fd)


def scan_names(rank_dir: Path, name_bytes: int) -> tuple[list[bytes], list[int], list[float]]:
    """``(names, sizes, mtimes)`` of the published records under ``rank_dir``: regular
    files named by ``name_bytes`` bytes in lowercase hex, in their own shard."""
    names, sizes, mtimes = [], [], []
    try:
        subdirs = list(os.scandir(rank_dir))
    except FileNotFoundError:
        return names, sizes, mtimes
    for sub in subdirs:
        if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
            continue
        for f in os.scandir(sub.path):
            name = f.name
            if len(name) != 2 * name_bytes or name[:2] != sub.name or name != name.lower():
                continue
            try:
                raw = bytes.fromhex(name)
                st = f.stat(follow_symlinks=False)
            except (ValueError, OSError):
                continue
            if len(raw) != name_bytes or not stat.S_ISREG(st.st_mode):
                continue
            names.append(raw)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime)
    return names, sizes, mtimes
