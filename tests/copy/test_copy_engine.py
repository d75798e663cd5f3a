"""Native copy engine, CPU path: exact round trips, byte-identical to the torch
reference engine, argument checks that leave memory untouched; the start-up
self-check and its fallback to the torch engine (``make_copy_engine``), the
host pool's registration flags.

The CPU path uses csrc/copy/kvtier_addressing.h, the index math of the CUDA kernel
too, so these tests cover the kernel's addressing.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

import kvtier._copy_engine  # noqa: F401  (fails the module when the extension is not built)
from kvtier.copy import engine as kvcopy
from kvtier.copy import native as native_copy
from kvtier.copy.engine import CopyError, HostPool, TorchCopyEngine
from kvtier.copy.choose import make_copy_engine
from kvtier.copy.native import NativeCopyEngine
from tests.kv_fixtures import (BAD_ARGUMENTS, DTYPES, LAYOUTS, NUM_BLOCKS, NUM_SLOTS,
                               PAYLOAD_OFFSET, assert_same, check_against_torch, kv_snapshot,
                               make_kv_caches, make_layout, make_pool)


def setup(layout, dtype, block_size, threads=None):
    caches = make_kv_caches(layout, NUM_BLOCKS, block_size, dtype)
    kv_layout = make_layout(caches, NUM_BLOCKS, layout)
    pool = make_pool(kv_layout, NUM_SLOTS)
    return caches, kv_layout, pool, NativeCopyEngine(kv_layout, pool, PAYLOAD_OFFSET,
                                                     threads=threads)


@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_torch(layout, dtype, block_size):
    def native(kv_layout, pool):
        engine = NativeCopyEngine(kv_layout, pool, PAYLOAD_OFFSET)
        assert engine.name == "native-cpu"
        return engine
    check_against_torch(layout, dtype, block_size, "cpu", native)


def test_round_trip_restores_exactly():
    caches, _, _, native = setup("LBNHC", "bf16", 32)
    before = kv_snapshot(caches)
    blocks = [3, 17, 5, 39, 0, 22]
    native.gather(blocks, [1, 2, 3, 4, 5, 6])
    for t in caches.values():
        t.view(torch.uint8)[blocks] = 0
    native.scatter([1, 2, 3, 4, 5, 6], blocks)
    assert_same(kv_snapshot(caches), before)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_threads_split_large_transfers(threads):
    # 24 blocks of 6 runs of 16 KiB: above the inline threshold, so the pool splits it.
    caches, kv_layout, pool, native = setup("LBHNC", "bf16", 128, threads=threads)
    ref_pool = make_pool(kv_layout, NUM_SLOTS)
    blocks, slots = list(range(39, 15, -1)), list(range(NUM_SLOTS))
    native.gather(blocks, slots)
    TorchCopyEngine(kv_layout, caches, ref_pool, PAYLOAD_OFFSET).gather(blocks, slots)
    assert np.array_equal(pool.array, ref_pool.array)


def test_empty_transfer_is_a_no_op():
    caches, _, pool, native = setup("LBHNC", "fp16", 16)
    before = kv_snapshot(caches)
    native.gather([], [])
    native.scatter([], [])
    native.gather(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert not pool.array.any()
    assert_same(kv_snapshot(caches), before)


@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize("blocks,slots,message", BAD_ARGUMENTS)
def test_bad_arguments_raise_and_touch_nothing(op, blocks, slots, message):
    caches, _, pool, native = setup("LBHNC", "bf16", 32)
    native.gather([0, 1, 2], [0, 1, 2])
    kv_before, pool_before = kv_snapshot(caches), pool.array.copy()
    with pytest.raises(CopyError, match=message):
        if op == "gather":
            native.gather(blocks, slots)
        else:
            native.scatter(slots, blocks)
    assert_same(kv_snapshot(caches), kv_before)
    assert np.array_equal(pool.array, pool_before)


def test_slot_too_small_is_refused():
    caches = make_kv_caches("LBHNC", NUM_BLOCKS, 16, "bf16")
    kv_layout = make_layout(caches, NUM_BLOCKS, "LBHNC")
    pool = make_pool(kv_layout, 4)
    with pytest.raises(CopyError, match="slot too small"):
        NativeCopyEngine(kv_layout, pool, pool.slot_bytes - kv_layout.block_bytes + 1)


def test_concurrent_callers_share_one_engine():
    caches, kv_layout, pool, native = setup("LBHNC", "bf16", 128, threads=2)
    ref_pool = make_pool(kv_layout, NUM_SLOTS)
    ref = TorchCopyEngine(kv_layout, caches, ref_pool, PAYLOAD_OFFSET)
    jobs = [(list(range(i, 40, 4))[:6], list(range(6 * i, 6 * i + 6))) for i in range(4)]
    threads = [threading.Thread(target=native.gather, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in jobs:
        ref.gather(*job)
    assert np.array_equal(pool.array, ref_pool.array)


def test_make_copy_engine_picks_native():
    caches = make_kv_caches("LBHNC", NUM_BLOCKS, 32, "bf16")
    kv_layout = make_layout(caches, NUM_BLOCKS, "LBHNC")
    pool = make_pool(kv_layout, 4)
    assert make_copy_engine(kv_layout, caches, pool, PAYLOAD_OFFSET).name == "native-cpu"
    assert make_copy_engine(kv_layout, caches, pool, PAYLOAD_OFFSET, prefer="torch").name == "torch"


def test_cuda_cache_without_cuda_build_falls_back_to_torch(monkeypatch):
    from dataclasses import replace

    from kvtier.copy import native as native_copy
    caches = make_kv_caches("LBNHC", NUM_BLOCKS, 16, "bf16")
    kv_layout = replace(make_layout(caches, NUM_BLOCKS, "LBNHC"), device="cuda:0")
    pool = make_pool(kv_layout, 4)
    monkeypatch.setattr(native_copy._ce, "with_cuda", False)
    assert make_copy_engine(kv_layout, caches, pool, PAYLOAD_OFFSET).name == "torch"
    with pytest.raises(CopyError, match="no native copy path"):
        NativeCopyEngine(kv_layout, pool, PAYLOAD_OFFSET)


# -- start-up self-check, fallback -------------------------------------------

def auto_engine(layout="LBHNC/2", dtype="fp8", block_size=16, num_slots=NUM_SLOTS):
    caches = make_kv_caches(layout, NUM_BLOCKS, block_size, dtype)
    kv_layout = make_layout(caches, NUM_BLOCKS, layout)
    before = kv_snapshot(caches)
    engine = make_copy_engine(kv_layout, caches, make_pool(kv_layout, num_slots), PAYLOAD_OFFSET)
    return caches, before, engine


@pytest.mark.parametrize("layout", LAYOUTS)
def test_self_check_passes_and_restores_the_blocks_it_used(layout):
    caches, before, engine = auto_engine(layout)
    assert engine.kind == "native-cpu"
    assert_same(kv_snapshot(caches), before)


class _Broken:
    """The extension's CpuEngine (the native engine's ``_impl``) with one way of
    failing: what a broken kernel, DMA call or driver looks like from Python."""

    def __init__(self, fault, *args, **kwargs):
        self.fault, self.real = fault, _REAL_CPU_ENGINE(*args, **kwargs)
        self.threads, self.host, self.slot_bytes = self.real.threads, args[6], args[8]

    def gather(self, blocks, slots):
        if self.fault == "cuda_error":
            raise RuntimeError("CUDA error in cudaMemcpyBatchAsync: invalid argument")
        self.real.gather(blocks, slots)
        if self.fault == "wrong_bytes":   # one bit off in the first slot's payload
            self.host[int(slots[0]) * self.slot_bytes + PAYLOAD_OFFSET] ^= 1

    def scatter(self, slots, blocks):
        if self.fault != "lost_scatter":
            self.real.scatter(slots, blocks)


_REAL_CPU_ENGINE = native_copy._ce.CpuEngine
FAULTS = ["constructor", "cuda_error", "wrong_bytes", "lost_scatter"]


@pytest.mark.parametrize("fault", FAULTS)
def test_failing_native_engine_falls_back_to_torch(monkeypatch, caplog, fault):
    def broken(*args, **kwargs):
        if fault == "constructor":
            raise RuntimeError("CUDA driver supports CUDA 12.8, older than the CUDA 13.0 "
                               "runtime kvtier._copy_engine was built with")
        return _Broken(fault, *args, **kwargs)

    monkeypatch.setattr(native_copy._ce, "CpuEngine", broken)
    with caplog.at_level(logging.WARNING, logger="vllm.kvtier.copy"):
        caches, before, engine = auto_engine()
    assert engine.kind == "torch"
    warnings = [r for r in caplog.records if r.name == "vllm.kvtier.copy"]
    assert len(warnings) == 1 and "self-check" in warnings[0].getMessage()
    assert_same(kv_snapshot(caches), before)   # the blocks it used are restored
    engine.gather([3, 4], [0, 1])              # and the torch engine works
    engine.scatter([0, 1], [5, 6])
    for t in caches.values():   # LBHNC/2: pages 2b, 2b+1 are block b
        assert torch.equal(t.view(torch.uint8)[10:14], t.view(torch.uint8)[6:10])


def test_too_small_a_cache_is_not_checked_and_falls_back():
    # One block: no room for a block to scatter into; the torch engine runs.
    caches = make_kv_caches("LBHNC", 1, 16, "bf16")
    kv_layout = make_layout(caches, 1, "LBHNC")
    engine = make_copy_engine(kv_layout, caches, make_pool(kv_layout, 2), PAYLOAD_OFFSET)
    assert engine.kind == "torch"


def test_host_pool_registers_mapped_memory(monkeypatch):
    # The kernel path reads the pool through cudaHostGetDevicePointer: the
    # registration must carry cudaHostRegisterMapped (and Portable, all devices).
    calls = []

    class Cudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append((ptr, nbytes, flags))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append((ptr,))
            return 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    pool = HostPool(3, 8192, pin=True)
    assert pool.pinned
    assert calls == [(pool.base_ptr, 3 * 8192, kvcopy.HOST_REGISTER_PORTABLE
                      | kvcopy.HOST_REGISTER_MAPPED)]
    assert kvcopy.HOST_REGISTER_MAPPED == 2 and kvcopy.HOST_REGISTER_PORTABLE == 1  # CUDA's
    pool.close()
    assert calls[-1] == (pool.base_ptr,)
