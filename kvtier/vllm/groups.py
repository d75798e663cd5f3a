"""vLLM's KV cache groups as kvtier sees them (kvtier.cache.groups): which it
serves (full attention, sliding window) and what one block of a group weighs."""

from __future__ import annotations

from kvtier.cache.groups import KVGroup, cdiv


def groups_of(kv_cache_config) -> tuple[KVGroup, ...]:
    """kvtier's view of vLLM's KV cache groups; ValueError for what it cannot serve."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    groups = []
    block_size = None
    for i, g in enumerate(kv_cache_config.kv_cache_groups):
        spec = g.kv_cache_spec
        kind = type(spec)
        if kind is FullAttentionSpec:
            window = None
        elif kind is SlidingWindowSpec:
            window = cdiv(spec.sliding_window - 1 + spec.extra_retained_tokens,
                          spec.block_size) + 1
        else:
            raise ValueError(
                f"kvtier: KV cache group {i} ({len(g.layer_names)} layers) uses "
                f"{kind.__name__}; kvtier offloads full-attention and sliding-window "
                "attention only (not Mamba/SSM state, MLA, chunked-local or cross attention)")
        if block_size is None:
            block_size = spec.block_size
        elif spec.block_size != block_size:
            raise ValueError(f"kvtier: KV cache groups have different block sizes "
                             f"({block_size} and {spec.block_size}); not supported")
        groups.append(KVGroup(i, tuple(g.layer_names), window))
    sizes = {g.kv_cache_spec.page_size_bytes * len(g.layer_names)
             for g in kv_cache_config.kv_cache_groups}
    if len(sizes) != 1:
        raise ValueError(f"kvtier: KV cache groups hold different bytes per block {sorted(sizes)}; "
                         "not supported")
    return tuple(groups)


def payload_bytes_of(kv_cache_config) -> int:
    """Bytes of one block of one group (every group has the same)."""
    group = kv_cache_config.kv_cache_groups[0]
    return group.kv_cache_spec.page_size_bytes * len(group.layer_names)
