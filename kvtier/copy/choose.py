"""Which copy engine moves a layout's bytes: the native one where it is built for
the device and passes its self-check on the real layout, else the torch one."""

from __future__ import annotations

import logging

import torch

from kvtier.copy.engine import HostPool, KVLayout, TorchCopyEngine

log = logging.getLogger("vllm.kvtier.copy")


def make_copy_engine(layout: KVLayout, kv_caches: dict[str, torch.Tensor], pool: HostPool,
                     payload_offset: int, prefer: str = "auto"):
    """``prefer="auto"``: the native engine where the extension has a path for the
    layout's device and the engine passes its self-check on this layout (every
    path it may take, ``round_trip_check``); else the torch engine. Any failure
    of the native engine - a byte mismatch, a CUDA error, a driver older than
    the extension's runtime, a pool it cannot pin or map - is logged in one
    line. ``"native"``: the native engine, unchecked (tests, benchmarks);
    ``"torch"``: the torch engine."""
    ref = TorchCopyEngine(layout, kv_caches, pool, payload_offset)
    if prefer == "torch":
        return ref
    try:
        from kvtier.copy.native import NativeCopyEngine, supports
    except ImportError:
        if prefer == "native":
            raise
        return ref
    if prefer == "native":
        return NativeCopyEngine(layout, pool, payload_offset)
    if not supports(layout):   # a CUDA cache, an extension built without nvcc
        return ref
    engine = None
    try:
        engine = NativeCopyEngine(layout, pool, payload_offset)
        engine.self_check(ref)
        return engine
    except Exception as e:   # anything: the torch engine still moves the bytes
        log.warning("kvtier: the native copy engine failed its start-up self-check on %s "
                    "(%s: %s); using the torch copy engine", layout.device,
                    type(e).__name__, str(e).strip().replace("\n", " "))
        if engine is not None:
            engine.close()
        return ref
