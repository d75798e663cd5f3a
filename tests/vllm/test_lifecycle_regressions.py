"""Regression tests of the lifecycle review's findings (issue: trust under
concurrency), each on the real scheduler and real workers (tests.sim.MiniEngine,
TP=2 unless said) or the real store. Numbers refer to the review's items."""

import os
import threading
import time

import pytest

from kvtier.cache.groups import KVGroup
from tests.conftest import needs_vllm
from tests.sim import BS, MiniEngine

pytestmark = needs_vllm

PREFIX = list(range(5000, 5000 + 6 * BS))


def stored_prefix(tmp_path, tokens=PREFIX, after_slots=None, **kw) -> MiniEngine:
    """An engine whose disk holds ``tokens``' blocks, restarted: DRAM is empty
    (``after_slots``: the DRAM size after the restart)."""
    e = MiniEngine(tmp_path, **kw)
    e.add("seed", tokens + [1])
    e.settle()
    e.drain()
    assert len(e.sched.ledger.disk) == len(tokens) // BS
    e.restart(slots=after_slots)
    return e


def ready_keys(e, tier):
    return {b.key for t, b in e.sched.ledger.blocks() if t == tier and b.state.value == "ready"}


def test_1_a_failed_shared_read_is_never_marked_good(tmp_path):
    """Two requests load the same disk blocks in one step; the first's read of
    block 0 fails on rank 1. No stale slot becomes a ready DRAM block, and the
    second request does not get the bytes rank 1 never read."""
    e = stored_prefix(tmp_path)
    e.fail(1, "read", "io")
    e.add("a", PREFIX + [2])
    e.add("b", PREFIX + [3])
    e.step()
    e.settle()
    e.check()
    assert e.load_failures == 12           # both recompute from block 0
    key0 = e.keys("a")[0]
    for w in e.workers:
        for t, b in e.sched.ledger.blocks():
            if t == "dram" and b.state.value == "ready":
                assert w._slot_key[b.slot] == b.key
    # an I/O error proves nothing against the record: it is kept and served again
    assert key0 in ready_keys(e, "disk")
    e.add("c", PREFIX + [4])
    e.settle()
    e.check()
    assert e.load_failures == 12


def test_2_concurrent_loads_of_one_prefix_share_one_read(tmp_path):
    """Eight sub-agents resend one system prompt after a restart, in one step:
    one read per block, every request served, no failure, no record lost."""
    e = stored_prefix(tmp_path, pages=80, slots=24)
    reads = []
    for w in e.workers:
        inner = w.store.read_batch
        w.store.read_batch = lambda items, inner=inner: (reads.extend(k for k, *_ in items),
                                                         inner(items))[1]
    for i in range(8):
        e.add(f"agent{i}", PREFIX + [10 + i])
    e.step()
    e.settle()
    e.check()
    assert e.load_failures == 0
    assert e.hits["loaded_ok"] == 8 * len(PREFIX)
    assert len(reads) == 2 * 6              # each block once per rank
    assert len(ready_keys(e, "disk")) == 6 and len(ready_keys(e, "dram")) == 6


def test_2_concurrent_loads_when_dram_is_full_of_pinned_blocks(tmp_path):
    """The same with a DRAM tier too small to stage the prefix: the loads stream."""
    e = stored_prefix(tmp_path, pages=80, after_slots=4)
    assert e.sched.ledger.num_slots == 4
    for i in range(8):
        e.add(f"agent{i}", PREFIX + [10 + i])
    e.settle()
    e.check()
    assert e.load_failures == 0 and e.hits["loaded_ok"] == 8 * len(PREFIX)
    assert len(ready_keys(e, "disk")) == 6


def test_3_a_dropped_block_is_stored_and_served_again(tmp_path):
    """A hot block whose shared read failed (dropped while another load held it)
    must come back: stored again from the recompute, served to the next turn."""
    e = stored_prefix(tmp_path)
    e.fail(0, "read", "checksum")        # proves the record bad: removed
    e.add("a", PREFIX + [2])
    e.add("b", PREFIX + [3])
    e.step()
    key0 = e.keys("a")[0]
    e.settle()
    e.add("c", PREFIX + [4])
    e.settle()
    e.check()
    assert key0 in ready_keys(e, "dram") and key0 in ready_keys(e, "disk")
    before = e.load_failures
    e.add("d", PREFIX + [5])
    e.settle()
    assert e.load_failures == before and e.hits["loaded_ok"] >= 6 * BS


def test_4_abort_during_a_reload_after_preemption(tmp_path):
    """A request stores, is preempted, reloads its blocks from kvtier, and the
    client disconnects mid-load (rank 1's completion a step late). vLLM must get
    exactly one release of the request: no engine crash, no page freed early."""
    e = MiniEngine(tmp_path, pages=40, slots=16)
    e.add("a", PREFIX + list(range(40)), max_tokens=4)
    e.step()                                # computed and stored
    e.step()                                # decoding
    e.preempt("a")
    e.hold_back = {1}                       # rank 1's answers come a step late
    e.step()                                # looked up again: loading from kvtier
    assert e.reqs["a"].status == "loading"
    e.abort("a")
    e.settle()
    e.check()
    e.sched.check_invariants(idle=True)


def test_5_an_expired_block_is_never_served(tmp_path):
    e = MiniEngine(tmp_path, ttl=3)
    e.add("a", PREFIX + [1])
    e.settle()
    e.drain()
    e.now += 5                              # past the TTL; the file is still there
    e.add("b", PREFIX + [2])
    e.settle()
    assert e.hits["tokens"] == 0
    e.check()


def test_6_a_hot_prefix_survives_a_restart(tmp_path):
    """Used every 3 s for 26 s with a 20 s TTL, then a restart: still there."""
    e = MiniEngine(tmp_path, ttl=20)
    for i in range(10):
        e.add(f"t{i}", PREFIX + [i])
        e.settle()
        e.drain()
        e.now += 3
    e.restart()
    before = e.hits["loaded_ok"]
    e.add("after", PREFIX + [99])
    e.settle()
    assert e.hits["loaded_ok"] - before == 6 * BS


def test_7_lookup_is_linear_in_the_prompt(tmp_path, monkeypatch):
    """3,000 blocks whose window records are mostly missing: each (block, group)
    is looked at once, and the hit is built a bounded number of times."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from kvtier.config import KVTierConfig
    from kvtier.cache.groups import group_key
    from kvtier.cache.keys import KeyChain, root_key
    from kvtier.vllm.scheduler import KVTierScheduler
    from kvtier.store.slots import SlotGeometry

    groups = (KVGroup(0, ("f",)), KVGroup(1, ("w",), window_blocks=3))
    n = 3000
    cfg = KVTierConfig.from_extra_config({"disk": False, "dram_bytes": 1 << 30})
    s = KVTierScheduler(cfg, bytes(16), 1, BS, SlotGeometry(1024, 2 * n + 8), groups=groups,
                        start_sweeper=False)
    tokens = list(range(n * BS + 1))
    keys = KeyChain(root_key(bytes(16)), BS).extend(tokens)
    for i in range(n):
        for g in (0, 1) if i % 2 else (0,):   # every other window record missing
            b = s.ledger.begin_store(group_key(keys[i], g), s.clock())
            s.ledger.end_store(b, True)
    calls = {"where": 0, "needed": 0}
    locate_many, needed = s.ledger.locate_many, KVGroup.needed

    def count_where(keys, now):
        calls["where"] += len(keys)
        return locate_many(keys, now)

    def count_needed(self, *a):
        calls["needed"] += 1
        return needed(self, *a)
    monkeypatch.setattr(s.ledger, "locate_many", count_where)
    monkeypatch.setattr(KVGroup, "needed", count_needed)
    req = Request("r", tokens, SamplingParams(max_tokens=1), None)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)   # no 3 window blocks in a row
    assert calls["where"] <= 2 * len(groups) * n   # each (block, group) at most twice
    assert calls["needed"] <= 2 * len(groups)


def test_8_loads_do_not_wait_behind_writes(tmp_path):
    """Every write is stuck (a saturated disk); a disk hit still loads."""
    e = stored_prefix(tmp_path)
    gate = threading.Event()
    for w in e.workers:
        inner = w.store.write
        w.store.write = lambda *a, inner=inner, **kw: (gate.wait(60), inner(*a, **kw))[1]
    try:
        e.add("writer", list(range(90000, 90000 + 8 * BS)))   # its write-through blocks
        e.step(drain=False)
        e.add("reader", PREFIX + [7])
        deadline = time.monotonic() + 30
        while e.reqs["reader"].status in ("waiting", "loading"):
            assert time.monotonic() < deadline, "the load waited for the writes"
            e.step(drain=False)
            time.sleep(0.01)
        assert e.hits["loaded_ok"] == len(PREFIX)
    finally:
        gate.set()
    e.settle()
    e.check()


def test_9_an_unexpected_read_error_ends_the_load(tmp_path):
    """A bug in the read path (any exception) recomputes; the load never hangs."""
    e = stored_prefix(tmp_path)
    e.fail(0, "read", "bug", n=2)
    e.add("a", PREFIX + [1])
    e.settle(steps=10)
    e.check()
    assert e.load_failures > 0
    e.sched.check_invariants(idle=True)


def test_10_a_disk_hit_is_not_capped_by_dram(tmp_path):
    """20 blocks on disk, 4 DRAM slots: the whole hit loads, streamed."""
    long = list(range(7000, 7000 + 20 * BS))
    e = stored_prefix(tmp_path, long, after_slots=4, slots=24, tp=1, pages=64,
                      disk_records=64)
    e.add("again", long + [2])
    e.settle()
    e.check()
    assert e.hits["loaded_ok"] == 20 * BS and e.load_failures == 0


def test_a_long_disk_hit_scatters_while_it_still_reads(tmp_path):
    """Reads and scatters overlap: the load's last records are read only after
    its first ones reached the GPU pages (a load that read everything before
    scattering anything would wait here until the deadline)."""
    long = list(range(8000, 8000 + 24 * BS))
    e = stored_prefix(tmp_path, long, tp=1, pages=64, slots=40, disk_records=64)
    w = e.workers[0]
    scattered = threading.Event()
    waited, last = [], []
    inner_scatter, inner_read = w.engines[0].scatter, w.store.read_batch

    def scatter(*a, **kw):
        out = inner_scatter(*a, **kw)
        scattered.set()
        return out

    def read_batch(items):
        if any(it[0] in last for it in items):   # the hit's last record
            waited.append(scattered.wait(10))
        return inner_read(items)
    w.engines[0].scatter, w.store.read_batch = scatter, read_batch
    e.add("again", long + [2])
    last.append(e.keys("again")[23])
    e.settle()
    e.check()
    assert waited == [True]
    assert e.hits["loaded_ok"] == 24 * BS and e.load_failures == 0


# -------------------------------------------------------------------- item 12
def test_12_orphans_and_young_temp_files_count_then_go(tmp_path):
    e = MiniEngine(tmp_path)
    e.add("a", PREFIX + [1])
    e.settle()
    e.drain()
    e.restart()
    store = e.workers[1].store
    keys = [b.key for t, b in e.sched.ledger.blocks() if t == "disk"]
    os.unlink(store.path(keys[3]))          # rank 1 lost block 3: an orphan on rank 0
    (store.tmp / "young").write_bytes(b"x" * 5000)
    e.restart()
    sched = e.sched
    assert sched.stats.counters["kvtier_orphan_records_total"][""] == 1
    sched.drain_sweeper()
    assert not e.workers[0].store.path(keys[3]).exists()
    assert sched.ledger.held_disk >= 5000   # counted in the budget until it goes
    assert len(sched.ledger.disk) == 5


def test_12_fsync_covers_the_directory(tmp_path, monkeypatch):
    from kvtier.copy.engine import HostPool
    from kvtier.store.disk import DiskStore
    from kvtier.store.record import pack_header
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    s = DiskStore(tmp_path, bytes(16), 0, 1, fsync=True, native_io="off")
    pool = HostPool(1, 8192)
    pack_header(pool.slot(0), bytes(16), bytes(range(16)), 0, 1, 100, 0)
    s.write(bytes(range(16)), pool.slot(0))
    assert synced == [False, True]          # the file, then its directory


def test_12_store_tool_survives_files_vanishing(tmp_path):
    from kvtier.store import tool as storetool
    e = MiniEngine(tmp_path, tp=1)
    e.add("a", PREFIX + [1])
    e.settle()
    e.drain()
    root = tmp_path / "store"
    it = storetool.records(root)
    first = next(it)
    for r in list(storetool.records(root)):
        if r.path != first.path:
            r.path.unlink()                 # a server evicts while the scan runs
    assert list(it) == []
    first.path.unlink()
    assert storetool.check_file(first) is None
    assert storetool.main(["verify", str(root)]) == 0
    assert storetool.main(["gc", str(root)]) == 0


def test_12_a_future_mtime_does_not_move_the_clock(tmp_path):
    e = MiniEngine(tmp_path, tp=1, ttl=100)
    e.add("a", PREFIX + [1])
    e.settle()
    e.drain()
    store = e.workers[0].store
    future = e.now + 10_000
    for k in e.keys("a")[:6]:   # noqa: B007
        os.utime(store.path(k), (future, future))
    e.restart()
    blocks = [b for t, b in e.sched.ledger.blocks() if t == "disk"]
    assert blocks and all(b.entry.last_use <= e.now for b in blocks)
    e.now += 150                            # past the TTL counted from now
    e.sched.ledger.expire(e.now)
    assert len(e.sched.ledger.disk) == 0


def test_a_block_whose_record_went_bad_is_written_again_once_the_bad_one_is_gone(tmp_path):
    """A record found bad is removed; the block, recomputed and stored while that
    removal is in flight, gets a new record once it is done (it was skipped, and
    counted as 'disk_full', before): a restart then serves it from disk."""
    e = stored_prefix(tmp_path)
    e.fail(0, "read", "checksum")
    e.add("a", PREFIX + [2])
    drain, e.sched.drain_sweeper = e.sched.drain_sweeper, lambda: None   # a slow sweeper
    e.settle()
    e.sched.drain_sweeper = drain
    for _ in range(3):
        e.drain()
        e.step()
    e.check()
    assert e.load_failures == 6              # recomputed from block 0
    key0 = e.keys("a")[0]
    assert key0 in ready_keys(e, "disk")
    e.restart()
    before = e.hits["loaded_ok"]
    e.add("b", PREFIX + [3])
    e.settle()
    e.check()
    assert e.hits["loaded_ok"] - before == len(PREFIX)


def test_a_hit_vllm_could_not_allocate_lets_go_of_its_slot(tmp_path):
    """A disk hit takes a DRAM slot at lookup; when vLLM then finds no pages for
    the request, the slot and pins go back by the end of the step (held until the
    request's next lookup, they starved a request holding pages: a stall)."""
    e = stored_prefix(tmp_path)
    pages, e.free_pages = e.free_pages, e.free_pages[:2]   # too few for the request
    e.add("w", PREFIX + [9])
    e.step()
    assert e.reqs["w"].status == "waiting"
    assert e.sched.ledger.held_slots == 0
    assert not e.sched._pending_hits
    e.free_pages = pages
    e.settle()
    e.check()
    assert e.hits["loaded_ok"] == len(PREFIX)


def _refused(e) -> float:
    return sum(e.sched.stats.counters.get("kvtier_reload_refused_total", {}).values())


def test_a_load_failed_from_its_first_block_is_recomputed_not_loaded_forever(tmp_path):
    """Every read of rank 0 fails (a dying disk). vLLM frees the request's pages and
    asks again; a second load would fail the same way, forever (and vLLM reserves
    the request's pages against its own new load). It is recomputed, once."""
    e = stored_prefix(tmp_path)
    e.fail(0, "read", "io", n=10_000)
    e.add("a", PREFIX + [1])
    e.settle(steps=30)
    e.check()
    assert e.reqs["a"].status == "done"
    assert 0 < e.load_failures <= len(PREFIX) // BS, e.load_failures
    assert _refused(e) == 1
    e.sched.check_invariants(idle=True)


def test_a_preempted_request_loads_again(tmp_path):
    """The refusal above is for a failed load only: a request preempted after a
    load is offered the load again, each time."""
    e = MiniEngine(tmp_path, pages=40, slots=16, tp=1)
    e.add("a", PREFIX + list(range(40)), max_tokens=8)
    e.step()                                # computed and stored
    e.step()
    loaded = []
    for _ in range(2):
        e.preempt("a")
        e.step()                            # looked up again: loaded from kvtier
        loaded.append(e.hits["loaded_ok"])
    assert loaded[0] > 0 and loaded[1] == 2 * loaded[0], loaded
    e.settle()
    e.check()
    assert _refused(e) == 0
    e.sched.check_invariants(idle=True)


def test_a_prompt_longer_than_dram_is_stored_whole(tmp_path):
    """A prompt of 40 blocks through 16 DRAM slots: the blocks that find no free
    slot wait for one (the request's pages held after it finished) instead of
    being skipped; every block reaches the disk, and a restart loads them all.
    (Storing only what fit, 16 of 40 blocks were kept.)"""
    e = MiniEngine(tmp_path, slots=16, disk_records=64)
    tokens = list(range(7000, 7000 + 40 * BS))
    e.add("long", tokens + [1])
    e.settle()
    e.drain()
    e.check()
    assert len(e.sched.ledger.disk) == 40
    assert e.sched.stats.counter("kvtier_skipped_stores_total", reason="dram_full") == 0
    # LRU order: the first block, the one every continuation needs, leaves last
    keys = e.keys("long")
    for tier in (e.sched.ledger.dram, e.sched.ledger.disk):
        order = {k: i for i, k in enumerate(tier.keys())}   # least recently used first
        mine = [order[k] for k in keys if k in order]
        assert mine == sorted(mine, reverse=True), tier
    e.restart()
    e.add("again", tokens + [2])
    e.settle()
    e.check()
    assert e.hits["loaded_ok"] == 40 * BS and e.load_failures == 0


def test_a_finished_request_waits_for_dram_slots_at_most_store_wait(tmp_path):
    """DRAM held by a load that does not end: a finished request's waiting blocks
    give up after STORE_WAIT_S (counted as dram_full) and its pages are let go."""
    from kvtier.vllm.scheduler import STORE_WAIT_S
    e = MiniEngine(tmp_path, slots=16, disk_records=64)
    held = [e.sched.ledger.begin_store(bytes([i]) * 16, e.now) for i in range(16)]
    assert all(held)   # every slot pinned by a copy that never ends
    e.add("long", list(range(7000, 7000 + 8 * BS)) + [1])
    for _ in range(3):
        e.step()
    assert e.reqs["long"].pages is not None and e.sched.has_pending_work()
    e.now += STORE_WAIT_S + 0.1
    for _ in range(3):
        e.step()
    assert e.reqs["long"].pages is None   # let go
    assert e.sched.stats.counter("kvtier_skipped_stores_total", reason="dram_full") == 8
    for b in held:
        e.sched.ledger.end_store(b, False)
    e.check()


@pytest.mark.parametrize("told", [True, False])
def test_a_preempted_request_stores_nothing_from_its_freed_pages(tmp_path, told):
    """Blocks that wait for a DRAM slot belong to the request's pages: once it is
    preempted (vLLM frees them at once) and then aborted, none is stored later,
    whether a schedule told the connector of the preemption before the abort
    (``told``) or not (vLLM's reset_prefix_cache preempts running requests
    outside a schedule)."""
    e = MiniEngine(tmp_path, slots=16, disk_records=64)
    held = [e.sched.ledger.begin_store(bytes([i]) * 16, e.now) for i in range(16)]
    e.add("long", list(range(7000, 7000 + 8 * BS)) + [1], max_tokens=8)
    e.step()                      # prefilled: its 8 blocks wait for slots
    e.preempt("long")
    pages, e.free_pages = e.free_pages, []   # no room: it stays preempted
    if told:
        e.step()                  # vLLM tells the connector (preempted_req_ids)
    e.abort("long")
    e.free_pages = pages
    for b in held:                # slots free again
        e.sched.ledger.end_store(b, False)
    for _ in range(3):
        e.step()
    e.drain()
    assert len(e.sched.ledger.disk) == 0 and not e.sched.has_pending_work()
    e.check()


def test_an_idle_step_waits_for_a_write_instead_of_spinning(tmp_path, monkeypatch):
    """A step that computes nothing (vLLM steps only to collect results) waits,
    GIL released, for an in-flight write to end and returns with its answer; a
    step that computed returns at once. Returning at once let vLLM's empty steps
    spin the worker's main thread and starve the writer of the GIL (CI: a write
    holding a shared store's lock stalled for minutes)."""
    import kvtier.vllm.worker as worker_mod
    monkeypatch.setattr(worker_mod, "IDLE_STEP_WAIT_S", 5.0)   # a window no VM misses
    e = MiniEngine(tmp_path, tp=1)
    (w,) = e.workers
    gate = threading.Event()
    inner = w.store.write
    w.store.write = lambda *a, inner=inner, **kw: (gate.wait(60), inner(*a, **kw))[1]
    e.add("r", list(range(7000, 7000 + 4 * BS)) + [1])
    e.step(drain=False)
    deadline = time.monotonic() + 30
    while not w._pending_writes:   # the gather done, its writes queued behind the gate
        assert time.monotonic() < deadline
        time.sleep(0.001)
    w.transfer_results(set(), idle_step=False)   # a step that computed: at once
    meta = w.take_worker_meta()
    assert meta is None or not meta.written
    timer = threading.Timer(0.3, gate.set)
    timer.start()
    t0 = time.monotonic()
    w.transfer_results(set(), idle_step=True)
    waited = time.monotonic() - t0
    meta = w.take_worker_meta()
    assert meta is not None and meta.written, "the idle step returned before the write ended"
    assert 0.2 < waited < 4.0, waited   # until the write ended, not the whole window
    timer.join()
    e.settle()
    e.check()
