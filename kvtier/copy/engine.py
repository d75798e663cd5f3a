"""The copy engine's Python face: vLLM's paged KV <-> kvtier's host slots.

``KVLayout`` describes where block ``b`` of layer ``l`` lives in vLLM's KV
memory, read off the registered per-layer 4-D views ``[B, H, N, C]`` whatever
their stride order (LBHNC on CPU, LBNHC/FlashAttention on GPU, LHBNC...): a
block of a layer is ``nruns`` contiguous runs of ``run_bytes`` bytes, run ``r``
at ``base[l] + b * block_stride[l] + r * run_stride[l]``. A host slot holds a
block's runs back to back, layer-major, after a header: the bytes on disk are
exactly these, so the record format does not depend on which engine copied.

``HostPool`` is the DRAM tier's memory: one page-aligned allocation split into
fixed slots (pinned and mapped with one registration when CUDA is present).

Engines: ``NativeCopyEngine`` (csrc/, C++ threads on CPU, one kernel launch on
CUDA; kvtier.copy.native) and ``TorchCopyEngine`` (index_select + copy; the
reference, and the fallback where the extension is not built or the native
engine fails its start-up self-check: kvtier.copy.choose). Both take ``after=``: a
``torch.cuda.Event`` (or a ``torch.cuda.Stream``: the work queued on it so
far) that the copy waits for on the device; ignored on the CPU.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


PAGE = 4096
# cudaHostRegister flags: usable from every device, and mapped into the device
# address space (the native kernel path reads the pool through its mapping).
HOST_REGISTER_PORTABLE, HOST_REGISTER_MAPPED = 1, 2


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
            err = torch.cuda.cudart().cudaHostRegister(
                self.base_ptr, nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED)
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
    """Reference engine: per layer, index_select the blocks and copy them, on the
    calling thread's current stream; synchronous for the caller, as the native
    engine is."""

    name = kind = "torch"

    def __init__(self, layout: KVLayout, kv_caches: dict[str, torch.Tensor],
                 pool: HostPool, payload_offset: int):
        self.layout, self.pool, self.offset = layout, pool, payload_offset
        self._cuda = layout.device.startswith("cuda")
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

    def _stream(self, after):
        """The current stream of the cache's device (not the thread's current
        device: a copy thread's is device 0), made to wait for ``after``."""
        stream = torch.cuda.current_stream(self.layout.device)
        if isinstance(after, torch.cuda.Stream):
            stream.wait_stream(after)
        elif after is not None:
            stream.wait_event(after)
        return stream

    def gather(self, block_ids: Sequence[int], slot_ids: Sequence[int], after=None) -> None:
        b, s = self._check(block_ids, slot_ids)
        if not len(b):
            return
        if self._cuda:
            self._stream(after)
        for l, layer in enumerate(self._layers):
            src = layer.index_select(0, b.to(layer.device)).contiguous()
            self._payload[s, l] = src.view(torch.uint8).reshape(len(b), -1).cpu()

    def scatter(self, slot_ids: Sequence[int], block_ids: Sequence[int], after=None) -> None:
        b, s = self._check(block_ids, slot_ids)
        if not len(b):
            return
        stream = self._stream(after) if self._cuda else None
        for l, layer in enumerate(self._layers):
            src = self._payload[s, l].to(layer.device)
            layer[b.to(layer.device)] = src.view(layer.dtype).reshape(
                (len(b),) + tuple(layer.shape[1:]))
        if stream is not None:
            stream.synchronize()   # done when it returns (the caller reports the load)


def _noise(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random bytes shaped and typed as ``like``, on its device."""
    raw = torch.randint(0, 256, (like.numel() * like.element_size(),), dtype=torch.uint8,
                        generator=gen)
    return raw.to(like.device).view(like.dtype).view(like.shape)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def round_trip_check(engine, ref: TorchCopyEngine) -> None:
    """Round-trips a few blocks through ``engine`` on the real KV memory and pool
    and compares with ``ref``, the torch engine over the same memory: a gather
    of random blocks into slots (the slots' bytes against ref's gather of the
    same blocks), then a scatter of those slots into other blocks (their bytes
    against the source blocks'). The first and last blocks and slots are among
    them. Raises CopyError on a difference; engine errors propagate. The blocks
    are restored; the slots keep scratch bytes. Start-up only: nothing else may
    use the blocks meanwhile."""
    lay, pool = ref.layout, ref.pool
    picks = [b for b in dict.fromkeys([lay.num_blocks - 1, 0, lay.num_blocks // 2, 1])
             if b < lay.num_blocks]
    slots = list(dict.fromkeys([pool.num_slots - 1, 0]))[:len(picks) // 2]
    if not slots:
        raise CopyError(f"no room for a round trip ({lay.num_blocks} blocks, "
                        f"{pool.num_slots} slots)")
    k = len(slots)
    src, dst = picks[:k], picks[k:2 * k]
    # Every native call waits for the torch work before it (the cache's stream).
    after = torch.cuda.current_stream(lay.device) if ref._cuda else None
    layers = ref._layers
    saved = [layer[src + dst].clone() for layer in layers]
    gen = torch.Generator().manual_seed(lay.num_blocks)
    try:
        for layer in layers:
            layer[src] = _noise(layer[src], gen)
            layer[dst] = _noise(layer[dst], gen)
        for s in slots:
            pool.slot(s)[:] = 0x5A
        engine.gather(src, slots, after=after)
        got = np.stack([pool.slot(s) for s in slots])
        ref.gather(src, slots)
        if not np.array_equal(got, np.stack([pool.slot(s) for s in slots])):
            raise CopyError(f"gather of blocks {src} differs from the torch engine's")
        engine.scatter(slots, dst, after=after)
        if not all(torch.equal(_bytes(layer[dst]), _bytes(layer[src])) for layer in layers):
            raise CopyError(f"scatter into blocks {dst} differs from the torch engine's bytes")
    finally:
        for layer, old in zip(layers, saved):
            layer[src + dst] = old
        if after is not None:
            after.synchronize()


def default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))
