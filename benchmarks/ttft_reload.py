"""TTFT of a reloaded prefix vs a local hit vs a full recompute, and the cost of
kvtier on a workload with no reuse at all. One run, side by side.

    python -m benchmarks.ttft_reload [--prompt-tokens 4096] [--repeats 3]

On the CPU build with a ~100M-parameter dummy Llama (8 layers, hidden 1024,
4 KV heads of 64): TTFT (max_tokens=1 latency) of a 4K-token prompt when
 - recompute: nothing cached anywhere;
 - local: vLLM's own prefix-cache hit (the floor);
 - dram:  the prefix comes back from kvtier's DRAM tier;
 - disk:  the prefix comes back from kvtier's disk tier (O_DIRECT reads, so the
          page cache is not involved); the source of every hit is checked
          against kvtier's per-tier hit counters.
Then throughput of distinct prompts (no reuse) with and without the connector.
Targets: dram <= 1.25x local, disk <= 1.5x local, both >= 20x faster than
recompute; no-reuse throughput >= 97% of vLLM without the connector.
The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time

BLOCK = 32


def make_llm(model: str, gpu_blocks: int, max_len: int, extra: dict | None):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw = {}
    if extra is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.connector",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config=extra)
    return LLM(model=model, load_format="dummy", block_size=BLOCK, enforce_eager=True,
               max_model_len=max_len, num_gpu_blocks_override=gpu_blocks,
               gpu_memory_utilization=0.3, disable_log_stats=False, seed=0, **kw)


def hit_tokens(llm) -> dict[str, float]:
    """Prompt tokens cached by source, from vLLM's own counter."""
    out = {"dram": 0.0, "disk": 0.0}
    for m in llm.get_metrics():
        if m.name == "vllm:prompt_tokens_cached_by_source":
            tier = {"host": "dram", "disk": "disk"}.get(m.labels.get("source"))
            if tier:
                out[tier] += m.value
    return out


def ttft(llm, prompt) -> float:
    from vllm import SamplingParams
    sp = SamplingParams(max_tokens=1, temperature=0)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
    return time.perf_counter() - t0


def timed_hit(llm, prompt, want_tier: str, min_tokens: int) -> float:
    before = hit_tokens(llm)
    t = ttft(llm, prompt)
    after = hit_tokens(llm)
    got = {k: after[k] - before[k] for k in after}
    if got[want_tier] < min_tokens:
        raise RuntimeError(f"expected a {want_tier} hit of >= {min_tokens} tokens, got {got}")
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--throughput-prompts", type=int, default=8)
    p.add_argument("--throughput-tokens", type=int, default=2048)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--throughput-rounds", type=int, default=3)
    args = p.parse_args(argv)

    from kvtier.tinymodel import BENCH_LLAMA, write_model

    work = tempfile.mkdtemp(prefix="kvtier-ttft-")
    model = str(write_model(f"{work}/model", BENCH_LLAMA))
    n = args.prompt_tokens
    blocks_per_prompt = n // BLOCK
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 256) for _ in range(n)] for _ in range(2 * args.repeats)]
    payload = BENCH_LLAMA.num_layers * BLOCK * BENCH_LLAMA.num_kv_heads * \
        BENCH_LLAMA.head_dim * 2 * 2
    record = 4096 + payload
    # GPU KV: 1.5 prompts. DRAM: the `repeats` prompts of the DRAM phase and a half.
    gpu_blocks = int(blocks_per_prompt * 1.5) + 2
    dram_bytes = int((args.repeats + 0.5) * (blocks_per_prompt + 1) * record)
    extra = {"dram_bytes": dram_bytes, "disk_path": f"{work}/store", "disk_bytes": "64GiB",
             "o_direct": "auto"}
    min_hit = int(0.95 * ((n - 1) // BLOCK) * BLOCK)
    res: dict[str, list[float]] = {"recompute": [], "local": [], "dram": [], "disk": []}

    llm = make_llm(model, gpu_blocks, n + 64, extra)
    ttft(llm, [rng.randrange(0, 256) for _ in range(256)])   # warm-up
    first, second = prompts[:args.repeats], prompts[args.repeats:]
    for pr in first:
        res["recompute"].append(ttft(llm, pr))
        time.sleep(1.0)   # the floor: no offload of the prompt still running beside it
        res["local"].append(ttft(llm, pr))          # still in the GPU KV cache
    time.sleep(0.5)                                  # let the offload finish
    # The GPU cache holds 1.5 prompts: cycling through them, each was evicted
    # from the GPU before its turn and comes back from DRAM.
    for pr in first:
        res["dram"].append(timed_hit(llm, pr, "dram", min_hit))
    # New prompts push the first ones out of DRAM; they remain on disk.
    for pr in second:
        res["recompute"].append(ttft(llm, pr))
    time.sleep(1.0)
    for pr in first:
        res["disk"].append(timed_hit(llm, pr, "disk", min_hit))
    del llm
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"{'path':<10} {'median TTFT ms':>15}  samples")
    for k, v in res.items():
        print(f"{k:<10} {med[k] * 1000:15.1f}  {[round(x * 1000, 1) for x in v]}", flush=True)

    # Throughput with no reuse at all: kvtier only adds its stores. Both engines
    # stay up and take turns, so drift in the machine's load hits both alike.
    from vllm import SamplingParams
    sp = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    big = args.throughput_prompts * (args.throughput_tokens // BLOCK + 4)
    max_len = args.throughput_tokens + args.output_tokens + 64
    engines = {"vllm": make_llm(model, big, max_len, None),
               "kvtier": make_llm(model, big, max_len, dict(extra, disk_path=f"{work}/store2"))}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(args.throughput_rounds):
        for name, llm in engines.items():
            batch = [{"prompt_token_ids": [rng.randrange(0, 256)
                                           for _ in range(args.throughput_tokens)]}
                     for _ in range(args.throughput_prompts)]
            t0 = time.perf_counter()
            outs = llm.generate(batch, sp, use_tqdm=False)
            secs = time.perf_counter() - t0
            toks = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
            rates[name].append(toks / secs)
            time.sleep(1.0)   # kvtier's offload of the batch finishes inside its own turn
    tput = {name: statistics.median(r) for name, r in rates.items()}
    del engines
    print(f"no-reuse throughput: vLLM {tput['vllm']:.0f} tok/s, with kvtier "
          f"{tput['kvtier']:.0f} tok/s (medians of {rates})")
    figures = {
        "prompt_tokens": n,
        "ttft_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "dram_vs_local": round(med["dram"] / med["local"], 3),
        "disk_vs_local": round(med["disk"] / med["local"], 3),
        "recompute_vs_dram": round(med["recompute"] / med["dram"], 1),
        "recompute_vs_disk": round(med["recompute"] / med["disk"], 1),
        "no_reuse_throughput_vs_vllm": round(tput["kvtier"] / tput["vllm"], 3),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
