"""A hybrid-attention model (full + sliding-window layers) on real vLLM with its
hybrid KV cache manager on: kvtier offloads both KV cache groups and reloads
them from disk, byte for byte, with outputs equal to recompute.

Bytes, not logprobs: vLLM's CPU attention can give logprobs up to ~0.03 apart
for byte-identical KV in other pages (see test_e2e_connector.TOL)."""

import pytest

from kvtier.store.tool import cmd_verify
from kvtier.tinymodel import TinyLlama, write_model
from tests.conftest import needs_vllm
from tests.helpers import BLOCKS_PER_PROMPT, FULL_BLOCK_TOKENS, RECORD_BYTES, records
from tests.e2e.test_e2e_connector import run_bytecheck, run_rounds

pytestmark = [pytest.mark.e2e, needs_vllm]

# Gemma-2/3 style: full and sliding-window (64-token) layers alternate. vLLM puts
# them in two KV cache groups of 2 layers each; a group's block is a record of
# the size of the default 2-layer test model's.
HYBRID = TinyLlama(num_layers=4, layer_types=("full_attention", "sliding_attention") * 2,
                   sliding_window=64)


@pytest.fixture(scope="module")
def hybrid_model_dir(tmp_path_factory):
    return str(write_model(tmp_path_factory.mktemp("hybrid-model"), HYBRID, weights=True))


def test_sliding_window_model_reloads_exact_bytes_from_disk(hybrid_model_dir, tmp_path):
    store, out = tmp_path / "store", tmp_path / "out.json"
    # The "GPU" holds 100 pages: one 1024-token request needs 32 per group; the
    # 6 prompts' 2 x 24 pages do not stay. DRAM holds 60 group-blocks (< 2 of the
    # 6 prompts' 2 x 23): round 2 reads disk.
    doc = run_bytecheck(hybrid_model_dir, out, {"gpu_blocks": 100, "extra": {
        "dram_bytes": 60 * RECORD_BYTES, "disk_path": str(store)}})
    assert doc["hma"], "vLLM turned its hybrid KV cache manager off"
    assert doc["groups"] == 2
    # Every reloaded page of either group holds exactly the bytes the forward
    # computed for that block (full-attention: all 23 blocks; window: the last 2-3).
    checked = doc["checked"]
    assert checked["mismatch"] == []
    assert checked["by_group"]["0"] >= 6 * BLOCKS_PER_PROMPT * 0.95
    assert checked["by_group"]["1"] >= 6 * 2
    res = doc["results"]
    first = {r["prompt"]: r for r in res if r["round"] == 0}
    assert all(r["cached"] == 0 for r in first.values())
    for r in (r for r in res if r["round"] == 1):
        assert r["cached"] >= 0.95 * FULL_BLOCK_TOKENS, r["cached"]
        assert r["output"] == first[r["prompt"]]["output"]
    # One record per block per group: the full-attention group's and the window
    # group's (all of a prompt's blocks were in the window when they were computed).
    assert len(records(store)) == 6 * BLOCKS_PER_PROMPT * 2
    assert cmd_verify(store, delete=False, as_json=True) == 0


def test_sliding_window_model_survives_read_faults(hybrid_model_dir, tmp_path, monkeypatch):
    """vLLM cannot map failed block ids back to requests when a model has several
    KV cache groups (it raises: the engine dies), so kvtier fails a hybrid
    request's whole load instead (vLLM recomputes it). With 30% of disk reads
    failing (injected: a real EIO cannot be caused here) the engine lives, no
    page holds wrong bytes, and every answer equals the first round's."""
    monkeypatch.setenv("KVTIER_FAULT_READ_ERROR_RATE", "0.3")
    doc = run_bytecheck(hybrid_model_dir, tmp_path / "out.json", {"gpu_blocks": 100, "extra": {
        "dram_bytes": 60 * RECORD_BYTES, "disk_path": str(tmp_path / "store")}})
    assert doc["groups"] == 2
    assert doc["checked"]["mismatch"] == []
    res = doc["results"]
    first = {r["prompt"]: r for r in res if r["round"] == 0}
    again = [r for r in res if r["round"] == 1]
    assert again and all(r["output"] == first[r["prompt"]]["output"] for r in again)
    # The faults hit: some request was recomputed rather than served whole.
    assert any(r["cached"] < 0.95 * FULL_BLOCK_TOKENS for r in again), again


def test_a_finer_prefix_match_unit_never_maps_a_half_block_to_a_whole_one(hybrid_model_dir,
                                                                          tmp_path):
    """vLLM hashes every ``prefix_match_unit`` tokens (16 here: finer than the
    32-token blocks). Block i's vLLM hash is then the (2i+1)-th, not the i-th:
    six prompts that share only their first 16 tokens must not take prompt 0's
    first block from kvtier (taken by the i-th hash, it did: wrong KV)."""
    res = run_rounds(hybrid_model_dir, tmp_path / "out.json", {
        "gpu_blocks": 100, "shared_head": 16, "llm": {"prefix_match_unit": 16},
        "extra": {"dram_bytes": 60 * RECORD_BYTES, "disk_path": str(tmp_path / "store")}})
    first = [r for r in res if r["round"] == 0]
    assert [r["cached"] for r in first] == [0] * 6
    again = [r for r in res if r["round"] == 1]
    assert all(r["cached"] >= 0.95 * FULL_BLOCK_TOKENS for r in again), again
    assert [r["output"] for r in again] == [r["output"] for r in first]
