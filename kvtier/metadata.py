"""Messages between the connector's halves.

Scheduler -> workers (``KVTierMetadata``, once per step): which GPU blocks to
copy into which DRAM slots (stores), which slots or records to bring back into
which GPU blocks (loads). Workers never decide; they move bytes.

Workers -> scheduler (``KVTierWorkerMeta``, once per step, summed over ranks by
``aggregate``): which store jobs reached DRAM, which records reached disk,
which keys failed to load. The scheduler acts once every rank has answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

NO_SLOT = -1


class StoreItem(NamedTuple):
    key: bytes
    block: int      # GPU block id (source)
    slot: int       # DRAM slot (destination)
    to_disk: bool   # write the slot through to the disk tier afterwards
    group: int = 0  # KV cache group (kvtier.groups): which layers


class LoadItem(NamedTuple):
    key: bytes
    block: int      # GPU block id (destination)
    slot: int       # DRAM slot: holds the block, or stages it from disk; NO_SLOT = fail
    from_disk: bool
    group: int = 0  # KV cache group (kvtier.groups): which layers


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


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass
class KVTierWorkerMeta(KVConnectorWorkerMetadata):
    stored: dict[int, int] = field(default_factory=dict)         # job id -> ranks done
    store_failed: dict[int, int] = field(default_factory=dict)   # job id -> ranks failed
    written: dict[bytes, int] = field(default_factory=dict)      # key -> ranks published
    write_failed: dict[bytes, int] = field(default_factory=dict)  # key -> ranks failed
    load_failed: dict[bytes, int] = field(default_factory=dict)   # key -> ranks failed
    # Per-rank observations for the load-vs-recompute model: (tier, bytes, seconds).
    load_timings: list[tuple[str, int, float]] = field(default_factory=list)
    fail_reasons: dict[str, int] = field(default_factory=dict)   # e.g. "checksum" -> n

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVTierWorkerMeta":
        assert isinstance(other, KVTierWorkerMeta)
        return KVTierWorkerMeta(
            stored=_add(self.stored, other.stored),
            store_failed=_add(self.store_failed, other.store_failed),
            written=_add(self.written, other.written),
            write_failed=_add(self.write_failed, other.write_failed),
            load_failed=_add(self.load_failed, other.load_failed),
            load_timings=self.load_timings + other.load_timings,
            fail_reasons=_add(self.fail_reasons, other.fail_reasons),
        )

    def empty(self) -> bool:
        return not (self.stored or self.store_failed or self.written or self.write_failed or self.load_failed
                    or self.load_timings or self.fail_reasons)
