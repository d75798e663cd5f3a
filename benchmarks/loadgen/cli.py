"""Command line of the load generator (``python -m benchmarks.loadgen --help``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from ..stamp import stamp
from .runner import ARRIVALS, TIMINGS, LoadConfig, run_load
from .slo import SLO
from .synthetic import SwarmConfig, TraceStats, swarm_sessions
from .workload import Scale, Workload, load_traces


def make_workload(scale: Scale, trace_dir: str | None = None, synthetic: bool = False,
                  sampling: str = "sequential", seed: int = 0, max_traces: int = 0,
                  swarm_sessions_n: int = 16, swarm: SwarmConfig = SwarmConfig(),
                  max_turns: int = 0) -> Workload:
    """Trace replay (``trace_dir``) or the synthetic swarm (``synthetic``; its
    statistics come from ``trace_dir`` when given, else built-in ones)."""
    if synthetic:
        stats = TraceStats.from_dir(trace_dir) if trace_dir else TraceStats.builtin()
        sessions = swarm_sessions(swarm_sessions_n, stats, swarm, seed)
    elif trace_dir:
        sessions = load_traces(trace_dir, max_traces)
    else:
        raise ValueError("give --trace-dir and/or --synthetic")
    return Workload(sessions, scale, sampling, seed, max_turns)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    a = p.add_argument
    a("--url", default="http://127.0.0.1:8000", help="OpenAI-compatible vLLM server")
    a("--model", help="model name (default: the server's first)")
    a("--out", help="write the full result JSON here")
    g = p.add_argument_group("workload")
    g.add_argument("--trace-dir", help="kv-cache-tester traces (*.json)")
    g.add_argument("--max-traces", type=int, default=0, help="use the first N traces (0: all)")
    g.add_argument("--synthetic", action="store_true",
                   help="agent swarm instead of replay (stats from --trace-dir if given)")
    g.add_argument("--swarm-sessions", type=int, default=16, help="swarm sessions in the pool")
    g.add_argument("--high-watermark", type=int, default=SwarmConfig.high_watermark,
                   help="swarm context (trace tokens) that triggers a summary")
    g.add_argument("--sampling", choices=("sequential", "random"), default="sequential",
                   help="how users pick the next session of the working set")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-turns", type=int, default=0,
                   help="keep the first N turns of every agent of a session (0: all)")
    s = p.add_argument_group("scaling")
    s.add_argument("--tokens-per-hash", type=int, default=64,
                   help="tokens sent per 64-token trace block (e.g. 8 on small machines)")
    s.add_argument("--vocab-size", type=int, default=256, help="token ids in [0, N)")
    s.add_argument("--output-scale", type=float, default=1.0, help="max_tokens = out * this")
    s.add_argument("--max-output-tokens", type=int, default=0, help="cap on max_tokens (0: none)")
    s.add_argument("--time-scale", type=float, default=1.0, help="multiplies trace times")
    s.add_argument("--max-think", type=float, default=0.0,
                   help="cap on a scaled think time, s (0: none)")
    s.add_argument("--max-context", type=int, default=0,
                   help="skip requests whose prompt is longer (tokens, 0: keep all)")
    s.add_argument("--timing", choices=TIMINGS, default="think",
                   help="think: think time after the previous answer; original: trace `t`")
    m = p.add_argument_group("load")
    m.add_argument("--sessions", type=int, default=0,
                   help="fixed request set: serve the first N sessions to the end and report "
                        "the makespan (0: timed run of --duration)")
    m.add_argument("--arrival", choices=ARRIVALS, default="closed",
                   help="fixed set: closed (--users take the next session when done) or "
                        "poisson (sessions start at Poisson times of --rate per s)")
    m.add_argument("--rate", type=float, default=0.0, help="poisson: sessions started per s")
    m.add_argument("--arrival-seed", type=int, default=0)
    m.add_argument("--order", choices=("longest-first", "in-order"), default="longest-first",
                   help="fixed set: dispatch order of its sessions")
    m.add_argument("--time-limit", type=float, default=0.0,
                   help="fixed set: give up after this many s (0: none)")
    m.add_argument("--duration", type=float, default=300.0, help="s")
    m.add_argument("--users", type=int, default=4, help="concurrent users (start of a ramp)")
    m.add_argument("--ramp-step", type=int, default=0, help="users added per interval (0: fixed)")
    m.add_argument("--ramp-interval", type=float, default=30.0, help="s")
    m.add_argument("--max-users", type=int, default=64)
    m.add_argument("--slo-ttft-max", type=float, help="s")
    m.add_argument("--slo-ttft-avg", type=float, help="s")
    m.add_argument("--slo-ttft-p95", type=float, help="s")
    m.add_argument("--slo-tokens-per-s", type=float, help="min output tokens/s per request")
    m.add_argument("--block-size", type=int, default=32, help="server KV block size")
    m.add_argument("--progress-interval", type=float, default=5.0, help="s between stderr lines")
    return p


def scale_from_args(a) -> Scale:
    return Scale(a.tokens_per_hash, a.vocab_size, a.output_scale, a.max_output_tokens,
                 a.time_scale, a.max_think, a.max_context)


def config_from_args(a) -> LoadConfig:
    slo = SLO(a.slo_ttft_max, a.slo_ttft_avg, a.slo_ttft_p95, a.slo_tokens_per_s)
    return LoadConfig(a.duration, a.users, a.ramp_step, a.ramp_interval, a.max_users, slo,
                      a.timing, a.block_size, a.progress_interval, sessions=a.sessions,
                      arrival=a.arrival, rate=a.rate, arrival_seed=a.arrival_seed,
                      order=a.order, time_limit=a.time_limit)


def headline(doc: dict) -> dict:
    s = doc["summary"]
    out = {k: s[k] for k in ("output_tok_s", "hit_rate", "goodput_rps", "requests_ok",
                             "requests_failed", "max_users_within_slo", "cached_by_source",
                             "preemptions")} | {"ttft_p95": s["ttft"].get("p95")}
    if s["mode"] == "fixed":
        out |= {"makespan_s": s["makespan_s"], "complete": s["complete"],
                "request_set": s["request_set"]}
    if "stamp" in doc:
        out["stamp"] = doc["stamp"]
    return out


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    workload = make_workload(scale_from_args(a), a.trace_dir, a.synthetic, a.sampling, a.seed,
                             a.max_traces, a.swarm_sessions,
                             SwarmConfig(high_watermark=a.high_watermark), a.max_turns)
    print(f"[loadgen] workload {workload.describe()}", file=sys.stderr)
    st = stamp()   # when the run starts
    doc = asyncio.run(run_load(a.url, workload, config_from_args(a), a.model))
    doc["args"] = vars(a)
    doc["stamp"] = st
    doc["workload"] = workload.describe()
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps(headline(doc)))
    return 0
