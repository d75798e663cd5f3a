"""KVTierWorker on a KV cache shaped like vLLM's FlashAttention one, driven
through its hooks as vLLM and the scheduler drive it: a store job after a
"forward", then loads from DRAM slots and from disk records (staged and
streamed through scratch slots) into other pages.

The cache is what vLLM 0.32's ``allocate_kv_cache`` makes for the LBNHC
layout (rebuilt here: no vLLM needed): one zeroed int8 buffer, per layer a
``[blocks, heads, tokens, K+V of a head]`` view, tokens outside heads in memory.

On CUDA the forward (a kernel writing the pages) and vLLM's zeroing of the
pages a load fills are queued on the current stream right before the hook,
behind a GPU sleep, and never synchronized: the bytes come out right only if
the copies wait for the hook's event. On the CPU the same test runs without
streams. Needs neither vLLM nor the network: benchmarks/gpu_check.sh runs it
on GPU machines that have PyTorch alone.
"""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import pytest
import torch

from kvtier import _copy_engine
from kvtier.vllm import worker as worker_mod
from kvtier.config import KVTierConfig
from kvtier.copy.engine import KVLayout
from kvtier.copy.choose import make_copy_engine
from kvtier.vllm.metadata import (FROM_SLOT, READ, STREAM, KVTierMetadata, KVTierWorkerMeta, LoadItem,
                             LoadJob, StoreItem, StoreJob)
from kvtier.store.slots import SlotGeometry
from kvtier.store.record import HEADER_BYTES
from kvtier.vllm.worker import KVTierWorker

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])
LAYERS, HEADS, HEAD_SIZE, BLOCK = 4, 8, 128, 16   # a block: 4 x 64 KiB
NUM_BLOCKS, SLOTS = 64, 24
NS = bytes(range(16))
SLEEP_CYCLES = 200_000_000   # ~0.1 s of GPU time before the forward / the zeroing


def flash_attention_kv(device: str, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    es = torch.empty(0, dtype=dtype).element_size()
    content = 2 * HEAD_SIZE * es            # K and V of one head, one token (bytes)
    page = BLOCK * HEADS * content          # one block of one layer
    buf = torch.zeros(LAYERS * NUM_BLOCKS * page, dtype=torch.int8, device=device)
    return {f"model.layers.{l}.self_attn.attn": torch.as_strided(
        buf, (NUM_BLOCKS, HEADS, BLOCK, content), (page, content, HEADS * content, 1),
        l * NUM_BLOCKS * page).view(dtype) for l in range(LAYERS)}


def page_bytes(kv: dict[str, torch.Tensor], block: int) -> torch.Tensor:
    """A block's bytes in memory order ([tokens, heads, content]), layer after
    layer: a slot's payload (on the CPU)."""
    return torch.cat([t[block].transpose(0, 1).contiguous().view(torch.uint8).reshape(-1).cpu()
                      for t in kv.values()])


def late(kv, blocks, fill) -> None:
    """Writes ``fill(layer, block)`` into the blocks on the current stream, after
    a GPU sleep: work vLLM queued and nobody waited for. (The values are on the
    device before the sleep: a copy from host memory could make the host wait.)"""
    values = [[fill(t, b) for b in blocks] for t in kv.values()]
    if next(iter(kv.values())).is_cuda:
        torch.cuda._sleep(SLEEP_CYCLES)
    for t, vs in zip(kv.values(), values):
        for b, v in zip(blocks, vs):
            t[b] = v


def noise(seed: int):
    gen = torch.Generator().manual_seed(seed)

    def fill(t, b):
        raw = torch.randint(0, 256, (t[b].numel() * t.element_size(),), dtype=torch.uint8,
                            generator=gen)
        return raw.view(t.dtype).view(t[b].shape).to(t.device)
    return fill


def zeros(t, b):
    return torch.zeros_like(t[b])


def key(i: int) -> bytes:
    return bytes([i + 1]) * 16


class Driver:
    """A KVTierWorker with the copy engine ``engine`` picks ("auto": native after
    its self-check; "torch": the fallback), and what its hooks reported."""

    def __init__(self, device, engine, tmp_path, monkeypatch):
        if engine == "torch":
            monkeypatch.setattr(worker_mod, "make_copy_engine",
                                functools.partial(make_copy_engine, prefer="torch"))
        self.kv = flash_attention_kv(device)
        self.geometry = SlotGeometry(KVLayout.from_kv_caches(self.kv, NUM_BLOCKS).block_bytes,
                                     SLOTS)
        self.cfg = KVTierConfig.from_extra_config({
            "dram_bytes": SLOTS * self.geometry.slot_bytes, "disk_path": str(tmp_path),
            "disk_bytes": 4 * SLOTS * self.geometry.record_bytes, "io_threads": 2})
        self.w = KVTierWorker(self.cfg, NS, 0, 1, self.geometry)
        self.w.register_kv_caches(self.kv, NUM_BLOCKS, "LBNHC")
        self.meta = KVTierWorkerMeta()
        self.recving: set[str] = set()

    def wait(self, done, timeout=60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = self.w.take_worker_meta()
            if out is not None:
                self.meta = self.meta.aggregate(out)
            self.recving |= self.w.get_finished(set())[1] or set()
            if done():
                return
            assert time.monotonic() < deadline, f"timed out; worker reported {self.meta}"
            time.sleep(0.002)


@pytest.mark.parametrize("engine", ["auto", "torch"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_worker_round_trips_ordered_after_vllm_work(device, engine, tmp_path, monkeypatch):
    d = Driver(device, engine, tmp_path, monkeypatch)
    want_kind = ("torch" if engine == "torch" else "native-cpu" if device == "cpu"
                 else "native-cuda" if _copy_engine.with_cuda else "torch")
    assert [e.kind for e in d.w.engines] == [want_kind]
    kv, w = d.kv, d.w
    sources = list(range(1, 9))

    # Store: the forward writes the pages; wait_for_save queues the gathers at once.
    late(kv, sources, noise(1))
    w.submit_stores(KVTierMetadata(stores=[StoreJob(0, "r0", [
        StoreItem(key(i), b, i, to_disk=True) for i, b in enumerate(sources)])]))
    d.wait(lambda: d.meta.stored.get(0) and len(d.meta.written) == len(sources))
    assert not d.meta.store_failed and not d.meta.write_failed
    stored = {b: page_bytes(kv, b) for b in sources}
    assert any(p.any() for p in stored.values())
    for i, b in enumerate(sources):   # the gathers saw the forward's bytes
        payload = w.pool.slot(i)[HEADER_BYTES:HEADER_BYTES + stored[b].numel()]
        assert torch.equal(torch.from_numpy(payload.copy()), stored[b]), f"slot {i}"
    assert d.meta.copy_engines == {want_kind: 1}

    late(kv, sources, noise(2))   # vLLM reuses the pages
    # Loads: vLLM zeroed the new pages (late); start_load_kv queues the copies at once.
    from_slots, staged, streamed = (list(range(20, 28)), list(range(30, 34)),
                                    list(range(40, 44)))
    late(kv, from_slots + staged + streamed, zeros)
    w.submit_loads(KVTierMetadata(loads=[
        LoadJob("r1", [LoadItem(key(i), b, i, FROM_SLOT) for i, b in enumerate(from_slots)]),
        LoadJob("r2", [LoadItem(key(i), b, 10 + i, READ) for i, b in enumerate(staged)]),
        LoadJob("r3", [LoadItem(key(4 + i), b, 18 + i % 2, STREAM)   # 2 waves of 2
                       for i, b in enumerate(streamed)]),
    ]))
    d.wait(lambda: d.recving >= {"r1", "r2", "r3"})
    assert not w.take_invalid_blocks() and not d.meta.fail_reasons
    for dst, src in [*zip(from_slots, sources), *zip(staged, sources),
                     *zip(streamed, sources[4:])]:
        assert torch.equal(page_bytes(kv, dst), stored[src]), f"block {dst} (from {src})"
    w.shutdown()


def test_worker_reports_its_copy_engine_to_the_metric(tmp_path, monkeypatch):
    # The worker says which engine it runs once; the scheduler sets the gauge.
    from kvtier.vllm.scheduler import KVTierScheduler
    d = Driver("cpu", "torch", tmp_path, monkeypatch)
    meta = d.w.take_worker_meta()
    assert meta.copy_engines == {"torch": 1}
    assert d.w.take_worker_meta() is None   # once
    sched = KVTierScheduler(d.cfg, NS, 2, BLOCK, d.geometry, start_sweeper=False)
    other_rank = KVTierWorkerMeta(copy_engines={"native-cuda": 1})
    sched.update_connector_output(SimpleNamespace(
        kv_connector_worker_meta=meta.aggregate(other_rank), finished_recving=None))
    gauges = sched.take_stats().data["gauges"]["kvtier_copy_engine_info"]
    assert gauges == {"copy_engine=torch": 1, "copy_engine=native-cuda": 1}
    d.w.shutdown()
