"""The copy benchmark's fair torch baseline (benchmarks/copy_engine.py) moves the
same bytes as the native engine: a ratio against a baseline that copies less (or
the wrong bytes) would flatter neither side honestly."""

import pytest
import torch

import kvtier._copy_engine  # noqa: F401  (fails the module when the extension is not built)
from benchmarks.copy_engine import HEADER, FairTorchCopy, best_ratio, kv_cache, scattered
from kvtier.copy.engine import HostPool, KVLayout, round_up
from kvtier.copy.native import NativeCopyEngine


def setup(n=12, num_blocks=40):
    caches = kv_cache(3, num_blocks, 32, 2, 64, "LBHNC", "cpu")
    layout = KVLayout.from_kv_caches(caches, num_blocks, name="LBHNC")
    slot_bytes = round_up(HEADER + layout.block_bytes)
    pools = HostPool(n, slot_bytes), HostPool(n, slot_bytes)
    blocks, slots = scattered(n, num_blocks, seed=3)
    return caches, layout, pools, blocks, slots


def payloads(pool, n, layout):
    return [bytes(pool.slot(s)[HEADER:HEADER + layout.block_bytes]) for s in range(n)]


@pytest.mark.parametrize("general", [False, True])
def test_fair_torch_gather_and_scatter_match_the_native_engine(general):
    caches, layout, (p_native, p_torch), blocks, slots = setup()
    n = len(blocks)
    native = NativeCopyEngine(layout, p_native, HEADER, threads=1)
    fair = FairTorchCopy(caches, layout, p_torch, HEADER, blocks, slots)
    p_torch.array[:] = 0
    native.gather(blocks, slots)
    (fair.gather_general if general else fair.gather)()
    want = payloads(p_native, n, layout)
    assert payloads(p_torch, n, layout) == want
    assert len(set(want)) == n                      # distinct random blocks, not zeros
    # scatter: wipe the blocks in the cache, write them back from the torch pool
    before = {k: v.clone() for k, v in caches.items()}   # random bits: compare as int16
    for v in caches.values():
        v[blocks] = 0
    (fair.scatter_general if general else fair.scatter)()
    for k, v in caches.items():
        assert torch.equal(v.view(torch.int16), before[k].view(torch.int16)), k
    native.close()


def test_fair_torch_one_pass_needs_slots_zero_to_n():
    caches, layout, (pool, _), blocks, slots = setup()
    with pytest.raises(ValueError, match="slots 0..n-1"):
        FairTorchCopy(caches, layout, pool, HEADER, blocks, [s + 1 for s in slots])


def test_best_ratio_takes_the_fastest_baseline_of_each_round():
    times = {"a": [2.0, 4.0, 6.0], "b": [3.0, 1.0, 9.0], "x": [1.0, 1.0, 2.0]}
    med, lo, hi = best_ratio(times, ["a", "b"], "x")
    assert (med, lo, hi) == (2.0, 1.0, 3.0)           # per round: 2/1, 1/1, 6/2
    assert best_ratio(times, ["a"], "x") == (3.0, 2.0, 4.0)      # 2, 4, 3
