"""Tier-aware KV events for routers, from a real vLLM server (--kv-events-config,
vLLM's own ZMQ publisher) with kvtier: a router that subscribes sees kvtier's
DRAM ("CPU") and disk ("STORAGE") stores under the same block hashes as vLLM's
own GPU events, and removals when a tier evicts a block or its TTL runs out."""

import json
import threading
import time

import pytest

from tests.conftest import needs_vllm
from tests.helpers import BLOCKS_PER_PROMPT, RECORD_BYTES, prompts, server
from kvtier.serving import free_port

pytestmark = [pytest.mark.e2e, needs_vllm]


class Subscriber:
    """Collects vLLM's KV event batches from its ZMQ publisher."""

    def __init__(self, port: int):
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.bind(f"tcp://127.0.0.1:{port}")   # vLLM connects to a host:port endpoint
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVTIMEO, 200)
        self.decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode
        self.events, self._stop = [], False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import zmq
        while not self._stop:
            try:
                _topic, _seq, payload = self.sock.recv_multipart()
            except zmq.Again:
                continue
            self.events.extend(self.decode(payload).events)

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close(0)
        self.ctx.term()

    def summary(self) -> dict:
        out: dict = {}
        for e in self.events:
            k = f"{type(e).__name__}/{getattr(e, 'medium', None)}"
            out[k] = out.get(k, 0) + len(getattr(e, "block_hashes", ()) or ())
        return out

    def hashes(self, kind: str, medium: str | None) -> set:
        return {h for e in self.events if type(e).__name__ == kind
                and getattr(e, "medium", None) == medium for h in e.block_hashes}


def wait_for(cond, sub, timeout=60.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"events did not come; seen: {sub.summary()}"
        time.sleep(0.2)


def test_a_router_sees_kvtier_tiers_in_vllm_kv_events(model_dir, tmp_path):
    port = free_port()
    cfg = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"tcp://127.0.0.1:{port}"})
    sub = Subscriber(port)
    ps = prompts(3, seed=41)
    try:
        # Disk: 30 records (one prompt and a bit); DRAM: 30. A TTL of 6 s.
        with server(model_dir, tmp_path / "store", tmp_path / "s.log",
                    disk_bytes=32 * RECORD_BYTES, dram_bytes=30 * RECORD_BYTES, ttl_seconds=6,
                    vllm_args=["--kv-events-config", cfg]) as s:
            s.complete(ps[0])
            wait_for(lambda: len(sub.hashes("BlockStored", "STORAGE")) >= BLOCKS_PER_PROMPT, sub)
            gpu = sub.hashes("BlockStored", "GPU") | sub.hashes("BlockStored", None)
            dram = sub.hashes("BlockStored", "CPU")
            disk = sub.hashes("BlockStored", "STORAGE")
            # kvtier's blocks carry vLLM's own block hashes: a router can match them
            assert len(dram) >= BLOCKS_PER_PROMPT and dram == disk
            assert dram <= gpu
            first = set(disk)
            s.complete(ps[1])                  # a second prompt: the disk tier evicts
            wait_for(lambda: sub.hashes("BlockRemoved", "STORAGE") & first, sub)
            assert sub.hashes("BlockRemoved", "CPU") & first   # DRAM (30) evicted too
            time.sleep(12)                     # the TTL runs out; the sweeper expires
            s.complete(ps[2][:64])             # a step publishes what is pending
            second = sub.hashes("BlockStored", "STORAGE") - first
            wait_for(lambda: len(sub.hashes("BlockRemoved", "STORAGE") & second) > 0, sub)
    finally:
        sub.close()
