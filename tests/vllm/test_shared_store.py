"""A store no one can poison, shared by engines (issue 18), on the real
scheduler and workers (tests.sim.MiniEngine: TP=2, a real DiskStore):

- a record planted without the secret (right key, right header fields, valid
  checksums: what anyone who can write the directory can make) is a miss,
  counted (``kvtier_bad_mac_records_total``), recomputed, never served; the
  same plant on a store without a secret *is* served (the negative control);
- two engines on one shared store: a tenant's prefix (``cache_salt``) written
  by one engine is a miss for another tenant on the other engine, and a hit for
  the same tenant there (so the miss is the salt's doing, not the store's);
- an unsafe store directory stops the engine's start-up with a clear error.
"""


import numpy as np
import pytest
import xxhash

from kvtier.store.record import HEADER_BYTES, pack_header, parse_header
from kvtier.store.safety import UnsafeStore
from tests.conftest import needs_vllm
from tests.sim import BS, PAYLOAD, MiniEngine

pytestmark = needs_vllm

PREFIX = list(range(7000, 7000 + 6 * BS))


def plant(e: MiniEngine, key: bytes, rank: int = 0) -> None:
    """Overwrite ``key``'s record on ``rank`` with a forgery: the header fields
    read from the real file (names and sizes are no secret), another payload,
    checksums recomputed, no MAC (the forger has no secret)."""
    store = e.workers[rank].store
    path = store.path(key)
    real = np.frombuffer(path.read_bytes(), dtype=np.uint8).copy()
    h = parse_header(real)
    real[HEADER_BYTES:HEADER_BYTES + PAYLOAD] = np.random.default_rng(5).integers(
        0, 256, PAYLOAD, dtype=np.uint8)
    pack_header(real, h.namespace, h.key, h.rank, h.tp_size, h.payload_len,
                xxhash.xxh3_64_intdigest(real[HEADER_BYTES:HEADER_BYTES + PAYLOAD]), h.created)
    path.write_bytes(real.tobytes())


def stored_then_planted(tmp_path, **kw) -> tuple[MiniEngine, bytes]:
    e = MiniEngine(tmp_path, **kw)
    e.add("seed", PREFIX + [1])
    e.settle()
    e.drain()
    key = e.keys("seed")[2]
    e.restart()                                   # DRAM empty: the prefix loads from disk
    plant(e, key)
    e.add("again", PREFIX + [2])
    e.settle()
    return e, key


def test_a_planted_record_is_a_counted_miss_and_recomputed(tmp_path, secret):
    e, key = stored_then_planted(tmp_path, shared=True, secret_file=secret)
    e.check()                                     # no wrong KV anywhere
    stats = e.sched.stats
    assert stats.counter("kvtier_bad_mac_records_total") == 1
    assert stats.counter("kvtier_load_failures_total", reason="bad_mac") == 1
    assert stats.counter("kvtier_checksum_failures_total") == 1
    assert e.load_failures == 4                   # blocks 2..5 recomputed, 0..1 loaded
    # The forgery is gone; the recomputed block was stored again, genuine.
    e.drain()
    e.sched.drain_sweeper()
    e.add("third", PREFIX + [3])
    e.settle()
    e.check()
    assert e.load_failures == 4
    assert e.sched.stats.counter("kvtier_bad_mac_records_total") == 1


def test_negative_control_without_a_secret_the_plant_is_served(tmp_path):
    e, _ = stored_then_planted(tmp_path)
    assert e.violations and all("wrong KV" in v for v in e.violations), e.violations
    assert e.sched.stats.counter("kvtier_bad_mac_records_total") == 0


def test_two_engines_on_one_store_keep_tenants_apart(tmp_path, secret):
    common = dict(shared=True, secret_file=secret)
    a = MiniEngine(tmp_path, **common)
    b = MiniEngine(tmp_path, **common)           # the same store: tmp_path / "store"
    assert a.cfg.disk_path == b.cfg.disk_path
    a.add("a-tenant-a", PREFIX + [1], salt="tenant-a")
    a.settle()
    a.drain()
    a.sched.drain_sweeper()
    b.add("b-tenant-b", PREFIX + [2], salt="tenant-b")
    b.settle()
    assert b.hits["tokens"] == 0                  # tenant-a's prefix: a miss for tenant-b
    b.add("b-tenant-a", PREFIX + [3], salt="tenant-a")
    b.settle()
    assert b.hits["loaded_ok"] == len(PREFIX)     # the same tenant: a hit on the other engine
    for e in (a, b):
        e.check()


def test_an_unsafe_store_directory_stops_start_up(tmp_path):
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    store.chmod(0o777)
    with pytest.raises(UnsafeStore, match=rf"{store} is world-writable.*chmod 0700"):
        MiniEngine(tmp_path)
    store.chmod(0o700)
    MiniEngine(tmp_path).check()
