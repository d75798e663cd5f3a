"""Lookup cost: ``get_num_new_matched_tokens`` on a 128K-token prompt.

A hybrid model (one full-attention and one sliding-window KV cache group, a
window of 3 blocks of 32 tokens), every full-attention block in the DRAM tier
and half the window group's records missing - every other one, the worst case
for finding where a hit may end (no window is whole, so the whole prompt is
scanned). Requests are vLLM's own, with its sha256 block hasher (the default).
Per sample, three lookups:
  cold    a new request, nothing known of its blocks: its 4,096 kvtier keys
          (and the window group's) are hashed in the call (the first request
          after a restart);
  warm    a new request whose prefix this process has seen: its keys come from
          vLLM's block hashes (the steady state of an agent resending a prefix);
  repeat  the same request again (vLLM asks again on the next step).

    python -m benchmarks.lookup [--tokens 131072] [--samples 9]

Prints the median and spread of each, and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.stamp import line, stamp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128 * 1024)
    p.add_argument("--samples", type=int, default=9)
    a = p.parse_args(argv)
    st = stamp()
    print(f"lookup: {line(st)}", flush=True)

    from vllm.sampling_params import SamplingParams
    from vllm.utils.gc_utils import freeze_gc_heap
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.core.kv_cache_utils import BlockHash, get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    from kvtier.config import KVTierConfig
    from kvtier.cache.groups import KVGroup, group_key
    from kvtier.cache.keys import KeyChain, KeyMemo, root_key
    from kvtier.vllm.scheduler import KEY_MEMO_BLOCKS, KVTierScheduler
    from kvtier.store.slots import SlotGeometry

    bs, ns = 32, bytes(16)
    groups = (KVGroup(0, ("full",)), KVGroup(1, ("window",), window_blocks=3))
    n = a.tokens // bs
    cfg = KVTierConfig.from_extra_config({"disk": False, "dram_bytes": 1 << 30})
    sched = KVTierScheduler(cfg, ns, 1, bs, SlotGeometry(1024, 2 * n + 16), groups=groups,
                            start_sweeper=False, memo_keys=True)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(bs, sha256)
    tokens = list(range(a.tokens + 1))
    keys = KeyChain(root_key(ns), bs).extend(tokens)
    for i in range(n):
        for g in ((0, 1) if i % 2 else (0,)):   # every other window record missing
            b = sched.ledger.begin_store(group_key(keys[i], g), sched.clock())
            sched.ledger.end_store(b, True)
    # The memo at its bound, as in a server that has seen many prefixes: the old
    # generation full, the young one 4 cold lookups from full (the 5th ages it).
    memo, seg = sched._key_memo, KeyMemo.SEGMENT
    for lo, hi in ((0, memo.half), (memo.half, 2 * memo.half - 4 * (n // seg))):
        memo.remember(bytes(16), [i.to_bytes(32, "little") for i in range(lo * seg, hi * seg)],
                      [i.to_bytes(16, "little") for i in range(lo * seg, hi * seg)],
                      0, (hi - lo) * seg)
    assert len(memo) == KEY_MEMO_BLOCKS - 4 * n, len(memo)
    # As in vLLM's engine core after start-up: its heap frozen out of the collector
    # (the tier filled above is the long-lived state a lookup runs beside).
    freeze_gc_heap()
    sp = SamplingParams(max_tokens=1)
    times: dict[str, list[float]] = {"cold": [], "warm": [], "repeat": []}
    for s in range(a.samples):
        for kind in ("cold", "warm"):
            if kind == "cold":   # vLLM hashes the prompt from another root: unseen
                kv_cache_utils.NONE_HASH = BlockHash(sha256(f"cold{s}"))
            req = Request(f"{kind}{s}", tokens, sp, None, block_hasher=hasher)
            t0 = time.perf_counter()
            got = sched.get_num_new_matched_tokens(req, 0)
            t1 = time.perf_counter()
            times[kind].append((t1 - t0) * 1e3)
            if kind == "warm":
                sched.get_num_new_matched_tokens(req, 0)
                times["repeat"].append((time.perf_counter() - t1) * 1e3)
            sched.request_finished(req)
            assert got == (0, False), got   # no window is whole: no hit

    def summary(xs):
        return {"median_ms": round(statistics.median(xs), 3), "min_ms": round(min(xs), 3),
                "max_ms": round(max(xs), 3)}
    out = {"benchmark": "lookup", "tokens": a.tokens, "blocks": n, "samples": a.samples,
           **{f"{k}_lookup": summary(v) for k, v in times.items()}, "stamp": st}
    print(f"lookup of a {a.tokens}-token prompt ({n} blocks, hybrid, half the window "
          f"records missing), {a.samples} samples:")
    for k in times:
        r = out[f"{k}_lookup"]
        print(f"  {k:<7} median {r['median_ms']} ms [{r['min_ms']}, {r['max_ms']}]")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
