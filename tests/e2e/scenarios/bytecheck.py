"""Byte-level reload check on a real in-process vLLM engine.

Usage: python bytecheck.py MODEL_DIR OUT.json '{"extra": {...}, "gpu_blocks": N}'

Two rounds of the same prompts (as rounds.py) with kvtier's worker watched:
when a block is queued for offload (right after the forward that computed it)
its GPU page is copied aside, per KV cache group (the group's layers only);
when kvtier has reloaded a block into a GPU page, that page must hold exactly
those bytes. Writes the per-request results plus the comparison counts, also
by how the load got the bytes ("by_kind": "slot" from a DRAM slot, "read" and
"stream" from a disk record read for this load).
"""
import json
import os
import random
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the worker runs in this process


def main():
    model, out_path, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    import torch

    import kvtier.vllm.worker as W
    from kvtier.vllm.metadata import FROM_SLOT, READ, STREAM

    kinds = {FROM_SLOT: "slot", READ: "read", STREAM: "stream"}
    kv: dict = {}
    group_layers: list = []
    at_store: dict = {}
    checked = {"pages": 0, "by_group": {}, "by_kind": {}, "mismatch": []}

    def page(group, block):
        return torch.cat([kv[n][block].reshape(-1).view(torch.uint8).clone()
                          for n in group_layers[group]])

    register, submit, scatter = (W.KVTierWorker.register_kv_caches,
                                 W.KVTierWorker.submit_stores, W.KVTierWorker._scatter)

    def register_kv_caches(self, kv_caches, num_blocks, layout, groups=()):
        kv.update(kv_caches)
        group_layers.extend([tuple(g) for g in groups] or [tuple(kv_caches)])
        return register(self, kv_caches, num_blocks, layout, groups)

    def submit_stores(self, meta):
        for job in meta.stores:
            for it in job.items:
                at_store[it.key] = page(it.group, it.block)
        return submit(self, meta)

    def scatter_part(self, load, idxs):
        scatter(self, load, idxs)   # a part of a wave (its slots are not reused before it ends)
        for i in idxs:
            it = load.job.items[i]
            if i in load.failed or it.key not in at_store:
                continue
            checked["pages"] += 1
            checked["by_group"][it.group] = checked["by_group"].get(it.group, 0) + 1
            kind = kinds[it.kind]
            checked["by_kind"][kind] = checked["by_kind"].get(kind, 0) + 1
            if not torch.equal(page(it.group, it.block), at_store[it.key]):
                checked["mismatch"].append([load.job.req_id, it.key.hex(), it.group, it.block])

    W.KVTierWorker.register_kv_caches = register_kv_caches
    W.KVTierWorker.submit_stores = submit_stores
    W.KVTierWorker._scatter = scatter_part

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(model=model, block_size=32, enforce_eager=True, max_model_len=1024,
              num_gpu_blocks_override=opts.get("gpu_blocks", 56), gpu_memory_utilization=0.2,
              seed=0, kv_transfer_config=KVTransferConfig(
                  kv_connector="KVTierConnector", kv_connector_module_path="kvtier.connector",
                  kv_role="kv_both", kv_connector_extra_config={"load_policy": "always", **opts.get("extra", {})}))
    hma = not llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    rng = random.Random(opts.get("seed", 0))
    prompts = [[rng.randrange(0, 256) for _ in range(opts.get("length", 750))]
               for _ in range(opts.get("prompts", 6))]
    sp = SamplingParams(max_tokens=8, temperature=0, logprobs=3, detokenize=False)
    results = []
    for rnd in range(2):
        for i, p in enumerate(prompts):
            o = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
            c = o.outputs[0]
            results.append({"round": rnd, "prompt": i, "cached": o.num_cached_tokens,
                            "output": list(c.token_ids),
                            "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
    with open(out_path, "w") as f:
        json.dump({"hma": hma, "groups": len(group_layers), "checked": checked,
                   "results": results}, f)


if __name__ == "__main__":
    main()
