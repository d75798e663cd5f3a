"""Cache policy, pure: block keys, the block lifecycle ledger, LRU-within-TTL
tiers, the load-vs-recompute cost model, DRAM slot geometry. No vLLM, no I/O."""
