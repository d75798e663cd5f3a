import math

from kvtier.cache.tier import EVICT_CAPACITY, EVICT_TTL, Tier


def test_lru_within_capacity():
    evicted = []
    t = Tier("dram", capacity=3, on_evict=lambda k, e, c: evicted.append((k, c)))
    for i, k in enumerate("abc"):
        t.add(k, 1, now=i)
    t.touch("a", now=3)                       # b is now least recently used
    t.add("d", 1, now=4)
    assert evicted == [("b", EVICT_CAPACITY)]
    assert set(t.keys()) == {"a", "c", "d"} and t.used == 3


def test_ttl_runs_from_last_use_and_expired_is_never_served():
    t = Tier("disk", capacity=100, ttl=10)
    t.add("a", 1, now=0)
    t.add("b", 1, now=0)
    assert t.touch("a", now=9)
    assert t.get("b", now=10) is None         # idle for exactly the TTL: gone
    assert t.get("a", now=18) is not None     # used at 9: alive until 19
    assert t.expire(now=19) == 1 and len(t) == 0
    assert t.stats.evictions[EVICT_TTL] == 2


def test_pinned_entries_are_not_evicted():
    t = Tier("dram", capacity=2)
    t.add("a", 1, now=0, pinned=True)
    t.add("b", 1, now=1)
    assert t.add("c", 1, now=2) is not None   # evicts b, not the pinned a
    assert "a" in t and "b" not in t
    t.pin("c")
    assert t.add("d", 1, now=3) is None        # everything pinned: refused
    assert t.stats.rejected == 1
    t.unpin("a")
    assert t.add("d", 1, now=4) is not None and "a" not in t


def test_sized_entries_and_too_big():
    t = Tier("disk", capacity=10)
    assert t.add("big", 11, now=0) is None
    t.add("a", 6, now=0)
    t.add("b", 6, now=1)                       # a goes
    assert list(t.keys()) == ["b"] and t.used == 6


def test_time_never_goes_back():
    t = Tier("x", capacity=5, ttl=10)
    t.add("a", 1, now=100)
    t.add("b", 1, now=50)                      # clamped to 100
    assert t.peek("b").last_use == 100
    assert math.isinf(Tier("y", 1).ttl)
