"""KVTierConnector: vLLM glue only. The scheduler half is kvtier.vllm.scheduler, the
worker half kvtier.vllm.worker; this module wires vLLM's hooks to them.

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"KVTierConnector",
      "kv_connector_module_path":"kvtier.connector","kv_role":"kv_both",
      "kv_connector_extra_config":{"dram_bytes":"64GiB","disk_path":"/nvme/kvtier",
                                   "disk_bytes":"2TiB","ttl_seconds":3600}}'
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.config import KVTierConfig
from kvtier.cache.groups import KVGroup
from kvtier.vllm.groups import groups_of, payload_bytes_of
from kvtier.vllm.namespace import namespace_of
from kvtier.vllm.metadata import KVTierMetadata
from kvtier.vllm.metrics import KVTierPromMetrics, KVTierStats
from kvtier.store.slots import SlotGeometry
from kvtier.vllm.watchdog import StepWatchdog, limit_from_env

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvtier")

_SOURCES = {"dram": CacheHitSource.HOST, "disk": CacheHitSource.DISK,
            "remote": CacheHitSource.P2P}


def check_supported(vllm_config: "VllmConfig",
                    kv_cache_config: "KVCacheConfig") -> tuple[KVGroup, ...]:
    """Fail at start-up, clearly, on combinations kvtier does not handle; the KV
    cache groups kvtier serves otherwise."""
    pc = vllm_config.parallel_config
    if pc.pipeline_parallel_size > 1:
        raise ValueError("kvtier: pipeline parallelism is not supported "
                         f"(pipeline_parallel_size={pc.pipeline_parallel_size}); use TP only")
    if not vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("kvtier needs prefix caching: remove --no-enable-prefix-caching")
    return groups_of(kv_cache_config)   # raises for KV cache groups kvtier cannot serve


class KVTierConnector(KVConnectorBase_V1, SupportsHMA):
    """Prefix-cache offload: GPU -> DRAM -> disk, reload on prefix match.

    Supports vLLM's hybrid KV cache manager (``SupportsHMA``): full-attention and
    sliding-window groups are offloaded, each group's block as its own record
    (kvtier.cache.groups)."""

    @property
    def requires_kv_delivery(self) -> bool:
        return False   # a best-effort cache: a dropped store is a future miss

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        tc = self._kv_transfer_config
        self.cfg = KVTierConfig.from_extra_config(tc.kv_connector_extra_config)
        self.groups = check_supported(vllm_config, kv_cache_config)
        # kvtier is a cache: a failed load is a miss to recompute, never a failed request.
        if tc.kv_load_failure_policy != "recompute":
            tc.kv_load_failure_policy = "recompute"
        ns = namespace_of(vllm_config, kv_cache_config, self.groups)
        self.namespace = ns
        self.tp_size = ns.tp_size
        geometry = SlotGeometry.plan(payload_bytes_of(kv_cache_config), self.cfg.dram_bytes)
        self.scheduler = None
        self.worker = None
        if role == KVConnectorRole.SCHEDULER:
            from kvtier.vllm.scheduler import KVTierScheduler

            # vLLM's block hashes are collision-resistant with sha256 (its default):
            # then kvtier may look up the keys of blocks it saw before by them.
            algo = str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", ""))
            kv_events = getattr(vllm_config, "kv_events_config", None)
            self.scheduler = KVTierScheduler(
                self.cfg, ns.digest(), ns.tp_size, ns.block_size, geometry, groups=self.groups,
                memo_keys=algo.startswith("sha256"),
                events=bool(kv_events and kv_events.enable_kv_cache_events),
                hash_block_size=getattr(kv_cache_config, "hash_block_size", None)
                or getattr(vllm_config.cache_config, "prefix_match_unit", None))
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            from kvtier.vllm.worker import KVTierWorker

            self.worker = KVTierWorker(self.cfg, ns.digest(), get_tensor_model_parallel_rank(),
                                       ns.tp_size, geometry)
            self.watchdog = StepWatchdog(limit_from_env())
        log.info("kvtier %s: %s, %d DRAM slots of %d B, disk %s (%.1f GiB), ttl %.0f s",
                 role.name.lower(), ns, geometry.num_slots, geometry.slot_bytes,
                 self.cfg.disk_path if self.cfg.disk_enabled else "off",
                 self.cfg.disk_bytes / 2**30, self.cfg.ttl_seconds)

    # ------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches, self._kv_cache_config.num_blocks,
                                       self.namespace.layout,
                                       [g.layer_names for g in self.groups])

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:   # before the step's forward
            self.watchdog.begin()

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self.worker is not None:   # the step's hooks are done
            self.watchdog.end()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, KVTierMetadata):
            self.watchdog.begin()   # the step's first hook (flush_gathers may wait)
            self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierMetadata)
        self.worker.submit_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return   # loads are asynchronous: requests wait in WAITING_FOR_REMOTE_KVS

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                      **kwargs: Any) -> None:
        return   # whole blocks are offloaded after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierMetadata)
        self.worker.submit_stores(meta)   # queues copies; never waits for them

    def get_finished(self, finished_req_ids: set[str]):
        self.watchdog.end()
        return self.worker.get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        meta = self._connector_metadata   # bound during a step (None outside one)
        sending, recving, failed = self.worker.transfer_results(
            finished_req_ids, idle_step=isinstance(meta, KVTierMetadata) and meta.idle_step)
        self.watchdog.end()   # also where vLLM defers clearing the metadata
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_invalid_blocks()

    def build_connector_worker_meta(self):
        return self.worker.take_worker_meta()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.watchdog.close()
            self.worker.shutdown()

    # --------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks,
                                 num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: "Request",
                                       num_external_tokens: int) -> dict[CacheHitSource, int]:
        return {_SOURCES[t]: n
                for t, n in self.scheduler.hit_sources(request, num_external_tokens).items()}

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.update_connector_output(connector_output)

    def take_events(self):
        return self.scheduler.take_events() if self.scheduler is not None else ()

    def has_pending_push_work(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_pending_work()

    def has_pending_block_frees(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_pending_block_frees()

    def get_kv_connector_stats(self):
        return self.scheduler.take_stats() if self.scheduler is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return KVTierStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request)

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request)
