"""One disk budget for every engine on a store (kvtier.store.budget), with real
processes: two writers on one store never take more than the budget between
them, and a writer killed with SIGKILL in the middle of a write loses no budget
for good (its reservation and temp files are reaped, its records trimmed when
room is needed)."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvtier.copy.engine import HostPool
from kvtier.store.budget import BudgetExceeded, StoreBudget
from kvtier.store.claim import META_DIR, StoreInUse, claim_store
from kvtier.store.disk import DiskStore
from kvtier.store.record import HEADER_BYTES, record_bytes

NS = bytes(range(16))
PAYLOAD = 3 * 4096 + 100
REC = record_bytes(PAYLOAD)


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "secret"
    p.write_bytes(os.urandom(32))
    p.chmod(0o400)
    return p


META_SLACK = 2 * 4096   # budget.json and, while it is replaced, its successor


def fs_used(root: Path) -> int:
    """Bytes the store's own tmpfs holds, at one instant (a directory walk is no
    snapshot: a file renamed or replaced while it runs is counted twice)."""
    st = os.statvfs(root)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def store_bytes(root: Path) -> int:
    """Every regular file of the store (temp and free files included), but the
    budget's own few hundred bytes of metadata."""
    total = 0
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == root and META_DIR in dirs:
            dirs.remove(META_DIR)
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue
            if st.st_mode & 0o170000 == 0o100000:
                total += st.st_size
    return total


def one_store(root, secret, budget, **kw):
    return DiskStore(root, NS, 0, 1, secret_file=secret, shared=True, budget_bytes=budget, **kw)


def record(store, pool, k):
    rec = pool.slot(0)
    rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD] = np.frombuffer(
        k * (PAYLOAD // 16 + 1), dtype=np.uint8)[:PAYLOAD]
    store.seal(rec, k, PAYLOAD)
    return rec[:REC]


def test_accounting_matches_the_files(tmp_path, secret):
    """Writes, refusals, removals into free/ and writes over free files: the
    ledger's ``used`` is always what a recount of the files finds."""
    pool = HostPool(2, REC)
    s = one_store(tmp_path / "kv", secret, 8 * REC, free_files=2)
    b = s.budget
    ks = [i.to_bytes(16, "big") for i in range(12)]
    wrote = []
    for k in ks:
        try:
            s.write(k, record(s, pool, k))
            wrote.append(k)
        except BudgetExceeded:
            pass
        assert store_bytes(tmp_path / "kv") <= 8 * REC
    assert len(wrote) == 8
    assert b.snapshot()["used"] == store_bytes(tmp_path / "kv") == b.recount()
    for k in wrote[:3]:
        s.remove(k)                                     # 2 into free/, 1 unlinked
    assert len(os.listdir(s.free)) == 2
    assert b.snapshot()["used"] == store_bytes(tmp_path / "kv") == 7 * REC
    for k in ks[8:11]:                                  # 2 over free files, 1 new
        s.write(k, record(s, pool, k))
    assert b.snapshot()["used"] == store_bytes(tmp_path / "kv") == 8 * REC == b.recount()
    with pytest.raises(BudgetExceeded):
        s.write(ks[11], record(s, pool, ks[11]))
    s.write(ks[11], record(s, pool, ks[11]), reuse=ks[8])   # over an evicted record: no room needed
    assert b.snapshot()["used"] == store_bytes(tmp_path / "kv") == 8 * REC
    assert b.snapshot()["reserved"] == 0 and list(s.tmp.iterdir()) == []
    pool.close()


# An engine's disk path without vLLM: its real ledger (LRU within this engine's
# share), its real sweeper (removals, and about every second: reaping, trims,
# the share), one DiskStore writing records as a worker does.
WRITER = textwrap.dedent("""
    import os, sys, threading, time
    from kvtier.cache.ledger import Ledger
    from kvtier.copy.engine import HostPool
    from kvtier.store.budget import BudgetExceeded
    from kvtier.store.disk import DiskStore
    from kvtier.store.record import HEADER_BYTES, record_bytes
    from kvtier.store.sweeper import Sweeper
    root, secret, budget, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    P = 3 * 4096 + 100; R = record_bytes(P); SPARE = 2
    s = DiskStore(root, bytes(range(16)), 0, 1, secret_file=secret, shared=True,
                  budget_bytes=budget, free_files=SPARE)
    ledger = Ledger(4, budget - SPARE * R, R)
    lock = threading.RLock()
    sweeper = Sweeper([s], ledger, lock, time.time)
    sweeper.recover()
    sweeper.start()
    pool = HostPool(1, R)
    refused = skipped = 0
    for i in range(n):
        k = (tag + str(i)).encode().ljust(16, b"-")[:16]
        with lock:
            block, victim = ledger.begin_write(k, time.time())
            sweeper.flush()
        if block is None:
            skipped += 1
            continue
        rec = pool.slot(0)
        rec[HEADER_BYTES:HEADER_BYTES + P] = i % 251
        s.seal(rec, k, P)
        try:
            s.write(k, rec[:R], reuse=victim); ok = True
        except BudgetExceeded:
            refused += 1; ok = False
        with lock:
            ledger.end_write(block, ok)
            sweeper.flush()
        print(i, refused, skipped, flush=True)
        time.sleep(0.01)
    os._exit(0)   # (the sweeper's daemon thread still runs: no interpreter teardown)
""")


def writer(root, secret, budget, tag, n):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(secret), str(budget),
                             tag, str(n)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])


def sample(root, stop, out):
    while not stop.is_set():
        out.append(fs_used(root))
        time.sleep(0.002)


def test_two_writers_share_one_budget_and_a_killed_one_loses_nothing(tmp_path, secret):
    from tests.helpers import tmpfs
    budget = 40 * REC
    with tmpfs(tmp_path / "kv", "64m") as root:
        run_two_writers(root, secret, budget)


def run_two_writers(root, secret, budget):
    DiskStore(root, NS, 0, 1)          # the directory, as a first start would make it
    assert fs_used(root) == 0
    samples, stop = [], threading.Event()
    t = threading.Thread(target=sample, args=(root, stop, samples), daemon=True)
    t.start()
    procs = []
    try:
        a = writer(root, secret, budget, "a", 100)    # 5 x the budget between them
        b = writer(root, secret, budget, "b", 100)
        procs += [a, b]
        outs = [p.communicate(timeout=300)[0] for p in (a, b)]
        assert a.returncode == 0 and b.returncode == 0, outs
        published = []
        for out in outs:                              # (i, refused, skipped) after each write
            i, refused, skipped = map(int, out.split("\n")[-2].split())
            assert i == 99, out[-200:]
            published.append(100 - refused - skipped)
        # Refusals ("store_full") happen while a newcomer's share is not yet every
        # engine's (about a second); the budget stays usable by both.
        assert min(published) >= 10 and sum(published) >= 100, published
        # Now kill one in the middle of its writes: c writes until killed, d goes on.
        c = writer(root, secret, budget, "c", 10**6)
        d = writer(root, secret, budget, "d", 10**6)
        procs += [c, d]
        for p in (c, d):
            for _ in range(60):                       # both well under way
                p.stdout.readline()
        c.send_signal(signal.SIGKILL)
        c.wait()
        last = [int(d.stdout.readline().split()[0])]
        n_before = last[0]
        threading.Thread(target=lambda: [last.append(int(line.split()[0])) for line in d.stdout],
                         daemon=True).start()
        # d alone gets the whole budget back (c's records trimmed, c's reservations
        # reaped), having written at least 4 x the budget after the kill.
        view = one_store(root, secret, budget)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            held = sum(1 for k in view.scan_mtimes() if k[:1] == b"d")
            if held * REC >= budget - 8 * REC and last[-1] >= n_before + 160:
                break
            time.sleep(0.5)
        assert held * REC >= budget - 8 * REC, held                  # d got (nearly) all of it
        assert last[-1] >= n_before + 160, (n_before, last[-1])      # and wrote 4 x B after
    finally:
        for p in procs:
            p.kill()
            p.wait()
        stop.set()
        t.join()
    assert len(samples) > 100
    assert max(samples) <= budget + META_SLACK, (max(samples), budget)
    assert max(samples) >= budget - 4 * REC       # (and the budget was used)
    # Nothing of the dead is lost for good: after the next look, the ledger is the
    # files, no reservation is left, no temp file.
    b = StoreBudget.of(root, budget)
    b.maintain()
    snap = b.snapshot()
    assert snap["reserved"] == 0 and snap["processes"] == 1, snap
    assert snap["used"] == store_bytes(root) == b.recount()
    mine = [p for p in root.rglob("*") if p.is_file() and META_DIR not in p.parts]
    assert not [p for p in mine if p.parent.name == "tmp"]           # temp files reaped
    assert snap["reaped"] >= 3 and snap["trimmed"] > 0
    b.close()


def test_a_process_killed_holding_a_reservation(tmp_path, secret):
    """kill -9 with bytes reserved and a temp file half written: reaped, nothing lost."""
    root = tmp_path / "kv"
    s = one_store(root, secret, 10 * REC)
    code = textwrap.dedent(f"""
        import os, sys, time
        from kvtier.store.disk import DiskStore
        s = DiskStore({str(root)!r}, bytes(range(16)), 0, 1, secret_file={str(secret)!r},
                      shared=True, budget_bytes={10 * REC})
        with s.budget.locked() as st:
            assert s.budget.admit(st, {6 * REC})
        (s.tmp / ("ab" * 16 + "." + s.budget.lease + ".1")).write_bytes(b"x" * {3 * REC})
        print("ready", flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    pool = HostPool(1, REC)
    ks = [i.to_bytes(16, "big") for i in range(6)]
    for k in ks[:4]:
        s.write(k, record(s, pool, k))
    with pytest.raises(BudgetExceeded):          # 4 + 6 reserved: full
        s.write(ks[4], record(s, pool, ks[4]))
    p.send_signal(signal.SIGKILL)
    p.wait()
    s.budget.maintain()
    snap = s.budget.snapshot()
    assert snap["reserved"] == 0 and snap["used"] == 4 * REC == store_bytes(root)
    assert list(s.tmp.iterdir()) == []
    s.write(ks[4], record(s, pool, ks[4]))        # the room is back
    pool.close()


CLAIM = textwrap.dedent("""
    import sys, time
    from kvtier.store.claim import claim_store
    claim_store(sys.argv[1], sys.argv[2] == "shared")
    print("claimed", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("theirs,mine,ok", [("shared", True, True), ("shared", False, False),
                                            ("alone", True, False), ("alone", False, False)])
def test_engines_claim_the_store(tmp_path, theirs, mine, ok):
    root = tmp_path / "kv"
    root.mkdir(mode=0o700)
    p = subprocess.Popen([sys.executable, "-c", CLAIM, str(root), theirs], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "claimed"
        if ok:
            claim_store(root, mine)
        else:
            with pytest.raises(StoreInUse, match="shared: true"):
                claim_store(root, mine)
    finally:
        p.kill()
        p.wait()
    claim_store(tmp_path / "kv", False) if not ok else None   # free once it is gone


def test_a_read_only_store_is_served_unclaimed_but_never_shared(tmp_path, caplog):
    """A store on a read-only mount (its records still served): an engine starts
    without a claim, saying so; a shared engine needs the metadata directory."""
    import logging
    import subprocess
    from tests.helpers import tmpfs
    with tmpfs(tmp_path / "ro", "4m") as root:
        DiskStore(root, NS, 0, 1)                     # a store, as an earlier run left it
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        with caplog.at_level(logging.WARNING, logger="vllm.kvtier.store"):
            claim_store(root, False)
        assert "cannot claim the store" in caplog.text
        with pytest.raises(OSError, match="shared store needs its metadata directory"):
            claim_store(root, True)


def test_a_claimed_store_can_be_remounted_read_only(tmp_path):
    """An engine's claim holds no file of the store open for writing: the store's
    filesystem can go read-only under a running engine (EROFS, then recompute)."""
    from tests.helpers import tmpfs
    with tmpfs(tmp_path / "ro", "4m") as root:
        p = subprocess.Popen([sys.executable, "-c", CLAIM, str(root), "alone"],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "claimed"
            r = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stderr
            with pytest.raises(StoreInUse):           # still claimed, read-only or not
                claim_store(root, False)
        finally:
            p.kill()
            p.wait()


def test_a_planted_metadata_directory_is_refused(tmp_path):
    from kvtier.store.safety import UnsafeStore
    root = tmp_path / "kv"
    root.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (root / META_DIR).symlink_to(elsewhere)
    with pytest.raises(UnsafeStore, match="symlink"):
        claim_store(root, False)
    (root / META_DIR).unlink()
    (root / META_DIR).mkdir(mode=0o700)
    os.mkfifo(root / META_DIR / "owner", 0o600)      # must not block, nor be used
    with pytest.raises(UnsafeStore, match="not a regular file"):
        claim_store(root, False)
    assert list(elsewhere.iterdir()) == []
