"""Two rounds of the same long prompts through an offline vLLM engine.

Usage: python rounds.py MODEL_DIR OUT.json '{"connector": true, "extra": {...}, ...}'
Writes per-request cached tokens, greedy output ids, output logprobs and the
prompt logprobs vLLM computes (of the tokens it did not take from a cache).
With "metrics": true, OUT.json is {"results": [...], "metrics": [per round]}:
kvtier's Prometheus series after each round, as vLLM's stat loggers recorded
them in this process ({"name{label=value,...}": value}, vLLM's own labels left out).
"""
import json
import random
import sys


def main():
    model, out_path, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if opts.get("connector", True):
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.connector",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"load_policy": "always", **opts.get("extra", {})})
    llm = LLM(model=model, block_size=32, enforce_eager=True, max_model_len=1024,
              num_gpu_blocks_override=opts.get("gpu_blocks", 56), gpu_memory_utilization=0.2,
              seed=0, tensor_parallel_size=opts.get("tp", 1),
              disable_log_stats=not opts.get("metrics", False), **opts.get("llm", {}), **kw)
    rng = random.Random(opts.get("seed", 0))
    n, length = opts.get("prompts", 6), opts.get("length", 750)
    prompts = [[rng.randrange(0, 256) for _ in range(length)] for _ in range(n)]
    head = opts.get("shared_head", 0)   # every prompt starts with prompt 0's first tokens
    prompts = [prompts[0][:head] + p[head:] for p in prompts]
    sp = SamplingParams(max_tokens=opts.get("max_tokens", 8), temperature=0, logprobs=3,
                        prompt_logprobs=1, skip_reading_prefix_cache=False,
                        detokenize=False)
    # Whether vLLM kept its hybrid KV cache manager on (a connector without
    # SupportsHMA turns it off).
    hma = not llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    results, metrics = [], []
    for rnd in range(opts.get("rounds", 2)):
        if rnd == 1 and "corrupt" in opts:
            corrupt(model, opts, prompts)
        for i, p in enumerate(prompts):
            o = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
            c = o.outputs[0]
            results.append({
                "round": rnd, "prompt": i, "prompt_tokens": len(p), "hma": hma,
                "cached": o.num_cached_tokens,
                "output": list(c.token_ids),
                "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                "top": [{str(t): v.logprob for t, v in lp.items()} for lp in c.logprobs],
                # vLLM returns prompt logprobs only for the tokens it computed
                # (the tail after a cache hit): keep them aligned to the end.
                "prompt_logprobs": [None if d is None else {str(t): v.logprob
                                                            for t, v in d.items()}
                                    for d in (o.prompt_logprobs or [])],
            })
        if opts.get("metrics"):
            metrics.append(kvtier_metrics())
    with open(out_path, "w") as f:
        json.dump({"results": results, "metrics": metrics} if opts.get("metrics") else results,
                  f)


def kvtier_metrics() -> dict:
    from prometheus_client import REGISTRY

    out = {}
    for m in REGISTRY.collect():
        for s in m.samples if m.name.startswith("kvtier_") else ():
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                              if k not in ("model_name", "engine"))
            key = f"{s.name}{{{labels}}}"
            out[key] = out.get(key, 0) + s.value
    return out


def corrupt(model, opts, prompts):
    """Flip a payload byte of one block's record on one TP rank only (a real fault)."""
    import time

    from pathlib import Path

    from kvtier.cache.keys import chain_keys, root_key
    from kvtier.store.claim import META_DIR
    from kvtier.store.disk import DiskStore
    from kvtier.store.record import HEADER_BYTES

    c = opts["corrupt"]
    store = Path(opts["extra"]["disk_path"])
    (ns_dir,) = [d for d in store.iterdir() if d.is_dir() and d.name != META_DIR]   # this engine's namespace
    ns = bytes.fromhex(ns_dir.name)
    keys = chain_keys(root_key(ns), prompts[c["prompt"]], 32)
    path = DiskStore(store, ns, c["rank"], opts.get("tp", 1)).path(keys[c["block"]])
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.2)
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 7] ^= 0x20
    path.write_bytes(bytes(data))


if __name__ == "__main__":
    main()
