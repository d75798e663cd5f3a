"""The planner's text output: the result table and the sizing answer."""

from __future__ import annotations

from typing import Any, Sequence


from kvtier.plan.sizing import Sizing
from kvtier.plan.units import fmt_bytes, fmt_tokens, fmt_ttl

def table(rows: Sequence[dict[str, Any]], kv_bytes: int | None = None) -> str:
    """The terminal table of sweep rows."""
    rows = [r for r in rows if r.get("kind", "sweep") == "sweep"]
    if not rows:
        return ""
    names = [t["name"] for t in rows[0]["tiers"]]
    multi = len(names) > 1
    admitted = any(r.get("disk_admission") for r in rows)
    head = (["TTL"] + (["disk admission"] if admitted else [])
            + ([f"{n}" for n in names] if multi else ["capacity"]) + ["hit rate"])
    if multi:
        head += [f"from {n}" for n in names]
    head += [f"{names[-1]} writes/hit"]
    head += ["prefills/block", "peak working set"]
    body = []
    for r in rows:
        cells = [fmt_ttl(r["ttl_s"])] + ([r.get("disk_admission") or "inclusive"] if admitted
                                         else [])
        for t in r["tiers"]:
            c = t["capacity_tokens"]
            txt = fmt_tokens(c)
            if kv_bytes and c is not None:
                txt += f" ({fmt_bytes(c * kv_bytes)})"
            cells.append(txt)
        cells.append(f"{r['hit_rate']:.3f}")
        if multi:
            cells += [f"{r['hit_rate_by_tier'][n]:.3f}" for n in names]
        w = r.get("written_per_hit_token")
        cells.append("-" if w is None else f"{w:.3f}")
        cells.append(f"{r['prefills_per_block']:.2f}")
        ws = fmt_tokens(r["peak_working_set_tokens"]) + " tok"
        if kv_bytes:
            ws += f" ({fmt_bytes(r['peak_working_set_tokens'] * kv_bytes)})"
        cells.append(ws)
        body.append(cells)
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cs: "  ".join(c.rjust(w) if i else c.ljust(w)      # noqa: E731
                               for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def fleet_table(rows: Sequence[dict[str, Any]], kv_bytes: int | None = None) -> str:
    """The terminal table of fleet rows (kvtier.plan.fleet.fleet_row)."""
    rows = [r for r in rows if r.get("kind") == "fleet"]
    if not rows:
        return ""
    own = [t["name"] for t in rows[0]["tiers"] if t["name"] != "shared"]
    shared = any(r["shared_tier"] for r in rows)

    def cap(c: float | None) -> str:
        txt = fmt_tokens(c)
        return txt + (f" ({fmt_bytes(c * kv_bytes)})" if kv_bytes and c is not None else "")

    head = (["TTL", "replicas", "routing"] + [f"{n}/replica" for n in own] + ["shared tier",
            "hit rate"] + [f"from {n}" for n in own] + (["from shared"] if shared else [])
            + ["prefills/block", "requests/replica"])
    body = []
    for r in rows:
        tiers = {t["name"]: t for t in r["tiers"]}
        by = r["hit_rate_by_tier"]
        n = r["requests_by_replica"]
        body.append(
            [fmt_ttl(r["ttl_s"]), str(r["replicas"]), r["routing"]]
            + [cap(tiers[x]["capacity_tokens"]) for x in own]
            + [cap(tiers["shared"]["capacity_tokens"]) if r["shared_tier"] else "none",
               f"{r['hit_rate']:.3f}"] + [f"{by[x]:.3f}" for x in own]
            + ([f"{by['shared']:.3f}" if r["shared_tier"] else "-"] if shared else [])
            + [f"{r['prefills_per_block']:.2f}", f"{min(n)}-{max(n)}"])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cs: "  ".join(c.rjust(w) if i else c.ljust(w)      # noqa: E731
                               for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def sizing_text(sz: Sizing, kv_bytes: int | None, names: dict[float, str]) -> str:
    out = [f"Sizing at TTL {fmt_ttl(sz.ttl_s)}: unbounded-capacity hit rate "
           f"{sz.unbounded_hit_rate:.3f}, peak working set {fmt_tokens(sz.peak_working_set_tokens)}"
           f" tokens" + (f" ({fmt_bytes(sz.peak_working_set_tokens * kv_bytes)})" if kv_bytes
                         else "")]
    for f in sorted(sz.capacity_tokens):
        c = sz.capacity_tokens[f]
        who = names.get(f, "a tier")
        out.append(f"  {who}: >= {fmt_tokens(c)} tokens"
                   + (f" = {fmt_bytes(c * kv_bytes)}" if kv_bytes else "")
                   + f" reaches {f:.0%} of it (hit rate {sz.hit_rate[f]:.3f})")
    if sz.check is not None:
        by = sz.check.hit_rate_by_tier
        out.append("  check, DRAM + NVMe at those sizes: hit rate "
                   f"{sz.check.hit_rate:.3f} = "
                   + " + ".join(f"{v:.3f} {k}" for k, v in by.items()))
    return "\n".join(out)


# --------------------------------------------------------------------------- plots
