"""Side-by-side comparison of prefix-cache configurations under agentic load.

One command: for each configuration of :data:`CONFIGS` it starts a vLLM OpenAI
server as a subprocess (tiny Llama, dummy weights, CPU or GPU), waits for
``/health``, runs the load generator (replay of the weka-cc-dev Claude Code
traces, scaled down; the synthetic swarm when the traces are absent), reads
``/metrics`` before and after, stops the server, and moves on. A configuration
that fails (server does not start, dies, or serves only errors) is recorded as
failed with its server log tail; the run goes on.

Configurations, in order:
  1. baseline      vLLM prefix caching, deliberately small KV cache
  2. kvtier-dram   kvtier connector, DRAM tier only
  3. kvtier-nvme   kvtier connector, small DRAM tier + NVMe store
  4. ideal         vLLM prefix caching, KV cache holding the whole working set
  5. example-disk  vLLM's reference disk connector (ExampleConnector)
  6. vllm-offload  vLLM's native CPU offloading (--kv-offloading-size), GPU only
  7. lmcache       LMCache CPU offloading, GPU only, when installed

Outputs in ``--out`` (default ``results/compare``): ``compare.json`` (profile,
per-config summary, timeline, ramp, TTFTs, re-prefill histogram), ``compare.csv``
(one row per config), ``runs/<config>.json`` (full load-generator documents with
every request), ``logs/<config>.log`` (server logs) and plots: ``throughput.png``
(output tokens/s vs time and vs users), ``hit_rate.png``, ``ttft_cdf.png`` and
``reprefill.png`` (how many times each KV block was prefilled again). The last
line printed is one JSON object of the headline figures.

Usage:
    python -m benchmarks.compare                      # all configs, ~20 min on 2 cores
    python -m benchmarks.compare --smoke              # tiny scale, ~75 s per config
                                                      # (mostly vLLM start-up)
    python -m benchmarks.compare --configs baseline,ideal,example-disk --out results/x
    python -m benchmarks.compare --set users=2 --set ramp_step=2   # users ramped in the SLO

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

from benchmarks.loadgen import SLO, LoadConfig, Scale, make_workload, run_load

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

    # model (kvtier.tinymodel.TinyLlama fields)
    model: dict = field(default_factory=lambda: dict(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=512))
    block_size: int = 32
    # workload scaling
    tokens_per_hash: int = 2
    max_context: int = 4000
    output_scale: float = 0.1
    max_output_tokens: int = 32
    time_scale: float = 0.1
    max_think: float = 5.0
    timing: str = "think"
    sampling: str = "sequential"
    # load: a fixed number of users (the same offered load for every
    # configuration); --set ramp_step=2 ramps users inside the SLO instead. On
    # this scale a 15-s SLO window holds ~10-30 requests, and a session's first
    # (cold) turn alone breaks a 2-s p95: the ramp then measures cold turns, not
    # the cache (measured: the ideal configuration held 1-3 users).
    duration: float = 200.0
    users: int = 8
    ramp_step: int = 0
    ramp_interval: float = 20.0
    max_users: int = 24
    slo_ttft_p95: float = 2.0
    slo_tokens_per_s: float | None = None
    # caches
    small_cache_slack_blocks: int = 4      # small cache = one max-length request + this
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
    def small_cache_blocks(self) -> int:
        return self.max_model_len // self.block_size + self.small_cache_slack_blocks


SMOKE = dict(
    model=dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=64,
               intermediate_size=256),
    max_context=1024, max_output_tokens=16, duration=30.0, users=2, ramp_step=1,
    ramp_interval=10.0, max_users=4, big_cache_blocks=4096, dram_bytes=256 << 20,
    nvme_dram_bytes=4 << 20, disk_bytes=512 << 20, small_cache_slack_blocks=1)


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
    dict(name="example-disk", cache="small", kv=_example,
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
        log(f"[compare] {cfg['name']}: healthy after {rec['startup_s']:.0f} s; load for "
            f"{p.duration:.0f} s")
        doc = asyncio.run(run_load(url, workload(p, args), load_config(p), MODEL_NAME))
        (out / "runs" / f"{cfg['name']}.json").write_text(json.dumps(doc, indent=1))
        s = doc["summary"]
        rec.update(summary=s, timeline=doc["timeline"], ramp=doc["ramp"],
                   reprefill_histogram=doc["reprefill_histogram"],
                   ttfts=sorted(r["ttft"] for r in doc["requests"] if r["ok"]))
        if not server.alive():
            rec["error"] = f"server died during the run (code {server.proc.returncode})"
        elif s["requests_ok"] == 0:
            rec["error"] = f"no successful request; errors: {s['errors']}"
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
        log(f"[compare] {cfg['name']}: {s['output_tok_s']:.1f} out tok/s, hit rate "
            f"{_fmt(s['hit_rate'])}, ttft p95 {_fmt(s['ttft'].get('p95'))} s, "
            f"max users in SLO {s['max_users_within_slo']}")
    return rec


def workload(p: Profile, args):
    scale = Scale(p.tokens_per_hash, 256, p.output_scale, p.max_output_tokens, p.time_scale,
                  p.max_think, p.max_context)
    traces = Path(args.trace_dir) if args.trace_dir else None
    have = traces is not None and traces.is_dir()
    return make_workload(scale, str(traces) if have else None, synthetic=args.synthetic or not have,
                         sampling=p.sampling, seed=args.seed)


def load_config(p: Profile) -> LoadConfig:
    return LoadConfig(duration=p.duration, users=p.users, ramp_step=p.ramp_step,
                      ramp_interval=p.ramp_interval, max_users=p.max_users,
                      slo=SLO(ttft_p95=p.slo_ttft_p95, min_tokens_per_s=p.slo_tokens_per_s),
                      timing=p.timing, block_size=p.block_size,
                      progress_interval=max(5.0, p.ramp_interval / 2))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


# --------------------------------------------------------------------------- results

def headline(recs: list[dict], p: Profile, out: Path) -> dict:
    ok = {r["name"]: r["summary"] for r in recs if r["status"] == "ok"}
    ideal, base = ok.get("ideal"), ok.get("baseline")
    h = {"out": str(out), "small_cache_blocks": p.small_cache_blocks, "configs": {}}
    ws = [s["working_set_blocks"] for s in ok.values()]
    if ws:
        h["working_set_x_small_cache"] = round(max(ws) / p.small_cache_blocks, 1)
    for r in recs:
        if r["status"] != "ok":
            h["configs"][r["name"]] = {"status": "failed", "error": r.get("error", "")[:200]}
            continue
        s = r["summary"]
        c = {"status": "ok", "output_tok_s": round(s["output_tok_s"], 2),
             "hit_rate": None if s["hit_rate"] is None else round(s["hit_rate"], 3),
             "ttft_p95_s": None if s["ttft"].get("p95") is None else round(s["ttft"]["p95"], 3),
             "goodput_rps": round(s["goodput_rps"], 3),
             "max_users_within_slo": s["max_users_within_slo"]}
        src = {k: int(v) for k, v in (s.get("cached_by_source") or {}).items() if v}
        if src:
            c["cached_by_source"] = src
        if ideal and ideal["output_tok_s"]:
            c["tok_s_vs_ideal"] = round(s["output_tok_s"] / ideal["output_tok_s"], 3)
        if base and base["output_tok_s"]:
            c["tok_s_vs_baseline"] = round(s["output_tok_s"] / base["output_tok_s"], 3)
        h["configs"][r["name"]] = c
    return h


CSV_FIELDS = ["name", "status", "output_tok_s", "hit_rate", "hit_rate_client", "goodput_rps",
              "requests_per_s", "max_users_within_slo", "users_final", "ttft_p50", "ttft_p95",
              "tpot_p50", "requests_ok", "requests_failed", "cached_device", "cached_host",
              "cached_disk", "cached_external", "cache_blocks", "working_set_blocks",
              "reprefilled_blocks", "tok_s_vs_ideal", "tok_s_vs_baseline", "error"]


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
                    output_tok_s=s["output_tok_s"], hit_rate=s["hit_rate"],
                    hit_rate_client=s["hit_rate_client"], goodput_rps=s["goodput_rps"],
                    requests_per_s=s["requests_per_s"],
                    max_users_within_slo=s["max_users_within_slo"], users_final=s["users_final"],
                    ttft_p50=s["ttft"].get("p50"), ttft_p95=s["ttft"].get("p95"),
                    tpot_p50=s["tpot"].get("p50"), requests_ok=s["requests_ok"],
                    requests_failed=s["requests_failed"], cached_device=src.get("device"),
                    cached_host=src.get("host"), cached_disk=src.get("disk"),
                    cached_external=src.get("external_unspecified"),
                    working_set_blocks=s["working_set_blocks"],
                    reprefilled_blocks=s["reprefilled_blocks"],
                    tok_s_vs_ideal=hc.get("tok_s_vs_ideal"),
                    tok_s_vs_baseline=hc.get("tok_s_vs_baseline"))
            w.writerow(row)


def plot(recs: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in recs if r["status"] == "ok"]
    files = []

    def legend(a):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    for key, label, name in (("output_tok_s", "output tokens/s", "throughput.png"),
                             ("hit_rate", "prefix hit rate (tokens)", "hit_rate.png")):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        a1u = a1.twinx()
        for r in ok:
            tl = [b for b in r["timeline"] if b[key] is not None]
            line, = a1.plot([b["t"] for b in tl], [b[key] for b in tl], marker=".",
                            label=r["name"])
            a1u.step([b["t"] for b in r["timeline"]], [b["users"] for b in r["timeline"]],
                     where="post", color=line.get_color(), alpha=0.3, lw=1, ls="--")
            by_users: dict[int, list[float]] = {}
            for b in tl:
                by_users.setdefault(b["users"], []).append(b[key])
            us = sorted(by_users)
            a2.plot(us, [sum(by_users[u]) / len(by_users[u]) for u in us], marker="o",
                    label=r["name"], color=line.get_color())
        a1.set(xlabel="time (s)", ylabel=label, title=f"{label} vs time")
        a1u.set_ylabel("users (dashed)")
        a1u.set_ylim(bottom=0)
        a2.set(xlabel="concurrent users", ylabel=label, title=f"{label} vs users (mean)")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            legend(a)
        save(fig, name)

    fig, a = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        xs = r["ttfts"]
        if xs:
            a.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r["name"])
    a.set(xscale="log", xlabel="TTFT (s)", ylabel="fraction of requests", title="TTFT CDF")
    a.grid(alpha=0.3)
    legend(a)
    save(fig, "ttft_cdf.png")

    fig, a = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(ok))
    for i, r in enumerate(ok):
        hist = {int(k): v for k, v in r["reprefill_histogram"].items()}
        ks = sorted(hist)
        a.bar([k + (i - (len(ok) - 1) / 2) * width for k in ks], [hist[k] for k in ks],
              width=width, label=r["name"])
    a.set(yscale="log", xlabel="times a KV block was prefilled again (0: computed once)",
          ylabel="blocks", title="Re-prefill per KV block")
    a.grid(alpha=0.3)
    legend(a)
    save(fig, "reprefill.png")
    return files


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "results" / "compare"))
    ap.add_argument("--smoke", action="store_true", help="tiny scale, a couple of minutes")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset, run in table order (default: all that "
                         "this machine can run)")
    ap.add_argument("--trace-dir", default=str(DEFAULT_TRACES))
    ap.add_argument("--synthetic", action="store_true", help="swarm instead of trace replay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="a real model (path or name) with its weights instead of "
                    "the generated dummy-weight Llama, e.g. on a GPU machine")
    ap.add_argument("--duration", type=float, help="override the load duration per config (s)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="override a Profile field, e.g. --set users=4 --set ramp_step=0")
    return ap.parse_args(argv)


def make_profile(args) -> Profile:
    p = Profile(**(SMOKE if args.smoke else {}))
    for item in args.set:
        k, _, v = item.partition("=")
        if k not in {f.name for f in dataclasses.fields(Profile)}:
            raise SystemExit(f"unknown profile field {k!r}")
        p = dataclasses.replace(p, **{k: json.loads(v)})
    if args.duration:
        p = dataclasses.replace(p, duration=args.duration)
    return p


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.configs is None:
        args.configs = ",".join(c["name"] for c in CONFIGS)
    p = make_profile(args)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = set(names) - {c["name"] for c in CONFIGS}
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; known: "
                         f"{[c['name'] for c in CONFIGS]}")
    out = Path(args.out).resolve()
    for d in ("runs", "logs"):
        (out / d).mkdir(parents=True, exist_ok=True)

    from kvtier.tinymodel import TinyLlama, write_model
    model_dir = args.model or write_model(out / "model", TinyLlama(
        **p.model, max_position_embeddings=p.max_model_len))
    wl = workload(p, args)
    log(f"[compare] profile: {dataclasses.asdict(p)}")
    log(f"[compare] workload: {wl.describe()}; small cache {p.small_cache_blocks} blocks of "
        f"{p.block_size}, big {p.big_cache_blocks}")

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
    head = headline(recs, p, out)
    head["wall_s"] = round(time.monotonic() - t0, 1)
    doc = {"profile": dataclasses.asdict(p), "server_env": SERVER_ENV, "workload": wl.describe(),
           "trace_dir": args.trace_dir, "configs": recs, "headline": head}
    (out / "compare.json").write_text(json.dumps(doc, indent=1))
    write_csv(out / "compare.csv", recs, head)
    head["plots"] = plot(recs, out)
    print(json.dumps(head), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
