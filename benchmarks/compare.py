"""Side-by-side comparison of prefix-cache configurations under agentic load.

One command: for each configuration of :data:`CONFIGS` it starts a vLLM OpenAI
server as a subprocess (small Llama, dummy weights, CPU or GPU), waits for
``/health``, serves it the load generator's request set (replay of the
weka-cc-dev Claude Code traces, scaled down; the synthetic swarm when the
traces are absent), reads ``/metrics`` before and after, stops the server, and
moves on. A configuration that fails (server does not start, dies, or serves
only errors) is recorded as failed with its server log tail; the run goes on.

**Same requests for every configuration.** By default a run is a *fixed
request set*: the first ``sessions`` sessions of the replay (each agent's first
``max_turns`` turns), dispatched longest first, served to the end. Closed loop
(default): ``users`` users each take the next session when they finish one,
with the traces' think times (scaled) between turns. Open loop (``--set
arrival=poisson --set rate=R``): session ``i`` starts at the ``i``-th arrival of a
seeded Poisson process of ``R`` sessions/s, however many are running; turns
inside a session still wait for the previous turn's answer (their prompt
extends it). Throughput is output tokens over the *makespan* (first request
sent to last answer); every configuration's request-set digest is checked to
be the same. ``--duration S`` instead runs the older timed mode (users replay
for ``S`` seconds, so faster configurations serve more requests).

**What else ran.** Configurations run one after the other; on a shared machine
other work can slow one and not the next. Each configuration's record says how
much of the machine other processes took during its load
(``others_cpu_share``, :mod:`benchmarks.busy`), the CPU seconds its server
used, and vLLM's mean queue and prefill time per request.

**Batching configuration.** The "GPU" KV cache of the small-cache rows holds
``gpu_cache_contexts`` (default 4) maximal contexts, so every configuration can
batch; the working set of the request set (distinct prompt blocks) is reported
beside it (``working_set_x_gpu_cache``, >= 10 by default).

Configurations, in order:
  1. baseline      vLLM prefix caching, the small KV cache
  2. kvtier-dram   kvtier connector, DRAM tier only (holds the working set)
  3. kvtier-nvme   kvtier connector, small DRAM tier + NVMe store (DRAM + disk)
  4. ideal         vLLM prefix caching, KV cache holding the whole working set
  5. example-disk  vLLM's reference disk connector (ExampleConnector); not in the
                   default set: it failed on vLLM's CPU build (docs/benchmarks.md)
  6. vllm-offload  vLLM's native CPU offloading (--kv-offloading-size), GPU only
  7. lmcache       LMCache CPU offloading, GPU only, when installed

Outputs in ``--out`` (default ``results/compare``): ``compare.json`` (stamp: date,
commit, machine; profile, request set, per-config summary, timeline, TTFTs,
completions, re-prefill histogram), ``compare.csv`` (one row per config),
``runs/<config>.json`` (full load-generator documents with every request),
``logs/<config>.log`` (server logs) and plots: ``throughput.png`` (output tokens
served over time, output tokens/s), ``ttft_cdf.png``, ``hit_rate.png`` (prefix hit
rate over time) and ``reprefill.png`` (how many times each KV block was
prefilled again). The last line printed is one JSON object of the headline.

Usage:
    python -m benchmarks.compare --out-docs docs/img  # closed loop, ~12 min on 2 cores
    python -m benchmarks.compare --set arrival=poisson --set rate=0.5
    python -m benchmarks.compare --smoke              # tiny scale, ~1 min per config
    python -m benchmarks.compare --configs baseline,ideal --out results/x
    python -m benchmarks.compare --plots-only results/compare --out-docs docs/img
                                  # plots again from a compare.json (file or its folder)

Server processes get ``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` (see ``SERVER_ENV``) so
that every configuration has the same CPU thread binding.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import stamp as stamp_mod
from benchmarks.busy import BusyMeter
from benchmarks.loadgen import (SLO, LoadConfig, Scale, describe_request_set, make_workload,
                                run_load)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = REPO.parent / "shared" / "traces" / "weka-cc-dev"
PYTHON = os.environ.get("KVTIER_BENCH_PYTHON", sys.executable)
MODEL_NAME = "kvtier-tiny"
# vLLM on CPU reserves one more core when a KV connector is configured; on a
# small machine that silently changes the worker's thread binding (2 OMP threads
# over all cores instead of 1 bound thread) for the connector configurations
# only. Pin the same reservation for every configuration (ignored on GPU).
SERVER_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU":
              os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")}


@dataclass
class Profile:
    """Everything that sets the scale of a comparison run."""

    # model (kvtier.tinymodel.TinyLlama fields): ~20M parameters, 3 KiB of KV per
    # token. Big enough that prefill dominates a step on a CPU (prefill ~6k tok/s,
    # batched decode ~500 tok/s on one core of the project's VM, the ratio of an
    # 8B model on a GPU), small enough for a run of ~12 minutes.
    model: dict = field(default_factory=lambda: dict(
        hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2, head_dim=64,
        intermediate_size=1024))
    block_size: int = 32
    # workload scaling
    tokens_per_hash: int = 2
    max_context: int = 2500
    output_scale: float = 0.1
    max_output_tokens: int = 16
    time_scale: float = 0.03               # think times x0.03 (capped at max_think): the
    max_think: float = 5.0                 # server, not the think times, sets the makespan
    timing: str = "think"
    sampling: str = "sequential"
    max_turns: int = 16                    # first N turns of every agent of a session
    # the fixed request set (sessions > 0) and how it arrives
    sessions: int = 64
    arrival: str = "closed"                # closed | poisson
    users: int = 32                        # closed loop: concurrent users
    rate: float = 0.5                      # poisson: sessions started per second
    arrival_seed: int = 0
    time_limit: float = 900.0              # s per configuration, then recorded incomplete
    # timed mode (sessions == 0, or --duration): users replay for `duration` s;
    # --set ramp_step=2 ramps users inside the SLO.
    duration: float = 200.0
    ramp_step: int = 0
    ramp_interval: float = 20.0
    max_users: int = 24
    slo_ttft_p95: float = 2.0
    slo_tokens_per_s: float | None = None
    # engine: a batch cap for every configuration (None: vLLM's default)
    max_num_seqs: int | None = None
    # caches
    gpu_cache_contexts: int = 4            # small cache: this many maximal contexts ...
    small_cache_slack_blocks: int = 4      # ... plus these blocks
    big_cache_blocks: int = 16384          # ideal: the whole working set
    dram_bytes: int = 1 << 30              # kvtier DRAM tier (holds the working set)
    nvme_dram_bytes: int = 32 << 20        # kvtier DRAM tier in front of the NVMe store
    disk_bytes: int = 4 << 30
    startup_timeout: float = 300.0

    @property
    def max_model_len(self) -> int:
        n = self.max_context + self.max_output_tokens
        return math.ceil(n / self.block_size) * self.block_size

    @property
    def context_blocks(self) -> int:
        return self.max_model_len // self.block_size

    @property
    def small_cache_blocks(self) -> int:
        return self.gpu_cache_contexts * self.context_blocks + self.small_cache_slack_blocks

    @property
    def fixed(self) -> bool:
        return self.sessions > 0


SMOKE = dict(
    model=dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=64,
               intermediate_size=256),
    max_context=1024, max_output_tokens=16, sessions=6, max_turns=6, users=2, rate=0.5,
    duration=30.0, ramp_step=1, ramp_interval=10.0, max_users=4, gpu_cache_contexts=1,
    big_cache_blocks=4096, dram_bytes=256 << 20, nvme_dram_bytes=4 << 20,
    disk_bytes=512 << 20, small_cache_slack_blocks=1, time_limit=600.0)


def _kvtier(extra):
    def make(p: Profile, work: Path) -> dict:
        return {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.connector",
                "kv_role": "kv_both", "kv_connector_extra_config": extra(p, work)}
    return make


def _example(p: Profile, work: Path) -> dict:
    return {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(work / "example-store")}}


# The comparison table: name, description, KV cache size ("small" | "big"), and
# the --kv-transfer-config (None: plain vLLM).
CONFIGS = [
    dict(name="baseline", cache="small", kv=None,
         description="vLLM prefix caching, small KV cache"),
    dict(name="kvtier-dram", cache="small",
         kv=_kvtier(lambda p, w: {"dram_bytes": p.dram_bytes, "disk": False}),
         description="kvtier, DRAM tier only"),
    dict(name="kvtier-nvme", cache="small",
         kv=_kvtier(lambda p, w: {"dram_bytes": p.nvme_dram_bytes,
                                  "disk_path": str(w / "kvtier-disk"),
                                  "disk_bytes": p.disk_bytes}),
         description="kvtier, small DRAM tier + NVMe store"),
    dict(name="ideal", cache="big", kv=None,
         description="vLLM prefix caching, KV cache for the whole working set"),
    dict(name="example-disk", cache="small", kv=_example, default=False,
         description="vLLM ExampleConnector (reference disk connector)"),
    # GPU machines only (vLLM's CPU build runs neither):
    dict(name="vllm-offload", cache="small", kv=None, needs="cuda",
         args=lambda p: ["--kv-offloading-size", f"{p.dram_bytes / 2**30:g}",
                         "--kv-offloading-backend", "native"],
         description="vLLM native CPU offloading, the same DRAM budget"),
    dict(name="lmcache", cache="small", kv=None, needs="lmcache",
         args=lambda p: ["--kv-offloading-size", f"{p.dram_bytes / 2**30:g}",
                         "--kv-offloading-backend", "lmcache"],
         description="LMCache CPU offloading, the same DRAM budget"),
]


def unavailable(cfg: dict) -> str | None:
    """Why a configuration cannot run on this machine (None: it can)."""
    import importlib.util
    need = cfg.get("needs")
    if need == "cuda":
        import torch
        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    if need == "lmcache":
        if importlib.util.find_spec("lmcache") is None:
            return "lmcache is not installed"
        import torch
        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    return None


# --------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(p: Profile, cfg: dict, model_dir: Path, port: int, work: Path,
               real_weights: bool = False) -> list[str]:
    blocks = p.big_cache_blocks if cfg["cache"] == "big" else p.small_cache_blocks
    cmd = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", MODEL_NAME, "--port", str(port), "--host", "127.0.0.1",
           *([] if real_weights else ["--load-format", "dummy"]),
           "--block-size", str(p.block_size),
           "--max-model-len", str(p.max_model_len), "--gpu-memory-utilization", "0.3",
           "--enforce-eager", "--num-gpu-blocks-override", str(blocks),
           "--enable-prompt-tokens-details"]
    if p.max_num_seqs:
        cmd += ["--max-num-seqs", str(p.max_num_seqs)]
    if cfg["kv"] is not None:
        cmd += ["--kv-transfer-config", json.dumps(cfg["kv"](p, work))]
    if "args" in cfg:
        cmd += cfg["args"](p)
    return cmd


class Server:
    def __init__(self, cmd: list[str], log_path: Path):
        self.cmd, self.log_path = cmd, log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.update(SERVER_ENV)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(REPO), start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_healthy(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"server exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"server not healthy after {timeout:.0f} s")

    def stop(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:  # the engine-core and worker children share the process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()

    def tail(self, n: int = 30) -> str:
        """The first traceback's last lines (the cause), then the log's last ``n`` lines."""
        if not self.log.closed:
            self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        first = next((i for i, ln in enumerate(lines) if "Traceback" in ln), None)
        cause = []
        if first is not None:
            end = next((i for i in range(first + 1, len(lines))
                        if re.search(r"\b\w*(Error|Exception)\b: ", lines[i])), None)
            if end is not None:
                cause = lines[max(first, end - 12):end + 1] + ["..."]
        return "\n".join(cause + lines[-n:])


# --------------------------------------------------------------------------- running

def run_config(cfg: dict, p: Profile, args, model_dir: Path, out: Path) -> dict:
    work = out / "work" / cfg["name"]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_cmd(p, cfg, model_dir, port, work, real_weights=bool(args.model))
    rec = {"name": cfg["name"], "description": cfg["description"], "status": "failed",
           "cache_blocks": p.big_cache_blocks if cfg["cache"] == "big" else p.small_cache_blocks,
           "server_cmd": cmd, "log": str(out / "logs" / f"{cfg['name']}.log")}
    log(f"[compare] {cfg['name']}: starting server on port {port}")
    t0 = time.monotonic()
    server = Server(cmd, out / "logs" / f"{cfg['name']}.log")
    try:
        server.wait_healthy(url, p.startup_timeout)
        rec["startup_s"] = time.monotonic() - t0
        what = (f"{p.sessions} sessions, {p.arrival} loop" if p.fixed
                else f"{p.duration:.0f} s")
        log(f"[compare] {cfg['name']}: healthy after {rec['startup_s']:.0f} s; load: {what}")
        wl = workload(p, args)
        meter = BusyMeter([server.proc.pid])
        meter.start()
        doc = asyncio.run(run_load(url, wl, load_config(p), MODEL_NAME))
        rec["machine_during_load"] = meter.stop()
        (out / "runs" / f"{cfg['name']}.json").write_text(json.dumps(doc, indent=1))
        s = doc["summary"]
        ok_reqs = [r for r in doc["requests"] if r["ok"]]
        rec.update(summary=s, timeline=doc["timeline"], ramp=doc["ramp"],
                   reprefill_histogram=doc["reprefill_histogram"],
                   ttfts=sorted(r["ttft"] for r in ok_reqs),
                   completions=sorted([round(r["end"], 3), r["output_tokens"]]
                                      for r in ok_reqs))
        if not server.alive():
            rec["error"] = f"server died during the run (code {server.proc.returncode})"
        elif s["requests_ok"] == 0:
            rec["error"] = f"no successful request; errors: {s['errors']}"
        elif s["mode"] == "fixed" and not s["complete"]:
            rec["error"] = (f"request set not completed: {s['requests_ok']} ok, "
                            f"{s['requests_failed']} failed of {s['requests_expected']}; "
                            f"errors: {s['errors']}")
        else:
            rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a failing configuration must not stop the run
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if rec["status"] != "ok":
        rec["log_tail"] = server.tail()
        cause = next((ln for ln in rec["log_tail"].splitlines()
                      if re.search(r"\b\w*(Error|Exception)\b: ", ln)), None)
        if cause:
            rec["error"] += "; server log: " + cause.split("] ")[-1].strip()[:300]
        log(f"[compare] {cfg['name']}: FAILED: {rec['error']}")
    else:
        s = rec["summary"]
        extra = (f"makespan {s['makespan_s']:.0f} s, " if s["mode"] == "fixed" else "")
        log(f"[compare] {cfg['name']}: {extra}{s['output_tok_s']:.1f} out tok/s, hit rate "
            f"{_fmt(s['hit_rate'])}, ttft p50/p95/p99 {_fmt(s['ttft'].get('p50'))}/"
            f"{_fmt(s['ttft'].get('p95'))}/{_fmt(s['ttft'].get('p99'))} s, preemptions "
            f"{_fmt(s.get('preemptions'), '.0f')}, re-prefilled blocks {s['reprefilled_blocks']}")
        srv, busy = s.get("server") or {}, rec.get("machine_during_load") or {}
        log(f"[compare] {cfg['name']}: queue {_fmt(srv.get('queue_time_s_mean'))} s and prefill "
            f"{_fmt(srv.get('prefill_time_s_mean'))} s per request (mean); server CPU "
            f"{_fmt(busy.get('measured_cpu_s'), '.0f')} s; other work took "
            f"{_fmt(busy.get('others_cpu_share'), '.0%')} of the machine")
    return rec


def workload(p: Profile, args):
    scale = Scale(p.tokens_per_hash, 256, p.output_scale, p.max_output_tokens, p.time_scale,
                  p.max_think, p.max_context)
    traces = Path(args.trace_dir) if args.trace_dir else None
    have = traces is not None and traces.is_dir()
    return make_workload(scale, str(traces) if have else None, synthetic=args.synthetic or not have,
                         sampling=p.sampling, seed=args.seed, max_turns=p.max_turns)


def load_config(p: Profile) -> LoadConfig:
    return LoadConfig(duration=p.duration, users=p.users, ramp_step=p.ramp_step,
                      ramp_interval=p.ramp_interval, max_users=p.max_users,
                      slo=SLO(ttft_p95=p.slo_ttft_p95, min_tokens_per_s=p.slo_tokens_per_s),
                      timing=p.timing, block_size=p.block_size,
                      progress_interval=10.0 if p.fixed else max(5.0, p.ramp_interval / 2),
                      sessions=p.sessions, arrival=p.arrival, rate=p.rate,
                      arrival_seed=p.arrival_seed, time_limit=p.time_limit)


def request_set_info(p: Profile, wl) -> dict | None:
    """The fixed request set's size and working set against the GPU KV cache."""
    if not p.fixed:
        return None
    info = describe_request_set(wl.request_set(p.sessions), wl.scale, p.block_size)
    info.update(gpu_cache_blocks=p.small_cache_blocks, context_blocks=p.context_blocks,
                gpu_cache_contexts=p.small_cache_blocks // p.context_blocks,
                working_set_x_gpu_cache=round(info["working_set_blocks"] / p.small_cache_blocks,
                                              1))
    return info


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


# --------------------------------------------------------------------------- results

def _r(x, nd=3):
    return None if x is None else round(x, nd)


def headline(recs: list[dict], p: Profile, out: Path, rset: dict | None = None) -> dict:
    ok = {r["name"]: r["summary"] for r in recs if r["status"] == "ok"}
    ideal, base = ok.get("ideal"), ok.get("baseline")
    h = {"out": str(out), "small_cache_blocks": p.small_cache_blocks,
         "context_blocks": p.context_blocks,
         "gpu_cache_contexts": p.small_cache_blocks // p.context_blocks, "configs": {}}
    if rset:
        h["mode"] = f"fixed request set, {p.arrival} loop"
        h["request_set"] = {k: rset[k] for k in ("sessions", "requests", "prompt_tokens",
                                                 "output_tokens", "working_set_blocks",
                                                 "digest")}
        h["working_set_x_small_cache"] = rset["working_set_x_gpu_cache"]
        digests = {r["name"]: r["summary"]["request_set"]["digest"] for r in recs
                   if r.get("summary") and r["summary"].get("request_set")}
        h["same_request_set"] = bool(digests) and set(digests.values()) == {rset["digest"]}
    else:
        h["mode"] = f"timed, {p.duration:.0f} s"
        ws = [s["working_set_blocks"] for s in ok.values()]
        if ws:
            h["working_set_x_small_cache"] = round(max(ws) / p.small_cache_blocks, 1)
    for r in recs:
        if r["status"] != "ok":
            h["configs"][r["name"]] = {"status": "failed", "error": r.get("error", "")[:200]}
            continue
        s = r["summary"]
        t = s["ttft"]
        c = {"status": "ok", "output_tok_s": round(s["output_tok_s"], 2),
             "hit_rate": _r(s["hit_rate"]),
             "ttft_p50_s": _r(t.get("p50")), "ttft_p95_s": _r(t.get("p95")),
             "ttft_p99_s": _r(t.get("p99")),
             "preemptions": None if s.get("preemptions") is None else int(s["preemptions"]),
             "reprefilled_blocks": s["reprefilled_blocks"],
             "requests": s["requests_ok"],
             "goodput_rps": round(s["goodput_rps"], 3),
             "max_users_within_slo": s["max_users_within_slo"]}
        if s["mode"] == "fixed":
            c["makespan_s"] = round(s["makespan_s"], 1)
        srv = s.get("server") or {}
        c["queue_s_mean"] = _r(srv.get("queue_time_s_mean"))     # waiting for KV room etc.
        c["prefill_s_mean"] = _r(srv.get("prefill_time_s_mean"))
        busy = r.get("machine_during_load") or {}
        c["server_cpu_s"] = busy.get("measured_cpu_s")
        c["others_cpu_share"] = busy.get("others_cpu_share")     # the machine's other work
        src = {k: int(v) for k, v in (s.get("cached_by_source") or {}).items() if v}
        if src:
            c["cached_by_source"] = src
        if ideal and ideal["output_tok_s"]:
            c["tok_s_vs_ideal"] = round(s["output_tok_s"] / ideal["output_tok_s"], 3)
        if base and base["output_tok_s"]:
            c["tok_s_vs_baseline"] = round(s["output_tok_s"] / base["output_tok_s"], 3)
        h["configs"][r["name"]] = c
    return h


CSV_FIELDS = ["name", "status", "output_tok_s", "makespan_s", "hit_rate", "hit_rate_client",
              "goodput_rps", "requests_per_s", "max_users_within_slo", "users_final",
              "ttft_p50", "ttft_p95", "ttft_p99", "tpot_p50", "requests_ok", "requests_failed",
              "requests_expected", "preemptions", "cached_device", "cached_host",
              "cached_disk", "cached_external", "cache_blocks", "working_set_blocks",
              "reprefilled_blocks", "tok_s_vs_ideal", "tok_s_vs_baseline", "queue_s_mean",
              "prefill_s_mean", "server_cpu_s", "others_cpu_share", "error"]


def write_csv(path: Path, recs: list[dict], head: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for r in recs:
            row = {"name": r["name"], "status": r["status"], "cache_blocks": r["cache_blocks"],
                   "error": r.get("error", "")}
            s = r.get("summary")
            if s and r["status"] == "ok":
                src = s.get("cached_by_source") or {}
                hc = head["configs"][r["name"]]
                row.update(
                    output_tok_s=s["output_tok_s"], makespan_s=s.get("makespan_s"),
                    hit_rate=s["hit_rate"],
                    hit_rate_client=s["hit_rate_client"], goodput_rps=s["goodput_rps"],
                    requests_per_s=s["requests_per_s"],
                    max_users_within_slo=s["max_users_within_slo"], users_final=s["users_final"],
                    ttft_p50=s["ttft"].get("p50"), ttft_p95=s["ttft"].get("p95"),
                    ttft_p99=s["ttft"].get("p99"),
                    tpot_p50=s["tpot"].get("p50"), requests_ok=s["requests_ok"],
                    requests_failed=s["requests_failed"],
                    requests_expected=s.get("requests_expected"),
                    preemptions=s.get("preemptions"), cached_device=src.get("device"),
                    cached_host=src.get("host"), cached_disk=src.get("disk"),
                    cached_external=src.get("external_unspecified"),
                    working_set_blocks=s["working_set_blocks"],
                    reprefilled_blocks=s["reprefilled_blocks"],
                    tok_s_vs_ideal=hc.get("tok_s_vs_ideal"),
                    tok_s_vs_baseline=hc.get("tok_s_vs_baseline"),
                    queue_s_mean=hc.get("queue_s_mean"), prefill_s_mean=hc.get("prefill_s_mean"),
                    server_cpu_s=hc.get("server_cpu_s"),
                    others_cpu_share=hc.get("others_cpu_share"))
            w.writerow(row)


COLORS = {"baseline": "tab:red", "kvtier-dram": "tab:blue", "kvtier-nvme": "tab:green",
          "ideal": "black", "example-disk": "tab:orange", "vllm-offload": "tab:purple",
          "lmcache": "tab:brown"}
PLOTS = ("throughput.png", "ttft_cdf.png", "hit_rate.png", "reprefill.png")


def plot(doc: dict, out: Path, prefix: str = "") -> list[str]:
    """The four plots of a compare.json document, written to ``out`` as
    ``prefix + name`` (small PNGs: 90 dpi, no transparency)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = doc["configs"]
    ok = [r for r in recs if r["status"] == "ok"]
    head = doc.get("headline", {})
    st = doc.get("stamp")
    caption = (f"{head.get('mode', '')}; {stamp_mod.line(st)}" if st else head.get("mode", ""))
    files = []
    out.mkdir(parents=True, exist_ok=True)

    def color(r):
        return COLORS.get(r["name"])

    def finish(fig, axes, name, title):
        for a in axes:
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.text(0.01, 0.005, caption, fontsize=6, color="0.4")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(out / (prefix + name), dpi=90)
        plt.close(fig)
        files.append(prefix + name)

    # throughput: output tokens served over time (the same total for every
    # configuration of a fixed set: the makespan is where a line ends), and
    # output tokens/s over the run.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in ok:
        comp = r.get("completions") or []
        xs, ys, tot = [0.0], [0], 0
        for end, n in comp:
            tot += n
            xs.append(end)
            ys.append(tot)
        a1.step(xs, ys, where="post", label=r["name"], color=color(r))
    a1.set(xlabel="time since the first request (s)", ylabel="output tokens served",
           title="output tokens served over time")
    names = [r["name"] for r in ok]
    vals = [r["summary"]["output_tok_s"] for r in ok]
    bars = a2.bar(names, vals, color=[color(r) or "tab:gray" for r in ok])
    for b, r in zip(bars, ok):
        hc = head.get("configs", {}).get(r["name"], {})
        lab = f"{b.get_height():.1f}"
        if hc.get("tok_s_vs_ideal") is not None:
            lab += f"\n{hc['tok_s_vs_ideal']:.2f}x ideal"
        if hc.get("tok_s_vs_baseline") is not None and r["name"] != "baseline":
            lab += f"\n{hc['tok_s_vs_baseline']:.1f}x baseline"
        a2.annotate(lab, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=7)
    a2.set(ylabel="output tokens/s (over the makespan)", title="throughput")
    a2.set_ylim(top=max(vals, default=1) * 1.35)
    a2.tick_params(axis="x", labelsize=8)
    finish(fig, (a1,), "throughput.png", "Throughput, same request set")

    fig, a = plt.subplots(figsize=(7, 4))
    for r in ok:
        xs = r["ttfts"]
        if xs:
            t = r["summary"]["ttft"]
            a.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], color=color(r),
                   label=f"{r['name']} (p50 {t['p50']:.2f} s, p99 {t['p99']:.2f} s)")
    a.set(xscale="log", xlabel="TTFT (s)", ylabel="fraction of requests")
    finish(fig, (a,), "ttft_cdf.png", "TTFT CDF")

    fig, a = plt.subplots(figsize=(7, 4))
    for r in ok:
        tl = [b for b in r["timeline"] if b["hit_rate"] is not None]
        hr = r["summary"]["hit_rate"]
        a.plot([b["t"] for b in tl], [b["hit_rate"] for b in tl], marker=".", color=color(r),
               label=f"{r['name']} (run: {hr:.3f})" if hr is not None else r["name"])
    a.set(xlabel="time since the first request (s)",
          ylabel="prefix hit rate (prompt tokens)", ylim=(-0.02, 1.02))
    finish(fig, (a,), "hit_rate.png", "Prefix hit rate over time (10-s windows)")

    fig, a = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(ok))
    for i, r in enumerate(ok):
        hist = {int(k): v for k, v in r["reprefill_histogram"].items()}
        ks = sorted(hist)
        a.bar([k + (i - (len(ok) - 1) / 2) * width for k in ks], [hist[k] for k in ks],
              width=width, color=color(r),
              label=f"{r['name']} ({r['summary']['reprefilled_blocks']:,} re-prefills)")
    a.set(yscale="log", xlabel="times a KV block was prefilled again (0: computed once)",
          ylabel="blocks")
    finish(fig, (a,), "reprefill.png", "Re-prefill per KV block")
    return files


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "results" / "compare"))
    ap.add_argument("--smoke", action="store_true", help="tiny scale, a few minutes")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset, run in table order (default: "
                         + ",".join(c["name"] for c in CONFIGS if c.get("default", True))
                         + "; those this machine cannot run are skipped)")
    ap.add_argument("--trace-dir", default=str(DEFAULT_TRACES))
    ap.add_argument("--synthetic", action="store_true", help="swarm instead of trace replay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="a real model (path or name) with its weights instead of "
                    "the generated dummy-weight Llama, e.g. on a GPU machine")
    ap.add_argument("--duration", type=float,
                    help="timed mode: users replay for this many s per config (different "
                         "request sets) instead of the fixed request set")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a Profile field, e.g. --set users=16 --set "
                         "arrival='\"poisson\"' (strings may be given bare: arrival=poisson)")
    ap.add_argument("--plots-only", metavar="PATH",
                    help="no run: plots again from PATH (a compare.json or its folder)")
    ap.add_argument("--out-docs", metavar="DIR",
                    help="also write the plots to DIR as compare-<name>.png (docs/img)")
    return ap.parse_args(argv)


def make_profile(args) -> Profile:
    p = Profile(**(SMOKE if args.smoke else {}))
    for item in args.set:
        k, _, v = item.partition("=")
        if k not in {f.name for f in dataclasses.fields(Profile)}:
            raise SystemExit(f"unknown profile field {k!r}")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v          # a bare string: --set arrival=poisson
        p = dataclasses.replace(p, **{k: val})
    if args.duration:
        p = dataclasses.replace(p, duration=args.duration, sessions=0)
    if p.arrival not in ("closed", "poisson"):
        raise SystemExit(f"arrival must be closed or poisson, not {p.arrival!r}")
    if p.arrival == "poisson" and not (p.fixed and p.rate > 0):
        raise SystemExit("arrival=poisson needs a fixed request set (sessions > 0) and rate > 0")
    return p


def plots_only(path: str, out_docs: str | None) -> int:
    src = Path(path)
    src = src / "compare.json" if src.is_dir() else src
    doc = json.loads(src.read_text())
    files = plot(doc, Path(out_docs), "compare-") if out_docs else plot(doc, src.parent)
    print(json.dumps({"plots": files, "from": str(src)}), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plots_only:
        return plots_only(args.plots_only, args.out_docs)
    if args.configs is None:
        args.configs = ",".join(c["name"] for c in CONFIGS if c.get("default", True))
    p = make_profile(args)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = set(names) - {c["name"] for c in CONFIGS}
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; known: "
                         f"{[c['name'] for c in CONFIGS]}")
    out = Path(args.out).resolve()
    for d in ("runs", "logs"):
        (out / d).mkdir(parents=True, exist_ok=True)

    st = stamp_mod.stamp()
    from kvtier.tinymodel import TinyLlama, write_model
    model_dir = args.model or write_model(out / "model", TinyLlama(
        **p.model, max_position_embeddings=p.max_model_len))
    wl = workload(p, args)
    rset = request_set_info(p, wl)
    log(f"[compare] {stamp_mod.line(st)}")
    log(f"[compare] profile: {dataclasses.asdict(p)}")
    log(f"[compare] workload: {wl.describe()}; small cache {p.small_cache_blocks} blocks of "
        f"{p.block_size} ({p.small_cache_blocks // p.context_blocks} contexts of "
        f"{p.context_blocks} blocks), big {p.big_cache_blocks}")
    if rset:
        log(f"[compare] request set: {rset['sessions']} sessions, {rset['requests']} requests, "
            f"{rset['prompt_tokens']} prompt tokens, {rset['output_tokens']} output tokens, "
            f"working set {rset['working_set_blocks']} blocks = "
            f"{rset['working_set_x_gpu_cache']}x the small cache; digest {rset['digest']}")

    t0 = time.monotonic()
    recs = []
    for c in CONFIGS:
        if c["name"] not in names:
            continue
        why = unavailable(c)
        if why:
            log(f"[compare] {c['name']}: skipped ({why})")
            continue
        recs.append(run_config(c, p, args, model_dir, out))
    head = headline(recs, p, out, rset)
    head["wall_s"] = round(time.monotonic() - t0, 1)
    head["stamp"] = st
    doc = {"stamp": st, "profile": dataclasses.asdict(p), "server_env": SERVER_ENV,
           "workload": wl.describe(), "request_set": rset, "trace_dir": args.trace_dir,
           "configs": recs, "headline": head}
    (out / "compare.json").write_text(json.dumps(doc, indent=1))
    write_csv(out / "compare.csv", recs, head)
    head["plots"] = plot(doc, out)
    if args.out_docs:
        plot(doc, Path(args.out_docs), "compare-")
    print(json.dumps(head), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
