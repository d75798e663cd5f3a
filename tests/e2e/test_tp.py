"""Tensor parallelism (TP=2 on vLLM's CPU build): each rank stores and loads its
own shard under its own records; one decision for all ranks; a load failure on
one rank only ends in a recompute of that block on all ranks."""

import pytest

from kvtier.cache.keys import chain_keys, root_key
from kvtier.store.claim import META_DIR
from kvtier.store.tool import cmd_verify
from tests.conftest import needs_vllm
from tests.helpers import BLOCKS_PER_PROMPT, FULL_BLOCK_TOKENS, RECORD_BYTES
from tests.e2e.test_e2e_connector import TOL, run_rounds, run_scenario

pytestmark = [pytest.mark.e2e, needs_vllm]


def chain_key_hex(store, prompt: int, block: int) -> str:
    """The key of ``block`` of scenario prompt ``prompt`` (rounds.py's prompts)."""
    import random
    rng = random.Random(0)
    ps = [[rng.randrange(0, 256) for _ in range(750)] for _ in range(6)]
    (ns_dir,) = [d for d in store.iterdir() if d.is_dir() and d.name != META_DIR]
    return chain_keys(root_key(bytes.fromhex(ns_dir.name)), ps[prompt], 32)[block].hex()


def counters(metrics: dict, prefix: str = "kvtier_") -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(prefix)}


def delta(after: dict, before: dict) -> dict:
    """The series that changed between two snapshots (kvtier counters and gauges)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_tp2_spill_reload_one_rank_failure_and_restart(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    store = tmp_path / "store"
    # Per-rank records are half the TP=1 size; 60 of them hold < 3 of the 6 prompts,
    # so round 2 reads the disk, where rank 1's copy of one block is corrupted.
    half = 4096 + (RECORD_BYTES - 4096) // 2
    doc = run_scenario("rounds.py", model_dir, tmp_path / "out.json", {
        "tp": 2, "metrics": True, "extra": {"dram_bytes": 60 * half, "disk_path": str(store)},
        "corrupt": {"rank": 1, "prompt": 0, "block": 10}})
    res, (m1, m2) = doc["results"], doc["metrics"]
    first = {r["prompt"]: r for r in res if r["round"] == 0}
    second = {r["prompt"]: r for r in res if r["round"] == 1}
    for i, r in second.items():
        assert r["output"] == first[i]["output"]
        assert max(abs(a - b) for a, b in zip(r["logprobs"], first[i]["logprobs"])) <= TOL
    for i in range(6):
        assert second[i]["cached"] >= 0.95 * FULL_BLOCK_TOKENS
    # Round 1 stored all 6 x 23 blocks, to DRAM and disk, and loaded nothing.
    blocks = 6 * BLOCKS_PER_PROMPT
    assert m1["kvtier_stored_blocks_total{tier=disk}"] == blocks
    assert not any(k.startswith(("kvtier_load_failures", "kvtier_checksum")) and v
                   for k, v in m1.items())
    # Round 2: the corruption was detected, once (one block, on rank 1 only), by the
    # payload checksum; the record was dropped from the disk tier (every rank's copy),
    # and the block was recomputed: vLLM recomputes from the failed block on, the blocks
    # after it are in the tiers already, so exactly one block is stored afresh.
    d = delta(counters(m2), counters(m1))
    assert d["kvtier_load_failures_total{reason=checksum}"] == 1, d
    assert d["kvtier_checksum_failures_total{}"] == 1, d
    assert [k for k in d if k.startswith("kvtier_load_failures_total")] \
        == ["kvtier_load_failures_total{reason=checksum}"], d
    assert d["kvtier_evictions_total{cause=dropped,tier=disk}"] == 1, d
    assert d["kvtier_stored_blocks_total{tier=dram}"] == 1, d
    # ... and written through to disk again, as every stored block is (else the
    # restart below misses it: prompt 0 would hit its first 10 blocks only).
    assert d.get("kvtier_stored_blocks_total{tier=disk}") == 1, \
        f"the recomputed block was not written to disk again: {d}"
    assert d["kvtier_hit_tokens_total{tier=disk}"] == 6 * FULL_BLOCK_TOKENS, d
    # On disk: every block again on both ranks, the corrupted record replaced by the
    # recomputed block's, and every record verifies.
    bad = chain_key_hex(store, 0, 10)
    for rank in (0, 1):
        assert len(list(store.glob(f"*/rank{rank}/??/*"))) == blocks
        assert len(list(store.glob(f"*/rank{rank}/??/{bad}"))) == 1
    assert cmd_verify(store, delete=False, as_json=True) == 0

    # Restart: a new TP=2 engine on the same store serves every prompt from disk
    # on its first request, with the same outputs.
    again = run_rounds(model_dir, tmp_path / "restart.json", {
        "tp": 2, "rounds": 1, "extra": {"dram_bytes": 60 * half, "disk_path": str(store)}})
    for r in again:
        assert r["cached"] >= 0.95 * FULL_BLOCK_TOKENS, r["cached"]
        assert r["output"] == first[r["prompt"]]["output"]
        assert max(abs(a - b) for a, b in zip(r["logprobs"], first[r["prompt"]]["logprobs"])) \
            <= TOL
