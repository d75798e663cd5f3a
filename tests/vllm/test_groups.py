"""KV cache groups (hybrid models): what vLLM's group specs become in kvtier, and
what a prefix hit loads from a full-attention and a sliding-window group."""

from types import SimpleNamespace

import pytest
import torch

from kvtier.config import KVTierConfig
from kvtier.cache.groups import NULL_BLOCK, KVGroup, group_key
from kvtier.vllm.groups import groups_of
from kvtier.cache.keys import KeyChain, root_key
from kvtier.vllm.scheduler import DRAM, KVTierScheduler
from kvtier.store.slots import SlotGeometry
from tests.conftest import needs_vllm

BS = 32
NS = bytes(16)


def kv_config(*specs, layers_per_group=2):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    groups = [KVCacheGroupSpec([f"g{i}.l{j}" for j in range(layers_per_group)], spec)
              for i, spec in enumerate(specs)]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)


def full(**kw):
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    return FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.bfloat16,
                             **kw)


def window(tokens):
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    return SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.bfloat16,
                             sliding_window=tokens)


@needs_vllm
def test_groups_of_full_and_sliding_window():
    g = groups_of(kv_config(full(), window(64)))
    assert [x.index for x in g] == [0, 1]
    assert g[0].window_blocks is None and not g[0].windowed
    # 63 past tokens may straddle 3 blocks of 32 (the window need not start on a block)
    assert g[1].window_blocks == 3
    assert g[1].layer_names == ("g1.l0", "g1.l1")
    assert list(g[0].needed(2, 10)) == list(range(2, 10))
    assert list(g[1].needed(2, 10)) == [7, 8, 9]
    assert list(g[1].needed(8, 10)) == [8, 9]


@needs_vllm
def test_groups_of_rejects_what_kvtier_cannot_serve():
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, MambaSpec

    mamba = MambaSpec(block_size=BS, shapes=((4, 64),), dtypes=(torch.bfloat16,))
    with pytest.raises(ValueError, match="group 1 .*MambaSpec"):
        groups_of(kv_config(full(), mamba))
    local = ChunkedLocalAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64,
                                      dtype=torch.bfloat16, attention_chunk_size=64)
    with pytest.raises(ValueError, match="ChunkedLocalAttentionSpec"):
        groups_of(kv_config(local))
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    uneven = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["a", "b"], full()), KVCacheGroupSpec(["c"], window(64))])
    with pytest.raises(ValueError, match="different bytes per block"):
        groups_of(uneven)


def test_group_keys_are_stable_and_distinct():
    key = bytes(range(16))
    assert group_key(key, 0) == key
    assert group_key(key, 1) == group_key(bytes(range(16)), 1)
    assert len({group_key(key, i) for i in range(4)}) == 4
    assert all(len(group_key(key, i)) == 16 for i in range(4))
    # pinned value: record keys must not change by accident (stores persist; they
    # changed once, blake2b -> SHA-256, on purpose: docs/operators.md)
    assert group_key(key, 1).hex() == "6492de54eeb2501f6dc95af965dc26b4"


# ----------------------------------------------------------------- scheduler

GROUPS = (KVGroup(0, ("f",)), KVGroup(1, ("w",), window_blocks=3))


def request(tokens, rid="r"):
    return SimpleNamespace(request_id=rid, num_tokens=len(tokens), all_token_ids=tokens,
                           num_prompt_tokens=len(tokens), mm_features=None, prompt_embeds=None,
                           lora_request=None, cache_salt=None)


def scheduler():
    cfg = KVTierConfig.from_extra_config({"disk": False, "dram_bytes": 1 << 20})
    return KVTierScheduler(cfg, NS, 1, BS, SlotGeometry(payload_bytes=1024, num_slots=200),
                           groups=GROUPS)


def keys_of(tokens):
    return KeyChain(root_key(NS), BS).extend(tokens)


def put(s, key):
    block = s.ledger.begin_store(key, s.clock())
    assert block is not None
    s.ledger.end_store(block, True)


TOKENS = list(range(20 * BS + 5))   # 20 full blocks; hits can cover blocks 0..19


def filled(window_blocks=(17, 18, 19)):
    """A scheduler holding all 20 blocks of the full group, ``window_blocks`` of
    the window group; and the blocks' keys."""
    s, keys = scheduler(), keys_of(TOKENS)
    for i in range(20):
        put(s, group_key(keys[i], 0))
    for i in window_blocks:
        put(s, group_key(keys[i], 1))
    return s, keys


def test_hit_needs_every_full_block_but_only_the_window_blocks():
    s = scheduler()
    keys = keys_of(TOKENS)
    for i in range(20):
        put(s, group_key(keys[i], 0))
    for i in (17, 18, 19):            # the window group kept only the last three
        put(s, group_key(keys[i], 1))
    n, is_async = s.get_num_new_matched_tokens(request(TOKENS), 0)
    assert (n, is_async) == (20 * BS, True)
    hits = s._pending_hits["r"].hits
    assert sorted((h.block, h.group) for h in hits) == \
        sorted([(i, 0) for i in range(20)] + [(17, 1), (18, 1), (19, 1)])


def test_hit_ends_where_the_window_group_has_its_blocks():
    s, keys = filled((9, 10, 11, 12, 19))   # a gap at 13..18: the window is whole up to 13
    n, _ = s.get_num_new_matched_tokens(request(TOKENS), 0)
    assert n == 13 * BS
    # a hit shorter than the window: its blocks from the hit's start are enough
    s3, _ = filled((0, 1, 5, 6, 8))
    assert s3.get_num_new_matched_tokens(request(TOKENS), 0)[0] == 2 * BS
    s4, _ = filled((5, 6, 9, 10, 12, 13))   # vLLM has blocks 0..4: its hit starts at 5
    assert s4.get_num_new_matched_tokens(request(TOKENS), 5 * BS)[0] == 2 * BS
    # nothing of the window group: no hit at all (a hit of a full group alone is wrong KV)
    s2, _ = filled(())
    assert s2.get_num_new_matched_tokens(request(TOKENS), 0) == (0, False)


def load_items(s, accepted: int, window_from: int):
    """Look the request up, then let vLLM take ``accepted`` blocks of the hit: full
    group pages 100.., window group pages 200+i from block ``window_from`` on (null
    before). The request and the load plan's items."""
    req = request(TOKENS)
    s.get_num_new_matched_tokens(req, 0)
    full_ids = list(range(100, 100 + accepted + 1))
    window_ids = [NULL_BLOCK] * window_from + list(range(200 + window_from, 200 + accepted + 1))
    blocks = SimpleNamespace(get_block_ids=lambda: (full_ids, window_ids))
    s.update_state_after_alloc(req, blocks, accepted * BS)
    return req, s._new_loads[0].items


def test_loads_skip_the_null_blocks_vllm_gives_out_of_window_pages():
    s, keys = filled()
    req, items = load_items(s, 20, window_from=17)
    assert sorted((it.group, it.block) for it in items) == \
        sorted([(0, 100 + i) for i in range(20)] + [(1, 217), (1, 218), (1, 219)])
    assert all(it.slot >= 0 for it in items)
    assert s.hit_sources(req, 20 * BS) == {DRAM: 20 * BS}


def test_fewer_tokens_accepted_fails_window_pages_the_hit_did_not_cover():
    s, keys = filled()
    # vLLM takes 18 blocks only: its window pages are blocks 15..17
    _, items = load_items(s, 18, window_from=15)
    loaded = {(it.group, it.block) for it in items if it.slot >= 0}
    failed = {(it.group, it.block) for it in items if it.slot < 0}
    assert loaded == {(0, 100 + i) for i in range(18)} | {(1, 217)}
    assert failed == {(1, 215), (1, 216)}      # reported to vLLM: recomputed from there
    # the pins of blocks beyond the accepted hit (and block 18, 19 of the window) are gone
    pins = lambda key: s.ledger.dram.peek(key).value.pins
    assert pins(group_key(keys[19], 0)) == 0
    assert pins(group_key(keys[19], 1)) == 0
    assert pins(group_key(keys[17], 1)) == 1
    s.check_invariants()


def test_stores_skip_null_window_pages_and_ask_for_a_flush():
    s = scheduler()
    req = request(TOKENS)
    s.get_num_new_matched_tokens(req, 0)
    full_ids = list(range(100, 121))
    window_ids = [NULL_BLOCK] * 5 + list(range(205, 221))   # blocks 0..4 left the window
    new = SimpleNamespace(req_id="r", block_ids=(full_ids, window_ids), num_computed_tokens=0)
    so = SimpleNamespace(preempted_req_ids=set(), total_num_scheduled_tokens=len(TOKENS),
                         scheduled_new_reqs=[new], num_scheduled_tokens={"r": len(TOKENS)},
                         scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[],
                                                               resumed_req_ids=set(),
                                                               num_computed_tokens=[]))
    meta = s.build_connector_meta(so)
    items = meta.stores[0].items
    assert {(it.group, it.block) for it in items} == \
        {(0, 100 + i) for i in range(20)} | {(1, 200 + i) for i in range(5, 20)}
    assert not meta.flush_gathers
    so.scheduled_new_reqs = []
    assert s.build_connector_meta(so).flush_gathers   # the next forward waits for the copies
    assert not s.build_connector_meta(so).flush_gathers


@needs_vllm
def test_unsupported_combinations_fail_at_startup_with_a_clear_message():
    from kvtier.vllm.connector import check_supported

    vc = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=2),
                         cache_config=SimpleNamespace(enable_prefix_caching=True))
    with pytest.raises(ValueError, match="pipeline parallelism is not supported"):
        check_supported(vc, kv_config(full()))
    vc.parallel_config.pipeline_parallel_size = 1
    vc.cache_config.enable_prefix_caching = False
    with pytest.raises(ValueError, match="needs prefix caching"):
        check_supported(vc, kv_config(full()))
    vc.cache_config.enable_prefix_caching = True
    from vllm.v1.kv_cache_interface import MambaSpec
    mamba = MambaSpec(block_size=BS, shapes=((4, 64),), dtypes=(torch.bfloat16,))
    with pytest.raises(ValueError, match="MambaSpec"):
        check_supported(vc, kv_config(full(), mamba))
    check_supported(vc, kv_config(full(), window(64)))   # hybrid attention: supported
