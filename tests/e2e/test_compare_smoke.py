"""End to end: ``benchmarks/compare.py`` on plain vLLM and on kvtier with a small DRAM
tier in front of its disk tier, one minute each: kvtier must serve hits from disk,
re-prefill fewer blocks than the baseline and beat its throughput; the run writes its
results (JSON, CSV, per-run documents) and plots, and ends with a JSON line.

The profile is the published comparison's (docs/benchmarks.md: 8 agents replaying the
weka-cc-dev Claude Code traces, contexts up to 4,000 tokens, a GPU KV cache of one
context), cut to 60 s, with a wider model (hidden 1024 instead of 256; the KV per token
is the same) so that a prefill costs what it costs relative to a reload on a real model,
and an 8 MiB DRAM tier (about 4,000 tokens), so that within the minute the reuse comes
back from the disk tier.
"""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["baseline", "kvtier-nvme"]
MODEL = {"hidden_size": 1024, "num_layers": 4, "num_heads": 16, "num_kv_heads": 2,
         "head_dim": 64, "intermediate_size": 2816}

# The 2026-11-29 comparison's profile (compare.py's defaults have since moved to
# the batching configuration): 8 users, a GPU cache of one 4,000-token context,
# every turn of a session, up to 32 output tokens, think times x0.1.
PROFILE = ["users=8", "gpu_cache_contexts=1", "max_context=4000", "max_turns=0",
           "max_output_tokens=32", "time_scale=0.1"]

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not importable")
def test_compare_kvtier_beats_baseline_from_disk(tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--configs", ",".join(CONFIGS),
         "--out", str(out), "--duration", "60", "--set", f"nvme_dram_bytes={8 << 20}",
         "--set", f"model={json.dumps(MODEL)}", *[x for kv in PROFILE for x in ("--set", kv)]],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(head["configs"]) == set(CONFIGS)
    for name, c in head["configs"].items():
        assert c["status"] == "ok", (name, c, proc.stderr[-3000:])
        assert c["output_tok_s"] > 0
    doc = json.loads((out / "compare.json").read_text())
    runs = {r["name"]: r["summary"] for r in doc["configs"]}
    base, kv = runs["baseline"], runs["kvtier-nvme"]

    # kvtier served prompt tokens from its disk tier (vLLM's cached-by-source counter),
    assert kv["cached_by_source"]["disk"] > 0, kv["cached_by_source"]
    assert base["cached_by_source"]["disk"] == 0
    # re-prefilled fewer blocks than plain vLLM with the same GPU cache,
    assert base["reprefilled_blocks"] > 0
    assert kv["reprefilled_blocks"] < base["reprefilled_blocks"] / 2, \
        (kv["reprefilled_blocks"], base["reprefilled_blocks"])
    # and produced more output tokens per second under the same offered load (the
    # margin is benchmarks/compare's to measure: on a loaded 2-core machine it was
    # 1.04x once, 2.6x quiet; here only that kvtier is not the slower one).
    assert head["configs"]["kvtier-nvme"]["tok_s_vs_baseline"] > 1.0, head["configs"]

    assert [r["name"] for r in doc["configs"]] == CONFIGS
    for r in doc["configs"]:
        assert r["timeline"] and r["ttfts"] and r["summary"]["requests_ok"] > 0
        run = json.loads((out / "runs" / f"{r['name']}.json").read_text())
        assert run["requests"] and run["metrics"]["after"]["prompt_tokens"] > 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [row["name"] for row in rows] == CONFIGS
    assert float(rows[1]["cached_disk"]) == kv["cached_by_source"]["disk"]
    for png in ("throughput.png", "hit_rate.png", "ttft_cdf.png", "reprefill.png"):
        assert (out / png).stat().st_size > 1000, png
