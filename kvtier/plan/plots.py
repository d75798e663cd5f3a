"""The planner's plots (matplotlib, optional)."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from kvtier.plan.replay import ReplayResult
from kvtier.plan.sizing import Sizing
from kvtier.plan.units import fmt_bytes, fmt_tokens, fmt_ttl

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_timeline(results: Sequence[ReplayResult], path: str | os.PathLike,
                  kv_bytes: int | None = None, title: str = "") -> None:
    """Working set (live tokens of the last tier) and hit rate over time, one line per run."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    span = max((r.timeline.t[-1] - r.timeline.t[0] for r in results
                if r.timeline is not None and r.timeline.t), default=0.0)
    window_s = 600.0 if span >= 6 * 3600 else max(span / 30, 1.0)
    for r in results:
        tl = r.timeline
        if tl is None or not tl.t:
            continue
        last = r.tiers[-1]
        t0 = tl.t[0]
        hours = [(x - t0) / 3600 for x in tl.t]
        used = np.array(tl.used[last.name], dtype=float)
        used[used <= 0] = np.nan                 # log scale: an empty cache is a gap
        lab = f"TTL {fmt_ttl(last.ttl_s)}"
        if not math.isinf(last.capacity_tokens):
            lab += f", capacity {fmt_tokens(last.capacity_tokens)}"
        if kv_bytes:
            a1.plot(hours, used * kv_bytes / 2**30, label=lab)
        else:
            a1.plot(hours, used, label=lab)
        win = max(1, int(round(window_s / tl.interval_s)))
        a2.plot(hours, tl.hit_rate(win), label=f"{lab} (overall {r.hit_rate:.3f})")
    a1.set_yscale("log")
    a1.set_ylabel("working set (GiB of KV)" if kv_bytes else "working set (tokens)")
    a1.set_title(title or "Working set (live cached blocks) and hit rate over time")
    a1.legend(fontsize=8)
    a1.grid(alpha=.3, which="both")
    a2.set_ylabel(f"hit rate (token-weighted,\n{fmt_ttl(round(window_s))} window)")
    a2.set_xlabel("trace time (h)")
    a2.set_ylim(0, 1.02)
    a2.legend(fontsize=8, loc="lower right")
    a2.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Hit rate vs capacity (a line per TTL) and vs TTL (a line per capacity)."""
    rows = [r for r in rows if r.get("kind", "sweep") == "sweep"]
    ttls = sorted({r["ttl_s"] if r["ttl_s"] is not None else math.inf for r in rows})
    caps = sorted({r["capacity_tokens"] if r["capacity_tokens"] is not None else math.inf
                   for r in rows})
    if len(ttls) < 2 and len(caps) < 2:
        return False
    plt = _plt()
    panels = int(len(caps) > 1) + int(len(ttls) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    key = lambda r, k: math.inf if r[k] is None else r[k]   # noqa: E731
    if len(caps) > 1:
        ax = axes.pop(0)
        finite = [c for c in caps if math.isfinite(c)]
        xinf = max(finite) * 3 if finite else 1.0
        for ttl in ttls:
            pts = sorted((key(r, "capacity_tokens"), r["hit_rate"]) for r in rows
                         if key(r, "ttl_s") == ttl)
            ax.plot([xinf if math.isinf(c) else c for c, _ in pts], [h for _, h in pts],
                    marker="o", label=f"TTL {fmt_ttl(ttl)}")
        ax.set_xscale("log")
        ax.set_xlabel("capacity (tokens; rightmost point: unbounded)")
        ax.set_ylabel("hit rate")
        ax.grid(alpha=.3, which="both")
        ax.legend(fontsize=8)
    if len(ttls) > 1:
        ax = axes.pop(0)
        finite = [t for t in ttls if math.isfinite(t)]
        xinf = max(finite) * 3 if finite else 1.0
        for cap in caps:
            pts = sorted((key(r, "ttl_s"), r["hit_rate"]) for r in rows
                         if key(r, "capacity_tokens") == cap)
            ax.plot([xinf if math.isinf(t) else t for t, _ in pts], [h for _, h in pts],
                    marker="o", label=f"capacity {fmt_tokens(cap)}")
        ax.set_xscale("log")
        ax.set_xlabel("TTL (s; rightmost point: no TTL)")
        ax.set_ylabel("hit rate")
        ax.grid(alpha=.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sizing(sz: Sizing, path: str | os.PathLike, kv_bytes: int | None = None,
                names: dict[float, str] | None = None, title: str = "") -> None:
    """Hit rate vs capacity at the sizing TTL, the goals and the answers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    scale = kv_bytes / 2**30 if kv_bytes else 1.0
    xs = [c * scale for c, _ in sz.curve if c > 0]
    ys = [h for c, h in sz.curve if c > 0]
    ax.plot(xs, ys, marker=".", color="C0", label=f"one tier, TTL {fmt_ttl(sz.ttl_s)}")
    ax.axhline(sz.unbounded_hit_rate, color="gray", ls=":",
               label=f"unbounded capacity: {sz.unbounded_hit_rate:.3f}")
    for i, f in enumerate(sorted(sz.capacity_tokens)):
        c = sz.capacity_tokens[f] * scale
        col = f"C{i + 1}"
        who = (names or {}).get(f, "capacity")
        txt = fmt_bytes(sz.capacity_tokens[f] * kv_bytes) if kv_bytes else \
            fmt_tokens(sz.capacity_tokens[f]) + " tokens"
        ax.axhline(f * sz.unbounded_hit_rate, color=col, ls="--", lw=.8)
        ax.axvline(c, color=col, ls="--", lw=.8)
        ax.plot([c], [sz.hit_rate[f]], "o", color=col,
                label=f"{who}: {txt} -> {sz.hit_rate[f]:.3f} ({f:.0%} of unbounded)")
    ax.set_xscale("log")
    ax.set_xlabel("capacity (GiB of KV)" if kv_bytes else "capacity (tokens)")
    ax.set_ylabel("hit rate (token-weighted)")
    ax.set_title(title or f"Hit rate vs capacity at TTL {fmt_ttl(sz.ttl_s)}")
    ax.grid(alpha=.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
