"""What a store secret costs (issue 18): disk store write and read bandwidth
with authenticated records (``secret_file``: an HMAC-SHA256 over header and
payload, kvtier.store.secret) against plain records (xxh3 checksums only), in
interleaved rounds on the same directory.

Records are Llama-8B blocks (32 layers x 8 KV heads x 128 x K,V x bf16):
``--tokens 16`` = 2 MiB of payload + the 4 KiB header. A pass does what the
worker does (kvtier/vllm/worker.py): writes ``--mib`` MiB of records, each
sealed (header, checksum, and with a secret the MAC) and written by one of
``--threads`` threads (``DiskStore.seal`` + ``DiskStore.write``), then reads
them all back in one ``read_batch`` (validated: checksums, and with a secret the
MAC, verified on ``--threads`` threads). The records are removed after each
pass (untimed), so every pass writes new files. Each round runs both
configurations, the order alternating; the ratios are medians of per-round
ratios (with MAC / plain, same round), with their range.

Also: one thread's HMAC-SHA256 and xxh3-64 throughput over one payload
(the CPU cost on its own).

    python benchmarks/store_mac.py [--dir DIR] [--rounds 7] [--mib 128] [--threads 4]

DIR: default /var/tmp/kvtier-store-mac (a disk); a tmpfs (e.g. /dev/shm/x)
shows the CPU-bound case. Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script
from benchmarks.stamp import line, stamp  # noqa: E402
from kvtier.copy.engine import HostPool  # noqa: E402
from kvtier.store.disk import DiskStore  # noqa: E402
from kvtier.store.record import HEADER_BYTES, record_bytes  # noqa: E402

GB = 1e9
MiB = 1 << 20
NS = bytes(range(16))
BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2   # Llama-8B, bf16, K and V


def fs_of(path: Path) -> str:
    best, real = ("?", "?", ""), str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (fstype, dev, mnt)
    return f"{best[1]} ({best[0]})"


def one_pass(store: DiskStore, pool: HostPool, keys: list[bytes], payload: int,
             threads: ThreadPoolExecutor) -> tuple[float, float]:
    """(write seconds, read seconds) of one pass; the records removed after it."""
    rec = record_bytes(payload)

    def write(i: int) -> None:
        slot = pool.slot(i)
        store.seal(slot, keys[i], payload)
        store.write(keys[i], slot[:rec])

    t0 = time.perf_counter()
    list(threads.map(write, range(len(keys))))
    t1 = time.perf_counter()
    results = store.read_batch([(k, pool.slot(len(keys) + i), payload)
                                for i, k in enumerate(keys)])
    t2 = time.perf_counter()
    bad = [r for r in results if r is not None]
    if bad:
        raise SystemExit(f"store_mac: a read failed: {bad[0]!r}")
    for k in keys:
        store.remove(k)
    return t1 - t0, t2 - t1


def cpu_rates(payload: int, repeats: int = 5) -> dict[str, float]:
    """One thread's GB/s of HMAC-SHA256 and of xxh3-64 over one payload."""
    buf = np.random.default_rng(1).integers(0, 256, payload, dtype=np.uint8)
    mac = hmac.new(os.urandom(32), digestmod="sha256")
    out = {}
    for name, fn in (("hmac_sha256", lambda: mac.copy().update(buf)),
                     ("xxh3_64", lambda: xxhash.xxh3_64_intdigest(buf))):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(8):
                fn()
            times.append((time.perf_counter() - t0) / 8)
        out[f"{name}_GBps_1thread"] = round(payload / statistics.median(times) / GB, 3)
    return out


def spread(xs: list[float]) -> list[float]:
    return [round(min(xs), 3), round(max(xs), 3)]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/kvtier-store-mac"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mib", type=int, default=128, help="MiB of records per pass")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per block (record size)")
    ap.add_argument("--threads", type=int, default=4)
    a = ap.parse_args(argv)
    st = stamp()
    print(f"store_mac: {line(st)}", flush=True)
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    payload = a.tokens * BYTES_PER_TOKEN
    rec = record_bytes(payload)
    n = max(1, a.mib * MiB // rec)
    base = a.dir
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True, mode=0o700)
    secret = base / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o400)
    stores = {"plain": DiskStore(base / "plain", NS, 0, 1, io_threads=a.threads),
              "mac": DiskStore(base / "mac", NS, 0, 1, io_threads=a.threads,
                               secret_file=secret)}
    pool = HostPool(2 * n, rec)
    rng = np.random.default_rng(0)
    for i in range(n):
        pool.slot(i)[HEADER_BYTES:HEADER_BYTES + payload] = rng.integers(0, 256, payload,
                                                                         dtype=np.uint8)
    keys = [xxhash.xxh3_128_digest(i.to_bytes(8, "little")) for i in range(n)]
    print(f"store_mac: {n} records of {rec / MiB:.2f} MiB ({a.tokens} tokens) per pass, "
          f"{a.threads} threads, {a.rounds} rounds; {base} on {fs_of(base)}, O_DIRECT "
          f"{stores['plain'].o_direct}, backend {stores['plain'].io_backend}; "
          f"{platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    gbps: dict[str, dict[str, list[float]]] = {c: {"write": [], "read": []} for c in stores}
    with ThreadPoolExecutor(a.threads) as threads:
        for name, s in stores.items():    # warm-up: engines, directories, page tables
            one_pass(s, pool, keys[:min(n, 4)], payload, threads)
        for r in range(a.rounds):
            order = list(stores) if r % 2 == 0 else list(reversed(stores))
            for name in order:
                w, rd = one_pass(stores[name], pool, keys, payload, threads)
                gbps[name]["write"].append(n * rec / w / GB)
                gbps[name]["read"].append(n * rec / rd / GB)
            print(f"  round {r + 1}: " + "  ".join(
                f"{c} w {gbps[c]['write'][-1]:.2f} r {gbps[c]['read'][-1]:.2f} GB/s"
                for c in stores), flush=True)
    pool.close()
    figures: dict = {}
    print(f"\n| {a.tokens}-token records | write GB/s median (range) | read GB/s median (range) |")
    print("|---|---|---|")
    for c in stores:
        for op in ("write", "read"):
            figures[f"{op}_GBps_{c}"] = round(statistics.median(gbps[c][op]), 3)
            figures[f"{op}_GBps_{c}_range"] = spread(gbps[c][op])
        print(f"| {c} | {figures[f'write_GBps_{c}']:.2f} ({figures[f'write_GBps_{c}_range'][0]:.2f}"
              f"-{figures[f'write_GBps_{c}_range'][1]:.2f}) | {figures[f'read_GBps_{c}']:.2f} "
              f"({figures[f'read_GBps_{c}_range'][0]:.2f}-{figures[f'read_GBps_{c}_range'][1]:.2f}) |")
    for op in ("write", "read"):
        ratios = [m / p for m, p in zip(gbps["mac"][op], gbps["plain"][op])]
        figures[f"{op}_mac_vs_plain"] = round(statistics.median(ratios), 3)
        figures[f"{op}_mac_vs_plain_range"] = spread(ratios)
        print(f"{op}: with MAC / plain, median of per-round ratios "
              f"{figures[f'{op}_mac_vs_plain']:.3f} (range {min(ratios):.3f}-"
              f"{max(ratios):.3f})")
    figures.update(cpu_rates(payload))
    print(f"one thread: HMAC-SHA256 {figures['hmac_sha256_GBps_1thread']:.2f} GB/s, "
          f"xxh3-64 {figures['xxh3_64_GBps_1thread']:.2f} GB/s")
    figures.update({"tokens": a.tokens, "record_bytes": rec, "records_per_pass": n,
                    "threads": a.threads, "rounds": a.rounds, "dir": fs_of(base),
                    "o_direct": stores["plain"].o_direct,
                    "backend": stores["plain"].io_backend,
                    "stamp": st})
    shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
