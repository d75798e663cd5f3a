"""A store nobody without the secret can poison, and that no planted file can
redirect or block (issue 18), on every I/O backend this build has.

Real faults: records forged without the secret (plain, with another secret's
MAC, a payload swapped with its checksums recomputed), symlinks, hard links and
FIFOs planted in free/ and in the record tree, world-writable, foreign-owned
and symlinked directories. Each protection is shown to matter by a negative
control where one is possible without the product (the planted record *is*
served by a store without a secret; the planted symlink *is* written through by
a plain open).
"""

import os
import stat
import threading
import time

import numpy as np
import pytest
import xxhash

from kvtier.config import ConfigError, KVTierConfig
from kvtier.copy.engine import HostPool
from kvtier.store import disk as store_mod
from kvtier.store.disk import DiskStore, UnsafeStore
from kvtier.store.record import (HEADER_BYTES, MAC_OFFSET, RecordError, pack_header, parse_header,
                                 record_bytes)
from kvtier.store.secret import SecretError, StoreKeys, read_secret
from kvtier.store.tool import cmd_verify, main as store_tool

NS = bytes(range(16))
PAYLOAD = 5 * 4096 + 123
REC = record_bytes(PAYLOAD)
BACKENDS = ["off"] + (["threads"] if store_mod._IoEngine is not None else [])


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(i.to_bytes(8, "little"))


@pytest.fixture
def pool():
    p = HostPool(16, REC)
    yield p
    p.close()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "secret"
    p.write_bytes(os.urandom(32).hex().encode() + b"\n")
    p.chmod(0o400)
    return p


def payload(pool, slot, seed):
    rec = pool.slot(slot)
    rng = np.random.default_rng(seed)
    rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD] = rng.integers(0, 256, PAYLOAD, dtype=np.uint8)
    return rec


def sealed(store: DiskStore, pool, slot, k: bytes):
    rec = payload(pool, slot, int.from_bytes(k[:4], "little"))
    store.seal(rec, k, PAYLOAD)
    return rec[:REC]


def finishes(fn, timeout=10.0):
    """fn()'s result, failing (not hanging) if it blocks: a FIFO must never block."""
    out = {}

    def run():
        try:
            out["r"] = fn()
        except BaseException as e:   # re-raised on the test's thread
            out["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"blocked for {timeout} s"
    if "e" in out:
        raise out["e"]
    return out.get("r")


# -- the secret file --------------------------------------------------------------


def test_secret_file_checks(tmp_path, secret):
    assert len(read_secret(secret)) == 64           # hex text, the newline stripped
    loose = tmp_path / "loose"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    with pytest.raises(SecretError, match="readable or writable by every user"):
        read_secret(loose)
    short = tmp_path / "short"
    short.write_bytes(b"tooshort\n")
    short.chmod(0o600)
    with pytest.raises(SecretError, match="at least 16"):
        read_secret(short)
    link = tmp_path / "link"                        # Kubernetes mounts Secrets as symlinks
    link.symlink_to(secret)
    assert read_secret(link) == read_secret(secret)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretError, match="not a regular file"):
        finishes(lambda: read_secret(fifo))
    # At start-up: a ConfigError naming the key; shared needs a secret.
    with pytest.raises(ConfigError, match="secret_file.*every user"):
        KVTierConfig.from_extra_config({"disk_path": str(tmp_path / "s"), "disk_bytes": "1GiB",
                                        "secret_file": str(loose)})
    with pytest.raises(ConfigError, match="'shared'.*secret_file"):
        KVTierConfig.from_extra_config({"shared": True})
    cfg = KVTierConfig.from_extra_config({"disk_path": str(tmp_path / "s"), "shared": "true",
                                          "secret_file": str(secret)})
    assert cfg.shared and cfg.secret_file == str(secret)


def test_keyed_names_are_a_permutation(secret, tmp_path):
    keys = StoreKeys.load(secret)
    other = StoreKeys(os.urandom(32))
    ks = [key(i) for i in range(2000)]
    names = [keys.name(k) for k in ks]
    assert [keys.key_of(n) for n in names] == ks
    assert len(set(names)) == len(ks)
    assert not set(names) & set(ks)
    assert all(other.name(k) != n for k, n in zip(ks, names))
    assert keys.namespace_id(NS) != NS and keys.namespace_id(NS) != other.namespace_id(NS)


# -- authenticated records ---------------------------------------------------------


def test_authenticated_roundtrip_and_names(tmp_path, pool, backend, secret):
    s = DiskStore(tmp_path / "kv", NS, 0, 1, native_io=backend, secret_file=secret)
    ks = [key(i) for i in range(4)]
    recs = [sealed(s, pool, i, k).copy() for i, k in enumerate(ks)]
    assert s.write_batch([(k, pool.slot(i)[:REC]) for i, k in enumerate(ks)]) == [REC] * 4
    assert s.read_batch([(k, pool.slot(4 + i), PAYLOAD) for i, k in enumerate(ks)]) == [None] * 4
    for i in range(4):
        assert np.array_equal(pool.slot(4 + i)[:REC], recs[i])
    # Names reveal nothing: no key, no namespace digest anywhere in the tree.
    tree = [p.name for p in (tmp_path / "kv").rglob("*")]
    assert not any(k.hex() in n for k in ks for n in tree)
    assert NS.hex() not in tree
    h = parse_header(recs[0])
    assert h.authenticated and h.key == s.name(ks[0]) and h.namespace == s.namespace_id
    assert sorted(i.key for i in s.scan()) == sorted(ks)    # names turn back into keys
    assert sorted(s.scan_mtimes()) == sorted(ks)
    # The offline tool verifies the structure without the secret, the MACs with it.
    assert cmd_verify(tmp_path / "kv", delete=False, as_json=True) == 0
    assert store_tool(["verify", str(tmp_path / "kv"), "--secret-file", str(secret)]) == 0


def forge_plain(store, pool, k):
    """What anyone who can write the directory can make: a record with the right
    key and namespace (predictable), a payload of their own, valid checksums."""
    rec = payload(pool, 7, 99)
    pack_header(rec, store.namespace_id, store.name(k), 0, 1, PAYLOAD,
                xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD]))
    return rec[:REC].tobytes()


def test_forged_records_are_misses(tmp_path, pool, backend, secret):
    s = DiskStore(tmp_path / "kv", NS, 0, 1, native_io=backend, secret_file=secret)
    ks = [key(i) for i in range(5)]
    for i, k in enumerate(ks):
        s.write(k, sealed(s, pool, i % 4, k))
    # 1. a plain record (no MAC) with the right key, planted over the real one
    s.path(ks[0]).write_bytes(forge_plain(s, pool, ks[0]))
    # 2. a record authenticated under another secret
    rec = payload(pool, 7, 98)
    pack_header(rec, s.namespace_id, s.name(ks[1]), 0, 1, PAYLOAD,
                xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD]),
                keys=StoreKeys(os.urandom(32)))
    s.path(ks[1]).write_bytes(rec[:REC].tobytes())
    # 3. the real header and MAC over another payload, its checksums recomputed
    data = bytearray(s.path(ks[2]).read_bytes())
    data[HEADER_BYTES:HEADER_BYTES + PAYLOAD] = os.urandom(PAYLOAD)
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    mac = bytes(arr[MAC_OFFSET:MAC_OFFSET + 32])
    h = parse_header(arr)
    pack_header(arr, h.namespace, h.key, 0, 1, PAYLOAD,
                xxhash.xxh3_64_intdigest(arr[HEADER_BYTES:HEADER_BYTES + PAYLOAD]), h.created)
    arr[:8] = np.frombuffer(b"KVTIERA\x00", dtype=np.uint8)   # claims to be authenticated
    from kvtier.store.record import _HEADER, _HEADER_CRC
    arr[_HEADER.size:_HEADER.size + 8] = np.frombuffer(
        _HEADER_CRC.pack(xxhash.xxh3_64_intdigest(bytes(arr[:_HEADER.size]))), dtype=np.uint8)
    arr[MAC_OFFSET:MAC_OFFSET + 32] = np.frombuffer(mac, dtype=np.uint8)
    s.path(ks[2]).write_bytes(arr.tobytes())
    # 4. another block's genuine record copied over this one's
    s.path(ks[3]).write_bytes(s.path(ks[4]).read_bytes())
    res = s.read_batch([(k, pool.slot(8 + i), PAYLOAD) for i, k in enumerate(ks)])
    reasons = [r.reason if isinstance(r, RecordError) else r for r in res]
    assert reasons == ["bad_mac", "bad_mac", "bad_mac", "wrong_key", None]
    # 5. a record planted where a store without the secret would look: never read
    plain = DiskStore(tmp_path / "kv", NS, 0, 1, native_io=backend)
    k6 = key(6)
    plain.path(k6).parent.mkdir(mode=0o700, exist_ok=True)
    plain.path(k6).write_bytes(forge_plain(plain, pool, k6))
    with pytest.raises(RecordError) as e:
        s.read(k6, pool.slot(5), PAYLOAD)
    assert e.value.reason == "missing"
    assert k6 not in s.scan_mtimes()
    # The offline tool finds the forgeries with the secret (not without: plain
    # records are well-formed).
    assert store_tool(["verify", str(tmp_path / "kv"), "--secret-file", str(secret)]) == 1


def test_a_long_authenticated_batch_checks_every_mac(tmp_path, backend, secret):
    """A batch longer than 2 x io_threads is read in parts, each part's MACs checked
    while the next part is read: every item still gets its own verdict."""
    pool = HostPool(24, REC)
    try:
        s = DiskStore(tmp_path / "kv", NS, 0, 1, native_io=backend, secret_file=secret,
                      io_threads=2)
        ks = [key(i) for i in range(12)]
        recs = []
        for i, k in enumerate(ks):
            recs.append(sealed(s, pool, i, k).copy())
            s.write(k, pool.slot(i)[:REC])
        forged = {1, 6, 11}                            # in the first, second and last part
        for i in forged:
            s.path(ks[i]).write_bytes(forge_plain(s, pool, ks[i]))
        res = s.read_batch([(k, pool.slot(12 + i), PAYLOAD) for i, k in enumerate(ks)])
        assert [getattr(r, "reason", r) for r in res] == \
            ["bad_mac" if i in forged else None for i in range(12)]
        for i in set(range(12)) - forged:
            assert np.array_equal(pool.slot(12 + i)[:REC], recs[i])
    finally:
        pool.close()


def test_negative_control_a_store_without_secret_serves_the_forgery(tmp_path, pool, backend):
    """What the MAC protects against: without a secret the forged record passes."""
    s = DiskStore(tmp_path / "kv", NS, 0, 1, native_io=backend)
    k = key(1)
    s.write(k, sealed(s, pool, 0, k))
    s.path(k).write_bytes(forge_plain(s, pool, k))
    s.read(k, pool.slot(1), PAYLOAD)    # accepted: checksums cannot tell
    assert bytes(pool.slot(1)[HEADER_BYTES:HEADER_BYTES + 64]) == \
        bytes(payload(pool, 2, 99)[HEADER_BYTES:HEADER_BYTES + 64])


def test_authenticated_and_plain_stores_do_not_meet(tmp_path, pool, secret):
    """Same directory, one engine with the secret, one without: disjoint namespaces."""
    a = DiskStore(tmp_path / "kv", NS, 0, 1, secret_file=secret)
    b = DiskStore(tmp_path / "kv", NS, 0, 1)
    assert a.dir != b.dir
    a.write(key(1), sealed(a, pool, 0, key(1)))
    with pytest.raises(RecordError):
        b.read(key(1), pool.slot(1), PAYLOAD)


# -- planted links and FIFOs ---------------------------------------------------------


def test_symlink_and_hardlink_in_free_are_not_written_through(tmp_path, pool, backend):
    s = DiskStore(tmp_path / "kv", NS, 0, 1, native_io=backend, free_files=4)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    linked = tmp_path / "linked"
    linked.write_bytes(b"also precious" * 1000)
    os.symlink(victim, s.free / "aa.1.1")
    os.link(linked, s.free / "bb.1.1")
    fifo = s.free / "cc.1.1"
    os.mkfifo(fifo, 0o600)
    ks = [key(i) for i in range(6)]
    res = finishes(lambda: [s.write(k, sealed(s, pool, i % 4, k)) for i, k in enumerate(ks)])
    assert res == [REC] * 6
    assert victim.read_bytes() == b"precious" * 1000
    assert linked.read_bytes() == b"also precious" * 1000 and linked.stat().st_nlink == 1
    assert not any((s.free / n).exists() or (s.free / n).is_symlink()
                   for n in ("aa.1.1", "bb.1.1", "cc.1.1"))
    assert s.read_batch([(k, pool.slot(8 + i), PAYLOAD) for i, k in enumerate(ks)]) \
        == [None] * 6
    assert list(s.tmp.iterdir()) == []


def test_negative_control_a_plain_open_writes_through_the_link(tmp_path):
    """What O_NOFOLLOW prevents: the reuse path's open without it follows the link."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "free-file"
    os.symlink(victim, link)
    fd = os.open(link, os.O_WRONLY)
    os.pwrite(fd, b"OVERWRIT", 0)
    os.close(fd)
    assert victim.read_bytes() == b"OVERWRIT"


def test_fifo_and_symlink_records_are_refused(tmp_path, pool, backend):
    s = DiskStore(tmp_path / "kv", NS, 0, 1, native_io=backend, free_files=4)
    ks = [key(i) for i in range(4)]
    for i, k in enumerate(ks):
        s.write(k, sealed(s, pool, i, k))
    s.path(ks[0]).unlink()
    os.mkfifo(s.path(ks[0]), 0o600)                        # a FIFO named like a record
    victim = tmp_path / "victim"
    victim.write_bytes(s.path(ks[3]).read_bytes())        # a valid record, outside the store
    s.path(ks[1]).unlink()
    os.symlink(victim, s.path(ks[1]))                      # a symlink named like one
    res = finishes(lambda: s.read_batch([(k, pool.slot(4 + i), PAYLOAD)
                                         for i, k in enumerate(ks[:3])]))
    reasons = [r.reason if isinstance(r, RecordError) else r for r in res]
    assert reasons == ["not_regular", "not_regular", None]
    with pytest.raises(RecordError) as e:
        finishes(lambda: s.read(ks[0], pool.slot(4), PAYLOAD))
    assert e.value.reason == "not_regular"
    # Scans do not index them; removal unlinks them (never into free/).
    assert sorted(s.scan_mtimes()) == sorted(ks[2:])
    assert s.mtime(ks[0]) is None and s.mtime(ks[1]) is None
    before = os.stat(victim).st_mtime
    s.touch(ks[1], time.time() - 5000)                     # touch does not follow either
    assert os.stat(victim).st_mtime == before
    assert s.remove(ks[0]) and s.remove(ks[1])
    assert list(s.free.iterdir()) == []
    assert not os.path.lexists(s.path(ks[0])) and victim.exists()


def test_store_tool_does_not_follow_or_block(tmp_path, pool):
    s = DiskStore(tmp_path / "kv", NS, 0, 1)
    k = key(1)
    s.write(k, sealed(s, pool, 0, k))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "dead.1.1").write_bytes(b"x")
    past = time.time() - 7200
    os.utime(outside / "dead.1.1", (past, past))
    os.rmdir(s.tmp)
    os.symlink(outside, s.tmp)                             # a tmp/ that leads elsewhere
    os.mkfifo(s.path(k).parent / (s.path(k).parent.name + "0" * 30), 0o600)   # named like one
    rc = finishes(lambda: store_tool(["gc", str(tmp_path / "kv"), "--json"]))
    assert rc == 0 and (outside / "dead.1.1").exists()
    assert finishes(lambda: cmd_verify(tmp_path / "kv", delete=False, as_json=True)) in (0, 1)


# -- directories ------------------------------------------------------------------------


def test_unsafe_store_directories_are_refused(tmp_path):
    ww = tmp_path / "ww"
    ww.mkdir()
    ww.chmod(0o777)
    with pytest.raises(UnsafeStore, match="world-writable.*chmod 0700"):
        DiskStore(ww, NS, 0, 1)
    ww.chmod(0o700)
    DiskStore(ww, NS, 0, 1)                                 # fixed: it opens
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(UnsafeStore, match="owned by uid 65534"):
            DiskStore(theirs, NS, 0, 1)
    # kvtier's own directories: no symlinks, no group or world write.
    s = DiskStore(tmp_path / "kv", NS, 0, 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.rename(s.dir, tmp_path / "moved")
    os.symlink(elsewhere, s.dir)
    with pytest.raises(UnsafeStore, match="symlink"):
        DiskStore(tmp_path / "kv", NS, 0, 1)
    os.unlink(s.dir)
    os.rename(tmp_path / "moved", s.dir)
    s.dir.parent.chmod(0o770)
    with pytest.raises(UnsafeStore, match="group-writable"):
        DiskStore(tmp_path / "kv", NS, 0, 1)
    s.dir.parent.chmod(0o700)
    shard = s.dir / "ab"
    os.symlink(elsewhere, shard)
    with pytest.raises(UnsafeStore, match="ab is a symlink"):
        DiskStore(tmp_path / "kv", NS, 0, 1)
    os.unlink(shard)
    # The store directory itself may be a symlink (an operator's choice).
    (tmp_path / "via").symlink_to(tmp_path / "kv")
    DiskStore(tmp_path / "via", NS, 0, 1)
    assert stat.S_IMODE(os.stat(s.dir).st_mode) == 0o700
