"""KV cache groups: which layers share a block table, and what a prefix hit
needs from each.

vLLM's hybrid KV cache manager splits a model's attention layers into groups
of equal size, one block table per group: full-attention layers keep every
block of a sequence; sliding-window layers keep only the blocks the window can
still see (the others become vLLM's *null block*, id 0). kvtier stores one
record per (prefix block, group): the group's layers for that block, under the
block's chained key mixed with the group index (``group_key``). A prefix hit
of blocks ``[start, end)`` needs every full-attention group's records for all
of them, but a sliding-window group's records only for the last
``window_blocks`` of them; vLLM allocates null blocks for the rest.

A model without a hybrid cache has one full-attention group, whose keys are
the plain chained keys. What vLLM's KV cache group specs become here:
kvtier.vllm.groups.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kvtier.cache.keys import native_hasher

NULL_BLOCK = 0   # vLLM's BlockPool reserves block 0 as the null block


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVGroup:
    index: int
    layer_names: tuple[str, ...]
    window_blocks: int | None = None   # None: full attention

    @property
    def windowed(self) -> bool:
        return self.window_blocks is not None

    def needed(self, start: int, end: int) -> range:
        """Blocks of ``[start, end)`` this group must load for a hit ending at ``end``."""
        if self.window_blocks is None:
            return range(start, end)
        return range(max(start, end - self.window_blocks), end)


FULL = (KVGroup(0, ()),)   # a model with one full-attention group


# A group key hashes 31 bytes, a chain key 16 + 4 x block_size: never the same input.
GROUP_PREFIX = b"kvtier-group\x00"


def group_key(key: bytes, index: int) -> bytes:
    """The record key of block ``key`` in group ``index`` (group 0: the block key):
    ``sha256(GROUP_PREFIX || key || index)`` truncated to the key's length."""
    if index == 0:
        return key
    return hashlib.sha256(GROUP_PREFIX + key + index.to_bytes(2, "little")).digest()[:len(key)]


def group_keys(keys: list[bytes], index: int) -> list[bytes]:
    """``group_key`` of each of ``keys``."""
    if index == 0:
        return list(keys)
    native = native_hasher("group_keys")
    if native is not None:
        return native(keys, index)
    return [group_key(k, index) for k in keys]
