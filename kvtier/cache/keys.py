"""Stable chained prefix-block keys.

A block's key is ``sha256(parent_key || token ids)`` truncated to 128 bits
(SHA-256: CPUs hash it in hardware, 3x blake2b's speed here); the first block's
parent is the *root*, a hash of the namespace (model, KV dtype, KV layout, block
size, TP size, format version) plus the request's ``cache_salt`` and LoRA
adapter. Nothing here depends on PYTHONHASHSEED or on vLLM's per-process random
hash seed, so the same prompt gives the same keys in any process, after any
restart. The TP rank is not part of the key (one scheduler decision for all
ranks); each rank's records carry their rank in the store (see store.py).
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

# Bulk hashers of the same keys from the native module (OpenSSL's libcrypto:
# csrc/cache/key_bindings.cpp), "chain_keys" and "group_keys", when it has them.
# cache/ is pure policy and imports no native code: kvtier.store.native, which
# loads the module, installs them (install_native_hashers).
_native: dict = {}


def install_native_hashers(**hashers) -> None:
    """Hash keys in bulk with these (the same bytes: tests/cache/test_keys.py)."""
    _native.update(hashers)


def native_keys_agree(chain, group) -> bool:
    """The native hashers make this module's keys (a module built from older
    sources would hash otherwise: then it is not used, and says so)."""
    from kvtier.cache.groups import group_key
    parent, toks = bytes(range(KEY_BYTES)), list(range(64))
    want = _chain_keys_hashlib(parent, toks, 32, 2)
    if chain(parent, toks, 32, 2) == want and group(want, 1) == [group_key(k, 1) for k in want]:
        return True
    log.warning(
        "kvtier: the native module hashes block keys otherwise than this kvtier (built from "
        "older sources? rebuild it): keys are hashed in Python")
    return False


def native_hasher(name: str):
    """The installed bulk hasher ``name``, or None (then hashlib is used)."""
    return _native.get(name)

FORMAT_VERSION = 1
KEY_BYTES = 16


@dataclass(frozen=True)
class Namespace:
    """Everything that makes two blocks of KV bytes interchangeable."""

    model: str
    kv_dtype: str
    layout: str
    block_size: int
    tp_size: int = 1
    extra: str = ""  # e.g. a model revision or a KV cache group id
    version: int = FORMAT_VERSION
    compute: str = ""   # what else changes the KV bytes (kvtier.vllm.namespace): dtype, weights...

    def digest(self) -> bytes:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=KEY_BYTES, person=b"kvtier-ns").digest()


def root_key(namespace_digest: bytes, cache_salt: str | None = None,
             lora: str | None = None) -> bytes:
    """Parent of a request's first block: the namespace, its salt and LoRA."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvtier-root")
    h.update(namespace_digest)
    for part in (cache_salt, lora):
        data = b"" if part is None else part.encode()
        h.update(len(data).to_bytes(4, "little") + (b"\x01" if part is not None else b"\x00"))
        h.update(data)
    return h.digest()


def _u32_le(token_ids: Sequence[int], n: int) -> bytes:
    """The first ``n`` token ids as little-endian uint32 bytes (any host)."""
    if sys.byteorder == "little" and array.array("I").itemsize == 4:
        return array.array("I", token_ids[:n]).tobytes()   # 4x faster than numpy here
    return np.asarray(token_ids[:n], dtype="<u4").tobytes()


def chain_keys(parent: bytes, token_ids: Sequence[int], block_size: int,
               n_full: int | None = None) -> list[bytes]:
    """Keys of the first ``n_full`` (default: every) *full* block of ``token_ids``
    following ``parent``."""
    if n_full is None:
        n_full = len(token_ids) // block_size
    if n_full <= 0:
        return []
    native = _native.get("chain_keys")
    if native is not None:   # reads the ids straight from the sequence
        return native(parent, token_ids, block_size, n_full)
    return _chain_keys_hashlib(parent, token_ids, block_size, n_full)


def _chain_keys_hashlib(parent: bytes, token_ids: Sequence[int], block_size: int,
                        n_full: int) -> list[bytes]:
    toks = _u32_le(token_ids, n_full * block_size)
    step = block_size * 4
    sha256 = hashlib.sha256
    keys = []
    append = keys.append
    for off in range(0, n_full * step, step):
        parent = sha256(parent + toks[off:off + step]).digest()[:KEY_BYTES]
        append(parent)
    return keys


class KeyChain:
    """Keys of one request's full blocks, extended as its tokens grow."""

    __slots__ = ("root", "block_size", "keys")

    def __init__(self, root: bytes, block_size: int):
        self.root = root
        self.block_size = block_size
        self.keys: list[bytes] = []

    def extend(self, token_ids: Sequence[int], n_full: int | None = None) -> list[bytes]:
        """Make sure the first ``n_full`` (default: every) full block of ``token_ids``
        has its key; return all keys."""
        have = len(self.keys)
        if n_full is None:
            n_full = len(token_ids) // self.block_size
        if n_full > have:
            parent = self.keys[-1] if self.keys else self.root
            bs = self.block_size
            tail = token_ids[have * bs: n_full * bs] if have else token_ids
            self.keys.extend(chain_keys(parent, tail, bs, n_full - have))
        return self.keys


class KeyMemo:
    """Another hash of the same blocks (vLLM's: collision-resistant, and chained,
    so a block's hash names its whole prefix) -> their kvtier keys, so a resent
    prefix is looked up instead of hashed again.

    Kept in segments of ``SEGMENT`` blocks: segment j (blocks ``[S*j, S*j+S)``)
    under the hash of its last block, with the kvtier root its keys chain from
    (a hash that covers less than the root - a LoRA adapter's path - never gives
    another root's keys). A 4,096-block prompt costs 256 dict operations, not
    4,096 (each a likely cache miss in a table this size: ~0.5 ms more per cold
    lookup). A prompt's blocks after its last whole segment are hashed again.

    Bounded by ``size`` blocks in two generations: new segments go to the young
    one; when it is full the old one is dropped whole and the young one becomes
    the old one. A segment found in the old generation moves to the young one,
    so a prefix in use stays. (A dict trimmed one oldest entry at a time would
    not do: CPython's iteration from the start skips the deleted slots, which
    made a full memo cost ~26 ms per 4K-token lookup.)"""

    SEGMENT = 16
    __slots__ = ("half", "_young", "_old")

    def __init__(self, size: int):
        self.half = max(1, size // (2 * self.SEGMENT))   # segments per generation
        # vLLM's hash of a segment's last block -> (root, keys, i): its keys are
        # keys[i:i + SEGMENT]
        self._young: dict[bytes, tuple[bytes, tuple[bytes, ...], int]] = {}
        self._old: dict[bytes, tuple[bytes, tuple[bytes, ...], int]] = {}

    def __len__(self) -> int:
        """Blocks remembered."""
        return self.SEGMENT * (len(self._young) + len(self._old))

    def clear(self) -> None:
        self._young, self._old = {}, {}

    def leading(self, root: bytes, hashes: Sequence[bytes], lo: int, n: int) -> list[bytes]:
        """The keys of blocks ``[lo, k)`` of a prompt whose blocks' hashes are
        ``hashes`` and whose keys chain from ``root``: the largest ``k <= n`` such
        that every segment from the one holding block ``lo`` to block ``k`` is
        known."""
        S = self.SEGMENT
        out: list[bytes] = []
        j = lo // S
        while (j + 1) * S <= n:
            h = hashes[(j + 1) * S - 1]
            seg = self._young.get(h)   # (a promotion may age the generations)
            if seg is None:
                seg = self._old.pop(h, None)
                if seg is None:
                    break
                seg = (seg[0], seg[1][seg[2]:seg[2] + S], 0)   # its own keys only
                self._put(h, seg)   # in use: kept
            seg_root, keys, at = seg
            if seg_root != root:
                break
            out += keys[at:at + S]
            j += 1
        return out[lo - (lo // S) * S:]

    def remember(self, root: bytes, hashes: Sequence[bytes], keys: Sequence[bytes],
                 lo: int, n: int) -> None:
        """Remember the whole segments of blocks ``[0, n)`` that end at or after
        block ``lo`` (``keys``: the keys of blocks ``[0, n)`` at least). They
        share one copy of the keys, and live and go together: a segment moved to
        the young generation takes its own, and one the young generation has is
        not replaced (under another root: vLLM hashed two prompts the same that
        kvtier keys apart, both rare and left to hashing), so what the memo
        holds stays within its bound (or one prompt's blocks, for a prompt
        longer than half of it)."""
        S = self.SEGMENT
        first, end = lo // S, n // S
        if end <= first:
            return
        shared = tuple(keys[first * S:end * S])
        young = self._young
        segs = {h: (root, shared, (j - first) * S) for j in range(first, end)
                if (h := hashes[(j + 1) * S - 1]) not in young}
        if len(self._young) + len(segs) > self.half:   # ages first: never past the bound
            self._old, self._young = self._young, {}
        self._young.update(segs)

    def _put(self, h: bytes, seg: tuple) -> None:
        if len(self._young) >= self.half:
            self._old, self._young = self._young, {}
        self._young[h] = seg
