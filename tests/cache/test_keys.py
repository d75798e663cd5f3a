import os
import subprocess
import sys

from kvtier.cache.keys import KeyChain, KeyMemo, Namespace, chain_keys, root_key

NS = Namespace(model="m", kv_dtype="bfloat16", layout="LBHNC", block_size=4, tp_size=1)

SNIPPET = (
    "from kvtier.cache.keys import *;"
    "ns=Namespace(model='m',kv_dtype='bfloat16',layout='LBHNC',block_size=4,tp_size=1);"
    "print(','.join(k.hex() for k in chain_keys(root_key(ns.digest(),'salt'),"
    "list(range(40)),4)))")


def test_keys_stable_across_processes_and_hash_seeds():
    outs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.check_output([sys.executable, "-c", SNIPPET], env=env,
                                         text=True).strip())
    assert len(outs) == 1
    here = ",".join(k.hex() for k in chain_keys(root_key(NS.digest(), "salt"),
                                                 list(range(40)), 4))
    assert outs == {here}


def test_keys_do_not_change_by_accident():
    """Stores persist: a pinned value (keys changed once on purpose, blake2b ->
    SHA-256: docs/operators.md)."""
    assert chain_keys(bytes(range(16)), list(range(64)), 32)[1].hex() == \
        "fb9f93cfd4b0252a1e9b1eba52947f0b"


def test_chain_is_a_prefix_hash():
    root = root_key(NS.digest())
    a = chain_keys(root, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = chain_keys(root, [1, 2, 3, 4, 5, 6, 7, 9, 9, 9, 9, 9], 4)
    assert len(a) == 2 and len(b) == 3          # only full blocks get keys
    assert a[0] == b[0] and a[1] != b[1]        # diverging block, and all after it
    c = chain_keys(root, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert c[1] != a[1]                          # same tokens, other parent: other key


def test_namespace_salt_and_lora_separate_keys():
    toks = list(range(8))
    base = chain_keys(root_key(NS.digest()), toks, 4)
    others = [
        chain_keys(root_key(NS.digest(), cache_salt="tenant-b"), toks, 4),
        chain_keys(root_key(NS.digest(), lora="adapter"), toks, 4),
        chain_keys(root_key(Namespace("m", "fp8", "LBHNC", 4).digest()), toks, 4),
        chain_keys(root_key(Namespace("m", "bfloat16", "LBNHC", 4).digest()), toks, 4),
        chain_keys(root_key(Namespace("m", "bfloat16", "LBHNC", 4, tp_size=2).digest()),
                   toks, 4),
        chain_keys(root_key(Namespace("other", "bfloat16", "LBHNC", 4).digest()), toks, 4),
    ]
    for o in others:
        assert set(o).isdisjoint(base)
    # An empty salt is not "no salt".
    assert chain_keys(root_key(NS.digest(), cache_salt=""), toks, 4) != base


def test_keychain_extends_incrementally():
    root = root_key(NS.digest())
    chain = KeyChain(root, 4)
    toks = list(range(18))
    chain.extend(toks[:5])
    assert len(chain.keys) == 1
    chain.extend(toks)
    assert chain.keys == chain_keys(root, toks, 4)


def test_native_keys_equal_the_hashlib_keys():
    """The bulk keys of the native module (OpenSSL) are hashlib's, byte for byte:
    chain keys and group keys, so stores written by either build agree."""
    import hashlib
    import random

    import pytest

    import kvtier.store.native  # installs the native hashers when built
    from kvtier.cache import groups, keys
    if not hasattr(getattr(kvtier.store.native, "_ext", None), "chain_keys"):
        pytest.skip("kvtier._copy_engine built without libcrypto")
    # built with it: its keys must agree with hashlib's (else it is not used)
    assert keys.native_hasher("chain_keys") and keys.native_hasher("group_keys")
    rng = random.Random(3)
    # ids of every size the native reader tells apart: 0, one 30-bit digit, two
    toks = [rng.choice((0, 2**30 - 1, 2**30, rng.randrange(1, 2**30), rng.randrange(2**30, 2**32)))
            for _ in range(64 * 32 + 5)]
    root = root_key(NS.digest(), "salt")
    want, parent = [], root
    for i in range(64):
        data = b"".join(t.to_bytes(4, "little") for t in toks[i * 32:(i + 1) * 32])
        parent = hashlib.sha256(parent + data).digest()[:16]
        want.append(parent)
    assert chain_keys(root, toks, 32) == want
    assert chain_keys(root, tuple(toks), 32, 10) == want[:10]   # any sequence, any length
    assert KeyChain(root, 32).extend(toks) == want
    for bad in (2**32, -1):   # ids outside uint32 are refused, as the hashlib path does
        with pytest.raises(OverflowError):
            chain_keys(root, toks[:31] + [bad], 32)
    assert groups.group_keys([], 1) == []
    for g in (1, 2, 300):
        assert groups.group_keys(want, g) == [
            hashlib.sha256(b"kvtier-group\x00" + k + g.to_bytes(2, "little")).digest()[:16]
            for k in want]
    assert groups.group_keys(want, 0) == want


def test_a_native_module_that_hashes_otherwise_is_not_used():
    """A native module built from older sources (another hash) must not mix its
    keys with this kvtier's: it is checked against hashlib before it is used."""
    from kvtier.cache.groups import group_key
    from kvtier.cache.keys import _chain_keys_hashlib, native_keys_agree

    def chain(parent, toks, bs, n):
        return _chain_keys_hashlib(parent, toks, bs, n)

    def group(keys, g):
        return [group_key(k, g) for k in keys]

    def old_chain(parent, toks, bs, n):   # e.g. the BLAKE2b keys of before
        import hashlib
        return [hashlib.blake2b(k, digest_size=16).digest() for k in chain(parent, toks, bs, n)]
    assert native_keys_agree(chain, group)
    assert not native_keys_agree(old_chain, group)
    assert not native_keys_agree(chain, lambda keys, g: list(keys))


def _h(i: int) -> bytes:
    return i.to_bytes(32, "little")


def _k(i: int) -> bytes:
    return i.to_bytes(16, "little")


R = bytes(16)    # a root


def _prompt(lo: int, n: int) -> tuple[list[bytes], list[bytes]]:
    """The hashes and keys of a prompt of ``n`` blocks of its own."""
    return [_h(i) for i in range(lo, lo + n)], [_k(i) for i in range(lo, lo + n)]


def test_key_memo_is_bounded_and_knows_the_recent_prompts():
    memo = KeyMemo(1000)
    for lo in range(0, 11_200, 80):   # 140 prompts of 80 blocks
        memo.remember(R, *_prompt(lo, 80), 0, 80)
        assert len(memo) <= 1000
    assert memo.leading(R, _prompt(11_120, 80)[0], 0, 80) == _prompt(11_120, 80)[1]
    assert memo.leading(R, _prompt(0, 80)[0], 0, 80) == []


def test_key_memo_keeps_a_prefix_in_use():
    """A system prompt resent between many new prompts stays known (a segment
    found in the old generation moves to the young one)."""
    memo = KeyMemo(1000)
    hot, hot_keys = _prompt(10**6, 64)
    memo.remember(R, hot, hot_keys, 0, 64)
    for lo in range(0, 20_000, 96):
        memo.remember(R, *_prompt(lo, 96), 0, 96)
        assert memo.leading(R, hot, 0, 64) == hot_keys, lo


def test_key_memo_gives_the_known_leading_segments_only():
    S = KeyMemo.SEGMENT
    memo = KeyMemo(1000)
    hashes, keys = _prompt(0, 3 * S + 5)
    memo.remember(R, hashes, keys, 0, len(hashes))   # the last 5 blocks: no whole segment
    assert memo.leading(R, hashes, 0, len(hashes)) == keys[:3 * S]
    assert memo.leading(R, hashes, 5, len(hashes)) == keys[5:3 * S]
    assert memo.leading(R, hashes, 0, 2 * S + 3) == keys[:2 * S]
    other = hashes[:2 * S - 1] + [_h(10**9)] + hashes[2 * S:]   # segment 1 differs
    assert memo.leading(R, other, 0, len(other)) == keys[:S]
    assert memo.leading(bytes(range(16)), hashes, 0, len(hashes)) == []   # another root
    memo.clear()
    assert len(memo) == 0 and memo.leading(R, hashes, 0, len(hashes)) == []


def test_key_memo_holds_no_more_keys_than_its_bound_whatever_the_roots():
    """Segments of one prompt share one copy of its keys: a segment replaced
    under another root would leave the rest of that copy held by its siblings
    (found by a review: 32x the bound with two roots alternating on prompts of
    shrinking length)."""
    S = KeyMemo.SEGMENT
    memo = KeyMemo(1 << 12)
    hashes = [_h(i) for i in range(64 * S)]
    for t in range(64):
        n = (64 - t) * S
        root = bytes([t % 2]) * 16
        memo.remember(root, hashes, [_k(10**6 * t + i) for i in range(n)], 0, n)
    held = {id(v[1]): len(v[1]) for gen in (memo._young, memo._old) for v in gen.values()}
    assert sum(held.values()) <= 2 * len(memo) + 64 * S
