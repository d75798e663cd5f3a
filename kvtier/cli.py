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


def cmd_demo(argv: list[str]) -> int:
    p = ArgumentParser(prog="kvtier demo", description=(
        "An agentic demo on an embedded tiny Llama: a few agents resend long contexts after "
        "the small GPU KV cache has evicted them; kvtier serves them from DRAM, then from "
        "disk after a server restart."))
    p.add_argument("--agents", type=integer(1), default=4)
    p.add_argument("--context-tokens", type=integer(32), default=1500)
    p.add_argument("--store", default=None, help="disk tier directory (default: a fresh one "
                   "under ~/.cache/kvtier/demo-store)")
    args = p.parse_args(argv)
    import random
    import shutil

    from kvtier.serving import Server, cpu_defaults, has_cuda, metric_value

    model = default_model()
    store = Path(args.store or _default_cache_dir() / "demo-store")
    if args.store is None:
        shutil.rmtree(store, ignore_errors=True)
    gpu_tokens = 2 * args.context_tokens   # the "GPU" KV cache holds about two agents
    vllm_args = ["--num-gpu-blocks-override", str(gpu_tokens // 32 + 1),
                 "--enable-prompt-tokens-details"]
    if not has_cuda():
        vllm_args = cpu_defaults(args.context_tokens + 64) + vllm_args
    extra = {"dram_bytes": "256MiB", "disk_path": str(store), "disk_bytes": "2GiB"}
    rng = random.Random(0)
    contexts = [[rng.randrange(0, 256) for _ in range(args.context_tokens)]
                for _ in range(args.agents)]
    log = store.parent / "demo-server.log"
    print(f"kvtier demo: {args.agents} agents x {args.context_tokens} tokens, GPU KV cache "
          f"~{gpu_tokens} tokens; model {model}; server log {log}", flush=True)
    rows = []

    def turn(server, phase):
        for i, ctx in enumerate(contexts):
            t0 = time.perf_counter()
            r = server.complete(ctx, max_tokens=1)
            ms = (time.perf_counter() - t0) * 1000
            c = (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            rows.append((phase, i, len(ctx), c, ms))
            print(f"  {phase:<22} agent {i}: {len(ctx)} prompt tokens, {c:5d} cached, "
                  f"TTFT {ms:7.1f} ms", flush=True)

    store.mkdir(parents=True, exist_ok=True)
    with Server(model, extra, vllm_args, log_path=str(log)) as s:
        turn(s, "1 cold (prefill)")
        time.sleep(1.0)
        turn(s, "2 after eviction (DRAM)")
        m = s.metrics()
        host = metric_value(m, "kvtier_hit_tokens_total", tier="dram")
    print("  restarting the server on the same store ...", flush=True)
    with Server(model, extra, vllm_args, log_path=str(log)) as s:
        turn(s, "3 after restart (disk)")
        m = s.metrics()
        disk = metric_value(m, "kvtier_hit_tokens_total", tier="disk")
    cold = sum(r[4] for r in rows if r[0].startswith("1")) / args.agents
    warm = sum(r[4] for r in rows if r[0].startswith("2")) / args.agents
    restart = sum(r[4] for r in rows if r[0].startswith("3")) / args.agents
    summary = {"ttft_cold_ms": round(cold, 1), "ttft_dram_hit_ms": round(warm, 1),
               "ttft_disk_hit_after_restart_ms": round(restart, 1),
               "hit_tokens_dram": host, "hit_tokens_disk": disk}
    print(f"mean TTFT: cold {cold:.1f} ms, DRAM hit {warm:.1f} ms, disk hit after restart "
          f"{restart:.1f} ms")
    print(json.dumps(summary))
    ok = host > 0 and disk > 0
    return 0 if ok else 1


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
