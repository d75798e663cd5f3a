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
    """Another hash of the same blocks (vLLM's, collision-resistant) -> their
    kvtier keys, so a resent prefix is looked up instead of hashed again.

    Bounded by ``size`` entries (a prompt longer than half of it: by its blocks)
    in two generations: new entries go to the young one; when it is full the old
    one is dropped whole and the young one becomes the old one. An entry found
    in the old generation moves to the young one, so a prefix in use stays.
    A call costs what its own entries cost, and once in ``size // 2`` new
    entries the drop of a generation. (A dict trimmed one oldest entry at a time
    does not: CPython's iteration from the start skips the deleted slots, so a
    full memo cost ~26 ms per 4K-token lookup, quadratic in the entries trimmed
    between resizes.)"""

    __slots__ = ("half", "_young", "_old")

    def __init__(self, size: int):
        self.half = max(1, size // 2)
        self._young: dict[bytes, bytes] = {}
        self._old: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def clear(self) -> None:
        self._young, self._old = {}, {}

    def knows(self, h: bytes) -> bool:
        return h in self._young or h in self._old

    def leading(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The keys of the leading run of ``hashes`` this memo knows."""
        found = list(map(self._young.get, hashes))
        if None in found:
            oget = self._old.get
            for i, key in enumerate(found):
                if key is None:
                    key = oget(hashes[i])
                    if key is None:
                        del found[i:]
                        break
                    found[i] = key
            promoted = [h for h, k in zip(hashes, found) if h not in self._young]
            self.remember(promoted, [self._old[h] for h in promoted])   # in use: kept
        return found

    def remember(self, hashes: Sequence[bytes], keys: Sequence[bytes]) -> None:
        if len(self._young) + len(hashes) > self.half:
            self._old, self._young = self._young, {}
        self._young.update(zip(hashes, keys))
