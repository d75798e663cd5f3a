"""The block lifecycle state machine on its own (no vLLM, no I/O)."""

import pytest

from kvtier.cache.ledger import Ledger, State

REC = 100


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_a_fill_holds_its_block_until_it_resolves():
    L = Ledger(num_slots=2, disk_bytes=0, record_size=REC)
    a = L.begin_store(k(1), 0)
    assert a.state is State.STORING and a.pins == 1
    assert L.servable(k(1), 0) is None          # not ready: never served
    b = L.begin_store(k(2), 0)
    assert L.begin_store(k(3), 0) is None       # both slots held by fills: no room
    L.end_store(a, True)
    assert L.servable(k(1), 0) == "dram" and a.pins == 0
    c = L.begin_store(k(3), 1)                  # evicts k(1), the only unpinned block
    assert c is not None and c.slot == a.slot and L.servable(k(1), 1) is None
    L.end_store(b, False)                       # a failed fill: gone, its slot free
    assert L.servable(k(2), 1) is None and len(L.dram) == 1
    L.check()


def test_a_dropped_pinned_block_leaves_the_index_but_keeps_its_slot():
    L = Ledger(num_slots=2, disk_bytes=0, record_size=REC)
    a = L.begin_stage(k(1), 0)
    L.pin(a)                                    # a load joined the read
    L.end_stage(a, False)                       # the read failed
    assert a.detached and L.servable(k(1), 0) is None
    again = L.begin_store(k(1), 0)              # the key can be stored anew...
    assert again is not None and again.slot != a.slot   # ...in another slot
    assert L.begin_store(k(2), 0) is None       # the detached slot is still held
    L.unpin_dram(a)                             # the joined load is done
    assert L.begin_store(k(2), 0) is not None
    L.check()


def test_what_a_load_can_read_is_what_lookups_find():
    """Lookups map keys through an index of the servable blocks: a read in
    flight (STAGING) is found, so a second load joins it; a failed read, a
    forgotten adoption, a removed record are not."""
    L = Ledger(num_slots=4, disk_bytes=4 * REC, record_size=REC)
    a = L.begin_stage(k(1), 0)
    assert L.locate_many([k(1), k(2)], 0) == [a, None]
    L.check()
    L.end_stage(a, False)
    assert L.locate_many([k(1)], 0) == [None]
    r = L.adopt(k(2), 0, 0, remote=True)
    assert L.locate_many([k(2)], 0) == [r]
    L.forget_adopted(r)
    assert L.locate_many([k(2)], 0) == [None]
    w, _ = L.begin_write(k(3), 0)
    assert L.locate_many([k(3)], 0) == [None]   # WRITING: not yet
    L.end_write(w, True)
    assert L.locate_many([k(3)], 0) == [w]
    L.drop_disk(w)
    assert L.locate_many([k(3)], 0) == [None]
    L.check()


def test_a_write_takes_over_the_file_of_the_block_it_evicts():
    L = Ledger(num_slots=4, disk_bytes=2 * REC, record_size=REC)
    for i in (1, 2):
        w, reuse = L.begin_write(k(i), i)
        assert reuse is None
        L.end_write(w, True)
    w, reuse = L.begin_write(k(3), 3)
    assert reuse == k(1)                        # the LRU record's file
    assert not L.writable(k(1))                 # until every rank consumed it
    assert L.disk.used + L.held_disk <= 2 * REC and not L.take_removals()
    L.end_write(w, True)
    assert L.writable(k(1))
    L.check()


def test_expired_and_dropped_records_count_until_removed():
    L = Ledger(num_slots=2, disk_bytes=2 * REC, record_size=REC, ttl=10)
    w, _ = L.begin_write(k(1), 0)
    L.end_write(w, True)
    L.expire(10)
    assert L.take_removals() == [k(1)] and L.held_disk == REC
    assert not L.writable(k(1)) and L.adopt(k(1), 9, 10) is None
    w, reuse = L.begin_write(k(2), 10)
    assert reuse is None and w is not None
    assert L.begin_write(k(3), 10) == (None, None)   # the removal still holds its bytes
    L.removed(k(1))
    assert L.held_disk == 0 and L.writable(k(1))
    L.check()


def test_recovery_keeps_the_newest_that_fit_and_never_moves_the_clock():
    L = Ledger(num_slots=2, disk_bytes=2 * REC, record_size=REC, ttl=60)
    expired, excess = L.recover({k(1): 10.0, k(2): 50.0, k(3): 90.0, k(4): 10_000.0}, now=100)
    assert (expired, excess) == (1, 1)          # k(1) is older than the TTL; k(2) does not fit
    assert sorted(L.take_removals()) == sorted([k(1), k(2)])
    assert {key for _, b in L.blocks() for key in [b.key]} == {k(3), k(4)}
    assert L.disk.peek(k(4)).last_use == 100    # the future counts as now
    L.expire(150)
    assert L.servable(k(3), 150) is None and L.servable(k(4), 150) == "disk"
    L.check()


def test_adopt_never_evicts():
    L = Ledger(num_slots=2, disk_bytes=REC, record_size=REC)
    w, _ = L.begin_write(k(1), 0)
    L.end_write(w, True)
    assert L.adopt(k(2), 0, 1) is None
    assert L.servable(k(1), 1) == "disk"


def test_scratch_slots_evict_lru_and_count_as_held():
    L = Ledger(num_slots=3, disk_bytes=0, record_size=REC)
    blocks = [L.begin_store(k(i), i) for i in range(3)]
    for b in blocks:
        L.end_store(b, True)
    L.pin(blocks[2])
    got = L.take_scratch(3, 5)
    assert len(got) == 2 and L.held_slots == 2   # the pinned block stays
    assert L.servable(k(2), 5) == "dram"
    L.give_scratch(got)
    assert L.held_slots == 0
    L.check()


@pytest.mark.parametrize("bad", ["double_unpin"])
def test_misuse_is_caught(bad):
    L = Ledger(num_slots=1, disk_bytes=0, record_size=REC)
    b = L.begin_store(k(1), 0)
    L.end_store(b, True)
    with pytest.raises(AssertionError):
        L.unpin_dram(b)


def test_the_disk_budget_changes_at_run_time():
    """A shared store's share (kvtier.store.budget) moves: a smaller budget evicts
    LRU now, never a pinned or kept block (the budget set is then at least theirs)."""
    L = Ledger(4, 10 * REC, REC, max_kept_bytes=10 * REC)
    blocks = []
    for i in range(10):
        b, _ = L.begin_write(k(i), float(i))
        L.end_write(b, True)
        blocks.append(b)
    pinned = L.pin(blocks[1])                       # an old block a read still holds
    assert L.keep(k(2), 100.0, "t", 10.0)           # an old block kept until t=100
    assert L.set_disk_budget(4 * REC, 20.0) == 4 * REC
    gone = L.take_removals()
    assert len(gone) == 6 and k(1) not in gone and k(2) not in gone   # LRU, pinned/kept stay
    for key in gone:
        L.removed(key)
    L.check()
    assert L.disk.used == 4 * REC
    L.unpin_disk(pinned)
    assert L.set_disk_budget(REC, 21.0) == REC      # the kept one stays: its size at least
    for key in L.take_removals():
        L.removed(key)
    L.check()
    assert L.servable(k(2), 21.0) == "disk" and L.disk.used == REC
    assert L.set_disk_budget(0, 22.0) == REC        # never below what is kept
    assert L.set_disk_budget(10 * REC, 23.0) == 10 * REC
    b, victim = L.begin_write(k(99), 24.0)
    assert b is not None and victim is None         # room again: no eviction


def _apply(L: Ledger, kind: str, key: bytes, now: float, ttl: float, pinned: list) -> None:
    """One operation of the random sequences below (``pinned``: the pins held)."""
    if kind == "store" and (b := L.begin_store(key, now, ttl=ttl)) is not None:
        L.end_store(b, True)
    elif kind == "write":
        b, _ = L.begin_write(key, now, ttl=ttl)
        if b is not None:
            L.end_write(b, True)
            for gone in L.take_removals():   # the sweeper's work, done
                L.removed(gone)
    elif kind == "touch":
        L.touch(key, now, ttl)
    elif kind == "keep":
        L.touch(key, now, ttl)
        L.keep(key, now + max(ttl, 10.0), "t", now)
    elif kind == "pin" and (b := L.locate(key, now)) is not None:
        pinned.append((b[0], L.pin(b[1])))
    elif kind == "unpin" and pinned:
        tier, b = pinned.pop()
        (L.unpin_dram if tier == "dram" else L.unpin_disk)(b)


def test_locate_many_serves_what_the_per_key_ttl_check_serves():
    """``locate_many`` skips the per-key TTL check when a tier's least recently
    used entry is live: it must answer exactly what checking every key answers,
    whatever the stores, writes, uses, pins and longer per-entry TTLs were."""
    from hypothesis import given, settings, strategies as st

    op = st.tuples(st.sampled_from(["store", "write", "touch", "pin", "unpin"]),
                   st.integers(0, 7), st.floats(0, 4), st.sampled_from([0.0, 0.0, 25.0]))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(op, max_size=40), st.floats(0, 40))
    def run(ops, wait):
        L = Ledger(8, 8 * REC, REC, ttl=10.0)
        now, pinned = 0.0, []
        for kind, i, dt, ttl in ops:
            now += dt
            _apply(L, kind, k(i), now, ttl, pinned)
        now += wait
        keys = [k(i) for i in range(8)]

        def checked(key):   # Tier.live per key and tier: the TTL checked every time
            e = L.dram.live(key, now)
            if e is not None and e.value.state in (State.READY, State.STAGING):
                return e.value
            e = L.disk.live(key, now)
            return e.value if e is not None and e.value.state is State.READY else None
        assert L.locate_many(keys, now) == [checked(key) for key in keys]
    run()


def test_lru_order_is_last_use_order_and_expire_leaves_nothing_expired():
    """What ``all_live`` and ``expire`` rely on, under capacity pressure with
    keeps (a scan moves a kept entry it walks past to the MRU end, as used),
    pins and longer per-entry TTLs: each tier's entries stay in last-use order,
    and after ``expire(now)`` no unpinned entry is expired (``expire`` skips its
    walk until one may be); lookups answer what per-key checks answer."""
    from hypothesis import given, settings, strategies as st

    op = st.tuples(st.sampled_from(["store", "write", "touch", "pin", "unpin", "keep", "expire"]),
                   st.integers(0, 11), st.floats(0, 1.5), st.sampled_from([0.0, 0.0, 25.0]))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(op, max_size=60), st.floats(0, 40))
    def run(ops, wait):
        L = Ledger(6, 6 * REC, REC, ttl=10.0, max_kept_bytes=3 * REC)
        now, pinned = 0.0, []

        def check():
            for tier in (L.dram, L.disk):
                uses = [e.last_use for e in tier._entries.values()]
                assert uses == sorted(uses), (tier.name, uses)
            L.expire(now)
            for tier in (L.dram, L.disk):
                assert not [key for key, e in tier._entries.items() if tier.expired(e, now)]
            L.check()
        for kind, i, dt, ttl in ops:
            now += dt
            if kind == "expire":
                check()
            else:
                _apply(L, kind, k(i), now, ttl, pinned)
        now += wait
        check()
    run()


def test_a_block_dropped_while_its_fill_is_in_flight_is_never_served():
    """The fill still ends (ok: its bytes arrived), but the block was dropped:
    it must not come back, neither from the slot another key then takes nor
    from a file on its way out. (Found by a review: the index of servable
    blocks took it back.)"""
    L = Ledger(num_slots=2, disk_bytes=4 * REC, record_size=REC)
    L.track = True
    a = L.begin_store(k(1), 0)
    L.drop_dram(a)
    L.end_store(a, True)
    assert L.locate(k(1), 0) is None
    b = L.begin_store(k(2), 0)                  # may take a's slot: k(1) must not follow
    L.end_store(b, True)
    assert L.locate(k(1), 0) is None and L.locate(k(2), 0) == ("dram", b)
    s = L.begin_stage(k(3), 0)
    L.drop_dram(s)
    again = L.begin_store(k(3), 0)              # stored anew meanwhile
    L.end_stage(s, True)
    assert L.locate(k(3), 0) is None            # not the dropped read's block
    L.end_store(again, True)
    assert L.locate(k(3), 0) == ("dram", again)
    w, _ = L.begin_write(k(5), 0)
    L.drop_disk(w)
    L.end_write(w, True)
    assert L.locate(k(5), 0) is None and k(5) in L.take_removals()
    assert not [c for c in L.take_changes() if c[0] and c[2].detached]   # no arrival event
    L.check()
