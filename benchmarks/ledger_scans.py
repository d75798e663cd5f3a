"""What the ledger's scans cost: per record written, and per scheduler step.

Two tiers an agentic server with retention reaches (``kv_transfer_params``
``kvtier.pin`` / ``kvtier.ttl``), each with ``--held`` records at the LRU end:
  kept      a full disk tier whose least recently used records are pinned
            prefixes (kept out of LRU eviction): every write must find a victim
            past them;
  long_ttl  a disk tier with room, whose least recently used records asked for
            a TTL past the tier's and were not used since the tier's TTL: every
            write's expiry scan meets them.
Per sample and tier, a new ledger is filled (untimed), then ``--writes`` new
records are written (``begin_write`` + ``end_write``, the removals handed to the
sweeper), timed as one window.
And one step's cost:
  write_back  ``disk_admission: on_dram_evict``'s due list (``dirty_lru``), which
            every step asks for: a DRAM tier of 8 x ``--held`` // 5 blocks, the
            oldest eighth its window, one block in 50 without a disk record;
            ``--writes`` calls timed as one window.
Samples alternate between the three.

    python -m benchmarks.ledger_scans [--held 20000] [--writes 200] [--samples 7]

Prints the median and spread per write (per step), and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.stamp import line, stamp

REC = 4096


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def build(kind: str, held: int):
    """A ledger as the tier ``kind`` describes it, and the clock after filling it."""
    from kvtier.cache.ledger import Ledger
    records = 2 * held
    L = Ledger(num_slots=16, disk_bytes=(records if kind == "kept" else 2 * records) * REC,
               record_size=REC, ttl=3600.0, max_kept_bytes=held * REC)
    now = 0.0
    for i in range(records):
        ttl = 7200.0 if kind == "long_ttl" and i < held else 0.0
        b, _ = L.begin_write(key(i), now, ttl=ttl)
        L.end_write(b, True)
        if kind == "kept" and i < held:
            L.keep(key(i), now + 3000.0, "tenant", now)
        now += 0.01
    if kind == "long_ttl":
        now += 3700.0   # past the tier's TTL, within the held records' own
        L.expire(now)
    L.take_removals()
    return L, now


def build_write_back(held: int):
    from kvtier.cache.ledger import Ledger
    slots = 8 * held // 5
    L = Ledger(num_slots=slots, disk_bytes=2 * slots * REC, record_size=REC, ttl=3600.0)
    for i in range(slots):
        b = L.begin_store(key(i), 0.0)
        L.end_store(b, True)
        if i % 50:
            w, _ = L.begin_write(key(i), 0.0)
            L.end_write(w, True)
    return L, slots // 8


def steps(L, window: int, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        L.dirty_lru(window, 1.0)
    return time.perf_counter() - t0


def writes(L, now: float, first: int, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(first, first + n):
        b, _ = L.begin_write(key(i), now)
        L.end_write(b, True)
        for k in L.take_removals():
            L.removed(k)
        now += 0.001
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--held", type=int, default=20_000)
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--samples", type=int, default=7)
    a = p.parse_args(argv)
    st = stamp()
    print(f"ledger_scans: {line(st)}", flush=True)
    per_write: dict[str, list[float]] = {"kept": [], "long_ttl": [], "write_back": []}
    for _ in range(a.samples):
        for kind in per_write:
            if kind == "write_back":
                L, window = build_write_back(a.held)
                t = steps(L, window, a.writes)
            else:
                L, now = build(kind, a.held)
                t = writes(L, now, 10 * a.held, a.writes)
            per_write[kind].append(t / a.writes * 1e3)
    out = {"benchmark": "ledger_scans", "held": a.held, "writes": a.writes,
           "samples": a.samples, "stamp": st}
    print(f"ms per record written ({a.held} held records at the LRU end), per step "
          f"(write_back: a {8 * a.held // 5 // 8}-block window), {a.samples} samples:")
    for kind, xs in per_write.items():
        out[kind] = {"median_ms": round(statistics.median(xs), 4),
                     "min_ms": round(min(xs), 4), "max_ms": round(max(xs), 4)}
        print(f"  {kind:<10} median {out[kind]['median_ms']} ms "
              f"[{out[kind]['min_ms']}, {out[kind]['max_ms']}]")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
