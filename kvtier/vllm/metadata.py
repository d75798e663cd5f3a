"""Messages between the connector's halves.

Scheduler -> workers (``KVTierMetadata``, once per step): which GPU blocks to
copy into which DRAM slots (stores), which slots or records to bring back into
which GPU blocks (loads), which finished requests wait for their copies.
Workers never decide; they move bytes and report what happened.

Workers -> scheduler (``KVTierWorkerMeta``, once per step, summed over ranks by
``aggregate``): per store job, per record write, per staged read, how many
ranks succeeded or failed. The scheduler acts on a thing once every rank has
answered for it (kvtier.vllm.scheduler, kvtier.cache.ledger).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorMetadata,
        KVConnectorWorkerMetadata,
    )
except ImportError:   # the worker alone, without vLLM (benchmarks/gpu_check.sh on a GPU box)
    class KVConnectorMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's base class."""

    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's base class."""

from kvtier.cache.ledger import NO_SLOT

__all__ = ["NO_SLOT", "StoreItem", "LoadItem", "StoreJob", "LoadJob", "KVTierMetadata",
           "KVTierWorkerMeta", "FROM_SLOT", "READ", "STREAM"]

# How a load item gets its bytes.
FROM_SLOT = 0   # the slot holds them (READY), or a read in flight fills it (join)
READ = 1        # read the record into the slot (a staging block), then scatter
STREAM = 2      # read into a scratch slot of the job, scatter, reuse the slot


WRITE_ONLY = -1    # StoreItem.block: the slot already holds the block; only write it


class StoreItem(NamedTuple):
    key: bytes
    block: int      # GPU block id (source); WRITE_ONLY: no copy, the slot is READY
    slot: int       # DRAM slot (destination)
    to_disk: bool   # write the slot through to the disk tier afterwards
    group: int = 0  # KV cache group (kvtier.cache.groups): which layers
    reuse: bytes | None = None   # to_disk: the evicted key whose file this write takes over


class LoadItem(NamedTuple):
    key: bytes
    block: int      # GPU block id (destination)
    slot: int       # DRAM slot; NO_SLOT: no bytes for this block (fail it: recompute)
    kind: int       # FROM_SLOT, READ or STREAM
    group: int = 0  # KV cache group (kvtier.cache.groups): which layers


@dataclass
class StoreJob:
    job_id: int
    req_id: str
    items: list[StoreItem]


@dataclass
class LoadJob:
    req_id: str
    items: list[LoadItem]


@dataclass
class KVTierMetadata(KVConnectorMetadata):
    stores: list[StoreJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    # GPU blocks were freed since the last step (preempted requests; sliding-
    # window blocks that left the window): in-flight reads of GPU blocks must
    # finish before the forward can overwrite them.
    flush_gathers: bool = False
    # Finished requests whose blocks vLLM keeps until this worker reports them
    # in finished_sending (their store copies may still read them).
    await_sending: set[str] = field(default_factory=set)
    # The step computes nothing: vLLM steps only to collect transfer results. The
    # worker then waits (GIL released) for one of its copies, reads or writes to
    # end, up to a few ms, instead of returning at once (kvtier.vllm.worker).
    idle_step: bool = False


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


_COUNTS = ("stored", "store_failed", "written", "write_failed", "staged", "stage_failed",
           "bad_records", "fail_reasons", "copy_engines")


@dataclass
class KVTierWorkerMeta(KVConnectorWorkerMetadata):
    stored: dict[int, int] = field(default_factory=dict)          # job id -> ranks done
    store_failed: dict[int, int] = field(default_factory=dict)    # job id -> ranks failed
    written: dict[bytes, int] = field(default_factory=dict)       # key -> ranks published
    write_failed: dict[bytes, int] = field(default_factory=dict)  # key -> ranks failed
    staged: dict[bytes, int] = field(default_factory=dict)        # key -> ranks read (READ)
    stage_failed: dict[bytes, int] = field(default_factory=dict)  # key -> ranks failed
    bad_records: dict[bytes, int] = field(default_factory=dict)   # key -> ranks: record proven bad
    # Per-rank observations for the load-vs-recompute model: (tier, bytes, seconds).
    load_timings: list[tuple[str, int, float]] = field(default_factory=list)
    fail_reasons: dict[str, int] = field(default_factory=dict)    # e.g. "checksum" -> n
    # Sent once, at the first step: copy engine kind ("native-cuda", "torch", ...) -> ranks.
    copy_engines: dict[str, int] = field(default_factory=dict)
    remote_stored: int = 0   # records this rank published to the cluster tier

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVTierWorkerMeta":
        assert isinstance(other, KVTierWorkerMeta)
        out = KVTierWorkerMeta(load_timings=self.load_timings + other.load_timings,
                               remote_stored=self.remote_stored + other.remote_stored)
        for name in _COUNTS:
            setattr(out, name, _add(getattr(self, name), getattr(other, name)))
        return out

    def empty(self) -> bool:
        return not (self.load_timings or self.remote_stored
                    or any(getattr(self, n) for n in _COUNTS))
