"""Prometheus metrics, exported through vLLM's connector-metrics hooks.

The scheduler half produces a ``KVTierStats`` each step (vLLM calls the
connector's ``get_kv_connector_stats`` after ``update_connector_output``). It
carries *cumulative* counters and current gauges (so aggregation is "newest
wins" and nothing is lost if vLLM drops an interval) plus the new latency
observations. vLLM hands it to ``KVTierPromMetrics.observe`` in the API server
process, whose metric classes are vLLM's multiprocess-safe ones: kvtier's
metrics appear in vLLM's own ``/metrics``. Names: docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )
except ImportError:  # the planner / store tools run without vLLM
    KVConnectorStats = object  # type: ignore[assignment,misc]
    KVConnectorPromMetrics = object  # type: ignore[assignment,misc]

# name -> (kind, help, label names). Counters are cumulative in the stats payload.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "kvtier_lookups_total": ("counter", "Prefix lookups answered by kvtier", ()),
    "kvtier_lookup_tokens_total": ("counter", "Prompt tokens looked up beyond vLLM's local hit", ()),
    "kvtier_hit_tokens_total": ("counter", "Prompt tokens loaded from a kvtier tier", ("tier",)),
    "kvtier_stored_blocks_total": ("counter", "Blocks stored into a tier", ("tier",)),
    "kvtier_stored_bytes_total": ("counter", "Bytes stored into a tier", ("tier",)),
    "kvtier_loaded_bytes_total": ("counter", "Bytes loaded from a tier", ("tier",)),
    "kvtier_evictions_total": ("counter", "Blocks evicted, by cause (capacity, ttl, dropped)",
                               ("tier", "cause")),
    "kvtier_load_failures_total": ("counter", "Blocks that failed to load and were recomputed, "
                                   "by reason (checksum, truncated, missing, wrong_namespace, ...)",
                                   ("reason",)),
    "kvtier_checksum_failures_total": ("counter", "Records rejected by checksum or header checks",
                                       ()),
    "kvtier_bad_mac_records_total": ("counter", "Records rejected because their MAC did not "
                                     "verify (written without the store's secret: planted or "
                                     "damaged); recomputed and removed", ()),
    "kvtier_skipped_stores_total": ("counter", "Stores skipped (backpressure), by reason",
                                    ("reason",)),
    "kvtier_io_errors_total": ("counter", "Disk I/O errors (ENOSPC, EIO, ...)", ()),
    "kvtier_deferred_lookups_total": ("counter", "Lookups answered 'ask again next step': every "
                                      "DRAM slot was held by loads and stores in flight", ()),
    "kvtier_reload_refused_total": ("counter", "Requests recomputed because their load failed "
                                    "from its first block (no second load: it could fail the "
                                    "same way forever)", ()),
    "kvtier_streamed_blocks_total": ("counter", "Disk blocks loaded through scratch slots (DRAM "
                                     "too full to stage them)", ()),
    "kvtier_pins_refused_total": ("counter", "Blocks a request asked to pin (kvtier.pin) that "
                                  "the pin budget refused (the request is served)", ()),
    "kvtier_bad_request_params_total": ("counter", "Requests whose kv_transfer_params.kvtier "
                                        "was not understood (served on the defaults)", ()),
    "kvtier_pinned_bytes": ("gauge", "Bytes of blocks pinned by requests (kvtier.pin)", ()),
    "kvtier_orphan_records_total": ("counter", "Records some TP rank lacked at start-up "
                                    "(removed)", ()),
    "kvtier_declined_loads_total": ("counter", "Hits declined because recompute was faster",
                                    ("tier",)),
    "kvtier_occupancy_bytes": ("gauge", "Bytes held by a tier", ("tier",)),
    "kvtier_capacity_bytes": ("gauge", "Capacity of a tier", ("tier",)),
    "kvtier_blocks": ("gauge", "Blocks held by a tier", ("tier",)),
    "kvtier_copy_engine_info": ("gauge", "TP ranks running each GPU<->DRAM copy engine "
                                "(native-cuda, native-cpu, or torch: the fallback)",
                                ("copy_engine",)),
    "kvtier_remote_errors_total": ("counter", "Cluster-tier calls that failed (op: lookup, "
                                   "get, put); the tier is then skipped for retry_seconds "
                                   "(misses: recompute)", ("op",)),
    "kvtier_load_seconds": ("histogram", "Latency of one load batch from a tier", ("tier",)),
}
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CHECKSUM_REASONS = ("checksum", "bad_header", "truncated", "wrong_key", "wrong_namespace",
                    "bad_mac", "not_regular")


def labels_key(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@dataclass
class KVTierStats(KVConnectorStats):
    """data = {"counters": {name: {labels_key: value}}, "gauges": {...},
    "observations": {name: {labels_key: [seconds...]}}}"""

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self):
        self.data = {}

    def aggregate(self, other: "KVTierStats") -> "KVTierStats":
        if not other.data:
            return self
        obs = {n: {k: list(v) for k, v in per.items()}
               for n, per in self.data.get("observations", {}).items()}
        for n, per in other.data.get("observations", {}).items():
            for k, v in per.items():
                obs.setdefault(n, {}).setdefault(k, []).extend(v)
        return KVTierStats({"counters": other.data.get("counters", {}),
                            "gauges": other.data.get("gauges", {}), "observations": obs})

    def reduce(self) -> dict[str, int | float]:
        c = self.data.get("counters", {})
        hits = c.get("kvtier_hit_tokens_total", {})
        return {"hit_tokens_dram": hits.get("tier=dram", 0), "hit_tokens_disk": hits.get(
            "tier=disk", 0), "lookup_tokens": c.get("kvtier_lookup_tokens_total", {}).get("", 0)}

    def is_empty(self) -> bool:
        return not self.data


class KVTierPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        unregister_kvtier_metrics()   # a second engine in one process registers anew
        self._metrics = {}
        for name, (kind, doc, extra) in METRICS.items():
            names = list(labelnames) + list(extra)
            if kind == "counter":
                # prometheus-client appends _total itself; give the base name.
                m = self._counter_cls(name=name.removesuffix("_total"), documentation=doc,
                                      labelnames=names)
            elif kind == "gauge":
                m = self._gauge_cls(name=name, documentation=doc, labelnames=names,
                                    multiprocess_mode="mostrecent")
            else:
                m = self._histogram_cls(name=name, documentation=doc, labelnames=names,
                                        buckets=LOAD_BUCKETS)
            self._metrics[name] = (m, extra)
        self._last: dict[tuple[int, str, str], float] = {}
        # Series exist from the start at 0, so rate()/increase() see the first event.
        known = {(): [""], ("tier",): ["tier=dram", "tier=disk"],
                 ("tier", "cause"): [f"cause={c},tier={t}" for t in ("dram", "disk")
                                     for c in ("capacity", "ttl", "dropped")]}
        for engine_idx in per_engine_labelvalues:
            for name, (kind, _, extra) in METRICS.items():
                if kind == "counter":
                    for lkey in known.get(extra, ()):
                        self._child(name, engine_idx, lkey).inc(0)

    def _child(self, name: str, engine_idx: int, lkey: str):
        m, extra = self._metrics[name]
        labels = dict(kv.split("=", 1) for kv in lkey.split(",") if kv)
        values = list(self.per_engine_labelvalues[engine_idx]) + [labels.get(x, "") for x in extra]
        return m.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for name, per in transfer_stats_data.get("counters", {}).items():
            for lkey, value in per.items():
                last = self._last.get((engine_idx, name, lkey), 0)
                if value > last:
                    self._child(name, engine_idx, lkey).inc(value - last)
                    self._last[(engine_idx, name, lkey)] = value
        for name, per in transfer_stats_data.get("gauges", {}).items():
            for lkey, value in per.items():
                self._child(name, engine_idx, lkey).set(value)
        for name, per in transfer_stats_data.get("observations", {}).items():
            for lkey, values in per.items():
                child = self._child(name, engine_idx, lkey)
                for v in values:
                    child.observe(v)


def unregister_kvtier_metrics() -> None:
    """Drop kvtier's collectors from the default registry (as vLLM does for its own)."""
    from prometheus_client import REGISTRY
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith("kvtier_"):
            REGISTRY.unregister(collector)


class StatsRecorder:
    """Scheduler-side accumulation: cumulative counters, gauges, new observations."""

    def __init__(self):
        self.counters: dict[str, dict[str, float]] = {}
        self.gauges: dict[str, dict[str, float]] = {}
        self.observations: dict[str, dict[str, list[float]]] = {}
        self._dirty = False

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        if n:
            per = self.counters.setdefault(name, {})
            k = labels_key(labels)
            per[k] = per.get(k, 0) + n
            self._dirty = True

    def set(self, name: str, value: float, **labels: str) -> None:
        per = self.gauges.setdefault(name, {})
        k = labels_key(labels)
        if per.get(k) != value:
            per[k] = value
            self._dirty = True

    def add(self, name: str, n: float, **labels: str) -> None:
        """Adds ``n`` to a gauge."""
        self.set(name, self.gauges.get(name, {}).get(labels_key(labels), 0) + n, **labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observations.setdefault(name, {}).setdefault(labels_key(labels), []).append(value)
        self._dirty = True

    def counter(self, name: str, **labels: str) -> float:
        return self.counters.get(name, {}).get(labels_key(labels), 0)

    def take(self) -> KVTierStats | None:
        if not self._dirty:
            return None
        self._dirty = False
        data = {"counters": {n: dict(p) for n, p in self.counters.items()},
                "gauges": {n: dict(p) for n, p in self.gauges.items()},
                "observations": self.observations}
        self.observations = {}
        return KVTierStats(data)
