import os
import stat
import time

import numpy as np
import pytest
import xxhash

from kvtier.copy.engine import HostPool
from kvtier.store.disk import DiskStore
from kvtier.store.record import HEADER_BYTES, RecordError, pack_header, record_bytes

NS = bytes(range(16))
PAYLOAD = 3 * 4096 + 100


def make_record(key: bytes, pool: HostPool, slot: int = 0, rank: int = 0, ns: bytes = NS):
    rec = pool.slot(slot)
    rng = np.random.default_rng(int.from_bytes(key[:4], "little"))
    rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD] = rng.integers(0, 256, PAYLOAD, dtype=np.uint8)
    pack_header(rec, ns, key, rank, 1, PAYLOAD,
                xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD]))
    return rec[:record_bytes(PAYLOAD)]


@pytest.fixture
def pool():
    return HostPool(4, record_bytes(PAYLOAD))


@pytest.fixture
def store(tmp_path):
    return DiskStore(tmp_path / "kv", NS, rank=0, tp_size=1)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_roundtrip_permissions_and_scan(store, pool, tmp_path):
    rec = make_record(key(1), pool)
    store.write(key(1), rec)
    out = pool.slot(1)
    store.read(key(1), out, PAYLOAD)
    assert np.array_equal(out[:len(rec)], rec)
    p = store.path(key(1))
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    for d in (tmp_path / "kv", store.dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    infos = list(store.scan())
    assert [(i.key, i.size) for i in infos] == [(key(1), record_bytes(PAYLOAD))]
    assert not list(store.tmp.iterdir())            # nothing left behind


def corrupt(path, fn):
    data = bytearray(path.read_bytes())
    data = fn(data)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (lambda d: d[:HEADER_BYTES + 10], "truncated"),
    (lambda d: b"", "truncated"),
    (lambda d: d[:50] + bytes([d[50] ^ 1]) + d[51:], "bad_header"),
    (lambda d: d[:HEADER_BYTES + 5] + bytes([d[HEADER_BYTES + 5] ^ 0x10])
     + d[HEADER_BYTES + 6:], "checksum"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), None),   # padding: not payload, still valid
])
def test_damage_is_detected(store, pool, damage, reason):
    store.write(key(2), make_record(key(2), pool))
    corrupt(store.path(key(2)), damage)
    if reason is None:
        store.read(key(2), pool.slot(1), PAYLOAD)
        return
    with pytest.raises(RecordError) as e:
        store.read(key(2), pool.slot(1), PAYLOAD)
    assert e.value.reason == reason


def test_missing_wrong_key_wrong_namespace(store, pool, tmp_path):
    with pytest.raises(RecordError) as e:
        store.read(key(3), pool.slot(1), PAYLOAD)
    assert e.value.reason == "missing"
    # A record renamed to another key's name.
    store.write(key(4), make_record(key(4), pool))
    os.makedirs(store.path(key(5)).parent, exist_ok=True)
    os.replace(store.path(key(4)), store.path(key(5)))
    with pytest.raises(RecordError) as e:
        store.read(key(5), pool.slot(1), PAYLOAD)
    assert e.value.reason == "wrong_key"
    # A record of another namespace planted in this namespace's directory.
    other = bytes(16)
    rec = make_record(key(6), pool, ns=other)
    store.write(key(6), rec)
    with pytest.raises(RecordError) as e:
        store.read(key(6), pool.slot(1), PAYLOAD)
    assert e.value.reason == "wrong_namespace"
    # Another rank's record is not this rank's.
    rec = make_record(key(7), pool, rank=1)
    store.write(key(7), rec)
    with pytest.raises(RecordError) as e:
        store.read(key(7), pool.slot(1), PAYLOAD)
    assert e.value.reason == "wrong_namespace"


def test_hostile_header_lengths(store, pool):
    """A header claiming a huge payload is rejected before anything is read into memory."""
    rec = make_record(key(8), pool)
    store.write(key(8), rec)
    with pytest.raises(RecordError):
        store.read(key(8), pool.slot(1), PAYLOAD + 4096 * 1000)


def test_keys_cannot_traverse(store):
    hostile = b"../../etc/passwd"                # 16 bytes: rendered as hex, stays inside
    assert store.path(hostile).resolve().is_relative_to(store.dir.resolve())
    with pytest.raises(ValueError):
        store.path(b"../../../etc/passwd")       # not a key at all


def test_temp_sweep_leaves_young_files(store):
    old = store.tmp / "dead.1.1"
    young = store.tmp / "live.2.2"
    old.write_bytes(b"x")
    young.write_bytes(b"x")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert store.sweep_temp(older_than=600) == 1
    assert young.exists() and not old.exists()


def test_write_failure_leaves_nothing(tmp_path, pool, monkeypatch):
    """The Python I/O path (the native one meets a real ENOSPC in test_store_io)."""
    store = DiskStore(tmp_path / "py", NS, rank=0, tp_size=1, native_io="off")
    rec = make_record(key(9), pool)

    def enospc(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", enospc)
    with pytest.raises(OSError):
        store.write(key(9), rec)
    assert not store.path(key(9)).exists() and not list(store.tmp.iterdir())
