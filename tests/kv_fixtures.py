"""Builders of vLLM-like paged KV caches for the copy engine tests.

Each layer's cache is registered as 4-D ``[B, H, N, C]`` views (blocks,
heads, tokens, head size) over memory in one of vLLM's physical orders, K and
V as separate entries, filled with random bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from kvtier.copy.engine import HostPool, KVLayout, TorchCopyEngine, round_up

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
# LBHNC: the CPU backend. LBNHC: FlashAttention. LHBNC: heads outermost, one
# run per head per block (as_strided, with a gap between heads). LBHNC/2: two
# kernel pages per block (vLLM's kernel block size half the cache's).
LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "LBHNC/2")
HEADS, HEAD_SIZE, LAYERS = 2, 32, 3
PAYLOAD_OFFSET = 64  # a header before the payload, as the connector's records have


def _random(nbytes: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.to(device).view(dtype)


def make_kv_caches(layout: str, num_blocks: int, block_size: int, dtype: str,
                   device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    dt = DTYPES[dtype]
    es = torch.empty(0, dtype=dt).element_size()
    H, N, C = HEADS, block_size, HEAD_SIZE
    gen = torch.Generator().manual_seed(seed)
    caches = {}
    for l in range(LAYERS):
        if layout == "LBHNC":      # per layer [2, B, H, N, C]
            whole = _random(2 * num_blocks * H * N * C * es, dt, device, gen).view(
                2, num_blocks, H, N, C)
        elif layout == "LBHNC/2":  # 2 pages of N/2 tokens per block
            whole = _random(2 * num_blocks * H * N * C * es, dt, device, gen).view(
                2, 2 * num_blocks, H, N // 2, C)
        elif layout == "LBNHC":    # per layer [2, B, N, H, C]
            whole = _random(2 * num_blocks * N * H * C * es, dt, device, gen).view(
                2, num_blocks, N, H, C).permute(0, 1, 3, 2, 4)
        elif layout == "LHBNC":    # per layer [2, H, B, N, C], a gap after each head
            head_stride = num_blocks * N * C + 3 * C
            flat = _random(2 * H * head_stride * es, dt, device, gen)
            whole = torch.as_strided(flat, (2, num_blocks, H, N, C),
                                     (H * head_stride, N * C, head_stride, C, 1))
        else:
            raise ValueError(layout)
        for kv in range(2):
            caches[f"model.layers.{l}.self_attn.{'kv'[kv]}"] = whole[kv]
    return caches


def make_layout(caches: dict[str, torch.Tensor], num_blocks: int, name: str) -> KVLayout:
    return KVLayout.from_kv_caches(caches, num_blocks, name=name)


def make_pool(layout: KVLayout, num_slots: int, pin: bool = False) -> HostPool:
    return HostPool(num_slots, round_up(PAYLOAD_OFFSET + layout.block_bytes), pin=pin)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """All bytes of the tensor's storage (gaps included), on the CPU."""
    s = t.untyped_storage()
    return torch.tensor([], dtype=torch.uint8, device=t.device).set_(s).cpu().clone()


def kv_snapshot(caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [storage_bytes(t) for t in caches.values()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def after(device: str):
    """What an engine call passes as ``after=`` to be ordered after the torch work
    queued before it (fills, zeroing, clones run on the current stream; the
    engine copies on its own non-blocking stream)."""
    return torch.cuda.current_stream() if device.startswith("cuda") else None


def check_against_torch(layout: str, dtype: str, block_size: int, device: str, make_engine,
                        num_blocks: int = 40, num_slots: int = 24, n: int = 9) -> None:
    """Gathers n scattered blocks into scattered slots, then scatters the slots
    into other blocks, with ``make_engine(kv_layout, pool)`` and with
    TorchCopyEngine on a same-seeded cache: pools and caches byte-identical,
    the payload in the slot format, every target holding its source's bytes.
    Each engine call is ordered after the torch work before it (``after``)."""
    rng = np.random.default_rng(block_size)
    caches = make_kv_caches(layout, num_blocks, block_size, dtype, device)
    kv_layout = make_layout(caches, num_blocks, layout)
    pool, ref_pool = make_pool(kv_layout, num_slots), make_pool(kv_layout, num_slots)
    engine = make_engine(kv_layout, pool)
    ref_caches = make_kv_caches(layout, num_blocks, block_size, dtype, device)
    ref = TorchCopyEngine(make_layout(ref_caches, num_blocks, layout), ref_caches, ref_pool,
                          PAYLOAD_OFFSET)

    blocks = rng.choice(num_blocks, size=n, replace=False).tolist()
    slots = rng.choice(num_slots, size=n, replace=False).tolist()
    engine.gather(blocks, slots, after=after(device))
    ref.gather(blocks, slots)
    assert np.array_equal(pool.array, ref_pool.array)  # payloads and untouched bytes

    # A payload is the block's runs back to back, layer-major: it starts with
    # layer 0's block (its first page, for two pages per block).
    layer0 = next(iter(caches.values()))
    page = layer0[2 * blocks[0] if layout == "LBHNC/2" else blocks[0]]
    order = sorted(range(3), key=lambda d: -page.stride(d))
    want = page.permute(*order).contiguous().view(torch.uint8).reshape(-1).cpu().numpy()
    assert np.array_equal(pool.slot(slots[0])[PAYLOAD_OFFSET:PAYLOAD_OFFSET + want.size], want)

    targets = rng.choice(num_blocks, size=n, replace=False).tolist()
    sources = {k: t.view(torch.uint8).clone() for k, t in caches.items()}
    engine.scatter(slots, targets, after=after(device))   # after the clones read the targets
    ref.scatter(slots, targets)
    assert_same(kv_snapshot(caches), kv_snapshot(ref_caches))
    pages = 2 if layout == "LBHNC/2" else 1
    for k, t in caches.items():
        got, src = t.view(torch.uint8), sources[k]
        for b, tb in zip(blocks, targets):
            for p in range(pages):
                assert torch.equal(got[tb * pages + p], src[b * pages + p])


# (block ids, slot ids, error) with NUM_BLOCKS = 40 blocks and NUM_SLOTS = 24 slots.
NUM_BLOCKS, NUM_SLOTS = 40, 24
BAD_ARGUMENTS = [
    ([1, NUM_BLOCKS], [0, 1], f"block id {NUM_BLOCKS} out of range"),
    ([1, -1], [0, 1], "block id -1 out of range"),
    ([1, 2], [0, NUM_SLOTS], f"slot id {NUM_SLOTS} out of range"),
    ([1, 2], [-5, 0], "slot id -5 out of range"),
    ([1, 2, 3], [0, 1], "3 block ids but 2 slot ids"),
]
