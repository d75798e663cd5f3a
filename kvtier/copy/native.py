"""The native copy engine (csrc/, built as ``kvtier._copy_engine``).

Same interface and slot format as ``TorchCopyEngine`` (see copy.py), working
on the raw addresses in ``KVLayout`` and ``HostPool``:

* CPU KV cache: memcpy per run on a persistent C++ thread pool, GIL released.
* CUDA KV cache (module built with nvcc): the engine's own stream, either one
  kernel launch that reads/writes the pinned pool through its device mapping
  ("kernel"), or the copy engines, one batched DMA call ("dma"). Calls are
  synchronous for the caller: they wait (polling an event) for their own
  transfer only. The connector calls them from a background thread. A copy
  is ordered after other streams' work only through ``after=`` (an event the
  engine's stream waits for on the device).

Argument errors (a block or slot id out of range, lengths differ) raise
``CopyError`` before any byte is copied; CUDA errors raise RuntimeError.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kvtier import _copy_engine as _ce
from kvtier.copy.engine import CopyError, HostPool, KVLayout, default_threads, round_trip_check

# CUDA transfers of at least this many bytes take the DMA path (copy engines,
# no SMs taken from the model); smaller ones the kernel (one launch, no per-run
# DMA overhead). A first guess: to be tuned from the GPU section of
# benchmarks/copy_engine.py (bandwidth per path and matmul slowdown).
DMA_MIN_BYTES = 8 << 20

CUDA_PATHS = ("auto", "kernel", "dma")


def supports(layout: KVLayout) -> bool:
    """Whether this build has a native path for the layout's device."""
    return layout.device == "cpu" or (layout.device.startswith("cuda") and _ce.with_cuda)


def _ids(ids: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _event(after):
    """A recorded ``torch.cuda.Event`` for ``after`` (an event, or a stream: an
    event recorded on it now), or None."""
    if after is None or isinstance(after, torch.cuda.Event):
        return after
    return after.record_event()


class NativeCopyEngine:
    """``gather(block_ids, slot_ids)``: KV -> host slots; ``scatter(slot_ids,
    block_ids)``: back. ``kind`` is "native-cpu" or "native-cuda"; ``name`` is
    "native-cpu", or on CUDA the path the latest transfer took
    ("native-cuda-kernel" / "native-cuda-dma"; before any, the one a one-block
    transfer would take).

    ``threads``: CPU copy threads (default ``default_threads()``; None on CUDA).
    ``cuda_path`` forces "kernel" or "dma" (tests, benchmarks); "auto" picks
    per transfer by size (``DMA_MIN_BYTES``). On CUDA, ``after`` (a recorded
    ``torch.cuda.Event``, or a ``torch.cuda.Stream``: the work queued on it so
    far) orders the copy after that work: the engine's stream waits for it on
    the device. Without it the copy starts at once, unordered against every
    other stream. ``after`` is ignored on the CPU.
    """

    def __init__(self, layout: KVLayout, pool: HostPool, payload_offset: int, *,
                 threads: int | None = None, cuda_path: str = "auto"):
        if not supports(layout):
            raise CopyError(f"no native copy path for device {layout.device!r} in this build")
        if payload_offset + layout.block_bytes > pool.slot_bytes:
            raise CopyError("slot too small for a block")
        if cuda_path not in CUDA_PATHS:
            raise ValueError(f"cuda_path must be one of {CUDA_PATHS}")
        self.layout, self.pool, self.offset = layout, pool, payload_offset
        args = (list(layout.base_ptrs), list(layout.block_strides), list(layout.run_strides),
                layout.nruns, layout.run_bytes, layout.num_blocks,
                pool.array, pool.num_slots, pool.slot_bytes, payload_offset)
        try:
            if layout.device == "cpu":
                self._impl = _ce.CpuEngine(*args, threads=threads or default_threads())
                self._cuda_path = None
                self.name, self.threads = "native-cpu", self._impl.threads
                self.kind = self.name
            else:
                device = torch.device(layout.device).index
                self._impl = _ce.CudaEngine(
                    *args, device=torch.cuda.current_device() if device is None else device)
                self._cuda_path = cuda_path
                self.name, self.threads = f"native-cuda-{self._path(1)}", None
                self.kind = "native-cuda"
        except ValueError as e:
            raise CopyError(str(e)) from None

    def gather(self, block_ids: Sequence[int], slot_ids: Sequence[int], after=None) -> None:
        blocks = _ids(block_ids)
        self._call(self._impl.gather, blocks, _ids(slot_ids), len(blocks), after)

    def scatter(self, slot_ids: Sequence[int], block_ids: Sequence[int], after=None) -> None:
        blocks = _ids(block_ids)
        self._call(self._impl.scatter, _ids(slot_ids), blocks, len(blocks), after)

    def self_check(self, ref) -> None:
        """``round_trip_check`` against ``ref`` (the torch engine on the same
        memory) on every path this engine may take: on CUDA with "auto", the
        kernel and the DMA path. Raises on the first failure."""
        chosen = self._cuda_path
        try:
            for path in ("kernel", "dma") if chosen == "auto" else (chosen,):
                self._cuda_path = path
                round_trip_check(self, ref)
        finally:
            self._cuda_path = chosen
            if chosen is not None:
                self.name = f"native-cuda-{self._path(1)}"

    def close(self) -> None:
        """Frees the engine's threads / CUDA stream and buffers, and unpins the
        pool if this engine pinned it. Close the engine before the pool."""
        self._impl = None

    def _path(self, n: int) -> str:
        if self._cuda_path != "auto":
            return self._cuda_path
        return "dma" if n * self.layout.block_bytes >= DMA_MIN_BYTES else "kernel"

    def _call(self, fn, first: np.ndarray, second: np.ndarray, n: int, after) -> None:
        try:
            if self._cuda_path is None:
                fn(first, second)
                return
            path = self._path(n)
            event = _event(after)   # alive until the engine's stream waits for it
            fn(first, second, getattr(_ce.CudaPath, path),
               None if event is None else event.cuda_event)
            self.name = f"native-cuda-{path}"
        except ValueError as e:
            raise CopyError(str(e)) from None
