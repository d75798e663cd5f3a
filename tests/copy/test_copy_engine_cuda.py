"""Native copy engine, CUDA paths (kernel and DMA): the CPU tests' round trips
on a GPU cache, byte-identical to the torch engine. Skipped without a GPU.

Ordered like the connector: the engine copies on its own non-blocking stream,
so every call that follows torch work on the cache (fills, zeroing, clones on
the current stream) passes ``after=`` (kv_fixtures.after); reads of the
results need nothing, a call returns once its copy is complete.

Under compute-sanitizer's memcheck (needs compute-sanitizer from the CUDA
toolkit): ``python tests/copy/test_copy_engine_cuda.py --memcheck [pytest args]``,
also run by test_under_memcheck when compute-sanitizer is found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier import _copy_engine
from kvtier.copy import native as native_copy
from kvtier.copy.engine import CopyError
from kvtier.copy.choose import make_copy_engine
from kvtier.copy.native import NativeCopyEngine
from tests.kv_fixtures import (BAD_ARGUMENTS, DTYPES, LAYOUTS, NUM_BLOCKS, NUM_SLOTS,
                               PAYLOAD_OFFSET, after, assert_same, check_against_torch,
                               kv_snapshot, make_kv_caches, make_layout, make_pool)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PATHS = ("kernel", "dma")
UNDER_SANITIZER = "KVTIER_UNDER_SANITIZER"


def engine_for(path):
    def make(kv_layout, pool):
        engine = NativeCopyEngine(kv_layout, pool, PAYLOAD_OFFSET, cuda_path=path)
        assert engine.name == f"native-cuda-{path}"
        return engine
    return make


def setup(path, layout="LBNHC", dtype="bf16", block_size=16, pin=False):
    caches = make_kv_caches(layout, NUM_BLOCKS, block_size, dtype, "cuda")
    kv_layout = make_layout(caches, NUM_BLOCKS, layout)
    pool = make_pool(kv_layout, NUM_SLOTS, pin=pin)
    return caches, kv_layout, pool, NativeCopyEngine(kv_layout, pool, PAYLOAD_OFFSET,
                                                     cuda_path=path)


def test_extension_built_with_cuda():
    assert _copy_engine.with_cuda, "a GPU is present but kvtier._copy_engine was built without nvcc"


@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_matches_torch(path, layout, dtype, block_size):
    check_against_torch(layout, dtype, block_size, "cuda", engine_for(path))


@pytest.mark.parametrize("pin", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_round_trip_restores_exactly(path, pin):
    # pin=True: the HostPool pinned itself; False: the engine pins it.
    caches, _, pool, engine = setup(path, pin=pin)
    before = kv_snapshot(caches)
    blocks, slots = [3, 17, 5, 39, 0, 22], [1, 2, 3, 4, 5, 6]
    engine.gather(blocks, slots, after=after("cuda"))
    for t in caches.values():
        t.view(torch.uint8)[blocks] = 0
    engine.scatter(slots, blocks, after=after("cuda"))   # after the zeroing
    assert_same(kv_snapshot(caches), before)
    engine.close()
    pool.close()


@pytest.mark.parametrize("path", PATHS)
def test_more_pairs_than_one_launch_holds(path):
    # 5000 pairs (repeated blocks) > the kernel's 4096 ids per launch.
    caches = make_kv_caches("LBHNC", 64, 16, "fp16", "cuda")
    kv_layout = make_layout(caches, 64, "LBHNC")
    pool = make_pool(kv_layout, 5000)
    engine = NativeCopyEngine(kv_layout, pool, PAYLOAD_OFFSET, cuda_path=path)
    blocks = np.random.default_rng(0).integers(0, 64, 5000).tolist()
    engine.gather(blocks, list(range(5000)), after=after("cuda"))
    layer0 = next(iter(caches.values())).view(torch.uint8).reshape(64, -1).cpu().numpy()
    for s in (0, 4095, 4096, 4999):
        got = pool.slot(s)[PAYLOAD_OFFSET:PAYLOAD_OFFSET + layer0.shape[1]]
        assert np.array_equal(got, layer0[blocks[s]])


@pytest.mark.parametrize("path", PATHS)
def test_empty_transfer_is_a_no_op(path):
    caches, _, pool, engine = setup(path)
    before = kv_snapshot(caches)
    engine.gather([], [])
    engine.scatter([], [])
    assert not pool.array.any()
    assert_same(kv_snapshot(caches), before)


@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize("blocks,slots,message", BAD_ARGUMENTS)
@pytest.mark.parametrize("path", PATHS)
def test_bad_arguments_raise_and_touch_nothing(path, op, blocks, slots, message):
    caches, _, pool, engine = setup(path)
    engine.gather([0, 1, 2], [0, 1, 2], after=after("cuda"))
    kv_before, pool_before = kv_snapshot(caches), pool.array.copy()
    with pytest.raises(CopyError, match=message):
        if op == "gather":
            engine.gather(blocks, slots)
        else:
            engine.scatter(slots, blocks)
    assert_same(kv_snapshot(caches), kv_before)
    assert np.array_equal(pool.array, pool_before)


@pytest.mark.parametrize("how", ["stream", "event"])
@pytest.mark.parametrize("path", PATHS)
def test_after_orders_the_copy_after_queued_work(path, how):
    # As the worker does: an event recorded on the "compute" stream, or that stream.
    caches, _, pool, engine = setup(path)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the write
        for t in caches.values():
            t.view(torch.uint8)[7] = 0x5A
    engine.gather([7], [0], after=side if how == "stream" else side.record_event())
    payload = pool.slot(0)[PAYLOAD_OFFSET:PAYLOAD_OFFSET + engine.layout.block_bytes]
    assert (payload == 0x5A).all()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # a zeroing that a scatter must not land under
        for t in caches.values():
            t.view(torch.uint8)[9] = 0
    engine.scatter([0], [9], after=side if how == "stream" else side.record_event())
    for t in caches.values():
        assert (t.view(torch.uint8)[9] == 0x5A).all()


def test_auto_path_follows_transfer_size(monkeypatch):
    caches, kv_layout, pool, engine = setup("auto")
    monkeypatch.setattr(native_copy, "DMA_MIN_BYTES", 3 * kv_layout.block_bytes)
    engine.gather([0, 1], [0, 1], after=after("cuda"))
    assert engine.name == "native-cuda-kernel"
    engine.gather([0, 1, 2], [0, 1, 2], after=after("cuda"))
    assert engine.name == "native-cuda-dma"


@pytest.mark.parametrize("pin", [False, True])
def test_make_copy_engine_picks_native_after_its_self_check(pin):
    # The self-check round-trips blocks on both paths and restores them.
    caches = make_kv_caches("LBNHC", NUM_BLOCKS, 16, "bf16", "cuda")
    before = kv_snapshot(caches)
    kv_layout = make_layout(caches, NUM_BLOCKS, "LBNHC")
    pool = make_pool(kv_layout, 4, pin=pin)   # pin=True: mapped by HostPool itself
    engine = make_copy_engine(kv_layout, caches, pool, PAYLOAD_OFFSET)
    assert engine.kind == "native-cuda" and engine.name == "native-cuda-kernel"
    assert_same(kv_snapshot(caches), before)
    engine.close()
    pool.close()


def test_self_check_failure_falls_back_to_torch(monkeypatch):
    # A scatter that copies nothing: the self-check sees it, the torch engine runs.
    caches = make_kv_caches("LBNHC", NUM_BLOCKS, 16, "bf16", "cuda")
    kv_layout = make_layout(caches, NUM_BLOCKS, "LBNHC")
    monkeypatch.setattr(NativeCopyEngine, "scatter", lambda self, *a, **kw: None)
    engine = make_copy_engine(kv_layout, caches, make_pool(kv_layout, 4), PAYLOAD_OFFSET)
    assert engine.kind == "torch"


def compute_sanitizer() -> str | None:
    return (shutil.which("compute-sanitizer")
            or next((p for p in ("/usr/local/cuda/bin/compute-sanitizer",
                                 "/usr/local/cuda/compute-sanitizer/compute-sanitizer")
                     if os.path.exists(p)), None))


def run_under_memcheck(pytest_args: list[str]) -> int:
    """Runs this file's tests (a selection: pytest_args) under memcheck; the
    exit status is non-zero on any memory error or failed test."""
    tool = compute_sanitizer()
    if tool is None:
        raise FileNotFoundError("compute-sanitizer not found (CUDA toolkit)")
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "99", sys.executable, "-m", "pytest",
           "-q", "-p", "no:cacheprovider", __file__, *pytest_args]
    env = dict(os.environ, **{UNDER_SANITIZER: "1"})
    return subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[2]).returncode


@pytest.mark.skipif(os.environ.get(UNDER_SANITIZER) == "1", reason="already under memcheck")
@pytest.mark.skipif(compute_sanitizer() is None, reason="compute-sanitizer not found")
def test_under_memcheck():
    assert run_under_memcheck(["-k", "(matches_torch and bf16 and 16) or restores or bad_arg"
                                     " or pairs or after or self_check"]) == 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memcheck"]:
        sys.exit(run_under_memcheck(sys.argv[2:]))
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
