"""Lookup cost: ``get_num_new_matched_tokens`` on a 128K-token prompt.

A hybrid model (one full-attention and one sliding-window KV cache group, a
window of 3 blocks of 32 tokens), every full-attention block in the DRAM tier
and half the window group's records missing - every other one, the worst case
for finding where a hit may end (no window is whole, so the whole prompt is
scanned). Each sample is a fresh request (its 4,096 block keys are hashed in
the call), then the same request looked up again (keys known: the cost of
vLLM asking again on the next step).

    python -m benchmarks.lookup [--tokens 131072] [--samples 9]

Prints the median and spread of each, and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128 * 1024)
    p.add_argument("--samples", type=int, default=9)
    a = p.parse_args(argv)

    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from kvtier.config import KVTierConfig
    from kvtier.groups import KVGroup, group_key
    from kvtier.keys import KeyChain, root_key
    from kvtier.scheduler import KVTierScheduler
    from kvtier.slots import SlotGeometry

    bs, ns = 32, bytes(16)
    groups = (KVGroup(0, ("full",)), KVGroup(1, ("window",), window_blocks=3))
    n = a.tokens // bs
    cfg = KVTierConfig.from_extra_config({"disk": False, "dram_bytes": 1 << 30})
    sched = KVTierScheduler(cfg, ns, 1, bs, SlotGeometry(1024, 2 * n + 16), groups=groups,
                            start_sweeper=False)
    tokens = list(range(a.tokens + 1))
    keys = KeyChain(root_key(ns), bs).extend(tokens)
    for i in range(n):
        for g in ((0, 1) if i % 2 else (0,)):   # every other window record missing
            b = sched.ledger.begin_store(group_key(keys[i], g), sched.clock())
            sched.ledger.end_store(b, True)
    sp = SamplingParams(max_tokens=1)
    first, again = [], []
    for s in range(a.samples):
        req = Request(f"r{s}", tokens, sp, None)
        t0 = time.perf_counter()
        got = sched.get_num_new_matched_tokens(req, 0)
        t1 = time.perf_counter()
        sched.get_num_new_matched_tokens(req, 0)
        t2 = time.perf_counter()
        sched.request_finished(req)
        first.append((t1 - t0) * 1e3)
        again.append((t2 - t1) * 1e3)
    assert got == (0, False), got   # no window is whole: no hit

    def summary(xs):
        return {"median_ms": round(statistics.median(xs), 3), "min_ms": round(min(xs), 3),
                "max_ms": round(max(xs), 3)}
    out = {"benchmark": "lookup", "tokens": a.tokens, "blocks": n, "samples": a.samples,
           "first_lookup": summary(first), "repeat_lookup": summary(again),
           "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
           "commit": commit(), "date": time.strftime("%Y-%m-%d")}
    print(f"lookup of a {a.tokens}-token prompt ({n} blocks, hybrid, half the window "
          f"records missing), {a.samples} samples:")
    print(f"  first lookup (keys hashed): median {out['first_lookup']['median_ms']} ms "
          f"[{out['first_lookup']['min_ms']}, {out['first_lookup']['max_ms']}]")
    print(f"  repeat lookup:              median {out['repeat_lookup']['median_ms']} ms "
          f"[{out['repeat_lookup']['min_ms']}, {out['repeat_lookup']['max_ms']}]")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
