"""The copy engine's Python face: vLLM's paged KV <-> kvtier's host slots.

``KVLayout`` describes where block ``b`` of layer ``l`` lives in vLLM's KV
memory, read off the registered per-layer 4-D views ``[B, H, N, C]`` whatever
their stride order (LBHNC on CPU, LBNHC/FlashAttention on GPU, LHBNC...): a
block of a layer is ``nruns`` contiguous runs of ``run_bytes`` bytes, run ``r``
at ``base[l] + b * block_stride[l] + r * run_stride[l]``. A host slot holds a
block's runs back to back, layer-major, after a header: the bytes on disk are
exactly these, so the record format does not depend on which engine copied.

``HostPool`` is the DRAM tier's memory: one page-aligned allocation split into
fixed slots (pinned with one registration when CUDA is present).

Engines: ``NativeCopyEngine`` (csrc/, C++ threads on CPU, one kernel launch on
CUDA) and ``TorchCopyEngine`` (index_select + copy; the reference and the
fallback where the extension is not built).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

PAGE = 4096


class CopyError(ValueError):
    """A copy was asked for with bad arguments (block id out of range, ...)."""


@dataclass(frozen=True)
class KVLayout:
    layer_names: tuple[str, ...]
    base_ptrs: tuple[int, ...]      # byte address of block 0, run 0, per layer
    block_strides: tuple[int, ...]  # bytes between blocks, per layer
    run_strides: tuple[int, ...]    # bytes between runs of one block, per layer
    nruns: int
    run_bytes: int
    num_blocks: int
    device: str                      # "cpu" or "cuda:N"
    name: str                        # layout name for the key namespace (e.g. "LBHNC")
    dtype: str

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers: a slot's payload."""
        return self.num_layers * self.nruns * self.run_bytes

    @classmethod
    def from_kv_caches(cls, kv_caches: dict[str, torch.Tensor], num_blocks: int,
                       name: str = "") -> "KVLayout":
        if not kv_caches:
            raise CopyError("no KV cache tensors registered")
        bases, bstrides, rstrides = [], [], []
        geometry = None
        dtype = None
        device = None
        for lname, t in kv_caches.items():
            if t.dim() != 4:
                raise CopyError(
                    f"layer {lname}: expected a 4-D [blocks, heads, tokens, content] KV view, "
                    f"got shape {tuple(t.shape)}")
            es = t.element_size()
            shape, strides = list(t.shape), [s * es for s in t.stride()]
            ratio = shape[0] // num_blocks if num_blocks else 0
            if ratio < 1 or shape[0] != ratio * num_blocks:
                raise CopyError(
                    f"layer {lname}: {shape[0]} pages is not a multiple of {num_blocks} blocks")
            inner = sorted(range(1, 4), key=lambda d: -strides[d])
            # Longest contiguous suffix of the inner dims in physical order.
            run = es
            k = 3
            while k >= 1 and (shape[inner[k - 1]] == 1 or strides[inner[k - 1]] == run):
                run *= shape[inner[k - 1]]
                k -= 1
            if k == 0:
                nruns, run_stride = 1, run
            elif k == 1:
                nruns, run_stride = shape[inner[0]], strides[inner[0]]
            else:
                raise CopyError(f"layer {lname}: unsupported KV stride order {t.stride()}")
            block_stride = strides[0]
            if ratio > 1:   # kernel pages subdivide a block: they must abut
                if nruns != 1 or block_stride != run:
                    raise CopyError(f"layer {lname}: split pages of non-dense layout")
                nruns, run_stride, block_stride = ratio, block_stride, block_stride * ratio
            g = (nruns, run)
            if geometry is None:
                geometry, dtype, device = g, str(t.dtype).replace("torch.", ""), str(t.device)
            elif g != geometry:
                raise CopyError(f"layer {lname}: block geometry {g} differs from {geometry}")
            bases.append(t.data_ptr())
            bstrides.append(block_stride)
            rstrides.append(run_stride)
        return cls(tuple(kv_caches), tuple(bases), tuple(bstrides), tuple(rstrides),
                   geometry[0], geometry[1], num_blocks, device, name or "?", dtype)


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


class HostPool:
    """``num_slots`` fixed slots of ``slot_bytes`` in one page-aligned allocation."""

    def __init__(self, num_slots: int, slot_bytes: int, pin: bool = False):
        if slot_bytes % PAGE:
            raise ValueError("slot_bytes must be a multiple of 4096 (O_DIRECT alignment)")
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        nbytes = max(num_slots * slot_bytes, PAGE)
        self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        self.base_ptr = self.array.ctypes.data
        self.pinned = False
        if pin and torch.cuda.is_available():
            # One registration for the whole pool; never per transfer.
            err = torch.cuda.cudart().cudaHostRegister(self.base_ptr, nbytes, 0)
            self.pinned = int(err) == 0

    def prefault(self) -> None:
        """Touch every page now (the kernel maps anonymous memory on first write)."""
        self.array[::PAGE] = 0

    def slot(self, i: int) -> np.ndarray:
        return self.array[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.array)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.base_ptr)
            self.pinned = False


def _check(ids: Sequence[int], limit: int, what: str) -> np.ndarray:
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= limit):
        bad = int(a[(a < 0) | (a >= limit)][0])
        raise CopyError(f"{what} id {bad} out of range [0, {limit})")
    return a


class TorchCopyEngine:
    """Reference engine: per layer, index_select the blocks and copy them."""

    name = "torch"

    def __init__(self, layout: KVLayout, kv_caches: dict[str, torch.Tensor],
                 pool: HostPool, payload_offset: int):
        self.layout, self.pool, self.offset = layout, pool, payload_offset
        if payload_offset + layout.block_bytes > pool.slot_bytes:
            raise CopyError("slot too small for a block")
        L = layout.num_layers
        # Physical-order view of each layer: [blocks, pages per block, inner dims
        # by decreasing stride] (several pages per block: KVLayout's split pages).
        self._layers = []
        for t in kv_caches.values():
            order = sorted(range(1, 4), key=lambda d: -t.stride(d))
            self._layers.append(t.permute(0, *order).unflatten(0, (layout.num_blocks, -1)))
        host = pool.tensor().view(pool.num_slots, pool.slot_bytes)
        self._payload = host[:, payload_offset:payload_offset + layout.block_bytes].view(
            pool.num_slots, L, layout.nruns * layout.run_bytes)

    def _check(self, block_ids, slot_ids):
        b = _check(block_ids, self.layout.num_blocks, "block")
        s = _check(slot_ids, self.pool.num_slots, "slot")
        if b.size != s.size:
            raise CopyError(f"{b.size} block ids but {s.size} slot ids")
        return torch.from_numpy(b), torch.from_numpy(s)

    def gather(self, block_ids: Sequence[int], slot_ids: Sequence[int]) -> None:
        b, s = self._check(block_ids, slot_ids)
        if not len(b):
            return
        for l, layer in enumerate(self._layers):
            src = layer.index_select(0, b.to(layer.device)).contiguous()
            self._payload[s, l] = src.view(torch.uint8).reshape(len(b), -1).cpu()

    def scatter(self, slot_ids: Sequence[int], block_ids: Sequence[int]) -> None:
        b, s = self._check(block_ids, slot_ids)
        if not len(b):
            return
        for l, layer in enumerate(self._layers):
            src = self._payload[s, l].to(layer.device)
            layer[b.to(layer.device)] = src.view(layer.dtype).reshape(
                (len(b),) + tuple(layer.shape[1:]))


def make_copy_engine(layout: KVLayout, kv_caches: dict[str, torch.Tensor], pool: HostPool,
                     payload_offset: int, prefer: str = "auto"):
    """The native engine when the extension is built (or ``prefer="native"``)."""
    if prefer in ("auto", "native"):
        try:
            from kvtier.native_copy import NativeCopyEngine, supports
        except ImportError:
            if prefer == "native":
                raise
        else:
            # auto: the torch engine where this build has no native path for
            # the device (a CUDA cache with an extension built without nvcc).
            if prefer == "native" or supports(layout):
                return NativeCopyEngine(layout, pool, payload_offset)
    return TorchCopyEngine(layout, kv_caches, pool, payload_offset)


def default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))
