"""The cluster tier (issue 19) on the real scheduler and workers (tests.sim.MiniEngine:
TP=2, real DiskStores) and a real Mooncake Store on loopback (a master and a
dedicated storage client, tests.cluster):

- engine B, on a disk of its own, loads what engine A stored, from the cluster;
  every loaded page holds exactly its block's bytes (MiniEngine checks them); the
  hit is counted as the remote tier's, and the record is kept on B's disk (a later
  hit reads it there);
- a corrupted value and a foreign one (another block's genuine record) in the
  cluster are rejected, recomputed, counted, and taken out of the cluster;
- a dead master costs a lookup at most lookup_timeout_ms, an error is counted, the
  tier is skipped while it backs off, and it is used again once the master is back.
"""

import time

import numpy as np
import pytest

from kvtier.config import RemoteConfig
from kvtier.store.record import HEADER_BYTES
from kvtier.store.remote import RemoteStore
from tests.cluster import needs_mooncake
from tests.conftest import needs_vllm
from tests.sim import BS, PAYLOAD, MiniEngine

pytestmark = [needs_vllm, needs_mooncake]

PREFIX = list(range(9000, 9000 + 6 * BS))


def connected(cfg, timeout: float = 30.0) -> RemoteStore:
    store = RemoteStore.of(RemoteConfig.parse(cfg))
    end = time.monotonic() + timeout
    while not store.connected:
        assert time.monotonic() < end, "no connection to the Mooncake master"
        time.sleep(0.05)
    return store


def two_engines(tmp_path, mooncake, secret, **remote):
    cfg = mooncake.remote(**remote)
    connected(cfg)
    a = MiniEngine(tmp_path / "a", remote=cfg, secret_file=secret)
    b = MiniEngine(tmp_path / "b", remote=cfg, secret_file=secret)
    return a, b


def served(e: MiniEngine, rid: str, tokens: list[int]) -> None:
    e.add(rid, tokens)
    e.settle()
    e.drain()
    e.check()


def test_another_engine_loads_the_prefix_from_the_cluster(tmp_path, mooncake, secret):
    a, b = two_engines(tmp_path, mooncake, secret)
    served(a, "seed", PREFIX + [1])
    assert a.sched.stats.counter("kvtier_stored_blocks_total", tier="remote") == 6
    served(b, "again", PREFIX + [2])             # B's disk and DRAM are empty
    stats = b.sched.stats
    assert stats.counter("kvtier_hit_tokens_total", tier="remote") == 6 * BS
    assert b.hits["loaded_ok"] == 6 * BS and b.load_failures == 0
    assert b.reports["again"]["kvtier"]["cached_tokens"]["remote"] == 6 * BS
    # Read through to B's disk: after a restart (DRAM empty) B loads it from disk.
    b.restart()
    served(b, "third", PREFIX + [3])
    assert b.sched.stats.counter("kvtier_hit_tokens_total", tier="disk") == 6 * BS
    assert b.sched.stats.counter("kvtier_hit_tokens_total", tier="remote") == 0


def put_value(mooncake, name: str, value: np.ndarray) -> None:
    c = mooncake.client()
    c.remove(name, True)
    assert c.put(name, value.tobytes()) == 0


@pytest.mark.parametrize("fault", ["corrupt", "foreign"])
def test_a_bad_value_in_the_cluster_is_rejected_and_recomputed(tmp_path, mooncake, secret,
                                                                fault):
    a, b = two_engines(tmp_path, mooncake, secret)
    served(a, "seed", PREFIX + [1])
    keys = a.keys("seed")
    store = a.workers[0].store
    victim = store.remote_name(keys[3])
    record = np.frombuffer(store.path(keys[3]).read_bytes(), dtype=np.uint8).copy()
    if fault == "corrupt":   # a flipped payload byte: the checksum fails
        record[HEADER_BYTES + PAYLOAD // 2] ^= 0xFF
        reason = "checksum"
    else:                    # block 4's genuine record under block 3's name
        record = np.frombuffer(store.path(keys[4]).read_bytes(), dtype=np.uint8).copy()
        reason = "wrong_key"
    put_value(mooncake, victim, record)
    served(b, "again", PREFIX + [2])            # check(): no page holds wrong KV
    stats = b.sched.stats
    assert stats.counter("kvtier_load_failures_total", reason=reason) == 1
    assert b.load_failures == 3                 # blocks 3..5 recomputed, 0..2 loaded
    assert b.hits["loaded_ok"] == 3 * BS
    # Taken out of the cluster; B recomputed the block and published it again: the
    # value there now is the genuine record.
    value = np.frombuffer(mooncake.client().get(victim), dtype=np.uint8).copy()
    store.check(keys[3], value, PAYLOAD, value.size)


def test_a_dead_master_is_a_bounded_miss_and_the_tier_comes_back(tmp_path, mooncake, secret):
    a, b = two_engines(tmp_path, mooncake, secret, lookup_timeout_ms=200, retry_seconds=1)
    served(a, "seed", PREFIX + [1])
    mooncake.kill_master()
    t0 = time.monotonic()
    served(b, "down", PREFIX + [2])             # recomputed: the cluster does not answer
    took = time.monotonic() - t0
    stats = b.sched.stats
    assert stats.counter("kvtier_remote_errors_total", op="lookup") >= 1
    assert stats.counter("kvtier_hit_tokens_total", tier="remote") == 0
    assert took < 3.0, f"a dead master cost {took:.1f} s"   # one 0.2 s lookup, then skips
    mooncake.start_master()                     # empty: a new master knows no records

    def published() -> float:
        return a.sched.stats.counter("kvtier_stored_blocks_total", tier="remote")
    deadline = time.monotonic() + 60
    for n in range(1000):                       # A publishes again once reconnected
        fresh = list(range(20000 + 1000 * n, 20000 + 1000 * n + 4 * BS))
        before = published()
        served(a, f"fresh{n}", fresh + [1])
        if published() - before == 4:
            break
        assert time.monotonic() < deadline, "A never published to the new master"
        time.sleep(0.5)
    served(b, "back", fresh + [2])
    assert b.sched.stats.counter("kvtier_hit_tokens_total", tier="remote") == 4 * BS


def test_blocks_past_a_hole_in_the_cluster_are_stored_by_the_engine_that_computes_them(
        tmp_path, mooncake, secret):
    a, b = two_engines(tmp_path, mooncake, secret)
    served(a, "seed", PREFIX + [1])
    keys = a.keys("seed")
    c = mooncake.client()

    def drop(i):
        for w in a.workers:
            assert c.remove(w.store.remote_name(keys[i]), True) == 0
    drop(2)                                     # the cluster lost block 2
    served(b, "again", PREFIX + [2])            # 0..1 from the cluster, 2..5 computed
    assert b.hits["loaded_ok"] == 2 * BS
    for i in (3, 4, 5):                         # ... and B's own now: gone from the cluster,
        drop(i)                                 # B still has them after a restart
    b.drain()
    b.sched.drain_sweeper()
    b.restart()
    served(b, "third", PREFIX + [3])
    assert b.sched.stats.counter("kvtier_hit_tokens_total", tier="disk") == 6 * BS
    assert b.load_failures == 0


def test_a_hung_master_costs_a_lookup_its_budget_then_the_tier_is_skipped(tmp_path, mooncake,
                                                                           secret):
    import signal
    a, b = two_engines(tmp_path, mooncake, secret, lookup_timeout_ms=200, retry_seconds=30)
    served(a, "seed", PREFIX + [1])
    mooncake.master.send_signal(signal.SIGSTOP)   # alive but silent: calls wait ~30 s
    try:
        t0 = time.monotonic()
        for n in range(3):
            served(b, f"hung{n}", PREFIX + [2 + n])   # recomputed, the first after 0.2 s
        took = time.monotonic() - t0
    finally:
        mooncake.master.send_signal(signal.SIGCONT)
    assert b.sched.stats.counter("kvtier_remote_errors_total", op="lookup") == 1
    assert took < 5.0, f"three requests took {took:.1f} s with the master hung"
    # B's own records of the prefix went to its disk only while the tier was skipped,
    # and say so (6 blocks on each of 2 ranks).
    assert b.sched.stats.counter("kvtier_skipped_stores_total", reason="remote_unavailable") == 12
