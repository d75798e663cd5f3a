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


def test_a_kept_entry_a_scan_walks_past_moves_to_the_mru_end_as_used():
    """Else every write into a full tier walks every kept entry at the LRU end
    (20,000 kept records: 2.2 ms a write); moved as used, LRU order stays
    last-use order (what all_live and expire rely on)."""
    t = Tier("disk", capacity=3, ttl=100)
    t.add("kept", 1, now=0).keep_until = 50
    t.add("a", 1, now=1)
    t.add("b", 1, now=2)
    t.add("c", 1, now=3)                       # walks past kept, evicts a
    assert list(t.keys()) == ["b", "kept", "c"]
    uses = [t.peek(k).last_use for k in t.keys()]
    assert uses == sorted(uses) == [2, 3, 3]
    t.add("d", 1, now=60)                      # kept is over: an LRU victim again
    assert "b" not in t and "kept" in t
    t.add("e", 1, now=61)
    assert "kept" not in t


def test_expire_walks_again_once_an_entry_may_have_expired():
    """``expire`` skips its walk until the earliest time an entry it walked may
    expire, a pinned one included: unpinned past its TTL, it goes at the next call."""
    t = Tier("disk", capacity=10, ttl=10)
    t.add("pinned", 1, now=0, pinned=True)
    t.add("long", 1, now=1, ttl=100)
    t.add("b", 1, now=5)
    assert t.expire(12) == 0                   # pinned is past its TTL: held
    t.unpin("pinned")
    assert t.expire(13) == 1 and "pinned" not in t
    walks = []

    class Counted(type(t._entries)):
        def items(self):
            walks.append(1)
            return super().items()
    t._entries = Counted(t._entries)
    assert t.expire(14) == 0 and not walks     # nothing may expire before b (15)
    assert t.expire(15) == 1 and list(t.keys()) == ["long"] and walks
    t.add("new", 1, now=16)
    assert t.expire(25) == 0 and t.expire(26) == 1 and list(t.keys()) == ["long"]
    assert t.expire(100) == 0 and t.expire(101) == 1 and len(t) == 0
