"""End to end: ``benchmarks/compare.py --smoke`` on two configurations writes its
results (JSON, CSV, per-run documents) and plots, and ends with a JSON line."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not importable")
def test_compare_smoke(tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--smoke",
         "--configs", "baseline,kvtier-nvme,ideal",
         "--out", str(out), "--duration", "20"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(head["configs"]) == {"baseline", "kvtier-nvme", "ideal"}
    for name, c in head["configs"].items():
        assert c["status"] == "ok", (name, c, proc.stderr[-3000:])
        assert c["output_tok_s"] > 0
    assert head["configs"]["ideal"]["tok_s_vs_ideal"] == 1.0

    doc = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in doc["configs"]] == ["baseline", "kvtier-nvme", "ideal"]
    for r in doc["configs"]:
        assert r["timeline"] and r["ttfts"] and r["summary"]["requests_ok"] > 0
        run = json.loads((out / "runs" / f"{r['name']}.json").read_text())
        assert run["requests"] and run["metrics"]["after"]["prompt_tokens"] > 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [row["name"] for row in rows] == ["baseline", "kvtier-nvme", "ideal"]
    for png in ("throughput.png", "hit_rate.png", "ttft_cdf.png", "reprefill.png"):
        assert (out / png).stat().st_size > 1000, png
