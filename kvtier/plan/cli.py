"""``kvtier plan``: the command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence


from kvtier.cache.admission import POLICIES
from kvtier.cliargs import ArgumentParser, integer, number
from kvtier.plan.fleet import (ROUTINGS, FleetResult, fleet_configs, fleet_label, fleet_row,
                               replay_fleets)
from kvtier.plan.plots import plot_sizing, plot_sweep, plot_timeline
from kvtier.plan.replay import ReplayResult, TierSpec, _label, replay, replay_many, tier_configs
from kvtier.plan.report import fleet_table, sizing_text, table
from kvtier.plan.sizing import kv_bytes_per_token, row, size_for, size_rows
from kvtier.plan.traces import FORMATS, TIER_NAMES, PlanError, load
from kvtier.plan.units import _list, fmt_bytes, parse_capacity, parse_ttl

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="kvtier plan",
        description="Replay request traces through kvtier's cache policy (index.Tier: LRU "
                    "within a TTL, under a capacity) and report hit rates, prefills per "
                    "block and working sets for TTL / capacity choices. See "
                    "docs/planning.md.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="trace files or directories")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="trace format (default: detected from the first file)")
    p.add_argument("--block-tokens", type=integer(1), default=None,
                   help="tokens per cached block (default: the trace's: 64 kv-cache-tester, "
                        "512 Mooncake, 64 jsonl); a multiple of the trace's block")
    p.add_argument("--hash-block-tokens", type=integer(1), default=None,
                   help="jsonl: tokens per block behind 'hash_ids' (default --block-tokens)")
    p.add_argument("--stagger", type=number(0, above=False), default=0.0, metavar="SECONDS",
                   help="start the i-th trace file i x SECONDS later (default 0: every "
                        "kv-cache-tester conversation starts at time 0)")
    p.add_argument("--ttl", default="60,300,3600,inf",
                   help="TTLs to sweep, comma list of seconds (or 5m, 1h, inf) "
                        "[%(default)s]")
    p.add_argument("--capacity-tokens", default=None,
                   help="one tier's capacities, comma list of tokens or inf [inf]")
    p.add_argument("--capacity-bytes", default=None,
                   help="one tier's capacities as byte sizes (64GiB, 1TiB, inf); needs "
                        "--kv-bytes-per-token or --model-config")
    for n, what in (("hbm", "GPU prefix cache (vLLM's; TTL --hbm-ttl)"),
                    ("dram", "kvtier's DRAM tier"), ("nvme", "kvtier's disk tier")):
        p.add_argument(f"--{n}", default=None,
                       help=f"hierarchy mode: {what} capacity, comma list; plain numbers "
                            "are tokens, sizes with a unit (64GiB) bytes")
    p.add_argument("--disk-admission", default=None, metavar="POLICIES",
                   help="hierarchy mode: which blocks the last tier (the disk) is written, "
                        f"comma list of {', '.join(POLICIES)} (kvtier's disk_admission); "
                        "default: every tier holds every block")
    p.add_argument("--hbm-ttl", default="inf", help="TTL of the HBM tier [inf]")
    p.add_argument("--replicas", default=None, metavar="N",
                   help="fleet mode: replay over N replicas, each with the tiers above "
                        "(comma list, e.g. 4,16); see docs/planning.md, 'Fleet'")
    p.add_argument("--routing", default=None, metavar="POLICIES",
                   help="fleet mode: how requests pick a replica, comma list of "
                        f"{', '.join(ROUTINGS)} [session]")
    p.add_argument("--shared-tier", default=None, metavar="CAPACITY",
                   help="fleet mode: also replay with a cluster-wide tier of this capacity "
                        "behind every replica's tiers (comma list; tokens, a byte size or "
                        "inf; its TTL is --ttl's); rows without it are always included")
    p.add_argument("--seed", type=integer(0), default=None,
                   help="fleet mode: the random router's seed [0]")
    p.add_argument("--kv-bytes-per-token", type=integer(1), default=None,
                   help="KV-cache bytes per token (e.g. 131072 for Llama-3-8B in bf16)")
    p.add_argument("--model-config", default=None,
                   help="a model's config.json: KV bytes per token = 2 x layers x KV heads x "
                        "head dim x dtype bytes")
    p.add_argument("--kv-dtype", default=None, help="KV-cache dtype override (fp8, bfloat16)")
    p.add_argument("--size-ttl", default=None,
                   help="also size the tiers at this TTL: smallest capacity reaching "
                        "--target (NVMe) and --dram-target (DRAM) of the unbounded hit rate")
    p.add_argument("--target", type=number(0, maximum=1), default=0.95,
                   help="fraction of the unbounded-capacity hit rate the whole cache "
                        "(the NVMe tier) must reach [%(default)s]")
    p.add_argument("--dram-target", type=number(0, maximum=1), default=None,
                   help="fraction the DRAM tier alone must reach (e.g. 0.8); omit for a "
                        "single answer")
    p.add_argument("--json", action="store_true",
                   help="print the rows as a JSON list on stdout instead of the table")
    p.add_argument("--plot", metavar="DIR", default=None, help="write PNG plots to DIR")
    p.add_argument("--sample-interval", type=number(0), default=None,
                   help="timeline sample interval in trace seconds [span/400]")
    p.add_argument("--jobs", type=integer(1), default=None,
                   help="parallel replays [number of CPUs]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``kvtier plan``; returns the exit status (argparse's own: 0 for --help, 2 for bad
    usage; 2 for unreadable traces or inconsistent options)."""
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    say = (lambda *a: None) if args.quiet else (   # noqa: E731
        lambda *a: print("[kvtier plan]", *a, file=sys.stderr, flush=True))
    try:
        return _main(args, say)
    except PlanError as e:
        print(f"kvtier plan: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, say: Callable[..., None]) -> int:
    kv = args.kv_bytes_per_token
    if args.model_config:
        try:
            cfg = json.loads(Path(args.model_config).read_text())
        except (OSError, ValueError) as e:
            raise PlanError(f"{args.model_config}: {e}") from None
        kv = kv_bytes_per_token(cfg, args.kv_dtype)
        say(f"KV cache: {kv} bytes/token ({fmt_bytes(kv)}) from {args.model_config}")
    def arg(name: str, parse: Callable[[], object]) -> object:
        """``parse()``, its PlanError naming the argument it read."""
        try:
            return parse()
        except PlanError as e:
            raise PlanError(f"argument {name}: {e}") from None

    ttls = arg("--ttl", lambda: _list(args.ttl, parse_ttl))
    caps = None
    if args.capacity_tokens and args.capacity_bytes:
        raise PlanError("give --capacity-tokens or --capacity-bytes, not both")
    if args.capacity_tokens:
        caps = arg("--capacity-tokens", lambda: _list(
            args.capacity_tokens, lambda x: parse_capacity(x, kv, "tokens")))
    elif args.capacity_bytes:
        caps = arg("--capacity-bytes", lambda: _list(
            args.capacity_bytes, lambda x: parse_capacity(x, kv, "bytes")))
    hier = {n: arg(f"--{n}", lambda n=n: _list(getattr(args, n),
                                                lambda x: parse_capacity(x, kv, "tokens")))
            for n in TIER_NAMES if getattr(args, n)}
    hbm_ttl = arg("--hbm-ttl", lambda: parse_ttl(args.hbm_ttl))
    size_ttl = arg("--size-ttl", lambda: parse_ttl(args.size_ttl)) if args.size_ttl else None
    admissions = arg("--disk-admission", lambda: _list(args.disk_admission, _policy)) \
        if args.disk_admission else ()
    configs = tier_configs(ttls, caps, hbm_ttl=hbm_ttl, admissions=admissions, **hier)
    jobs = args.jobs or os.cpu_count() or 1
    runs = _fleet_runs(args, configs, kv, arg)

    t0 = time.perf_counter()
    trace = load(args.paths, args.format, args.block_tokens, args.hash_block_tokens,
                 args.stagger)
    s = trace.summary()
    say(f"loaded {s['requests']} requests, {s['input_tokens']:,} prompt tokens, "
        f"{s['blocks']:,} blocks ({s['distinct_blocks']:,} distinct) of {trace.block_tokens} "
        f"tokens from {s['sources']} file(s), span {s['span_s'] / 3600:.1f} h "
        f"in {time.perf_counter() - t0:.1f} s")
    if not len(trace):
        raise PlanError("the trace has no requests")
    if runs is not None:
        return _fleet(args, trace, runs, kv, jobs, say)
    sample = args.sample_interval or max(trace.span_s / 400, 1.0)

    n_replays = [0]

    def done(i: int, r: ReplayResult) -> None:
        n_replays[0] += 1
        say(f"{_label(r.tiers)}: hit rate {r.hit_rate:.3f}, prefills/block "
            f"{r.prefills_per_block:.2f} ({r.replay_s:.1f} s, {r.cpu_s:.1f} s CPU)")

    t1 = time.perf_counter()
    results = replay_many(trace, configs, jobs=jobs, sample_interval_s=sample,
                          progress=not args.quiet and trace.num_blocks > 2_000_000,
                          on_result=done)
    say(f"{len(configs)} replay(s) in {time.perf_counter() - t1:.1f} s")
    rows = [row(r, kv) for r in results]

    sz = None
    names: dict[float, str] = {}
    if args.size_ttl:
        targets = [args.target] + ([args.dram_target] if args.dram_target else [])
        names = {args.target: "NVMe (whole cache)" if args.dram_target else "capacity"}
        if args.dram_target:
            names[args.dram_target] = "DRAM"
        st = size_ttl
        t2 = time.perf_counter()
        base = next((r for r in results if len(r.tiers) == 1 and r.tiers[0].ttl_s == st
                     and math.isinf(r.tiers[0].capacity_tokens)), None)
        sz = size_for(trace, st, targets, jobs=jobs, unbounded=base, on_result=done)
        if args.dram_target:
            d, n = sz.capacity_tokens[args.dram_target], sz.capacity_tokens[args.target]
            sz.check = replay(trace, [TierSpec("dram", d, st), TierSpec("nvme", max(n, d), st)])
        say(f"sizing: {n_replays[0] - len(configs) + bool(args.dram_target)} replays in "
            f"{time.perf_counter() - t2:.1f} s")
        rows += size_rows(sz, kv, {f: ("dram" if f == args.dram_target and args.dram_target
                                       else "nvme" if args.dram_target else "cache")
                                   for f in targets})

    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows, kv))
        if sz is not None:
            print()
            print(sizing_text(sz, kv, names))
    if args.plot:
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        # timeline: per TTL, the run with the largest (last-tier) capacity
        best: dict[float, ReplayResult] = {}
        for r in results:
            k = r.tiers[-1].ttl_s
            if k not in best or r.tiers[-1].capacity_tokens >= best[k].tiers[-1].capacity_tokens:
                best[k] = r
        plot_timeline([best[k] for k in sorted(best)], out / "timeline.png", kv)
        written = ["timeline.png"]
        if plot_sweep(rows, out / "sweep.png"):
            written.append("sweep.png")
        if sz is not None:
            plot_sizing(sz, out / "sizing.png", kv, names)
            written.append("sizing.png")
        say("plots: " + ", ".join(str(out / w) for w in written))
    return 0


def _fleet_runs(args: argparse.Namespace, configs: list, kv: int | None,
                arg: Callable[[str, Callable[[], object]], object]) -> list | None:
    """The fleet replays the options ask for (None: not fleet mode), or PlanError
    naming the argument that cannot be used."""
    fleet_only = {"--routing": args.routing, "--shared-tier": args.shared_tier,
                  "--seed": args.seed}
    if not args.replicas:
        for name, v in fleet_only.items():
            if v is not None:
                raise PlanError(f"argument {name}: needs --replicas (fleet mode)")
        return None
    for name, v in {"--disk-admission": args.disk_admission, "--size-ttl": args.size_ttl,
                    "--plot": args.plot}.items():
        if v:
            raise PlanError(f"argument {name}: not available with --replicas (fleet mode)")
    replicas = arg("--replicas", lambda: _list(args.replicas, _replicas))
    routings = arg("--routing", lambda: _list(args.routing or "session", _routing))
    shared = arg("--shared-tier", lambda: _list(
        args.shared_tier, lambda x: parse_capacity(x, kv, "tokens"))) if args.shared_tier \
        else []
    return fleet_configs(configs, replicas, routings, shared, args.seed or 0)


def _fleet(args: argparse.Namespace, trace, runs: list, kv: int | None, jobs: int,
           say: Callable[..., None]) -> int:
    def done(i: int, r: FleetResult) -> None:
        say(f"{fleet_label(r.tiers[:len(runs[i][0])], r.fleet)}: hit rate {r.hit_rate:.3f}, "
            f"prefills/block {r.prefills_per_block:.2f} ({r.replay_s:.1f} s, "
            f"{r.cpu_s:.1f} s CPU)")

    t1 = time.perf_counter()
    results = replay_fleets(trace, runs, jobs=jobs,
                            progress=not args.quiet and trace.num_blocks > 2_000_000,
                            on_result=done)
    say(f"{len(runs)} fleet replay(s) in {time.perf_counter() - t1:.1f} s")
    rows = [fleet_row(r, kv) for r in results]
    print(json.dumps(rows, indent=1) if args.json else fleet_table(rows, kv))
    return 0




def _replicas(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise PlanError(f"expected an integer >= 1, got {text.strip()!r}")
    return n


def _routing(text: str) -> str:
    text = text.strip()
    if text not in ROUTINGS:
        raise PlanError(f"{text!r} is not a routing ({', '.join(ROUTINGS)})")
    return text


def _policy(text: str) -> str:
    text = text.strip()
    if text not in POLICIES:
        raise PlanError(f"{text!r} is not a disk admission policy ({', '.join(POLICIES)})")
    return text


if __name__ == "__main__":
    sys.exit(main())
