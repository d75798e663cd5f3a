"""Tensor parallelism (TP=2 on vLLM's CPU build): each rank stores and loads its
own shard under its own records; one decision for all ranks; a load failure on
one rank only ends in a recompute of that block on all ranks."""

import pytest

from kvtier.store.tool import cmd_verify
from tests.conftest import needs_vllm
from tests.helpers import FULL_BLOCK_TOKENS, RECORD_BYTES
from tests.e2e.test_e2e_connector import TOL, run_rounds

pytestmark = [pytest.mark.e2e, needs_vllm]


def test_tp2_spill_reload_one_rank_failure_and_restart(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    store = tmp_path / "store"
    # Per-rank records are half the TP=1 size; 60 of them hold < 3 of the 6 prompts,
    # so round 2 reads the disk, where rank 1's copy of one block is corrupted.
    half = 4096 + (RECORD_BYTES - 4096) // 2
    res = run_rounds(model_dir, tmp_path / "out.json", {
        "tp": 2, "extra": {"dram_bytes": 60 * half, "disk_path": str(store)},
        "corrupt": {"rank": 1, "prompt": 0, "block": 10}})
    first = {r["prompt"]: r for r in res if r["round"] == 0}
    second = {r["prompt"]: r for r in res if r["round"] == 1}
    for i, r in second.items():
        assert r["output"] == first[i]["output"]
        assert max(abs(a - b) for a, b in zip(r["logprobs"], first[i]["logprobs"])) <= TOL
    for i in range(6):
        assert second[i]["cached"] >= 0.95 * FULL_BLOCK_TOKENS
    # Rank 1's corrupted record was detected and dropped on every rank, then the
    # recomputed block was stored afresh: every record in the store verifies.
    assert cmd_verify(store, delete=False, as_json=True) == 0
    for rank in (0, 1):
        assert any(store.glob(f"*/rank{rank}/??/*"))

    # Restart: a new TP=2 engine on the same store serves every prompt from disk
    # on its first request, with the same outputs.
    again = run_rounds(model_dir, tmp_path / "restart.json", {
        "tp": 2, "rounds": 1, "extra": {"dram_bytes": 60 * half, "disk_path": str(store)}})
    for r in again:
        assert r["cached"] >= 0.95 * FULL_BLOCK_TOKENS, r["cached"]
        assert r["output"] == first[r["prompt"]]["output"]
        assert max(abs(a - b) for a, b in zip(r["logprobs"], first[r["prompt"]]["logprobs"])) \
            <= TOL
