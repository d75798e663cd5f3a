"""Retention as a contract: per-request TTLs and pins, in the tier, the ledger and
the scheduler (tests.sim: real scheduler and workers)."""

import math

import pytest

from kvtier.cache.ledger import Ledger
from kvtier.cache.retention import duration, retention_of
from kvtier.cache.tier import Tier

REC = 100


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.mark.parametrize("value,seconds", [(300, 300), ("300", 300), ("5m", 300), ("1h", 3600),
                                           ("1.5h", 5400), ("250ms", 0.25), ("inf", math.inf)])
def test_durations(value, seconds):
    assert duration(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "", -1, 0, True, None, "1y"])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        duration(value)


def test_a_request_gets_at_least_the_default_and_at_most_the_cap():
    assert retention_of(None, 60, 3600).ttl == 60
    assert retention_of({"kvtier": {"ttl": "5m"}}, 60, 3600).ttl == 300
    assert retention_of({"kvtier": {"ttl": "10s"}}, 60, 3600).ttl == 60     # never shorter
    assert retention_of({"kvtier": {"ttl": "1d"}}, 60, 3600).ttl == 3600    # capped
    r = retention_of({"kvtier": {"pin": True}}, 60, 3600)
    assert r.pin and r.ttl == 60 and not r.error
    for bad in ({"kvtier": {"ttl": "soon"}}, {"kvtier": {"pin": "yes"}}, {"kvtier": 5},
                {"kvtier": {"ttl": 60, "forever": True}}):
        r = retention_of(bad, 60, 3600)
        assert r.error and r.ttl == 60 and not r.pin   # served on the defaults, said why


def test_an_entry_lives_its_own_ttl_and_the_scan_still_finds_the_expired():
    t = Tier("t", capacity=10, ttl=10)
    t.add("long", 1, 0, ttl=100)
    t.add("short", 1, 1)
    assert t.expire(20) == 1 and "long" in t and "short" not in t
    assert t.live("long", 99) is not None and t.live("long", 100) is None
    t.touch("long", 50, ttl=5)           # a shorter ask never shortens it
    assert t.live("long", 149) is not None


def test_a_kept_entry_is_not_an_lru_victim_until_its_time():
    t = Tier("t", capacity=2, ttl=1000)
    t.add("kept", 1, 0).keep_until = 50
    t.add("a", 1, 1)
    assert t.add("b", 1, 2) is not None and "kept" in t and "a" not in t
    assert t.add("c", 1, 60) is not None and "kept" not in t   # its time is over


def test_keeps_stay_within_the_budget_overall_and_per_tenant():
    L = Ledger(num_slots=8, disk_bytes=10 * REC, record_size=REC,
               max_kept_bytes=3 * REC, max_kept_bytes_per_tenant=2 * REC)
    for i in range(6):
        w, _ = L.begin_write(k(i), 0)
        L.end_write(w, True)
    assert L.keep(k(0), 100, "a", 0) and L.keep(k(1), 100, "a", 0)
    assert L.keep(k(2), 100, "a", 0) is False          # tenant a is at its budget
    assert L.keep(k(2), 100, "b", 0) is True
    assert L.keep(k(3), 100, "b", 0) is False          # the whole budget is spent
    assert L.keep(k(0), 200, "a", 0) is True            # extending a keep costs nothing
    assert L.keep(k(99), 100, "a", 0) is None          # no such block
    assert L.kept_by_tenant(150) == {"a": REC}          # k(1), k(2) kept until 100 only
    L.check()


def test_a_pinned_prefix_survives_a_flood_that_evicts_an_unpinned_one(tmp_path):
    pytest.importorskip("vllm")
    from tests.sim import BS, MiniEngine
    e = MiniEngine(tmp_path, tp=1, pages=80, slots=40, disk_records=12,
                   max_pinned_bytes="1MiB")
    pinned, plain = [list(range(s, s + 4 * BS)) for s in (1000, 2000)]
    e.add("pin", pinned + [1], kvtier={"ttl": "1h", "pin": True})
    e.add("plain", plain + [1])
    e.settle()
    for i in range(4):                                   # 16 new blocks > the 12 on disk
        e.add(f"flood{i}", list(range(10000 * (i + 1), 10000 * (i + 1) + 4 * BS)) + [1])
        e.settle()
    e.restart()                                          # only the disk remembers
    hits = {}
    for name, toks in (("pin", pinned), ("plain", plain)):
        before = e.hits["loaded_ok"]
        e.add(name + "2", toks + [2])
        e.settle()
        hits[name] = e.hits["loaded_ok"] - before
    assert hits == {"pin": 4 * BS, "plain": 0}
    assert e.reports["pin"]["kvtier"]["pinned"] is True
    assert e.reports["pin"]["kvtier"]["ttl_seconds"] == 3600
    e.check()


def test_a_pin_over_budget_is_refused_and_the_request_served(tmp_path):
    pytest.importorskip("vllm")
    from tests.sim import BS, MiniEngine
    e = MiniEngine(tmp_path, tp=1, pages=80, slots=40, disk_records=40,
                   max_pinned_bytes=2 * 8192)            # two records
    e.add("big", list(range(4 * BS)) + [1], kvtier={"pin": True})
    e.settle()
    r = e.reports["big"]["kvtier"]
    assert r["pinned"] is False and r["pin_refused_blocks"] == 2 and r["stored_tokens"] == 4 * BS
    assert e.sched.stats.counter("kvtier_pins_refused_total") == 2
    e.check()


def test_a_keep_ends_at_its_latest_time_and_belongs_to_its_block():
    """Keeps end when their (extended) time is over; a block dropped while kept
    and written again carries its own keep, not the dropped block's end."""
    L = Ledger(num_slots=8, disk_bytes=10 * REC, record_size=REC, max_kept_bytes=10 * REC)
    blocks = {}
    for i in range(3):
        w, _ = L.begin_write(k(i), 0)
        L.end_write(w, True)
        blocks[i] = w
    for i in range(3):
        assert L.keep(k(i), 100, "a", 0)
    assert L.keep(k(1), 300, "a", 50)                   # extended
    L.drop_disk(blocks[2])                              # kept, then gone...
    L.removed(k(2))
    w, _ = L.begin_write(k(2), 60)                      # ...and written again
    L.end_write(w, True)
    assert L.keep(k(2), 400, "a", 60)
    assert L.kept_by_tenant(150) == {"a": 2 * REC}      # k(1) until 300, the new k(2) 400
    assert L.kept_by_tenant(350) == {"a": REC}
    assert L.kept_by_tenant(450) == {}
    L.check()


def test_a_pinned_record_never_used_again_expires_at_its_ttl_under_write_pressure():
    """A scan that passes a kept record moves it to the MRU end; it still
    expires when its TTL since its last use ends (found by a review: moved as
    used, it lived up to twice its TTL)."""
    L = Ledger(num_slots=4, disk_bytes=3 * REC, record_size=REC, ttl=10.0,
               max_kept_bytes=3 * REC)
    w, _ = L.begin_write(k(0), 0.0, ttl=25.0)
    L.end_write(w, True)
    assert L.keep(k(0), 25.0, "t", 0.0)
    t, i = 0.0, 1
    while t < 24:                                        # writes walk past it
        t += 0.9
        b, _ = L.begin_write(k(i), t)
        if b is not None:
            L.end_write(b, True)
        for key in L.take_removals():
            L.removed(key)
        i += 1
    assert L.disk.peek(k(0)).last_use > 20              # walked past: moved, "used" late
    assert L.servable(k(0), 24.9) == "disk"
    assert L.servable(k(0), 25.0) is None               # its TTL is over: never served
    L.expire(25.0)
    assert k(0) not in L.disk
    L.check()
