"""The disk store under faults, on a real vLLM server with the real connector.

Every case ends with correct outputs (equal to a full recompute) and a live
engine. Faults are real where this machine can cause them: damaged files, a
size-limited tmpfs (ENOSPC), a read-only remount (EROFS), kill -9 of the whole
server while it writes, two servers sharing one store. The one injected fault
is a slow disk (KVTIER_FAULT_READ_DELAY_S), for the load-vs-recompute decision.
"""

import subprocess
import threading
import time
import urllib.request

import pytest

from kvtier.serving import metric_value
from kvtier.store.claim import META_DIR
from kvtier.store.record import HEADER_BYTES, pack_header, parse_header
from kvtier.store.tool import cmd_verify
from tests.conftest import needs_vllm
from tests.helpers import (BLOCKS_PER_PROMPT, FULL_BLOCK_TOKENS, RECORD_BYTES, cached, prompts,
                           records, server, shared_store_config, text, tmpfs, wait_records)

pytestmark = [pytest.mark.e2e, needs_vllm]


def alive(s) -> bool:
    with urllib.request.urlopen(s.url + "/health", timeout=10) as r:
        return r.status == 200


def write_prompts(s, store, ps):
    """Serve ``ps`` one by one; return outputs and each prompt's record files."""
    outs, files, seen = [], [], set()
    for i, p in enumerate(ps):
        outs.append(text(s.complete(p)))
        now = wait_records(store, (i + 1) * BLOCKS_PER_PROMPT)
        files.append(sorted(now - seen))
        seen = now
    return outs, files


def test_damaged_records_are_misses(model_dir, tmp_path):
    store, ps = tmp_path / "store", prompts(5, seed=11)
    with server(model_dir, store, tmp_path / "a.log") as s:
        ref, files = write_prompts(s, store, ps)

    def rewrite(path, fn):
        path.write_bytes(fn(path.read_bytes()))

    def other_namespace(data):   # a valid record of another namespace, planted here
        buf = bytearray(data)
        import numpy as np
        arr = np.frombuffer(buf, dtype=np.uint8).copy()
        h = parse_header(data)
        pack_header(arr, bytes(16), h.key, h.rank, h.tp_size, h.payload_len, h.checksum)
        return arr.tobytes()

    mid = BLOCKS_PER_PROMPT // 2
    rewrite(files[0][mid], lambda d: d[:HEADER_BYTES + 1000])             # truncated
    rewrite(files[1][mid], lambda d: b"")                                 # zero length
    rewrite(files[2][mid], other_namespace)                               # wrong namespace
    rewrite(files[3][mid], lambda d: files[3][mid - 1].read_bytes())      # another key's record
    with server(model_dir, store, tmp_path / "b.log") as s:
        files[4][mid].unlink()                                            # missing at load time
        for p, want in zip(ps, ref):
            r = s.complete(p)
            assert text(r) == want   # the damaged block and all after it were recomputed
        m = s.metrics()
        for reason in ("truncated", "wrong_namespace", "wrong_key", "missing"):
            assert metric_value(m, "kvtier_load_failures_total", reason=reason) >= 1, reason
        assert metric_value(m, "kvtier_checksum_failures_total") >= 3
        assert alive(s)


def test_enospc_backpressure(model_dir, tmp_path):
    """A 3 MiB filesystem behind a 1 GiB budget: writes fail with ENOSPC, serving goes on."""
    ps = prompts(6, seed=12)
    with tmpfs(tmp_path / "small", "3m") as store, \
            server(model_dir, store, tmp_path / "s.log") as s:
        first = [text(s.complete(p)) for p in ps]
        time.sleep(2.0)
        second = [s.complete(p) for p in ps]
        assert [text(r) for r in second] == first
        m = s.metrics()
        assert metric_value(m, "kvtier_io_errors_total") >= 1
        assert metric_value(m, "kvtier_skipped_stores_total") >= 1
        assert alive(s)
        # What did land is whole: every published record verifies.
        assert cmd_verify(store, delete=False, as_json=True) == 0
        assert len(records(store)) < 6 * BLOCKS_PER_PROMPT


def test_read_only_store(model_dir, tmp_path):
    ps = prompts(6, seed=13)
    with tmpfs(tmp_path / "ro", "64m") as store, \
            server(model_dir, store, tmp_path / "s.log", dram_bytes=60 * RECORD_BYTES) as s:
        before, _ = write_prompts(s, store, ps[:3])
        subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
        after = [text(s.complete(p)) for p in ps[3:]]          # their writes fail (EROFS)
        again = [s.complete(p) for p in ps[:3]]                # still served from disk
        assert [text(r) for r in again] == before
        assert all(cached(r) >= 0.95 * FULL_BLOCK_TOKENS for r in again)
        assert [text(s.complete(p)) for p in ps[3:]] == after
        assert metric_value(s.metrics(), "kvtier_io_errors_total") >= 1
        assert alive(s)


def test_kill_9_while_writing_then_restart(model_dir, tmp_path):
    store, ps = tmp_path / "store", prompts(6, seed=14)
    s = server(model_dir, store, tmp_path / "a.log").start()
    done = []

    def load():
        for p in ps:
            try:
                done.append(text(s.complete(p, timeout=120)))
            except Exception:
                return
    t = threading.Thread(target=load)
    t.start()
    wait_records(store, BLOCKS_PER_PROMPT + 3)    # mid-way through the writes
    s.kill()
    t.join()
    assert cmd_verify(store, delete=False, as_json=True) == 0   # no torn record published
    with server(model_dir, store, tmp_path / "b.log") as s2:
        outs = [s2.complete(p) for p in ps]
        assert [text(r) for r in outs[:len(done)]] == done
        assert cached(outs[0]) >= 0.95 * FULL_BLOCK_TOKENS   # written before the kill
        time.sleep(1.0)
        again = [text(s2.complete(p)) for p in ps]
        assert again == [text(r) for r in outs]
        assert alive(s2)
    assert cmd_verify(store, delete=False, as_json=True) == 0


def test_two_servers_share_one_store(model_dir, tmp_path):
    store, ps = tmp_path / "store", prompts(4, seed=15)
    shared = shared_store_config(tmp_path)   # several engines on one store: shared + secret
    with server(model_dir, store, tmp_path / "a.log", **shared) as a, \
            server(model_dir, store, tmp_path / "b.log", **shared) as b:
        results = {}

        def run(name, srv):
            results[name] = [text(srv.complete(p)) for p in ps]
        threads = [threading.Thread(target=run, args=x) for x in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["a"] == results["b"]
        assert cmd_verify(store, delete=False, as_json=True) == 0
        # A prompt only A has seen: B finds A's records on its first request.
        extra = prompts(1, seed=16)[0]
        n = len(records(store))
        ref = text(a.complete(extra))
        wait_records(store, n + BLOCKS_PER_PROMPT)
        time.sleep(1.0)
        r = b.complete(extra)
        assert text(r) == ref
        assert cached(r) >= 0.95 * FULL_BLOCK_TOKENS
        assert metric_value(b.metrics(), "kvtier_hit_tokens_total", tier="disk") > 0
        # Tenants stay apart on a shared store: A's tenant-a prefix is a miss for
        # tenant-b on B, and a hit for tenant-a there.
        salted = prompts(1, seed=17)[0]
        n = len(records(store))
        ref = text(a.complete(salted, cache_salt="tenant-a"))
        wait_records(store, n + BLOCKS_PER_PROMPT)
        time.sleep(1.0)
        assert cached(b.complete(salted, cache_salt="tenant-b")) == 0
        r = b.complete(salted, cache_salt="tenant-a")
        assert text(r) == ref and cached(r) >= 0.95 * FULL_BLOCK_TOKENS


def record_paths(model_dir, store, prompt):
    """Where kvtier puts ``prompt``'s records: keys are stable, so a test can compute them."""
    from kvtier.cache.keys import chain_keys, root_key
    from kvtier.store.disk import DiskStore
    (ns_dir,) = [d for d in store.iterdir() if d.is_dir() and d.name != META_DIR]   # the server's namespace
    ns = bytes.fromhex(ns_dir.name)
    ds = DiskStore(store, ns, 0, 1)
    return [ds.path(k) for k in chain_keys(root_key(ns), prompt[:FULL_BLOCK_TOKENS], 32)]


def store_bytes(store):
    """Bytes of every file the store holds, but in-flight temp files."""
    return sum(f.stat().st_size for f in store.rglob("*")
               if f.is_file() and f.parent.name != "tmp")


def test_budget_keeps_most_recent(model_dir, tmp_path):
    """Writing ~3.4x disk_bytes: the store stays within budget and keeps the newest blocks."""
    store, ps = tmp_path / "store", prompts(6, seed=17)
    budget = 40 * RECORD_BYTES
    with server(model_dir, store, tmp_path / "s.log", disk_bytes=budget,
                dram_bytes=60 * RECORD_BYTES) as s:
        outs = []
        for p in ps:
            outs.append(text(s.complete(p)))
            time.sleep(0.3)
        newest = record_paths(model_dir, store, ps[-1])
        deadline = time.time() + 30
        while time.time() < deadline:
            size = store_bytes(store)
            if size <= budget + RECORD_BYTES and all(f.exists() for f in newest):
                break
            time.sleep(0.5)
        # records and the evicted files kept for writes to reuse, all within budget
        assert store_bytes(store) <= budget + RECORD_BYTES
        assert all(f.exists() for f in newest)
        assert not any(f.exists() for f in record_paths(model_dir, store, ps[0]))
        assert text(s.complete(ps[0])) == outs[0] and alive(s)


def test_ttl_expiry_and_sweeper(model_dir, tmp_path):
    store, ps = tmp_path / "store", prompts(4, seed=18)
    with server(model_dir, store, tmp_path / "s.log", ttl_seconds=4) as s:
        first = text(s.complete(ps[0]))
        files = wait_records(store, BLOCKS_PER_PROMPT)
        for p in ps[1:]:
            s.complete(p)                 # ps[0] leaves the GPU cache
        deadline = time.time() + 30       # idle: the sweeper expires and removes them
        while time.time() < deadline and any(f.exists() for f in files):
            time.sleep(0.5)
        assert not any(f.exists() for f in files)
        r = s.complete(ps[0])             # older than the TTL: a miss, recomputed
        assert cached(r) == 0 and text(r) == first
        m = s.metrics()
        assert metric_value(m, "kvtier_evictions_total", cause="ttl") >= BLOCKS_PER_PROMPT
        assert alive(s)


def test_slow_disk_load_is_declined(model_dir, tmp_path):
    """A disk slower than recompute: after a few measured loads, disk hits are declined."""
    from kvtier.cache.cost import LoadCostModel
    store, ps = tmp_path / "store", prompts(6, seed=19)
    with server(model_dir, store, tmp_path / "s.log", dram_bytes=50 * RECORD_BYTES,
                load_policy="auto", env={"KVTIER_FAULT_READ_DELAY_S": "0.3"}) as s:
        first = [text(s.complete(p)) for p in ps]
        time.sleep(1.0)
        second = [s.complete(p) for p in ps]
        assert [text(r) for r in second] == first
        m = s.metrics()
        assert metric_value(m, "kvtier_declined_loads_total", tier="disk") >= BLOCKS_PER_PROMPT
        measured = LoadCostModel().min_samples   # loads taken before the first decision
        assert metric_value(m, "kvtier_hit_tokens_total", tier="disk") \
            <= measured * FULL_BLOCK_TOKENS
        assert alive(s)


def test_a_disk_that_fails_every_read_costs_a_recompute_not_a_stuck_request(model_dir, tmp_path):
    """Every disk read fails (a dying disk: EIO on each read; injected, a real EIO
    cannot be caused here). A request whose load failed is rescheduled by vLLM,
    which asks kvtier again: offered the same load, it would fail the same way,
    again and again, and the request would never finish. It is recomputed, with
    the right answer, and loads stay bounded: at most one per request."""
    store, ps = tmp_path / "store", prompts(3, seed=13)
    with server(model_dir, store, tmp_path / "a.log") as s:
        ref, _ = write_prompts(s, store, ps)
    with server(model_dir, store, tmp_path / "b.log",
                env={"KVTIER_FAULT_READ_ERROR_RATE": "1"}) as s:
        for p, want in zip(ps, ref):
            assert text(s.complete(p, timeout=120)) == want
        m = s.metrics()
        failed = metric_value(m, "kvtier_load_failures_total", reason="io_error")
        assert 1 <= failed <= len(ps) * BLOCKS_PER_PROMPT, failed
        assert metric_value(m, "kvtier_reload_refused_total") >= 1
        assert alive(s)


def test_a_prompt_longer_than_dram_is_stored_whole(model_dir, tmp_path):
    """A DRAM tier of 12 records and a prompt of 23 full blocks: the blocks that
    find no free slot wait for one (the finished request's pages held meanwhile),
    so every block reaches the disk; after a restart the whole prompt is a disk
    hit with the same answer. (Before: 12 of 23 blocks stored, 384 tokens hit.)"""
    store, (p,) = tmp_path / "store", prompts(1, seed=41)
    kw = {"dram_bytes": 12 * RECORD_BYTES}
    with server(model_dir, store, tmp_path / "a.log", **kw) as s:
        first = text(s.complete(p))
        wait_records(store, BLOCKS_PER_PROMPT, timeout=30)
        assert metric_value(s.metrics(), "kvtier_skipped_stores_total", reason="dram_full") == 0
    with server(model_dir, store, tmp_path / "b.log", **kw) as s:
        r = s.complete(p)
        assert cached(r) == FULL_BLOCK_TOKENS and text(r) == first
