"""The record format: one block of one TP rank, as a file and as a DRAM slot.

A record is a 4096-byte header then the payload (padded to 4096 so O_DIRECT can
write it in one go). The header carries magic, format version, namespace digest,
key, rank, TP size, payload length, an xxh3-64 checksum of the payload, the
creation time and an xxh3-64 of the header itself. A reader checks all of it
before a byte is used (``check_record``): any mismatch is a miss, never loaded.

An *authenticated* record (a store with a secret, kvtier.store.secret) has its
own magic and an HMAC-SHA256 of the header's fields and checksum and of the
payload right after the header checksum (bytes 88..120 of the 4 KiB header,
unused otherwise: the layout of plain records is unchanged). A reader with the
secret accepts only authenticated records whose MAC verifies ("bad_mac"
otherwise); the xxh3 checksums stay (they tell damage from forgery). In such a
store the header's namespace and key fields hold the keyed names the store
uses for them (``DiskStore.namespace_id``, ``DiskStore.name``), as the paths do.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import numpy as np
import xxhash

from kvtier.cache.keys import FORMAT_VERSION
from kvtier.copy.engine import PAGE, round_up
from kvtier.store.secret import MAC_BYTES, StoreKeys

MAGIC = b"KVTIERB\x00"
MAGIC_MAC = b"KVTIERA\x00"   # authenticated: a MAC follows the header checksum
HEADER_BYTES = PAGE
# magic, version, header_bytes, namespace, key, rank, tp_size, payload_len,
# checksum, created
_HEADER = struct.Struct("<8sII16s16sIIQQd")
_HEADER_CRC = struct.Struct("<Q")
_SIGNED = _HEADER.size + _HEADER_CRC.size    # the bytes the MAC covers of the header
MAC_OFFSET = _SIGNED


# Read failures that prove a record unusable (it is then removed); an I/O error
# or an internal error proves nothing about the record.
RECORD_FAULTS = ("missing", "checksum", "bad_header", "truncated", "wrong_key",
                 "wrong_namespace", "bad_mac", "not_regular")


class RecordError(Exception):
    """A record failed validation; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def record_bytes(payload_len: int) -> int:
    return HEADER_BYTES + round_up(payload_len)


def pack_header(buf, namespace: bytes, key: bytes, rank: int, tp_size: int,
                payload_len: int, checksum: int, created: float | None = None,
                keys: "StoreKeys | None" = None) -> None:
    """Write a record header into the first HEADER_BYTES of ``buf`` (a uint8 array).
    ``keys``: an authenticated record, its MAC over the header and ``buf``'s payload."""
    head = _HEADER.pack(MAGIC_MAC if keys is not None else MAGIC, FORMAT_VERSION, HEADER_BYTES,
                        namespace, key, rank, tp_size, payload_len, checksum,
                        time.time() if created is None else created)
    blob = head + _HEADER_CRC.pack(xxhash.xxh3_64_intdigest(head))
    if keys is not None:
        blob += keys.mac(blob, buf[HEADER_BYTES:HEADER_BYTES + payload_len])
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
    authenticated: bool = False   # MAGIC_MAC: a MAC follows (verified by check_record)


def parse_header(buf) -> Header:
    """The header's fields, after its own checksum, magic and version are checked."""
    if len(buf) < _HEADER.size + _HEADER_CRC.size:
        raise RecordError("truncated", f"{len(buf)} bytes: no header")
    head = bytes(buf[:_HEADER.size])
    (crc,) = _HEADER_CRC.unpack(bytes(buf[_HEADER.size:_HEADER.size + _HEADER_CRC.size]))
    if xxhash.xxh3_64_intdigest(head) != crc:
        raise RecordError("bad_header", "header checksum mismatch")
    magic, version, hbytes, ns, k, r, tp, plen, checksum, created = _HEADER.unpack(head)
    if magic not in (MAGIC, MAGIC_MAC) or hbytes != HEADER_BYTES:
        raise RecordError("bad_header", f"not a kvtier record (magic {magic!r}, header {hbytes})")
    if version != FORMAT_VERSION:
        raise RecordError("bad_header", f"record format version {version}: this kvtier reads "
                          f"format version {FORMAT_VERSION} only")
    return Header(ns, k, r, tp, plen, checksum, created, magic == MAGIC_MAC)


def check_mac(buf, keys: "StoreKeys", payload_len: int) -> None:
    """Raise RecordError("bad_mac") unless ``buf`` (a parsed authenticated record)
    carries a valid MAC under ``keys``."""
    tag = bytes(buf[MAC_OFFSET:MAC_OFFSET + MAC_BYTES])
    if not keys.verify(bytes(buf[:_SIGNED]), buf[HEADER_BYTES:HEADER_BYTES + payload_len], tag):
        raise RecordError("bad_mac", "MAC mismatch: not written with this store's secret")


def check_record(buf, namespace: bytes, key: bytes, rank: int, tp_size: int,
                 payload_len: int, file_size: int, payload_digest: int | None = None,
                 keys: "StoreKeys | None" = None, mac: bool = True) -> None:
    """Raise RecordError unless ``buf`` holds a valid record of exactly this block.

    ``payload_digest``: the xxh3-64 of ``buf``'s payload bytes when the caller has
    it already (the native reader hashes on its I/O threads); else computed here.
    ``keys``: the store's secret: only an authenticated record with a valid MAC
    passes (``mac=False``: every check but the MAC's, which the caller does).
    """
    if file_size < HEADER_BYTES + payload_len:
        raise RecordError("truncated", f"{file_size} bytes < {HEADER_BYTES + payload_len}")
    h = parse_header(buf)
    if keys is not None and not h.authenticated:
        raise RecordError("bad_mac", "the record carries no MAC (this store has a secret)")
    if h.namespace != namespace or h.rank != rank or h.tp_size != tp_size:
        raise RecordError("wrong_namespace",
                          f"record of namespace {h.namespace.hex()} rank {h.rank}/{h.tp_size}")
    if h.key != key:
        raise RecordError("wrong_key", f"record holds key {h.key.hex()}")
    if h.payload_len != payload_len:
        raise RecordError("bad_header", f"payload length {h.payload_len} != {payload_len}")
    checksum = h.checksum
    if payload_digest is None:
        payload_digest = xxhash.xxh3_64_intdigest(buf[HEADER_BYTES:HEADER_BYTES + payload_len])
    if payload_digest != checksum:
        raise RecordError("checksum", "payload checksum mismatch")
    if keys is not None and mac:
        check_mac(buf, keys, payload_len)


