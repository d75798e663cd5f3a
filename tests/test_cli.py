import json
import os
import time

import numpy as np
import xxhash

from kvtier.cli import main
from kvtier.copy.engine import HostPool
from kvtier.store.disk import DiskStore
from kvtier.store.record import HEADER_BYTES, pack_header, record_bytes

NS = bytes(range(16))
PAYLOAD = 8192


def write(store: DiskStore, pool: HostPool, i: int, age: float = 0.0):
    key = i.to_bytes(16, "big")
    rec = pool.slot(0)
    rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD] = i % 251
    pack_header(rec, NS, key, store.rank, store.tp_size, PAYLOAD,
                xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD]))
    store.write(key, rec[:record_bytes(PAYLOAD)])
    if age:
        t = time.time() - age
        os.utime(store.path(key), (t, t))
    return store.path(key)


def test_serve_rejects_bad_config_before_starting_vllm(capsys):
    assert main(["serve", "--dram-bytes", "lots"]) == 2
    err = capsys.readouterr().err
    assert "dram_bytes" in err and "'lots'" in err
    assert main(["serve", "--kvtier-config", '{"ttl": 5}']) == 2
    assert "unknown key" in capsys.readouterr().err


def test_unknown_command_prints_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "serve" in capsys.readouterr().err


def test_store_stats_verify_gc(tmp_path, capsys):
    pool = HostPool(1, record_bytes(PAYLOAD))
    ranks = [DiskStore(tmp_path, NS, r, 2) for r in (0, 1)]
    for i in range(6):                       # blocks 0-1 old, 2-5 recent; both ranks
        for s in ranks:
            write(s, pool, i, age=7200 if i < 2 else 10 * (6 - i))
    assert main(["store", "stats", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["total"]["records"] == 12
    assert stats["namespaces"][0]["age_histogram"][">=1d"] == 0
    # Corrupt one record: verify finds it (exit 1), --delete removes it.
    victim = ranks[1].path((3).to_bytes(16, "big"))
    data = bytearray(victim.read_bytes())
    data[HEADER_BYTES + 1] ^= 1
    victim.write_bytes(data)
    assert main(["store", "verify", str(tmp_path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out == {"records": 12, "bad": 1, "by_reason": {"checksum": 1}}
    assert main(["store", "verify", str(tmp_path), "--delete"]) == 0
    capsys.readouterr()
    assert not victim.exists()
    # gc: TTL 1 h drops blocks 0-1 (both ranks); a budget of 2 blocks keeps the newest.
    one_block = 2 * record_bytes(PAYLOAD)
    assert main(["store", "gc", str(tmp_path), "--ttl-seconds", "3600", "--max-bytes",
                 str(2 * one_block), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed_blocks"]["expired"] == 2
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and len(p.name) == 32)
    assert left == sorted([(4).to_bytes(16, "big").hex(), (5).to_bytes(16, "big").hex()] * 2)
    assert main(["store", "gc", str(tmp_path / "nope")]) == 2
