"""Keys of a resent prefix come from vLLM's block hashes (the scheduler's key
memo) and are the keys hashing its tokens gives: with vLLM's real requests and
its sha256 block hasher (the default)."""

import pytest

from tests.conftest import needs_vllm

pytestmark = needs_vllm

BS = 32


@pytest.fixture
def sched():
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import init_none_hash

    from kvtier.config import KVTierConfig
    from kvtier.store.slots import SlotGeometry
    from kvtier.vllm.scheduler import KVTierScheduler

    init_none_hash(sha256)
    cfg = KVTierConfig.from_extra_config({"disk": False, "dram_bytes": 1 << 20})
    return KVTierScheduler(cfg, bytes(16), 1, BS, SlotGeometry(1024, 16), start_sweeper=False,
                           memo_keys=True)


def request(req_id, tokens, lora=None):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.request import Request
    return Request(req_id, list(tokens), SamplingParams(max_tokens=1), None,
                   block_hasher=get_request_block_hasher(BS, sha256), lora_request=lora)


def hashed(sched, req):
    """The keys hashing the request's tokens gives."""
    from kvtier.cache.keys import KeyChain
    return KeyChain(sched._state(req).chain.root, BS).extend(req.prompt_token_ids)


@pytest.fixture
def blocks_hashed(monkeypatch):
    """How many blocks' keys were hashed from tokens since the last reset."""
    import kvtier.cache.keys as keys
    count, chain_keys = [0], keys.chain_keys

    def counting(parent, token_ids, block_size, n_full=None):
        out = chain_keys(parent, token_ids, block_size, n_full)
        count[0] += len(out)
        return out
    monkeypatch.setattr(keys, "chain_keys", counting)
    return count


def test_a_resent_prefix_gets_the_hashed_keys_without_hashing_them(sched, blocks_hashed):
    S = 16   # KeyMemo.SEGMENT
    a = list(range(1000, 1000 + 50 * BS + 1))
    sched._keys(sched._state(request("a", a)), 50)
    assert blocks_hashed[0] == 50
    b = a[:37 * BS] + list(range(5000, 5000 + 13 * BS + 1))   # 37 blocks shared
    blocks_hashed[0] = 0
    rb = request("b", b)
    got = sched._keys(sched._state(rb), 50)
    assert got == hashed(sched, rb)
    assert blocks_hashed[0] == 50 + (50 - 2 * S)   # (hashed() above: 50) two whole segments known
    # A request whose keys grow across a segment's middle (a lookup of 20 blocks,
    # then its stores of 45): the known segments come from the memo.
    blocks_hashed[0] = 0
    rc = request("c", b)
    st = sched._state(rc)
    sched._keys(st, 20)
    assert sched._keys(st, 45) == hashed(sched, rc)[:45]
    assert blocks_hashed[0] == 50 + (20 - 16) + (45 - 32)

