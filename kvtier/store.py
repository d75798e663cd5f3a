"""The disk tier's records: one file per (block key, TP rank), content-addressed.

Layout under ``disk_path``::

    <namespace hex>/rank<R>/<key[0:2] hex>/<key hex>     published records
    <namespace hex>/rank<R>/tmp/                         records being written

A record is a 4096-byte header then the payload (padded to 4096 so O_DIRECT can
write it in one go). The header carries magic, format version, namespace digest,
key, rank, TP size, payload length, an xxh3-64 checksum of the payload, the
creation time and an xxh3-64 of the header itself. A reader checks all of it
before a byte is used: any mismatch is a miss (counted), never loaded.

Publication is atomic: write to ``tmp/``, optionally fsync, ``rename`` into
place. A crash leaves complete records or nothing (plus temp files that the
next start sweeps). Records are immutable and named by content, so several
processes (other ranks, other instances, other nodes on a shared filesystem
with atomic rename) can write the same key concurrently: the last rename wins
with identical bytes.

Directories are 0700 and files 0600. Keys are fixed-size digests rendered as
hex, so no key can become a path traversal.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import xxhash

from kvtier.copy import PAGE, round_up
from kvtier.keys import FORMAT_VERSION, KEY_BYTES

log = logging.getLogger("vllm.kvtier.store")

MAGIC = b"KVTIERB\x00"
HEADER_BYTES = PAGE
# magic, version, header_bytes, namespace, key, rank, tp_size, payload_len,
# checksum, created
_HEADER = struct.Struct("<8sII16s16sIIQQd")
_HEADER_CRC = struct.Struct("<Q")


class RecordError(Exception):
    """A record failed validation; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class RecordInfo:
    key: bytes
    rank: int
    size: int       # bytes on disk
    mtime: float    # last use (we touch records on hits)


def record_bytes(payload_len: int) -> int:
    return HEADER_BYTES + round_up(payload_len)


def pack_header(buf, namespace: bytes, key: bytes, rank: int, tp_size: int,
                payload_len: int, checksum: int, created: float | None = None) -> None:
    """Write a record header into the first HEADER_BYTES of ``buf`` (a uint8 array)."""
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_BYTES, namespace, key, rank, tp_size,
                        payload_len, checksum, time.time() if created is None else created)
    crc = _HEADER_CRC.pack(xxhash.xxh3_64_intdigest(head))
    blob = head + crc
    buf[:len(blob)] = np.frombuffer(blob, dtype=np.uint8)


@dataclass(frozen=True)
class Header:
    namespace: bytes
    key: bytes
    rank: int
    tp_size: int
    payload_len: int
    checksum: int
    created: float


def parse_header(buf) -> Header:
    """The header's fields, after its own checksum, magic and version are checked."""
    if len(buf) < _HEADER.size + _HEADER_CRC.size:
        raise RecordError("truncated", f"{len(buf)} bytes: no header")
    head = bytes(buf[:_HEADER.size])
    (crc,) = _HEADER_CRC.unpack(bytes(buf[_HEADER.size:_HEADER.size + _HEADER_CRC.size]))
    if xxhash.xxh3_64_intdigest(head) != crc:
        raise RecordError("bad_header", "header checksum mismatch")
    magic, version, hbytes, ns, k, r, tp, plen, checksum, created = _HEADER.unpack(head)
    if magic != MAGIC or version != FORMAT_VERSION or hbytes != HEADER_BYTES:
        raise RecordError("bad_header", f"magic/version {magic!r}/{version}")
    return Header(ns, k, r, tp, plen, checksum, created)


def check_record(buf, namespace: bytes, key: bytes, rank: int, tp_size: int,
                 payload_len: int, file_size: int) -> None:
    """Raise RecordError unless ``buf`` holds a valid record of exactly this block."""
    if file_size < HEADER_BYTES + payload_len:
        raise RecordError("truncated", f"{file_size} bytes < {HEADER_BYTES + payload_len}")
    h = parse_header(buf)
    if h.namespace != namespace or h.rank != rank or h.tp_size != tp_size:
        raise RecordError("wrong_namespace",
                          f"record of namespace {h.namespace.hex()} rank {h.rank}/{h.tp_size}")
    if h.key != key:
        raise RecordError("wrong_key", f"record holds key {h.key.hex()}")
    if h.payload_len != payload_len:
        raise RecordError("bad_header", f"payload length {h.payload_len} != {payload_len}")
    checksum = h.checksum
    payload = buf[HEADER_BYTES:HEADER_BYTES + payload_len]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise RecordError("checksum", "payload checksum mismatch")


class DiskStore:
    """Files of one namespace and one rank. Thread-safe (no shared state)."""

    def __init__(self, root: str | os.PathLike, namespace: bytes, rank: int, tp_size: int,
                 o_direct: str = "auto", fsync: bool = False):
        if len(namespace) != KEY_BYTES:
            raise ValueError("namespace digest must be 16 bytes")
        self.root = Path(root)
        self.namespace = namespace
        self.rank = rank
        self.tp_size = tp_size
        self.fsync = fsync
        self.dir = self.root / namespace.hex() / f"rank{rank}"
        self.tmp = self.dir / "tmp"
        for d in (self.root, self.root / namespace.hex(), self.dir, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.o_direct = self._probe_o_direct(o_direct)

    # -- paths ---------------------------------------------------------------
    def path(self, key: bytes) -> Path:
        h = key.hex()
        if len(key) != KEY_BYTES:
            raise ValueError("bad key length")
        return self.dir / h[:2] / h

    def _probe_o_direct(self, mode: str) -> bool:
        if mode == "off" or not hasattr(os, "O_DIRECT"):
            return False
        probe = self.tmp / f".probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
            os.close(fd)
            return True
        except OSError as e:
            if mode == "on":
                raise OSError(e.errno, f"kvtier: O_DIRECT not supported on {self.root} ({e})")
            log.warning("kvtier: %s does not allow O_DIRECT (%s); using buffered I/O",
                        self.root, e.strerror)
            return False
        finally:
            probe.unlink(missing_ok=True)

    # -- write ---------------------------------------------------------------
    def write(self, key: bytes, record) -> int:
        """Publish ``record`` (header + padded payload, a page-aligned uint8 array).

        Raises OSError (ENOSPC, EIO, EROFS...) leaving nothing behind.
        """
        final = self.path(key)
        tmp = self.tmp / f"{key.hex()}.{os.getpid()}.{time.monotonic_ns()}"
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | (os.O_DIRECT if self.o_direct else 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            view = memoryview(record)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
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
        return len(record)

    # -- read ----------------------------------------------------------------
    def read(self, key: bytes, into, payload_len: int) -> None:
        """Read and validate ``key``'s record into ``into`` (>= record size).

        Raises RecordError (reason "missing" when there is no record) or OSError.
        """
        want = record_bytes(payload_len)
        flags = os.O_RDONLY | (os.O_DIRECT if self.o_direct else 0)
        try:
            fd = os.open(self.path(key), flags)
        except FileNotFoundError:
            raise RecordError("missing", self.path(key).name) from None
        try:
            size = os.fstat(fd).st_size
            if size < want:
                raise RecordError("truncated", f"{size} bytes < {want}")
            view = memoryview(into)[:want]
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
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def exists(self, key: bytes) -> bool:
        return self.path(key).exists()

    # -- recovery ------------------------------------------------------------
    def scan(self) -> Iterator[RecordInfo]:
        """Published records of this rank (no content read: validated on load)."""
        try:
            subdirs = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        for sub in subdirs:
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                name = f.name
                if len(name) != 2 * KEY_BYTES:
                    continue
                try:
                    key = bytes.fromhex(name)
                    st = f.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    continue
                yield RecordInfo(key, self.rank, st.st_size, st.st_mtime)

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


def is_space_error(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
