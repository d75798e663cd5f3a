"""A small round trip through the native CUDA copy engine, sized for
compute-sanitizer (benchmarks/gpu_check.sh runs it under memcheck, and under
racecheck with ``--path kernel``):

1. ``make_copy_engine`` on a FlashAttention-shaped (LBNHC) bf16 cache with a
   pinned, mapped pool: the start-up self-check (both paths) must pass;
2. per path, ``tests.kv_fixtures.check_against_torch``: gathers and scatters of
   a few scattered blocks, byte-identical to the torch engine, on LBNHC bf16
   and on two kernel pages per block in fp8.

Prints one line; exit status 0 when every byte matched, 3 without a GPU.

    python -m benchmarks.gpu_round_trip [--path kernel|dma|both]
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvtier import _copy_engine
from kvtier.copy.choose import make_copy_engine
from kvtier.copy.native import NativeCopyEngine
from tests.kv_fixtures import PAYLOAD_OFFSET, check_against_torch, make_kv_caches, make_layout, \
    make_pool


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", choices=("kernel", "dma", "both"), default="both")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and _copy_engine.with_cuda):
        print("gpu_round_trip: skipped (no CUDA GPU, or the extension has no CUDA path)")
        return 3
    caches = make_kv_caches("LBNHC", 16, 16, "bf16", "cuda")
    layout = make_layout(caches, 16, "LBNHC")
    pool = make_pool(layout, 4, pin=True)
    engine = make_copy_engine(layout, caches, pool, PAYLOAD_OFFSET)
    if engine.kind != "native-cuda":
        print(f"gpu_round_trip: FAILED: the self-check fell back to the {engine.kind} engine "
              "(the log line above says why)")
        return 1
    engine.close()
    pool.close()
    paths = ("kernel", "dma") if args.path == "both" else (args.path,)
    for path in paths:
        for kv_layout, dtype in (("LBNHC", "bf16"), ("LBHNC/2", "fp8")):
            check_against_torch(kv_layout, dtype, 16, "cuda",
                                lambda kl, p, path=path: NativeCopyEngine(
                                    kl, p, PAYLOAD_OFFSET, cuda_path=path),
                                num_blocks=16, num_slots=8, n=4)
    torch.cuda.synchronize()
    print(f"gpu_round_trip: ok (self-check passed; {'+'.join(paths)} paths byte-identical to "
          f"torch on LBNHC bf16 and LBHNC/2 fp8; {torch.cuda.get_device_name()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
