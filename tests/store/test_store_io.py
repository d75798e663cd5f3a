"""The disk store's native I/O path (csrc/io/io_*.cpp, ``kvtier._copy_engine.IoEngine``).

Round trips through every backend this build has, against the Python path;
O_DIRECT where the filesystem allows it and buffered I/O where it does not;
real errors (a full tmpfs, a read-only remount) coming back as OSError with
their errno and nothing left behind; and the same validation of what is read.
Filesystem faults need root to mount a tmpfs/ramfs: skipped otherwise.
"""

import errno
import logging
import mmap
import os
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvtier.store import disk as store_mod
from kvtier.copy.engine import HostPool
from kvtier.store.disk import DiskStore
from kvtier.store.record import HEADER_BYTES, RecordError, pack_header, record_bytes

native = pytest.mark.skipif(store_mod._IoEngine is None,
                            reason="kvtier._copy_engine has no IoEngine (extension not built)")

NS = bytes(range(16))
PAYLOAD = 5 * 4096 + 123          # not a multiple of the page: padding in the record
REC = record_bytes(PAYLOAD)


def backends() -> list[str]:
    out = ["off"]
    if store_mod._IoEngine is not None:
        out.append("threads")
    return out


BACKENDS = backends()
NATIVE_BACKENDS = [b for b in BACKENDS if b != "off"]


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(i.to_bytes(8, "little"))


def fill(pool: HostPool, slot: int, k: bytes, rank: int = 0, ns: bytes = NS,
         payload: int = PAYLOAD) -> np.ndarray:
    rec = pool.slot(slot)
    rng = np.random.default_rng(int.from_bytes(k[:4], "little"))
    rec[HEADER_BYTES:HEADER_BYTES + payload] = rng.integers(0, 256, payload, dtype=np.uint8)
    pack_header(rec, ns, k, rank, 1, payload,
                xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + payload]))
    return rec[:record_bytes(payload)]


@contextmanager
def mounted(path: Path, fstype: str, opts: str = ""):
    path.mkdir(parents=True, exist_ok=True)
    args = ["mount", "-t", fstype] + (["-o", opts] if opts else []) + [fstype, str(path)]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {fstype} here ({r.stderr.strip() or r.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def o_direct_allowed(d: Path) -> bool:
    """Whether an aligned O_DIRECT write works in ``d`` (the raw probe)."""
    p = d / ".odirect-probe"
    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
        try:
            os.pwrite(fd, buf, 0)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        p.unlink(missing_ok=True)


@pytest.fixture
def pool():
    p = HostPool(8, REC)
    yield p
    p.close()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def make(root, backend, **kw) -> DiskStore:
    return DiskStore(root, NS, 0, 1, native_io=backend, **kw)


# -- round trips -----------------------------------------------------------------


def test_backend_selection(tmp_path, monkeypatch):
    assert make(tmp_path / "p", "off").io_backend == "python"
    monkeypatch.setenv("KVTIER_NATIVE_IO", "off")
    assert DiskStore(tmp_path / "e", NS, 0, 1).io_backend == "python"
    with pytest.raises(ValueError):
        make(tmp_path / "x", "bogus")
    if store_mod._IoEngine is not None:
        monkeypatch.setenv("KVTIER_NATIVE_IO", "auto")
        assert DiskStore(tmp_path / "a", NS, 0, 1).io_backend == "threads"
        assert make(tmp_path / "t", "threads").io_backend == "threads"


def test_roundtrip(tmp_path, pool, backend):
    """Round trip with O_DIRECT: skipped, with the reason, where the test's
    directory does not take it (the buffered path has its own tests below)."""
    if not o_direct_allowed(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT (a ramfs, or a tmpfs before Linux 6.6): "
                    "run pytest with --basetemp on a disk filesystem to test it")
    s = make(tmp_path / "kv", backend, fsync=True)
    assert s.o_direct
    keys = [key(i) for i in range(4)]
    recs = [fill(pool, i, k).copy() for i, k in enumerate(keys)]
    # Batch write from page-aligned slots, single write, batch read, single read.
    assert s.write_batch([(k, pool.slot(i)[:REC]) for i, k in enumerate(keys[:3])]) == [REC] * 3
    assert s.write(keys[3], pool.slot(3)[:REC]) == REC
    pool.array[4 * REC:] = 0
    got = s.read_batch([(k, pool.slot(4 + i), PAYLOAD) for i, k in enumerate(keys[:3])])
    assert got == [None, None, None]
    for i in range(3):
        assert np.array_equal(pool.slot(4 + i)[:REC], recs[i])
    s.read(keys[3], pool.slot(7), PAYLOAD)
    assert np.array_equal(pool.slot(7)[:REC], recs[3])
    for k in keys:
        p = s.path(k)
        assert p.stat().st_size == REC
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700   # shard made by the publisher
        assert p.read_bytes() == recs[keys.index(k)].tobytes()
    assert not list(s.tmp.iterdir())
    assert sorted(i.key for i in s.scan()) == sorted(keys)


def test_same_files_from_every_backend(tmp_path, pool):
    """What one backend writes, every other reads, byte for byte."""
    k = key(7)
    rec = fill(pool, 0, k).copy()
    for wb in BACKENDS:
        root = tmp_path / wb
        make(root, wb).write(k, pool.slot(0)[:REC])
        for rb in BACKENDS:
            pool.slot(1)[:] = 0
            make(root, rb).read(k, pool.slot(1), PAYLOAD)
            assert np.array_equal(pool.slot(1)[:REC], rec), (wb, rb)


def test_unaligned_buffers_go_buffered(tmp_path, backend):
    """O_DIRECT needs aligned memory: other buffers are written/read without it."""
    s = make(tmp_path / "kv", backend)
    raw = np.zeros(REC + 1, dtype=np.uint8)
    rec = raw[1:] if raw.ctypes.data % 4096 == 0 else raw[:REC]
    assert rec.ctypes.data % 4096 != 0
    pool = HostPool(1, REC)
    rec[:] = fill(pool, 0, key(1))
    s.write(key(1), rec)
    out = np.zeros(REC + 7, dtype=np.uint8)[3:]
    s.read(key(1), out, PAYLOAD)
    assert np.array_equal(out[:REC], rec)
    s.write(key(2), bytes(fill(pool, 0, key(2))))   # any buffer object
    s.read(key(2), bytearray(REC), PAYLOAD)


@native
@pytest.mark.parametrize("b", NATIVE_BACKENDS)
def test_native_digest_is_xxh3(tmp_path, pool, b):
    """The payload checksum computed on the I/O threads is the Python package's xxh3."""
    s = make(tmp_path / "kv", b)
    recs = [fill(pool, i, key(i)) for i in range(3)]
    s.write_batch([(key(i), recs[i]) for i in range(3)])
    eng = s._io
    reqs = [(str(s.path(key(i))), pool.slot(4 + i).ctypes.data, REC, True, HEADER_BYTES, PAYLOAD)
            for i in range(3)]
    for (err, got, size, digest, not_regular), i in zip(eng.read_records(reqs), range(3)):
        assert not not_regular
        assert (err, got, size) == (0, REC, REC)
        assert digest == xxhash.xxh3_64_intdigest(pool.slot(4 + i)[HEADER_BYTES:HEADER_BYTES + PAYLOAD])


# A record as kvtier writes it (format version 1, payload checksum XXH3-64): the
# bytes are fixed here, so a store written by an earlier build (the checksum was
# computed by a vendored copy of xxHash then, by the system's libxxhash now, by
# the `xxhash` package on the Python path) must still verify.
GOLDEN_PAYLOAD = bytes((i * 7 + 3) % 256 for i in range(PAYLOAD))
GOLDEN_XXH3 = 0x7C76D73A5CAC7067
GOLDEN_KEY, GOLDEN_RANK, GOLDEN_TP = bytes(range(100, 116)), 1, 2
GOLDEN_HEADER = bytes.fromhex(
    "4b565449455242000100000000100000000102030405060708090a0b0c0d0e0f6465666768696a6b"
    "6c6d6e6f7071727301000000020000007b500000000000006770ac5c3ad7767c00000040fc54d941"
    "9fe4c7dec4975ac00000000000000000")


def golden_record(header: bytes = GOLDEN_HEADER) -> bytes:
    return (header + bytes(HEADER_BYTES - len(header)) + GOLDEN_PAYLOAD
            + bytes(REC - HEADER_BYTES - PAYLOAD))


def test_checksum_is_xxh3_64_and_old_records_verify(tmp_path, pool, backend):
    """The record format is pinned: the payload and header checksums are XXH3-64,
    and a record written before (fixed bytes) reads back valid through every backend."""
    assert xxhash.xxh3_64_intdigest(GOLDEN_PAYLOAD) == GOLDEN_XXH3
    buf = np.zeros(HEADER_BYTES, dtype=np.uint8)
    pack_header(buf, NS, GOLDEN_KEY, GOLDEN_RANK, GOLDEN_TP, PAYLOAD, GOLDEN_XXH3,
                created=1700000000.0)
    assert bytes(buf[:len(GOLDEN_HEADER)]) == GOLDEN_HEADER
    s = DiskStore(tmp_path / "kv", NS, GOLDEN_RANK, GOLDEN_TP, native_io=backend)
    s.path(GOLDEN_KEY).parent.mkdir(mode=0o700)
    s.path(GOLDEN_KEY).write_bytes(golden_record())
    s.read(GOLDEN_KEY, pool.slot(0), PAYLOAD)
    assert bytes(pool.slot(0)[HEADER_BYTES:HEADER_BYTES + PAYLOAD]) == GOLDEN_PAYLOAD
    if backend != "off":   # the digest computed on the I/O threads
        (res,) = s._io.read_records([(str(s.path(GOLDEN_KEY)), pool.slot(1).ctypes.data, REC,
                                      True, HEADER_BYTES, PAYLOAD)])
        assert res == (0, REC, REC, GOLDEN_XXH3, False)   # (False: a regular file)


def test_other_format_version_is_refused_by_name(tmp_path, pool, backend):
    """A record of another format version (its header checksum valid) is refused with
    an error that says "format version", never read as this version's."""
    head = bytearray(GOLDEN_HEADER[:80])         # the fields; then their XXH3-64
    head[8:12] = (2).to_bytes(4, "little")          # the version field
    crc = xxhash.xxh3_64_intdigest(bytes(head)).to_bytes(8, "little")
    s = DiskStore(tmp_path / "kv", NS, GOLDEN_RANK, GOLDEN_TP, native_io=backend)
    s.path(GOLDEN_KEY).parent.mkdir(mode=0o700)
    s.path(GOLDEN_KEY).write_bytes(golden_record(bytes(head) + crc))
    with pytest.raises(RecordError) as e:
        s.read(GOLDEN_KEY, pool.slot(0), PAYLOAD)
    assert e.value.reason == "bad_header"
    assert "record format version 2" in str(e.value) and "reads format version 1" in str(e.value)


@native
def test_gil_released(tmp_path):
    """Python keeps running while a batch is on the disk: the GIL is released for the
    I/O (held, this thread would stall for the whole call)."""
    s = make(tmp_path / "kv", "threads")
    n, size = 24, 4 << 20
    big = HostPool(n, record_bytes(size))
    items = [(key(i), fill(big, i, key(i), payload=size)) for i in range(n)]
    span = {}

    def write():
        span["t0"] = time.perf_counter()
        span["res"] = s.write_batch(items)
        span["t1"] = time.perf_counter()

    t = threading.Thread(target=write)
    t.start()
    gaps, last = [], time.perf_counter()
    while t.is_alive():
        now = time.perf_counter()
        gaps.append((now, now - last))
        last = now
    t.join()
    big.close()
    assert all(r == record_bytes(size) for r in span["res"])
    took = span["t1"] - span["t0"]
    if took < 0.05:
        pytest.skip(f"batch took {took * 1e3:.0f} ms: too fast to tell")
    inside = [g for at, g in gaps if span["t0"] + 0.005 < at < span["t1"]]
    assert inside and max(inside) < 0.5 * took, (max(inside, default=None), took)


# -- validation on the native path ------------------------------------------------


def damage(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


def test_validation_per_item(tmp_path, pool, backend):
    s = make(tmp_path / "kv", backend)
    keys = [key(i) for i in range(7)]
    for i, k in enumerate(keys):
        s.write(k, fill(pool, 0, k))
    damage(s.path(keys[1]), lambda d: d[:HEADER_BYTES + 5] + bytes([d[HEADER_BYTES + 5] ^ 1])
           + d[HEADER_BYTES + 6:])                                           # payload bit flip
    damage(s.path(keys[2]), lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:])  # header bit flip
    damage(s.path(keys[3]), lambda d: d[:HEADER_BYTES + 100])                # truncated
    damage(s.path(keys[4]), lambda d: s.path(keys[0]).read_bytes())          # another key's
    s.path(keys[5]).unlink()                                                 # missing
    other = DiskStore(tmp_path / "other", bytes(16), 0, 1, native_io=backend)
    other.write(keys[6], fill(pool, 0, keys[6], ns=bytes(16)))
    s.path(keys[6]).write_bytes(other.path(keys[6]).read_bytes())          # wrong namespace
    outs = [pool.slot(1 + (i % 7)) for i in range(7)]
    res = s.read_batch([(k, o, PAYLOAD) for k, o in zip(keys, outs)])
    assert res[0] is None
    reasons = [r.reason if isinstance(r, RecordError) else r for r in res[1:]]
    assert reasons == ["checksum", "bad_header", "truncated", "wrong_key", "missing",
                       "wrong_namespace"]
    with pytest.raises(RecordError) as e:
        s.read(keys[1], pool.slot(1), PAYLOAD)
    assert e.value.reason == "checksum"
    # The padding after the payload is not covered: still valid.
    s.write(keys[0], fill(pool, 0, keys[0]))
    damage(s.path(keys[0]), lambda d: d[:-1] + bytes([d[-1] ^ 1]))
    s.read(keys[0], pool.slot(1), PAYLOAD)


def test_short_buffer_is_truncated_not_overrun(tmp_path, pool, backend):
    s = make(tmp_path / "kv", backend)
    s.write(key(1), fill(pool, 0, key(1)))
    guard = np.full(REC, 0xAB, dtype=np.uint8)
    buf = np.zeros(2 * REC, dtype=np.uint8)
    (r,) = s.read_batch([(key(1), buf[:REC // 2], PAYLOAD * 2)])
    assert isinstance(r, RecordError) and r.reason == "truncated"
    assert np.all(buf[REC // 2:] == 0) and np.all(guard == 0xAB)


# -- errors: errno, nothing left behind -------------------------------------------


def test_errno_of_failed_publish(tmp_path, pool, backend):
    """A shard path that is a file: the rename fails ENOTDIR; no temp file stays."""
    s = make(tmp_path / "kv", backend)
    k = key(3)
    s.path(k).parent.write_bytes(b"not a directory")
    with pytest.raises(OSError) as e:
        s.write(k, fill(pool, 0, k))
    assert e.value.errno == errno.ENOTDIR
    (r,) = s.write_batch([(k, fill(pool, 0, k))])
    assert isinstance(r, OSError) and r.errno == errno.ENOTDIR
    assert not list(s.tmp.iterdir())


@pytest.mark.parametrize("aligned", [True, False], ids=["o_direct", "buffered"])
def test_read_errors_are_oserror(tmp_path, pool, backend, aligned):
    """A directory where the record should be: an OSError (EISDIR) from every backend,
    with O_DIRECT (whose open refuses a directory with EINVAL) or without; not a
    RecordError (that would prove a record bad), and the path is left alone."""
    s = make(tmp_path / "kv", backend)
    k = key(4)
    s.path(k).parent.mkdir(mode=0o700)
    s.path(k).mkdir()                   # a directory where the record should be
    into = pool.slot(0) if aligned else np.zeros(REC + 1, dtype=np.uint8)[1:]
    assert s._direct_ok(into.ctypes.data, REC) == (aligned and s.o_direct)
    (r,) = s.read_batch([(k, into, PAYLOAD)])
    assert type(r) is IsADirectoryError and r.errno == errno.EISDIR, repr(r)
    with pytest.raises(IsADirectoryError):
        s.read(k, into, PAYLOAD)
    assert s.path(k).is_dir()


@pytest.fixture
def small_tmpfs(tmp_path):
    with mounted(tmp_path / "small", "tmpfs", "size=1m,mode=0700") as d:
        yield d


def test_enospc(small_tmpfs, pool, backend):
    s = make(small_tmpfs, backend)
    keys = [key(i) for i in range(64)]            # 64 x 28 KiB > 1 MiB
    many = HostPool(len(keys), REC)
    res = s.write_batch([(k, fill(many, i, k)) for i, k in enumerate(keys)])
    full = [r for r in res if isinstance(r, OSError)]
    assert full and all(r.errno == errno.ENOSPC for r in full)
    with pytest.raises(OSError) as e:
        s.write(key(1000), fill(pool, 0, key(1000)))
    assert e.value.errno == errno.ENOSPC
    assert not list(s.tmp.iterdir())              # failed records left no temp file
    # What was published is complete and valid.
    good = [k for k, r in zip(keys, res) if r == REC]
    assert good and set(good) == {i.key for i in s.scan()}
    many.array[:] = 0
    assert s.read_batch([(k, many.slot(i), PAYLOAD) for i, k in enumerate(good)]) \
        == [None] * len(good)
    many.close()


def test_erofs(small_tmpfs, pool, backend):
    s = make(small_tmpfs, backend)
    s.write(key(1), fill(pool, 0, key(1)))
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot remount read-only")
    try:
        with pytest.raises(OSError) as e:
            s.write(key(2), fill(pool, 0, key(2)))
        assert e.value.errno == errno.EROFS
        (w,) = s.write_batch([(key(3), fill(pool, 0, key(3)))])
        assert isinstance(w, OSError) and w.errno == errno.EROFS
        s.read(key(1), pool.slot(1), PAYLOAD)     # reads still work
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], capture_output=True)


# -- O_DIRECT where allowed, buffered (and said) where not -------------------------


@pytest.mark.parametrize("fstype", ["tmpfs", "ramfs"])
def test_o_direct_fallback(tmp_path, pool, backend, fstype, caplog):
    """tmpfs refuses O_DIRECT before Linux 6.6 and takes it since; ramfs refuses it:
    the store follows the filesystem, says so, and works either way."""
    # (mode 0700: kvtier refuses a world-writable store directory)
    with mounted(tmp_path / fstype, fstype,
                 "size=8m,mode=0700" if fstype == "tmpfs" else "mode=0700") as d:
        allowed = o_direct_allowed(d)
        with caplog.at_level(logging.WARNING, logger="vllm.kvtier.store"):
            s = make(d, backend)
        assert s.o_direct == allowed
        if not allowed:
            assert "does not allow O_DIRECT" in caplog.text
            with pytest.raises(OSError) as e:
                make(d / "on", backend, o_direct="on")
            assert e.value.errno == errno.EINVAL
        keys = [key(i) for i in range(3)]
        assert s.write_batch([(k, fill(pool, i, k)) for i, k in enumerate(keys)]) == [REC] * 3
        assert s.read_batch([(k, pool.slot(4 + i), PAYLOAD) for i, k in enumerate(keys)]) \
            == [None] * 3


# -- scan ---------------------------------------------------------------------------


def test_scan_native_equals_python(tmp_path, pool):
    root = tmp_path / "kv"
    s = make(root, "off")
    keys = [key(i) for i in range(50)]
    s.write_batch([(k, fill(pool, 0, k)) for k in keys])
    os.utime(s.path(keys[0]), (1000.25, 1000.25))
    # Things that are not records.
    (s.dir / "zz").mkdir()
    (s.dir / "zz" / ("ab" * 16)).write_bytes(b"x")       # not a hex shard name
    shard = s.path(keys[1]).parent
    (shard / ("AB" * 16)).write_bytes(b"x")               # upper case: not a name we write
    (shard / ("ab" * 15)).write_bytes(b"x")               # wrong length
    (shard / ("g" * 32)).write_bytes(b"x")                # not hex
    (shard / ("cd" * 16)).mkdir()                         # a directory
    os.symlink(s.path(keys[2]), shard / ("ef" * 16))      # a symlink
    (s.tmp / ("12" * 16)).write_bytes(b"x")               # a temp file
    want = sorted((i.key, i.rank, i.size, i.mtime) for i in s.scan())
    assert [w[0] for w in want] == sorted(keys)
    assert (keys[0], 0, REC, 1000.25) in want
    for b in BACKENDS:
        t = make(root, b)
        assert sorted((i.key, i.rank, i.size, i.mtime) for i in t.scan()) == want, b
        assert t.scan_mtimes() == {w[0]: w[3] for w in want}, b
    assert list(make(tmp_path / "empty", "off").scan()) == []


@native
def test_fork_gets_its_own_engine(tmp_path, pool):
    """A store used before fork() works in the child (the parent's I/O threads do not
    exist there)."""
    s = make(tmp_path / "kv", "threads")
    s.write_batch([(key(i), fill(pool, i, key(i))) for i in range(2)])   # threads started
    parent_engine = s._io
    pid = os.fork()
    if pid == 0:   # child: no pytest from here on, only an exit code
        code = 1
        try:
            ok = s._io is not parent_engine
            res = s.write_batch([(key(10 + i), fill(pool, 2 + i, key(10 + i))) for i in range(2)])
            back = s.read_batch([(key(10 + i), pool.slot(4 + i), PAYLOAD) for i in range(2)])
            code = 0 if ok and res == [REC, REC] and back == [None, None] else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s._io is parent_engine
    assert s.read_batch([(key(10 + i), pool.slot(6 + i), PAYLOAD) for i in range(2)]) == [None] * 2


# -- free files: writes over evicted records ----------------------------------------

def test_removed_records_are_overwritten_by_later_writes(tmp_path, pool, backend):
    s = make(tmp_path / "kv", backend, free_files=2)
    old = [key(i) for i in range(3)]
    s.write_batch([(k, fill(pool, i, k)) for i, k in enumerate(old)])
    assert all(s.remove(k) for k in old)
    # two kept for reuse (the bound), the third unlinked; none is a record any more
    assert len(os.listdir(s.free)) == 2
    inodes = {(s.free / n).stat().st_ino for n in os.listdir(s.free)}
    assert not list(s.scan()) and not any(s.exists(k) for k in old)
    with pytest.raises(RecordError) as e:
        s.read(old[0], pool.slot(7), PAYLOAD)
    assert e.value.reason == "missing"
    new = [key(10 + i) for i in range(3)]
    recs = [fill(pool, i, k).copy() for i, k in enumerate(new)]
    for i, k in enumerate(new):
        s.write(k, pool.slot(i)[:REC])
    assert not os.listdir(s.free)                               # both taken
    assert inodes <= {s.path(k).stat().st_ino for k in new}   # both written over
    # (the free files' inodes: the unlinked third's number may be reused by a new file)
    for i, k in enumerate(new):
        s.read(k, pool.slot(7), PAYLOAD)
        assert np.array_equal(pool.slot(7)[:REC], recs[i])
        assert s.path(k).stat().st_size == REC
        assert stat.S_IMODE(s.path(k).stat().st_mode) == 0o600
    assert sorted(i.key for i in s.scan()) == sorted(new)
    assert not list(s.tmp.iterdir())


def test_a_longer_free_file_is_cut_to_the_record(tmp_path, pool, backend):
    s = make(tmp_path / "kv", backend, free_files=4)
    (s.free / "big").write_bytes(b"\xff" * (3 * REC))
    k = key(1)
    rec = fill(pool, 0, k).copy()
    s.write(k, pool.slot(0)[:REC])
    assert not os.listdir(s.free)
    assert s.path(k).read_bytes() == rec.tobytes()


def test_free_files_taken_by_someone_else_mean_a_new_file(tmp_path, pool, backend):
    s = make(tmp_path / "kv", backend, free_files=4)
    (s.free / "gone").write_bytes(b"x")
    s._free_names.append("gone")
    (s.free / "gone").unlink()            # another writer took it first
    k = key(2)
    rec = fill(pool, 0, k).copy()
    s.write(k, pool.slot(0)[:REC])
    assert s.path(k).read_bytes() == rec.tobytes()


def test_free_files_off_unlinks(tmp_path, pool):
    s = make(tmp_path / "kv", "off")
    s.write(key(1), fill(pool, 0, key(1)))
    assert s.remove(key(1)) and not os.listdir(s.free) and not s.remove(key(1))
