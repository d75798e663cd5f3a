"""Disk admission on the real scheduler and workers (tests.sim.MiniEngine, TP=2):
which blocks get a disk record, and when; records written from DRAM slots are
the blocks' true bytes (a restart serves them byte-exact)."""

import pytest

from tests.conftest import needs_vllm
from tests.sim import BS, MiniEngine

pytestmark = needs_vllm

PREFIX = [list(range(p * 1000, p * 1000 + 4 * BS)) for p in range(8)]


def on_disk(e) -> set:
    return {b.key for t, b in e.sched.ledger.blocks() if t == "disk" and b.state.value == "ready"}


def disk_writes(e) -> float:
    from kvtier.vllm.metrics import labels_key
    return e.sched.stats.counters["kvtier_stored_blocks_total"].get(labels_key({"tier": "disk"}), 0)


def run(e, rid, tokens):
    e.add(rid, tokens + [1])
    e.settle()
    e.drain()
    e.step()      # deliver the writes' answers
    e.check()


def serves_from_disk_after_restart(e, tokens):
    """After a restart (DRAM empty) the prefix loads from disk, byte-exact on every
    rank (MiniEngine checks each loaded page), no load failing."""
    e.restart()
    before = e.hits["loaded_ok"]
    run(e, "after-restart", tokens)
    assert e.load_failures == 0 and not e.violations
    return e.hits["loaded_ok"] - before


def test_write_through_writes_every_new_block_at_once(tmp_path):
    e = MiniEngine(tmp_path, slots=16, disk_admission="write_through")
    run(e, "a", PREFIX[0])
    assert on_disk(e) == set(e.keys("a")[:4])
    assert disk_writes(e) == 4
    assert serves_from_disk_after_restart(e, PREFIX[0]) == 4 * BS


def test_second_use_writes_a_block_when_it_is_used_again(tmp_path):
    e = MiniEngine(tmp_path, slots=16, disk_admission="second_use")
    run(e, "a", PREFIX[0])
    assert on_disk(e) == set()                    # used once: DRAM only
    run(e, "b", PREFIX[0] + [5] * BS)             # a hit: the second use
    assert on_disk(e) == set(e.keys("a")[:4])     # written from the DRAM slots
    assert disk_writes(e) == 4
    run(e, "c", PREFIX[1])
    assert on_disk(e) == set(e.keys("a")[:4])     # a new prefix, once: not written
    assert serves_from_disk_after_restart(e, PREFIX[0]) == 4 * BS


def test_on_dram_evict_writes_blocks_before_dram_evicts_them(tmp_path):
    # 8 DRAM slots, the write-back window is all of them (at least 8): a block
    # is written once it is READY; with a window smaller than DRAM only the
    # LRU's oldest are. Here: every prefix stored ends up on disk before the
    # later ones push it out of DRAM, and none is written twice.
    e = MiniEngine(tmp_path, slots=8, disk_admission="on_dram_evict")
    for i in range(4):
        run(e, f"r{i}", PREFIX[i])
    want = {k for i in range(4) for k in e.keys(f"r{i}")[:4]}
    assert on_disk(e) == want
    assert disk_writes(e) == 16            # each block written once
    assert serves_from_disk_after_restart(e, PREFIX[0]) == 4 * BS


def test_on_dram_evict_leaves_recent_blocks_in_dram_only(tmp_path):
    """With DRAM much larger than the window, recently stored blocks are not
    written (the point of write-back: fewer disk bytes)."""
    e = MiniEngine(tmp_path, slots=96, pages=64, disk_records=96,
                   disk_admission="on_dram_evict")
    window = e.sched._write_back_window()
    assert window == 12
    for i in range(8):
        run(e, f"r{i}", PREFIX[i])
    assert len(on_disk(e)) == 0            # 32 blocks in 96 slots: none near eviction
    for i in range(8, 24):
        run(e, f"r{i}", list(range(i * 1000, i * 1000 + 4 * BS)))
    # 96 blocks stored, DRAM full: the oldest got written before being evicted
    written = on_disk(e)
    assert 0 < len(written) <= 96 - 64 + window
    assert set(e.keys("r0")[:4]) <= written


@pytest.mark.parametrize("policy", ["second_use", "on_dram_evict"])
def test_a_write_back_of_a_slot_a_rank_does_not_hold_is_refused(tmp_path, policy):
    """A write from a DRAM slot checks, on each rank, that the slot holds the
    block: where it does not, nothing is written and the block gets no record."""
    e = MiniEngine(tmp_path, slots=16, disk_admission=policy)
    run(e, "a", PREFIX[0])
    keys = e.keys("a")[:4]
    slot = e.sched.ledger.dram_block(keys[0], e.now).slot
    e.workers[1]._slot_key[slot] = b"someone else"
    if policy == "second_use":
        run(e, "b", PREFIX[0] + [5] * BS)    # the second use: all four written back
    else:
        e.sched._write_backs += keys         # as if DRAM were about to evict them
        run(e, "b", PREFIX[1])
    assert keys[0] not in on_disk(e)
    assert set(keys[1:]) <= on_disk(e)
