"""Restart recovery benchmark: how long the scheduler takes to rebuild its disk
index from a store directory of 100,000 blocks.

Creates ``--blocks`` small valid records (header + one 4 KiB page of payload,
8 KiB each) under a store directory with the store's own batched writer, then
times what a restart does: constructing ``KVTierScheduler`` with a config
pointing at that directory, as the connector does (its ``_recover``: scan
every rank's directory, intersect, admit the blocks into the disk ``Tier`` in
last-use order, sweep temp files). Also times ``DiskStore.scan`` alone.

Warm: the directory's inodes in the kernel's caches (a restart of the engine
on a running host). Cold: after ``echo 3 > /proc/sys/vm/drop_caches`` (root
only; a host reboot), skipped with a message where not permitted.

Prints a table; the last line is one JSON object of the figures.

    python benchmarks/recovery.py [--dir DIR] [--blocks 100000] [--repeats 5] [--keep]

DIR must be on a real disk (default /var/tmp/kvtier-recovery); the store is
created once and reused by later runs (``--keep``) when it holds the blocks.
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
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script
from benchmarks.stamp import line, stamp  # noqa: E402
from kvtier.config import KVTierConfig  # noqa: E402
from kvtier.copy.engine import HostPool  # noqa: E402
from kvtier.store.disk import DiskStore  # noqa: E402
from kvtier.store.record import HEADER_BYTES, pack_header, record_bytes  # noqa: E402
from kvtier.store.slots import SlotGeometry  # noqa: E402
from kvtier.vllm.scheduler import KVTierScheduler  # noqa: E402

NS = bytes.fromhex("6b7674696572207265636f7665727921")   # "kvtier recovery!"
PAYLOAD = 4096
BLOCK_SIZE = 16


def key_of(i: int) -> bytes:
    return xxhash.xxh3_128_digest(i.to_bytes(8, "little"))   # spread over the shards


def populate(root: Path, n: int, batch: int = 2048) -> float:
    """Write ``n`` valid records of ``PAYLOAD`` bytes; seconds taken."""
    store = DiskStore(root, NS, 0, 1, io_threads=4)
    pool = HostPool(batch, record_bytes(PAYLOAD))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        items = []
        for j, i in enumerate(range(start, min(n, start + batch))):
            rec = pool.slot(j)
            rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD] = rng.integers(0, 256, PAYLOAD, np.uint8)
            key = key_of(i)
            pack_header(rec, NS, key, 0, 1, PAYLOAD,
                        xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD]))
            items.append((key, rec[:record_bytes(PAYLOAD)]))
        bad = [r for r in store.write_batch(items) if isinstance(r, BaseException)]
        if bad:
            raise bad[0]
    os.sync()
    pool.close()
    return time.perf_counter() - t0


def count_records(root: Path) -> int:
    d = root / NS.hex() / "rank0"
    if not d.is_dir():
        return 0
    return sum(1 for sub in os.scandir(d) if len(sub.name) == 2
               for _ in os.scandir(sub.path))


def drop_caches() -> str | None:
    """None if dropped, else why not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return None
    except OSError as e:
        return f"cannot drop the page cache ({e.strerror}; needs root)"


def recover_once(cfg: KVTierConfig, geometry: SlotGeometry) -> tuple[float, int]:
    t0 = time.perf_counter()
    sched = KVTierScheduler(cfg, NS, 1, BLOCK_SIZE, geometry)
    dt = time.perf_counter() - t0
    return dt, sched.recovered_blocks


def scan_once(root: Path) -> tuple[float, int]:
    store = DiskStore(root, NS, 0, 1, o_direct="off")
    t0 = time.perf_counter()
    n = sum(1 for _ in store.scan())
    return time.perf_counter() - t0, n


KINDS = {"recover": lambda cfg, g, root: recover_once(cfg, g),
         "scan": lambda cfg, g, root: scan_once(root)}


def measure_child(root: Path, blocks: int, kind: str) -> None:
    """In a fresh process (a restart): time one rebuild, print JSON."""
    cfg, geometry = config_for(root, blocks)
    dt, n = KINDS[kind](cfg, geometry, root)
    if n != blocks:
        raise AssertionError(f"{kind}: {n} blocks, expected {blocks}")
    print(json.dumps({kind: dt}))


def config_for(root: Path, blocks: int) -> tuple[KVTierConfig, SlotGeometry]:
    cfg = KVTierConfig.from_extra_config({
        "disk_path": str(root), "disk_bytes": 2 * blocks * record_bytes(PAYLOAD),
        "dram_bytes": "64MiB", "ttl_seconds": 86400})
    return cfg, SlotGeometry.plan(PAYLOAD, cfg.dram_bytes)


def in_child(root: Path, blocks: int, kind: str) -> float:
    r = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(root),
                        "--blocks", str(blocks)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"measuring process failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])[kind]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.environ.get("KVTIER_RECOVERY_DIR",
                                                   "/var/tmp/kvtier-recovery"))
    p.add_argument("--blocks", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cold", type=int, default=1, help="cold-cache repeats (0: none)")
    p.add_argument("--keep", action="store_true", help="leave the store for the next run")
    p.add_argument("--child", choices=sorted(KINDS), help=argparse.SUPPRESS)
    args = p.parse_args()

    root = Path(args.dir)
    if args.child:
        measure_child(root, args.blocks, args.child)
        return
    st = stamp()
    print(f"recovery: {line(st)}", flush=True)
    have = count_records(root)
    if have != args.blocks:
        shutil.rmtree(root, ignore_errors=True)
        secs = populate(root, args.blocks)
        made = f"created {args.blocks} records in {secs:.1f} s"
    else:
        made = f"reusing {have} records"
    print(f"recovery: {args.blocks} blocks of {record_bytes(PAYLOAD)} B under {root}; {made}; "
          f"{platform.node()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; each measurement in a fresh process", flush=True)

    in_child(root, args.blocks, "scan")   # warm the caches
    warm, scans = [], []
    for _ in range(args.repeats):
        warm.append(in_child(root, args.blocks, "recover"))
        scans.append(in_child(root, args.blocks, "scan"))
    cold, why = [], None
    for _ in range(args.cold):
        why = drop_caches()
        if why:
            break
        cold.append(in_child(root, args.blocks, "recover"))
    med = statistics.median
    print(f"{'':42s} {'seconds':>8s}")
    print(f"{'scheduler recovery, warm (median of %d)' % args.repeats:42s} {med(warm):8.3f}")
    print(f"{'DiskStore.scan alone (a RecordInfo each)':42s} {med(scans):8.3f}")
    if cold:
        print(f"{'scheduler recovery, cold caches':42s} {med(cold):8.3f}")
    else:
        print(f"cold: skipped ({why or 'not asked for'})")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    out = {"blocks": args.blocks, "recover_warm_s": round(med(warm), 3),
           "scan_warm_s": round(med(scans), 3),
           "recover_cold_s": round(med(cold), 3) if cold else None,
           "target_s": 2.0, "ok": med(warm) < 2.0, "stamp": st}
    print()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
