"""Disk store benchmark: DiskStore record write and read bandwidth against fio,
side by side in one run, on the same directory with the same I/O size.

Records are those of a Llama-8B block (32 layers, 8 KV heads of 128, bf16, K
and V): 16 tokens = 2 MiB of payload, 128 tokens = 16 MiB, each plus the 4 KiB
header (``store.record_bytes``). A round writes ``--mib`` MiB of such records
from page-aligned DRAM slots (``HostPool``) and reads them back (validated:
header and payload checksums), through:

* ``native``: the store's native path (``kvtier._copy_engine.IoEngine``: a C++
  thread pool), one ``write_batch``/``read_batch`` call for the whole round,
  ``--threads`` records in flight;
* ``native_reuse``: the native path with a full store's steady state: the
  previous pass's records are removed as evictions remove them (kept as free
  files, ``DiskStore(free_files=...)``), so writes go over existing blocks;
* ``python``: the store's Python path (os.open/pwrite/rename), one record per
  call from a pool of ``--threads`` Python threads, as kvtier/vllm/worker.py calls it;

and fio with O_DIRECT in the same directory, block size = record size,
``--threads`` I/Os in flight, two ways:

* ``fio, one file`` (the ratios ``*_vs_fio``): iodepth ``--threads`` on one
  file, ``overwrite=1`` (fio writes over blocks it laid out before timing): the
  device's figure, with no block allocation in it;
* ``fio, file per record`` (``*_vs_fio_files``): ``--threads`` jobs, each
  creating (``create_on_open``) and writing its share of record-sized files,
  then reading them: the store's own pattern, file creation and block
  allocation included (no rename, no checksums). O_DIRECT on both sides, so the page cache is out
of the picture. Rounds interleave fio and the store (order rotated); the
ratios are medians of per-round ratios (store / fio of the same round).

Prints a table; the last line is one JSON object of the figures.

    python benchmarks/store_io.py [--dir DIR] [--rounds 9] [--mib 256] [--threads 4]

DIR must be on the disk to measure (not a tmpfs): default /var/tmp/kvtier-store-io.
fio is installed with apt-get when missing (root); without fio the store side
still runs and the fio columns say why they are empty.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script
from benchmarks.stamp import line, stamp  # noqa: E402
from kvtier.copy.engine import HostPool  # noqa: E402
from kvtier.store import disk as store_mod  # noqa: E402
from kvtier.store.disk import DiskStore  # noqa: E402
from kvtier.store.record import HEADER_BYTES, pack_header, record_bytes  # noqa: E402

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30
NS = bytes(range(16))
# Llama-8B: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes per token.
BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
SIZES = {"16tok": 16 * BYTES_PER_TOKEN, "128tok": 128 * BYTES_PER_TOKEN}


def fs_of(path: Path) -> tuple[str, str]:
    """(filesystem type, device) of the mount holding ``path``."""
    best = ("?", "?", "")
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (fstype, dev, mnt)
    return best[0], best[1]


def find_fio() -> tuple[str | None, str]:
    fio = shutil.which("fio")
    if fio:
        return fio, ""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("fio not found: installing it with apt-get ...", flush=True)
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "fio"]):
            subprocess.run(cmd, capture_output=True, env={**os.environ,
                                                          "DEBIAN_FRONTEND": "noninteractive"})
        fio = shutil.which("fio")
        if fio:
            return fio, ""
        return None, "apt-get install fio failed"
    return None, "fio not installed (apt-get install fio, as root)"


def fio_ioengine(fio: str, directory: Path) -> str:
    """io_uring where fio and the kernel have it, else libaio, else psync."""
    for engine in ("io_uring", "libaio"):
        r = subprocess.run([fio, "--name=probe", f"--directory={directory}", "--filename=probe",
                            "--size=64k", "--bs=4k", "--rw=write", "--direct=1",
                            f"--ioengine={engine}", "--output-format=json"],
                           capture_output=True, text=True)
        (directory / "probe").unlink(missing_ok=True)
        if r.returncode == 0:
            return engine
    return "psync"


def run_fio(fio: str, engine: str, directory: Path, rw: str, bs: int, total: int,
            depth: int) -> float:
    """fio's bandwidth (bytes/s) for one sequential O_DIRECT pass over ``total`` bytes."""
    args = [fio, "--name=kvtier", f"--directory={directory}", "--filename=fio.dat",
            f"--rw={rw}", f"--bs={bs}", f"--size={total}", "--direct=1",
            f"--ioengine={engine}", "--overwrite=1", "--output-format=json"]
    args += [f"--iodepth={depth}"] if engine != "psync" else [f"--numjobs={depth}",
                                                              "--group_reporting"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stderr.strip() or r.stdout[-500:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"])


def run_fio_files(fio: str, engine: str, directory: Path, rw: str, bs: int, n: int,
                  jobs: int) -> float:
    """fio doing the store's pattern: one file per record, ``jobs`` writers/readers each
    going through its share of files (write: created on open, unallocated)."""
    per = max(1, n // jobs)
    args = [fio, "--name=kvtier", f"--directory={directory}", f"--rw={rw}", f"--bs={bs}",
            f"--numjobs={jobs}", f"--nrfiles={per}", f"--filesize={bs}", f"--size={per * bs}",
            "--direct=1", f"--ioengine={engine}", "--iodepth=1", "--fallocate=none",
            "--file_service_type=sequential", "--group_reporting", "--output-format=json"]
    if rw == "write":
        for f in directory.iterdir():
            f.unlink()
        args.append("--create_on_open=1")
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed: {r.stderr.strip() or r.stdout[-500:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"])


def make_records(pool: HostPool, n: int, payload: int) -> list[bytes]:
    """Fill ``n`` slots with distinct valid records; their keys."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, payload, dtype=np.uint8)
    keys = []
    for i in range(n):
        key = (i + 1).to_bytes(16, "big")
        rec = pool.slot(i)
        rec[HEADER_BYTES:HEADER_BYTES + payload] = base
        rec[HEADER_BYTES:HEADER_BYTES + 8] = np.frombuffer(key[8:], dtype=np.uint8)
        pack_header(rec, NS, key, 0, 1, payload,
                    xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + payload]))
        keys.append(key)
    return keys


def settle() -> None:
    """Flush writeback (and the discards of removed files) before a timed pass."""
    os.sync()
    time.sleep(0.2)


def clear_records(store: DiskStore) -> None:
    for sub in os.scandir(store.dir):
        if len(sub.name) == 2 and sub.is_dir():
            shutil.rmtree(sub.path)
    os.sync()


class StoreCase:
    """One way of driving the store: write all records, then read them all back.

    ``reuse``: between passes the records are removed as evictions remove them
    (into the store's free files) instead of deleted, so each write pass writes
    over the previous pass's files: a full store's steady state."""

    def __init__(self, label: str, store: DiskStore, batch: bool, threads: int,
                 reuse: bool = False):
        self.label, self.store, self.batch, self.reuse = label, store, batch, reuse
        self.pool = None if batch else ThreadPoolExecutor(threads)

    def clear(self, keys) -> None:
        if self.reuse:
            for k in keys:
                self.store.remove(k)
            os.sync()
        else:
            clear_records(self.store)

    def write(self, keys, recs) -> None:
        if self.batch:
            res = self.store.write_batch(list(zip(keys, recs)))
        else:
            res = list(self.pool.map(lambda kr: self.store.write(*kr), zip(keys, recs)))
        bad = [r for r in res if isinstance(r, BaseException)]
        if bad:
            raise bad[0]

    def read(self, keys, outs, payload) -> None:
        if self.batch:
            res = self.store.read_batch([(k, o, payload) for k, o in zip(keys, outs)])
        else:
            res = list(self.pool.map(lambda ko: self.store.read(ko[0], ko[1], payload),
                                     zip(keys, outs)))
        bad = [r for r in res if r is not None]
        if bad:
            raise bad[0]


def bench_size(name: str, payload: int, args, fio, engine, fio_why) -> dict:
    rec_len = record_bytes(payload)
    n = max(args.threads, args.mib * MiB // rec_len)
    total = n * rec_len
    src = HostPool(n, rec_len)
    dst = HostPool(n, rec_len)
    dst.array[:] = 0                       # fault the pages in before timing
    keys = make_records(src, n, payload)
    recs = [src.slot(i) for i in range(n)]
    outs = [dst.slot(i) for i in range(n)]

    root = Path(args.dir) / name
    shutil.rmtree(root, ignore_errors=True)
    cases = []
    if store_mod._IoEngine is not None:
        s = DiskStore(root / "threads", NS, 0, 1, io_threads=args.threads, native_io="threads")
        cases.append(StoreCase(f"native ({s.io_backend}, batch)", s, True, args.threads))
        s = DiskStore(root / "reuse", NS, 0, 1, io_threads=args.threads, native_io="threads",
                      free_files=n)
        cases.append(StoreCase(f"native_reuse ({s.io_backend}, batch, full store)", s,
                               True, args.threads, reuse=True))
    s = DiskStore(root / "python", NS, 0, 1, io_threads=args.threads, native_io="off")
    cases.append(StoreCase(f"python ({args.threads} threads, per record)", s, False, args.threads))
    if not all(c.store.o_direct for c in cases):
        print(f"warning: O_DIRECT refused under {root}: the store runs buffered", flush=True)
    fio_dir = root / "fio"
    fio_dir.mkdir(parents=True, exist_ok=True)
    files_dir = root / "fio-files"
    files_dir.mkdir(parents=True, exist_ok=True)

    w = {c.label: [] for c in cases}
    r = {c.label: [] for c in cases}
    cpu = {c.label: [] for c in cases}   # CPU seconds of this process per GiB (write, read)
    fw, fr = [], []       # fio, one file
    ffw, ffr = [], []     # fio, one file per record
    # Round 0 is a warm-up, not counted; fio lays its file out there and then
    # writes over it in every round (overwrite=1).
    for rnd in range(args.rounds + 1):
        order = cases[rnd % len(cases):] + cases[:rnd % len(cases)]
        steps = [("fio", None)] + [("store", c) for c in order]
        if rnd % 2:
            steps = steps[::-1]
        for what, c in steps:
            if what == "fio":
                if fio is None:
                    continue
                settle()
                bw_w = run_fio(fio, engine, fio_dir, "write", rec_len, total, args.threads)
                settle()
                bw_r = run_fio(fio, engine, fio_dir, "read", rec_len, total, args.threads)
                settle()
                bw_fw = run_fio_files(fio, engine, files_dir, "write", rec_len, n, args.threads)
                settle()
                bw_fr = run_fio_files(fio, engine, files_dir, "read", rec_len, n, args.threads)
                if rnd:
                    fw.append(bw_w)
                    fr.append(bw_r)
                    ffw.append(bw_fw)
                    ffr.append(bw_fr)
                continue
            c.clear(keys)
            settle()
            t0, c0 = time.perf_counter(), time.process_time()
            c.write(keys, recs)
            t1, c1 = time.perf_counter(), time.process_time()
            dst.array[:PAGE_CHECK] = 0
            settle()
            t1b, c1b = time.perf_counter(), time.process_time()
            c.read(keys, outs, payload)
            t2, c2 = time.perf_counter(), time.process_time()
            if not np.array_equal(dst.array[:rec_len], src.array[:rec_len]):
                raise AssertionError(f"{c.label}: read back differs")
            if rnd:
                w[c.label].append(total / (t1 - t0))
                r[c.label].append(total / (t2 - t1b))
                cpu[c.label].append(((c1 - c0) / total * GiB, (c2 - c1b) / total * GiB))
    for c in cases:
        clear_records(c.store)
    shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    print(f"\n{name}: record {rec_len / MiB:.3f} MiB (payload {payload / MiB:.0f} MiB + header), "
          f"{n} records = {total / MiB:.0f} MiB per pass, {args.rounds} rounds, "
          f"{args.threads} in flight")
    print(f"{'':44s} {'write GB/s':>10s} {'vs fio':>7s} {'read GB/s':>10s} {'vs fio':>7s}"
          f" {'CPU s/GiB w, r':>15s}")
    if fio is not None:
        print(f"{'fio, one file (' + engine + ', iodepth ' + str(args.threads) + ')':44s} "
              f"{med(fw) / GB:10.2f} {1:7.2f} {med(fr) / GB:10.2f} {1:7.2f}")
        print(f"{'fio, file per record (' + str(args.threads) + ' jobs)':44s} "
              f"{med(ffw) / GB:10.2f} {med([a / b for a, b in zip(ffw, fw)]):7.2f} "
              f"{med(ffr) / GB:10.2f} {med([a / b for a, b in zip(ffr, fr)]):7.2f}")
    else:
        print(f"{'fio':44s} {'-':>10s} {'':7s} {'-':>10s}   ({fio_why})")
    out = {}
    for c in cases:
        wv, rv = med(w[c.label]), med(r[c.label])
        wr = med([a / b for a, b in zip(w[c.label], fw)]) if fw else None
        rr = med([a / b for a, b in zip(r[c.label], fr)]) if fr else None
        fmt = lambda x: f"{x:7.2f}" if x is not None else f"{'-':>7s}"  # noqa: E731
        cw = med([x[0] for x in cpu[c.label]])
        cr = med([x[1] for x in cpu[c.label]])
        print(f"{c.label:44s} {wv / GB:10.2f} {fmt(wr)} {rv / GB:10.2f} {fmt(rr)}"
              f" {cw:7.3f} {cr:7.3f}")
        key = c.label.split(" ")[0].replace("-", "_")
        wf = med([a / b for a, b in zip(w[c.label], ffw)]) if ffw else None
        rf = med([a / b for a, b in zip(r[c.label], ffr)]) if ffr else None
        out[key] = dict(write_vs_fio_files=None if wf is None else round(wf, 3),
                        read_vs_fio_files=None if rf is None else round(rf, 3),write_GBps=round(wv / GB, 3), read_GBps=round(rv / GB, 3),
                        write_vs_fio=None if wr is None else round(wr, 3),
                        read_vs_fio=None if rr is None else round(rr, 3),
                        write_cpu_s_per_GiB=round(cw, 3), read_cpu_s_per_GiB=round(cr, 3))
    if fio is not None:
        out["fio"] = dict(write_GBps=round(med(fw) / GB, 3), read_GBps=round(med(fr) / GB, 3))
        out["fio_files"] = dict(write_GBps=round(med(ffw) / GB, 3),
                                read_GBps=round(med(ffr) / GB, 3))
    out["o_direct"] = all(c.store.o_direct for c in cases)
    src.close()
    dst.close()
    return out


PAGE_CHECK = 1 << 20   # bytes of the destination cleared before each read pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.environ.get("KVTIER_BENCH_DIR", "/var/tmp/kvtier-store-io"))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--mib", type=int, default=256, help="MiB of records per pass and size")
    p.add_argument("--threads", type=int, default=4, help="records in flight (store and fio)")
    p.add_argument("--sizes", default="16tok,128tok")
    p.add_argument("--allow-tmpfs", action="store_true")
    args = p.parse_args()

    st = stamp()
    print(f"store_io: {line(st)}", flush=True)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    fstype, dev = fs_of(d)
    if fstype in ("tmpfs", "ramfs") and not args.allow_tmpfs:
        sys.exit(f"{d} is on {fstype}: pick a directory on the disk to measure (--dir)")
    fio, fio_why = find_fio()
    engine = fio_ioengine(fio, d) if fio else ""
    ioe = store_mod._IoEngine
    print(f"store_io: {d} on {dev} ({fstype}); {platform.node()}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}; native I/O: "
          f"{'threads' if ioe else 'not built'}"
          f"; fio: {fio or fio_why}", flush=True)

    figures: dict = {}
    results = {}
    for name in args.sizes.split(","):
        res = bench_size(name, SIZES[name], args, fio, engine, fio_why)
        results[name] = res
        best = res.get("native") or res["python"]
        if "native_reuse" in res:   # a full store (the steady state of a long TTL)
            figures[f"write_{name}_vs_fio_full_store"] = res["native_reuse"]["write_vs_fio"]
            figures[f"write_{name}_full_store_GBps"] = res["native_reuse"]["write_GBps"]
        figures[f"write_{name}_vs_fio"] = best["write_vs_fio"]
        figures[f"read_{name}_vs_fio"] = best["read_vs_fio"]
        figures[f"write_{name}_vs_fio_files"] = best["write_vs_fio_files"]
        figures[f"read_{name}_vs_fio_files"] = best["read_vs_fio_files"]
        figures[f"write_{name}_GBps"] = best["write_GBps"]
        figures[f"read_{name}_GBps"] = best["read_GBps"]
        if "fio" in res:
            figures[f"fio_write_{name}_GBps"] = res["fio"]["write_GBps"]
            figures[f"fio_read_{name}_GBps"] = res["fio"]["read_GBps"]
            figures[f"fio_files_write_{name}_GBps"] = res["fio_files"]["write_GBps"]
            figures[f"fio_files_read_{name}_GBps"] = res["fio_files"]["read_GBps"]
        for k, v in res.items():
            if k.startswith(("native_", "python")):
                figures[f"{k}_write_{name}_vs_fio"] = v["write_vs_fio"]
                figures[f"{k}_read_{name}_vs_fio"] = v["read_vs_fio"]
    figures["backend"] = "threads" if ioe else "python"
    figures["o_direct"] = all(r["o_direct"] for r in results.values())
    figures["fio"] = bool(fio)
    figures["threads"] = args.threads
    figures["stamp"] = st
    print()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
