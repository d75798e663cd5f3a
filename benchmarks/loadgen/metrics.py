"""Prometheus text parsing (vLLM ``/metrics``) and summary statistics."""

from __future__ import annotations

import math
import re

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# vLLM v1 counters (prometheus_client adds ``_total``); see vllm/v1/metrics/loggers.py.
COUNTERS = {
    "prompt_tokens": "vllm:prompt_tokens",
    "cached_tokens": "vllm:prompt_tokens_cached",
    "prefix_cache_queries": "vllm:prefix_cache_queries",
    "prefix_cache_hits": "vllm:prefix_cache_hits",
    "external_prefix_cache_queries": "vllm:external_prefix_cache_queries",
    "external_prefix_cache_hits": "vllm:external_prefix_cache_hits",
    "generation_tokens": "vllm:generation_tokens",
    "preemptions": "vllm:num_preemptions",
    # request-phase histograms (sum and count): time waiting in the scheduler's
    # queue (e.g. for KV cache room) and in prefill, per request
    "queue_time_s_sum": "vllm:request_queue_time_seconds_sum",
    "queue_time_n": "vllm:request_queue_time_seconds_count",
    "prefill_time_s_sum": "vllm:request_prefill_time_seconds_sum",
    "prefill_time_n": "vllm:request_prefill_time_seconds_count",
}
BY_SOURCE = "vllm:prompt_tokens_cached_by_source"


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)] for every sample line."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\")
                  for k, v in _LABEL.findall(m.group(2) or "")}
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def counter(samples: dict, name: str, **labels: str) -> float | None:
    """Sum of a counter's samples whose labels match (``name`` with or without ``_total``)."""
    for n in (name + "_total", name):
        if n in samples:
            return sum(v for lab, v in samples[n]
                       if all(lab.get(k) == want for k, want in labels.items()))
    return None


def server_counters(text: str) -> dict:
    """The vLLM counters this benchmark reads, plus cached tokens by source."""
    s = parse_prometheus(text)
    out = {k: counter(s, name) for k, name in COUNTERS.items()}
    by_source: dict[str, float] = {}
    for n in (BY_SOURCE + "_total", BY_SOURCE):
        for lab, v in s.get(n, []):
            src = lab.get("source", "unknown")
            by_source[src] = by_source.get(src, 0.0) + v
        if by_source:
            break
    out["cached_by_source"] = by_source
    return out


def counters_delta(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    out = {}
    for k, v in after.items():
        if k == "cached_by_source":
            b = before.get(k, {})
            out[k] = {src: x - b.get(src, 0.0) for src, x in v.items()}
        elif v is not None and before.get(k) is not None:
            out[k] = v - before[k]
        else:
            out[k] = None
    p, c = out.get("prompt_tokens"), out.get("cached_tokens")
    if c is None and out["cached_by_source"]:
        c = sum(out["cached_by_source"].values())
    out["hit_rate"] = c / p if p and c is not None else None
    for what in ("queue", "prefill"):       # mean seconds per request
        s_, n = out.get(f"{what}_time_s_sum"), out.get(f"{what}_time_n")
        out[f"{what}_time_s_mean"] = s_ / n if s_ is not None and n else None
    return out


def percentile(values, p: float) -> float | None:
    """Linear-interpolated percentile, p in [0, 100]; None for no values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats(values) -> dict:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "avg": sum(xs) / len(xs), "p50": percentile(xs, 50),
            "p95": percentile(xs, 95), "p99": percentile(xs, 99), "max": max(xs)}
