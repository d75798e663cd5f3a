"""From replays to answers: result rows, the smallest capacity that reaches a
target hit rate at a TTL, KV bytes per token of a model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kvtier.plan.replay import ReplayResult, TierSpec, replay_many, tier_configs
from kvtier.plan.traces import PlanError, Trace

def sweep(trace: Trace, ttls: Sequence[float], capacities: Sequence[float] | None = None, *,
          jobs: int = 1, sample_interval_s: float | None = None,
          kv_bytes_per_token: int | None = None,
          **hierarchy: Any) -> list[dict[str, Any]]:
    """Rows (see :func:`row`) for every TTL x capacity (or hierarchy) combination."""
    configs = tier_configs(ttls, capacities, **hierarchy)
    res = replay_many(trace, configs, jobs=jobs, sample_interval_s=sample_interval_s)
    return [row(r, kv_bytes_per_token) for r in res]


def _none_if_inf(x: float) -> float | None:
    return None if math.isinf(x) else x


def row(res: ReplayResult, kv_bytes_per_token: int | None = None) -> dict[str, Any]:
    """One JSON-able result: ``ttl_s`` / ``capacity_tokens`` (null = none / unbounded) are
    those of the last (largest) tier; ``tiers`` lists every tier."""
    last = res.tiers[-1]
    peak = res.peak_used_tokens[last.name]
    out: dict[str, Any] = {
        "kind": "sweep",
        "ttl_s": _none_if_inf(last.ttl_s),
        "capacity_tokens": _none_if_inf(last.capacity_tokens),
        "tiers": [{"name": s.name, "capacity_tokens": _none_if_inf(s.capacity_tokens),
                   "ttl_s": _none_if_inf(s.ttl_s), "admission": s.admission}
                  for s in res.tiers],
        "disk_admission": last.admission,
        "written_tokens": res.written_tokens,
        "written_per_hit_token": _none_if_inf(res.written_per_hit_token),
        "hit_rate": res.hit_rate,
        "hit_rate_by_tier": res.hit_rate_by_tier,
        "prefills_per_block": res.prefills_per_block,
        "requests": res.requests,
        "input_tokens": res.input_tokens,
        "hit_tokens": res.hit_tokens,
        "blocks": res.blocks,
        "blocks_prefilled": res.blocks_prefilled,
        "distinct_blocks": res.distinct_blocks,
        "peak_working_set_tokens": peak,
        "evictions": res.evictions,
        "replay_s": round(res.replay_s, 3),
        "cpu_s": round(res.cpu_s, 3),
    }
    if kv_bytes_per_token:
        out["kv_bytes_per_token"] = kv_bytes_per_token
        out["capacity_bytes"] = (None if math.isinf(last.capacity_tokens)
                                 else int(last.capacity_tokens * kv_bytes_per_token))
        out["peak_working_set_bytes"] = int(peak * kv_bytes_per_token)
        out["written_bytes"] = int(res.written_tokens * kv_bytes_per_token)
    return out


# --------------------------------------------------------------------------- sizing
@dataclass
class Sizing:
    """Smallest one-tier capacities reaching ``target x unbounded hit rate`` at ``ttl_s``."""

    ttl_s: float
    unbounded_hit_rate: float
    peak_working_set_tokens: float
    capacity_tokens: dict[float, float]              # target fraction -> smallest capacity
    hit_rate: dict[float, float]                     # target fraction -> its hit rate
    curve: list[tuple[float, float]]                 # (capacity, hit rate), every probe
    check: ReplayResult | None = None                # DRAM + NVMe at the two answers


def size_for(trace: Trace, ttl: float, targets: Sequence[float] = (0.95,), *, jobs: int = 1,
             rel_tol: float = 0.02, grid_points: int = 5, progress: bool = False,
             unbounded: ReplayResult | None = None,
             on_result: Callable[[int, ReplayResult], None] | None = None) -> Sizing:
    """Smallest capacity (tokens) of one LRU-within-TTL tier whose hit rate reaches
    ``f x`` the unbounded-capacity hit rate at the same TTL, for each ``f`` in
    ``targets``, to within ``rel_tol``. Assumes hit rate grows with capacity (LRU).

    The unbounded replay's peak working set P is enough for everything (a tier of P
    tokens never evicts for capacity); a log grid P/100..P brackets each answer, then
    geometric bisection narrows it. An answer is the smallest probed capacity that
    reaches its goal. ``unbounded``: a one-tier unbounded replay at ``ttl`` already made."""
    for f in targets:
        if not 0 < f <= 1:
            raise PlanError(f"target {f}: must be a fraction in (0, 1]")
    base = unbounded
    if base is None or len(base.tiers) != 1 or base.tiers[0].ttl_s != ttl or \
            not math.isinf(base.tiers[0].capacity_tokens):
        base = replay_many(trace, [[TierSpec("cache", math.inf, ttl)]], progress=progress,
                           on_result=on_result)[0]
    H = base.hit_rate
    P = float(base.peak_used_tokens["cache"])
    probes: dict[float, float] = {P: H}

    def run(caps: Iterable[float]) -> None:
        todo = sorted({c for c in caps if c not in probes})
        if todo:
            res = replay_many(trace, [[TierSpec("cache", c, ttl)] for c in todo], jobs=jobs,
                              progress=progress, on_result=on_result)
            probes.update(zip(todo, (r.hit_rate for r in res)))

    if P > 0:
        run(float(round(P * 10 ** e)) for e in np.linspace(-2, 0, grid_points)[:-1])
    answers: dict[float, float] = {}
    brackets: dict[float, tuple[float, float]] = {}
    for f in targets:
        goal = f * H * (1 - 1e-12)
        ok = [c for c in sorted(probes) if probes[c] >= goal]
        hi = ok[0] if ok else P
        below = [c for c in sorted(probes) if c < hi]
        brackets[f] = (below[-1] if below else 0.0, hi)
    while True:
        mids = {}
        for f, (lo, hi) in brackets.items():
            if lo > 0 and hi / lo > 1 + rel_tol:
                mids[f] = float(round(math.sqrt(lo * hi)))
            elif lo == 0 and hi >= 2:
                mids[f] = float(round(hi / 2))   # below the grid: halve (rare)
        mids = {f: m for f, m in mids.items() if brackets[f][0] < m < brackets[f][1]}
        if not mids:
            break
        run(mids.values())
        for f, m in mids.items():
            lo, hi = brackets[f]
            brackets[f] = (lo, m) if probes[m] >= f * H * (1 - 1e-12) else (m, hi)
    for f, (lo, hi) in brackets.items():
        answers[f] = hi
    return Sizing(ttl_s=ttl, unbounded_hit_rate=H, peak_working_set_tokens=P,
                  capacity_tokens=answers, hit_rate={f: probes[c] for f, c in answers.items()},
                  curve=sorted(probes.items()))


def size_rows(sz: Sizing, kv_bytes_per_token: int | None = None,
              names: dict[float, str] | None = None) -> list[dict[str, Any]]:
    """JSON rows of a sizing: one ``kind: "size"`` per target, ``"size-probe"`` per probe."""
    out = []
    for f, c in sz.capacity_tokens.items():
        r = {"kind": "size", "tier": (names or {}).get(f), "target": f,
             "ttl_s": _none_if_inf(sz.ttl_s), "capacity_tokens": c,
             "hit_rate": sz.hit_rate[f], "unbounded_hit_rate": sz.unbounded_hit_rate,
             "peak_working_set_tokens": sz.peak_working_set_tokens}
        if kv_bytes_per_token:
            r["capacity_bytes"] = int(c * kv_bytes_per_token)
        out.append(r)
    for c, h in sz.curve:
        r = {"kind": "size-probe", "ttl_s": _none_if_inf(sz.ttl_s), "capacity_tokens": c,
             "hit_rate": h}
        if kv_bytes_per_token:
            r["capacity_bytes"] = int(c * kv_bytes_per_token)
        out.append(r)
    if sz.check is not None:
        out.append(row(sz.check, kv_bytes_per_token) | {"kind": "size-check"})
    return out


# --------------------------------------------------------------------------- model sizes
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2,
                "bfloat16": 2, "bf16": 2, "fp8": 1, "float8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
                "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}


def kv_bytes_per_token(config: dict[str, Any], dtype: str | None = None) -> int:
    """KV-cache bytes per token of a Hugging Face ``config.json``:
    2 (K and V) x layers x KV heads x head dim x dtype bytes (MLA models: layers x
    (kv_lora_rank + qk_rope_head_dim) x dtype bytes). ``dtype`` overrides the config's
    (e.g. ``fp8`` for an FP8 KV cache)."""
    c = config
    if "num_hidden_layers" not in c and isinstance(c.get("text_config"), dict):
        c = c["text_config"]
    try:
        layers = int(c["num_hidden_layers"])
        dt = str(dtype or c.get("torch_dtype") or c.get("dtype") or config.get("torch_dtype")
                 or "bfloat16").lower().replace("torch.", "")
        nbytes = _DTYPE_BYTES[dt]
        if c.get("kv_lora_rank"):
            return layers * (int(c["kv_lora_rank"]) + int(c.get("qk_rope_head_dim", 0))) * nbytes
        heads = int(c["num_attention_heads"])
        kv_heads = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    except KeyError as e:
        raise PlanError(f"model config: missing {e} (or unknown dtype)") from None
    return 2 * layers * kv_heads * head_dim * nbytes


# --------------------------------------------------------------------------- parsing
