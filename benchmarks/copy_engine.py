"""Copy engine benchmark: the native engine against the bandwidth ceiling and the
torch path, measured side by side in one run (median of interleaved repeats).

CPU: gather/scatter of N scattered blocks at vLLM's CPU block size (32
tokens) for an LBHNC cache (default 8 layers, 4 KV heads of 64, bf16), against
one contiguous memcpy of the same bytes (numpy copyto) and TorchCopyEngine.

GPU (only with CUDA and an extension built with nvcc): D2H gather / H2D
scatter for a Llama-8B-shaped cache (32 layers, 8 KV heads of 128, bf16,
FlashAttention LBNHC) at 16- and 128-token blocks, kernel and DMA paths,
against one contiguous pinned cudaMemcpyAsync of the same bytes and a loop of
one cudaMemcpyAsync per block and layer; plus how much each path slows a
matmul running on another stream.

Prints a table, then as the last line one JSON object of the ratios and rates.

    python benchmarks/copy_engine.py [--blocks 256] [--repeats 11] [--section gpu]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import threading
import time

import numpy as np
import torch

from kvtier import _copy_engine
from kvtier.copy.engine import HostPool, KVLayout, TorchCopyEngine, round_up
from kvtier.copy.native import NativeCopyEngine

HEADER = 64  # payload offset in a slot, as in the connector's records
GB = 1e9


def median_times(cases: dict, repeats: int) -> dict:
    """{key: (label, fn)} -> {key: median seconds}, calls interleaved round-robin."""
    for _, fn in cases.values():
        fn()  # warm up: page faults, thread start, lazy init
    times = {key: [] for key in cases}
    for _ in range(repeats):
        for key, (_, fn) in cases.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(ts) for key, ts in times.items()}


def table(cases: dict, times: dict, nbytes: int, base: str) -> None:
    print(f"{'':44s} {'ms':>9s} {'GB/s':>8s} {'vs ' + base:>14s}")
    for key, (label, _) in cases.items():
        s = times[key]
        print(f"{label:44s} {s * 1e3:9.2f} {nbytes / s / GB:8.2f} {times[base] / s:14.2f}")


def kv_cache(layers, num_blocks, block_size, heads, head_size, order, device):
    """Per layer one [2, B, ...] tensor as vLLM allocates it; K and V registered
    as separate [B, H, N, C] views."""
    caches = {}
    for l in range(layers):
        if order == "LBHNC":
            t = torch.empty(2, num_blocks, heads, block_size, head_size, dtype=torch.bfloat16,
                            device=device)
            views = (t[0], t[1])
        else:  # LBNHC
            t = torch.empty(2, num_blocks, block_size, heads, head_size, dtype=torch.bfloat16,
                            device=device)
            views = (t[0].permute(0, 2, 1, 3), t[1].permute(0, 2, 1, 3))
        t.view(torch.int16).random_()
        caches[f"l{l}.k"], caches[f"l{l}.v"] = views
    return caches


def scattered(n, num_blocks, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(num_blocks, size=n, replace=False).tolist(), rng.permutation(n).tolist()


def cpu_section(args) -> dict:
    num_blocks = 4 * args.blocks
    caches = kv_cache(args.layers, num_blocks, 32, args.heads, args.head_size, "LBHNC", "cpu")
    layout = KVLayout.from_kv_caches(caches, num_blocks, name="LBHNC")
    pool = HostPool(args.blocks, round_up(HEADER + layout.block_bytes))
    blocks, slots = scattered(args.blocks, num_blocks)
    nbytes = args.blocks * layout.block_bytes
    src, dst = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8), np.empty(
        nbytes, np.uint8)

    native = NativeCopyEngine(layout, pool, HEADER)
    native1 = NativeCopyEngine(layout, pool, HEADER, threads=1)
    ref = TorchCopyEngine(layout, caches, pool, HEADER)
    cases = {
        "memcpy": ("memcpy (numpy copyto, contiguous)", lambda: np.copyto(dst, src)),
        "gather": (f"native gather ({native.threads} threads)",
                   lambda: native.gather(blocks, slots)),
        "gather1": ("native gather (1 thread)", lambda: native1.gather(blocks, slots)),
        "torch_gather": ("torch gather (TorchCopyEngine)", lambda: ref.gather(blocks, slots)),
        "scatter": (f"native scatter ({native.threads} threads)",
                    lambda: native.scatter(slots, blocks)),
        "torch_scatter": ("torch scatter (TorchCopyEngine)", lambda: ref.scatter(slots, blocks)),
    }
    t = median_times(cases, args.repeats)
    print(f"\nCPU: {args.blocks} scattered blocks of 32 tokens, {args.layers} layers x K/V, "
          f"{args.heads} KV heads of {args.head_size}, bf16, LBHNC: "
          f"{layout.block_bytes / 1024:.0f} KiB per block, {nbytes / 2**20:.0f} MiB per transfer")
    table(cases, t, nbytes, "memcpy")
    return {
        "cpu_gather_vs_memcpy": round(t["memcpy"] / t["gather"], 3),
        "cpu_gather_vs_torch": round(t["torch_gather"] / t["gather"], 3),
        "cpu_gather_1thread_vs_memcpy": round(t["memcpy"] / t["gather1"], 3),
        "cpu_scatter_vs_memcpy": round(t["memcpy"] / t["scatter"], 3),
        "cpu_scatter_vs_torch": round(t["torch_scatter"] / t["scatter"], 3),
        "cpu_memcpy_GBps": round(nbytes / t["memcpy"] / GB, 2),
        "cpu_gather_GBps": round(nbytes / t["gather"] / GB, 2),
    }


def _cudart():
    """The CUDA runtime torch loaded, for raw cudaMemcpyAsync baselines."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    if not paths:
        raise RuntimeError("torch's libcudart.so not found in /proc/self/maps")
    lib = ctypes.CDLL(sorted(paths)[0])
    lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_int, ctypes.c_void_p]
    return lib


def gpu_section(args) -> dict:
    torch.cuda.init()
    cudart = _cudart()
    stream = torch.cuda.Stream()
    out = {}
    for block_size, n in ((16, args.gpu_blocks), (128, max(1, args.gpu_blocks // 8))):
        num_blocks = 4 * n
        caches = kv_cache(32, num_blocks, block_size, 8, 128, "LBNHC", "cuda")
        layout = KVLayout.from_kv_caches(caches, num_blocks, name="LBNHC")
        pool = HostPool(n, round_up(HEADER + layout.block_bytes), pin=True)
        blocks, slots = scattered(n, num_blocks)
        nbytes = n * layout.block_bytes
        engines = {p: NativeCopyEngine(layout, pool, HEADER, cuda_path=p)
                   for p in ("kernel", "dma")}
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()   # the caches' fill, before copies on other streams
        host = pool.tensor()[:nbytes]
        h = stream.cuda_stream

        def memcpy_async(dst, src, size):
            err = cudart.cudaMemcpyAsync(dst, src, size, 4, h)  # 4: cudaMemcpyDefault
            if err:
                raise RuntimeError(f"cudaMemcpyAsync failed: error {err}")

        def one_memcpy(dst, src):
            def run():
                memcpy_async(dst, src, nbytes)
                stream.synchronize()
            return run

        def per_block(to_host):  # one cudaMemcpyAsync per block and layer, as vLLM's swap_blocks
            runs = []
            for b, s in zip(blocks, slots):
                for l in range(layout.num_layers):
                    kv = layout.base_ptrs[l] + b * layout.block_strides[l]
                    slot = pool.base_ptr + s * pool.slot_bytes + HEADER + l * layout.run_bytes
                    runs.append((slot, kv) if to_host else (kv, slot))

            def run():
                for dst, src in runs:
                    memcpy_async(dst, src, layout.run_bytes)
                stream.synchronize()
            return run

        for direction, to_host in (("D2H gather", True), ("H2D scatter", False)):
            cases = {
                "contiguous": ("one contiguous cudaMemcpyAsync",
                               one_memcpy(host.data_ptr(), dev.data_ptr()) if to_host
                               else one_memcpy(dev.data_ptr(), host.data_ptr())),
                "per_run": ("cudaMemcpyAsync per block x layer", per_block(to_host)),
            }
            for p, e in engines.items():
                cases[p] = (f"native {p}", (lambda e=e: e.gather(blocks, slots)) if to_host
                            else (lambda e=e: e.scatter(slots, blocks)))
            t = median_times(cases, args.repeats)
            print(f"\nGPU {direction}: {n} scattered blocks of {block_size} tokens, Llama-8B KV "
                  f"(32 layers x K/V, 8 heads of 128, bf16, LBNHC), {nbytes / 2**20:.0f} MiB")
            table(cases, t, nbytes, "contiguous")
            key = f"gpu_{'d2h' if to_host else 'h2d'}_{block_size}"
            for k in cases:
                out[f"{key}_{k}_GBps"] = round(nbytes / t[k] / GB, 2)
            for p in engines:
                out[f"{key}_{p}_vs_contiguous"] = round(t["contiguous"] / t[p], 3)
        if block_size == 16:
            out.update(matmul_slowdown(engines, blocks, slots))
        for e in engines.values():
            e.close()
        pool.close()
        del caches, dev
        torch.cuda.empty_cache()
    return out


def matmul_slowdown(engines, blocks, slots) -> dict:
    """Time of 20 bf16 8192^3 matmuls on their own stream while each path copies
    in a loop on another thread, over their time alone."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    compute = torch.cuda.Stream()
    torch.cuda.synchronize()   # `a`, before the matmuls on their own stream

    def matmuls() -> float:
        with torch.cuda.stream(compute):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                a @ a
            end.record()
        end.synchronize()
        return start.elapsed_time(end)

    matmuls()
    alone = statistics.median(matmuls() for _ in range(5))
    out = {}
    print("\nmatmul slowdown while copying (D2H gather in a loop on another thread):")
    for p, e in engines.items():
        stop = threading.Event()

        def copy_loop(e=e):
            while not stop.is_set():
                e.gather(blocks, slots)
        th = threading.Thread(target=copy_loop)
        th.start()
        time.sleep(0.05)
        during = statistics.median(matmuls() for _ in range(5))
        stop.set()
        th.join()
        out[f"gpu_matmul_slowdown_{p}"] = round(during / alone, 3)
        print(f"  {p:7s} {during / alone:.3f}x  ({alone:.1f} ms alone, {during:.1f} ms during)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=256, help="CPU: blocks per transfer")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--gpu-blocks", type=int, default=128,
                    help="GPU: 16-token blocks per transfer (128-token: an eighth)")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--section", choices=("all", "cpu", "gpu"), default="all")
    args = ap.parse_args()
    result = cpu_section(args) if args.section != "gpu" else {}
    gpu = torch.cuda.is_available() and _copy_engine.with_cuda
    if gpu and args.section != "cpu":
        result.update(gpu_section(args))
    elif args.section != "cpu":
        print("\nGPU section skipped (no CUDA device, or extension built without nvcc)")
    result["gpu"] = gpu and args.section != "cpu"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
