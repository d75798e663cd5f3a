"""``kvtier serve | demo | plan | store``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from kvtier.cliargs import ArgumentParser, checked, integer, json_object, number
from kvtier.config import ConfigError, KVTierConfig, _default_cache_dir, parse_size

DEFAULT_MODEL_DIR = _default_cache_dir() / "models" / "tiny-llama"


def default_model() -> str:
    """The embedded default: a small Llama written on the spot (no download)."""
    from kvtier.tinymodel import write_model
    return str(write_model(DEFAULT_MODEL_DIR, weights=True))


def _size(key: str):
    """A size argument (``64GiB``), checked as the config key ``key``; kept as given."""
    def conv(text: str) -> str:
        parse_size(key, text)
        return text
    return checked(conv, ConfigError)


def _directory(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a directory path")
    return text


def _kvtier_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kvtier (kv_connector_extra_config)")
    g.add_argument("--kvtier-config", default=None, type=json_object("kvtier settings"),
                   help="JSON object of kvtier settings (keys: see docs/operators.md)")
    g.add_argument("--dram-bytes", type=_size("dram_bytes"),
                   help="DRAM tier budget, e.g. 64GiB")
    g.add_argument("--disk-path", type=checked(_directory, ValueError),
                   help="disk tier directory (local NVMe)")
    g.add_argument("--disk-bytes", type=_size("disk_bytes"), help="disk tier budget, e.g. 2TiB")
    g.add_argument("--ttl-seconds", type=number(0, allow_inf=True),
                   help="block TTL in seconds, or inf (default 3600)")
    g.add_argument("--no-disk", action="store_true", help="DRAM tier only")


def _extra_config(args, parser: argparse.ArgumentParser) -> dict:
    extra = dict(args.kvtier_config or {})
    try:   # the JSON's own keys and values, named as such
        KVTierConfig.from_extra_config(extra)
    except ConfigError as e:
        parser.error(f"argument --kvtier-config: {e}")
    for key in ("dram_bytes", "disk_path", "disk_bytes", "ttl_seconds"):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)
    if args.no_disk:
        extra["disk"] = False
    KVTierConfig.from_extra_config(extra)   # fail here, clearly, not in the engine
    return extra


def cmd_serve(argv: list[str]) -> int:
    p = ArgumentParser(
        prog="kvtier serve",
        description="Start vLLM's OpenAI server with kvtier. Unknown arguments go to vLLM.")
    _kvtier_options(p)
    p.add_argument("--port", type=integer(1, 65535), default=8000,
                   help="the server's port (default 8000)")
    p.add_argument("model", nargs="?", default=None,
                   help="model name or path (default: an embedded tiny Llama)")
    args, vllm_args = p.parse_known_args(argv)
    extra = _extra_config(args, p)
    from kvtier.serving import cpu_defaults, has_cuda, server_command, server_env

    model = args.model or default_model()
    if not has_cuda() and "--block-size" not in vllm_args:
        vllm_args = cpu_defaults() + vllm_args
    cmd = server_command(model, args.port, extra, vllm_args)
    if any(a == "--host" or a.startswith("--host=") for a in vllm_args):
        i = cmd.index("--host")   # the operator's --host wins over our 127.0.0.1
        del cmd[i:i + 2]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, server_env())


DEMO_MODEL_DIR = _default_cache_dir() / "models" / "demo-llama"
DEMO_PHASES = (("cold", "1 first turn (cold)"), ("dram", "2 after GPU eviction"),
               ("disk", "3 after a restart"))


def demo_model() -> str:
    """The demo's embedded model (kvtier.tinymodel.DEMO_LLAMA), written on the spot."""
    from kvtier.tinymodel import DEMO_LLAMA, write_model
    return str(write_model(DEMO_MODEL_DIR, DEMO_LLAMA, weights=True))


def cached_by_source(metrics_text: str) -> dict[str, float]:
    """vLLM's prompt tokens served from a cache, by source (device, host, disk)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("vllm:prompt_tokens_cached_by_source_total{"):
            head, _, value = line.rpartition(" ")
            src = head.split('source="', 1)[1].split('"', 1)[0] if 'source="' in head else "?"
            out[src] = out.get(src, 0.0) + float(value)
    return out


def demo_phase(server, phase: str, contexts: list[list[int]], fresh, rows: list,
               clock=time.perf_counter, out=sys.stdout) -> None:
    """One phase: each agent resends its context ("kvtier") and, beside it, a fresh
    context of the same length ("recompute": no cache has it, what vLLM without
    kvtier pays once its GPU cache lost the agent's context). The two alternate
    in order from agent to agent; each is timed alone (a 1-token completion),
    and the source of its cached tokens is read from /metrics around it."""
    for i, ctx in enumerate(contexts):
        for what in (("recompute", "kvtier") if i % 2 == 0 else ("kvtier", "recompute")):
            prompt = ctx if what == "kvtier" else fresh(len(ctx))
            before = cached_by_source(server.metrics())
            t0 = clock()
            r = server.complete(prompt, max_tokens=1)
            ms = (clock() - t0) * 1000
            after = cached_by_source(server.metrics())
            src = {k: int(v - before.get(k, 0.0)) for k, v in after.items()
                   if v - before.get(k, 0.0) > 0}
            cached = (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            rows.append({"phase": phase, "agent": i, "what": what, "tokens": len(prompt),
                         "cached": cached, "source": src, "ms": ms})
            where = ", ".join(f"{SOURCE_NAMES.get(k, k)} {v}" for k, v in src.items()) or "-"
            print(f"  {phase:<5} agent {i} {what:<9} {len(prompt)} tokens, {cached:5d} cached "
                  f"({where}), TTFT {ms:7.1f} ms", file=out, flush=True)


SOURCE_NAMES = {"device": "GPU cache", "host": "kvtier DRAM", "disk": "kvtier disk"}


def demo_summary(rows: list[dict]) -> dict:
    """Median TTFT per phase of the kvtier requests and of the recompute ones."""
    import statistics
    out = {}
    for phase, _ in DEMO_PHASES:
        k = [r["ms"] for r in rows if r["phase"] == phase and r["what"] == "kvtier"]
        c = [r["ms"] for r in rows if r["phase"] == phase and r["what"] == "recompute"]
        if not k or not c:
            continue
        src: dict[str, int] = {}
        for r in rows:
            if r["phase"] == phase and r["what"] == "kvtier":
                for s, v in r["source"].items():
                    src[s] = src.get(s, 0) + v
        km, cm = statistics.median(k), statistics.median(c)
        out[phase] = {"kvtier_ms": round(km, 1), "recompute_ms": round(cm, 1),
                      "recompute_over_kvtier": round(cm / km, 2), "kvtier_cached_by_source": src,
                      "kvtier_ms_all": [round(x, 1) for x in k],
                      "recompute_ms_all": [round(x, 1) for x in c]}
    return out


def demo_table(summary: dict, out=sys.stdout) -> None:
    print(f"\n{'phase':<24} {'kvtier':>9} {'recompute':>10} {'speed-up':>9}  kvtier's hits from",
          file=out)
    for phase, label in DEMO_PHASES:
        p = summary.get(phase)
        if p is None:
            continue
        src = ", ".join(f"{SOURCE_NAMES.get(k, k)} {v:,}" for k, v in
                        p["kvtier_cached_by_source"].items()) or "- (nothing cached yet)"
        print(f"{label:<24} {p['kvtier_ms']:7.1f}ms {p['recompute_ms']:8.1f}ms "
              f"{p['recompute_over_kvtier']:8.2f}x  {src}", file=out)
    print("(median TTFT of the agents' requests; recompute = a fresh context of the same "
          "length in the same server: what vLLM without kvtier pays after an eviction or a "
          "restart)", file=out)


def cmd_demo(argv: list[str]) -> int:
    p = ArgumentParser(prog="kvtier demo", description=(
        "An agentic demo on an embedded small Llama: a few agents resend long contexts after "
        "the small GPU KV cache has evicted them; kvtier serves them from DRAM, then from "
        "disk after a server restart. Each phase is timed beside a recompute of a fresh "
        "context of the same length (the no-kvtier figure)."))
    p.add_argument("--agents", type=integer(1), default=4)
    p.add_argument("--context-tokens", type=integer(32), default=6000)
    p.add_argument("--store", default=None, help="disk tier directory (default: a fresh one "
                   "under ~/.cache/kvtier/demo-store)")
    args = p.parse_args(argv)
    import random
    import shutil

    from kvtier.serving import Server, cpu_defaults, has_cuda, metric_value

    t_start = time.monotonic()
    model = demo_model()
    store = Path(args.store or _default_cache_dir() / "demo-store")
    if args.store is None:
        shutil.rmtree(store, ignore_errors=True)
    ctx_blocks = -(-args.context_tokens // 32)
    gpu_blocks = 2 * ctx_blocks + 1       # the "GPU" KV cache holds about two agents
    vllm_args = ["--num-gpu-blocks-override", str(gpu_blocks), "--enable-prompt-tokens-details"]
    if not has_cuda():
        vllm_args = cpu_defaults(args.context_tokens + 64) + vllm_args
    # kvtier's defaults (load_policy auto: a load measured slower than recomputing
    # is declined) except the sizes, kept small for a laptop.
    extra = {"dram_bytes": "256MiB", "disk_path": str(store), "disk_bytes": "2GiB"}
    rng = random.Random(0)
    contexts = [[rng.randrange(0, 256) for _ in range(args.context_tokens)]
                for _ in range(args.agents)]

    def fresh(n: int) -> list[int]:
        return [rng.randrange(0, 256) for _ in range(n)]

    log = store.parent / "demo-server.log"
    print(f"kvtier demo: {args.agents} agents x {args.context_tokens} tokens, GPU KV cache "
          f"{gpu_blocks * 32} tokens (about two agents); model {model} (4 layers, hidden 256); "
          f"server log {log}", flush=True)
    rows: list[dict] = []

    def warm_up(server) -> None:   # the server's first forward passes, untimed
        server.complete(fresh(64), max_tokens=1)
        server.complete(fresh(min(args.context_tokens, 2048)), max_tokens=1)

    def disk_settled(server, want: int, timeout: float = 60.0) -> float:
        """Wait until the disk tier's stored blocks stop growing (>= want)."""
        deadline, last = time.monotonic() + timeout, -1.0
        while time.monotonic() < deadline:
            n = metric_value(server.metrics(), "kvtier_stored_blocks_total", tier="disk")
            if n >= want and n == last:
                return n
            last = n
            time.sleep(0.5)
        return last

    store.mkdir(parents=True, exist_ok=True)
    with Server(model, extra, vllm_args, log_path=str(log)) as s:
        warm_up(s)
        demo_phase(s, "cold", contexts, fresh, rows)
        demo_phase(s, "dram", contexts, fresh, rows)
        m = s.metrics()
        host = metric_value(m, "kvtier_hit_tokens_total", tier="dram")
        disk_settled(s, args.agents * (args.context_tokens // 32))
    print("  restarting the server on the same store ...", flush=True)
    with Server(model, extra, vllm_args, log_path=str(log)) as s:
        warm_up(s)
        demo_phase(s, "disk", contexts, fresh, rows)
        m = s.metrics()
        disk = metric_value(m, "kvtier_hit_tokens_total", tier="disk")
        declined = metric_value(m, "kvtier_declined_loads_total")
    summary = demo_summary(rows)
    demo_table(summary)
    d = summary.get("disk")
    faster = bool(d and d["recompute_over_kvtier"] > 1.0 and d["kvtier_cached_by_source"])
    if faster:
        print(f"disk hit after a restart: {d['kvtier_ms']:.0f} ms against {d['recompute_ms']:.0f}"
              f" ms to recompute, {d['recompute_over_kvtier']:.1f}x faster")
    else:
        print("disk hit after a restart: NOT faster than recomputing on this machine"
              + (f" ({d['kvtier_ms']:.0f} ms against {d['recompute_ms']:.0f} ms)" if d else ""))
    if declined:
        print(f"kvtier declined {declined:.0f} block loads it measured slower than recomputing "
              "(load_policy auto)")
    out = {"agents": args.agents, "context_tokens": args.context_tokens,
           "gpu_cache_tokens": gpu_blocks * 32, "ttft_ms": summary,
           "hit_tokens_dram": host, "hit_tokens_disk": disk, "declined_block_loads": declined,
           "disk_hit_faster_than_recompute": faster,
           "wall_s": round(time.monotonic() - t_start, 1)}
    print(json.dumps(out))
    return 0 if host > 0 and disk > 0 else 1


def cmd_plan(argv: list[str]) -> int:
    from kvtier.plan import main
    return main(argv)


def cmd_store(argv: list[str]) -> int:
    from kvtier.store.tool import main
    return main(argv)


COMMANDS = {"serve": cmd_serve, "demo": cmd_demo, "plan": cmd_plan, "store": cmd_store}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: kvtier {serve,demo,plan,store} ...\n"
              "  serve [MODEL] [vLLM args]   vLLM's OpenAI server with kvtier\n"
              "  demo                        agentic demo on an embedded tiny Llama\n"
              "  plan TRACE...               TTL/capacity planner (kvtier plan -h)\n"
              "  store stats|verify|gc PATH  inspect and maintain a disk store",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except ConfigError as e:
        print(f"kvtier: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:   # argparse: --help (0) or a bad argument (2, one line said)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
