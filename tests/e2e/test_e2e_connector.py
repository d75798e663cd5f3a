"""End to end on a real vLLM engine (CPU build) with the real connector.

Six distinct 750-token prompts, a "GPU" KV cache of 56 blocks of 32 tokens
(room for about two of them), two rounds: the second round must come back from
kvtier, with the same greedy tokens and logprobs as a full recompute.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.serving import metric_value
from tests.conftest import ROOT, needs_vllm
from tests.helpers import (BLOCKS_PER_PROMPT, FULL_BLOCK_TOKENS, RECORD_BYTES, cached, prompts,
                           same_greedy, server, wait_records)

pytestmark = [pytest.mark.e2e, needs_vllm]

SCENARIOS = Path(__file__).parent / "scenarios"
# Logprob tolerance vs recompute. The reloaded KV is byte-identical to what the
# original forward wrote (test_reload_is_byte_exact), but vLLM's CPU attention
# does not always give bit-identical results for the same KV in other pages:
# measured 0.0 for most prompts and up to 0.029 for some on a 2-core EPYC VM
# (the same with kvtier's code before hybrid support, and with vLLM's hybrid
# manager on or off). Outputs must be equal regardless.
TOL = 0.05


def run_scenario(script: str, model_dir: str, out: Path, opts: dict):
    """Run tests/e2e/scenarios/<script> in its own process; its JSON output."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(SCENARIOS / script), model_dir, str(out),
                           json.dumps(opts)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def run_bytecheck(model_dir: str, out: Path, opts: dict) -> dict:
    """Two rounds in-process, reloaded pages compared byte for byte with the pages
    the storing forward wrote (scenarios/bytecheck.py)."""
    return run_scenario("bytecheck.py", model_dir, out, opts)


def run_rounds(model_dir: str, out: Path, opts: dict) -> list[dict]:
    """Two rounds of the same prompts, per-request results (scenarios/rounds.py)."""
    return run_scenario("rounds.py", model_dir, out, opts)


@pytest.fixture(scope="module")
def kvtier_rounds(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kvtier")
    return run_rounds(model_dir, tmp / "out.json", {
        "extra": {"dram_bytes": "64MiB", "disk_path": str(tmp / "store")}})


@pytest.fixture(scope="module")
def baseline_rounds(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    return run_rounds(model_dir, tmp / "out.json", {"connector": False})


# DRAM tiers: "dram" holds all six prompts (round 2 loads from DRAM slots only);
# "disk" holds 80 records of the 138 blocks (RECORD_BYTES each), so round 2 reads
# the first prompts' blocks back from their disk records.
BYTECHECK_DRAM = {"dram": "64MiB", "disk": 80 * RECORD_BYTES}


@pytest.mark.parametrize("tier", list(BYTECHECK_DRAM))
def test_reload_is_byte_exact(model_dir, tmp_path, tier):
    doc = run_bytecheck(model_dir, tmp_path / "out.json", {
        "extra": {"dram_bytes": BYTECHECK_DRAM[tier], "disk_path": str(tmp_path / "store")}})
    checked = doc["checked"]
    assert checked["mismatch"] == []
    assert checked["pages"] >= 6 * BLOCKS_PER_PROMPT * 0.95
    from_disk = checked["by_kind"].get("read", 0) + checked["by_kind"].get("stream", 0)
    if tier == "disk":   # the compared pages include pages read from disk records
        assert from_disk >= BLOCKS_PER_PROMPT, checked["by_kind"]
    else:
        assert from_disk == 0, checked["by_kind"]
    res = doc["results"]
    first = {r["prompt"]: r["output"] for r in res if r["round"] == 0}
    for r in (r for r in res if r["round"] == 1):
        assert r["cached"] >= 0.95 * FULL_BLOCK_TOKENS and r["output"] == first[r["prompt"]]


def test_second_round_served_beyond_gpu_capacity(kvtier_rounds, baseline_rounds):
    second = [r for r in kvtier_rounds if r["round"] == 1]
    assert len(second) == 6
    for r in second:
        assert r["cached"] >= 0.95 * FULL_BLOCK_TOKENS, r
    # Plain vLLM with the same small KV cache has evicted them all.
    assert [r["cached"] for r in baseline_rounds if r["round"] == 1] == [0] * 6
    assert all(r["cached"] == 0 for r in kvtier_rounds if r["round"] == 0)


def test_reload_equals_recompute(kvtier_rounds, baseline_rounds):
    first = {r["prompt"]: r for r in kvtier_rounds if r["round"] == 0}
    for r in kvtier_rounds:
        if r["round"] != 1:
            continue
        ref = first[r["prompt"]]
        assert r["output"] == ref["output"]
        assert max(abs(a - b) for a, b in zip(r["logprobs"], ref["logprobs"])) <= TOL
        # Prompt logprobs of the tokens computed on top of the reloaded prefix.
        for j in range(r["cached"], r["prompt_tokens"]):
            got, want = r["prompt_logprobs"][j], ref["prompt_logprobs"][j]
            for tok, lp in got.items():
                if tok in want:
                    assert abs(lp - want[tok]) <= TOL, (r["prompt"], j, tok)
    # And the same as plain vLLM (no connector at all), up to near ties (helpers).
    base = {r["prompt"]: r for r in baseline_rounds if r["round"] == 0}
    for p, r in first.items():
        assert same_greedy(r["output"], r["top"], base[p]["output"], base[p]["top"]), p


# ---------------------------------------------------------------- server tests
def test_disk_tier_restart_corruption_and_salt(model_dir, tmp_path):
    store, ps = tmp_path / "store", prompts()
    blocks = FULL_BLOCK_TOKENS // 32
    with server(model_dir, store, tmp_path / "s1.log") as s:
        first = [s.complete(ps[0])]
        prompt0_files = wait_records(store, blocks)
        first += [s.complete(p) for p in ps[1:]]
        wait_records(store, 6 * blocks)
        # Newest first: the GPU holds ~2 prompts, DRAM (80 blocks) ~3, disk all 6.
        second = [s.complete(p) for p in reversed(ps)][::-1]
        m = s.metrics()
        assert metric_value(m, "vllm:prompt_tokens_cached_by_source_total", source="disk") > 0
        assert metric_value(m, "vllm:prompt_tokens_cached_by_source_total", source="host") > 0
        for a, b in zip(first, second):
            assert cached(b) >= 0.95 * FULL_BLOCK_TOKENS
            assert b["choices"][0]["text"] == a["choices"][0]["text"]
        assert metric_value(m, "kvtier_hit_tokens_total", tier="disk") > 0
        # cache_salt isolation: another tenant's salt never hits these blocks ...
        other = s.complete(ps[0], cache_salt="tenant-b")
        assert cached(other) == 0
        # ... but does hit its own.
        assert cached(s.complete(ps[0], cache_salt="tenant-b")) > 0
        assert cached(s.complete(ps[0], cache_salt="tenant-a")) == 0

    # Flip one payload byte of a record of prompt 0 while the server is down.
    victim = sorted(prompt0_files)[len(prompt0_files) // 2]
    data = bytearray(victim.read_bytes())
    data[4096 + 100] ^= 0x40
    victim.write_bytes(data)

    with server(model_dir, store, tmp_path / "s2.log") as s:
        # First request after the restart: served from disk.
        r1 = s.complete(ps[1])
        assert cached(r1) >= 0.95 * FULL_BLOCK_TOKENS
        assert r1["choices"][0]["text"] == first[1]["choices"][0]["text"]
        m = s.metrics()
        assert metric_value(m, "vllm:prompt_tokens_cached_by_source_total", source="disk") \
            >= 0.95 * FULL_BLOCK_TOKENS
        # The corrupted block is detected, counted, recomputed: same output.
        r0 = s.complete(ps[0])
        assert r0["choices"][0]["text"] == first[0]["choices"][0]["text"]
        m = s.metrics()
        assert metric_value(m, "kvtier_checksum_failures_total") >= 1
        assert metric_value(m, "kvtier_load_failures_total", reason="checksum") >= 1
