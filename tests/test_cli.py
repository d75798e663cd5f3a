import json
import os
import time

import pytest
import xxhash

from kvtier.cli import main
from kvtier.copy.engine import HostPool
from kvtier.store.disk import DiskStore
from kvtier.store.record import HEADER_BYTES, pack_header, record_bytes

NS = bytes(range(16))
PAYLOAD = 8192


def write(store: DiskStore, pool: HostPool, i: int, age: float = 0.0):
    key = i.to_bytes(16, "big")
    rec = pool.slot(0)
    rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD] = i % 251
    pack_header(rec, NS, key, store.rank, store.tp_size, PAYLOAD,
                xxhash.xxh3_64_intdigest(rec[HEADER_BYTES:HEADER_BYTES + PAYLOAD]))
    store.write(key, rec[:record_bytes(PAYLOAD)])
    if age:
        t = time.time() - age
        os.utime(store.path(key), (t, t))
    return store.path(key)


def test_serve_rejects_bad_config_before_starting_vllm(capsys):
    assert main(["serve", "--dram-bytes", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--dram-bytes" in err and "dram_bytes" in err and "'lots'" in err
    assert main(["serve", "--kvtier-config", '{"ttl": 5}']) == 2
    assert "unknown key" in capsys.readouterr().err


# Every argument the CLI parses, given a bad value: (argv, the argument's name, a word
# of what it accepts).
BAD_ARGS = [
    (["serve", "--kvtier-config", "{not json"], "--kvtier-config", "JSON object"),
    (["serve", "--kvtier-config", "[1, 2]"], "--kvtier-config", "JSON object"),
    (["serve", "--kvtier-config", '{"dram_bytes": "lots"}'], "--kvtier-config", "size"),
    (["serve", "--kvtier-config", '{"ttl": 5}'], "--kvtier-config", "accepted keys"),
    (["serve", "--dram-bytes", "lots"], "--dram-bytes", "64GiB"),
    (["serve", "--disk-bytes", "-1"], "--disk-bytes", "64GiB"),
    (["serve", "--disk-path", " "], "--disk-path", "directory"),
    (["serve", "--ttl-seconds", "soon"], "--ttl-seconds", "number > 0"),
    (["serve", "--ttl-seconds", "0"], "--ttl-seconds", "number > 0"),
    (["serve", "--port", "http"], "--port", "1 to 65535"),
    (["serve", "--port", "70000"], "--port", "1 to 65535"),
    (["serve", "--port"], "--port", "expected one argument"),
    (["demo", "--agents", "0"], "--agents", "integer >= 1"),
    (["demo", "--agents", "many"], "--agents", "integer >= 1"),
    (["demo", "--context-tokens", "8"], "--context-tokens", "integer >= 32"),
    (["store", "gc", ".", "--ttl-seconds", "soon"], "--ttl-seconds", "number > 0"),
    (["store", "gc", ".", "--max-bytes", "lots"], "--max-bytes", "64GiB"),
    (["store", "shred", "."], "action", "choose from"),
    (["plan", "x.jsonl", "--jobs", "0"], "--jobs", "integer >= 1"),
    (["plan", "x.jsonl", "--block-tokens", "-64"], "--block-tokens", "integer >= 1"),
    (["plan", "x.jsonl", "--target", "95"], "--target", "<= 1"),
    (["plan", "x.jsonl", "--stagger", "-1"], "--stagger", ">= 0"),
    (["plan", "x.jsonl", "--ttl", "5parsecs"], "--ttl", "5m, 1h or inf"),
    (["plan", "x.jsonl", "--dram", "1GiB"], "--dram", "--kv-bytes-per-token"),
    (["plan", "x.jsonl", "--size-ttl", "later"], "--size-ttl", "5m, 1h or inf"),
]


@pytest.mark.parametrize("argv,name,accepts", BAD_ARGS, ids=[" ".join(a[0]) for a in BAD_ARGS])
def test_bad_arguments_get_one_line_naming_them(argv, name, accepts, tmp_path, monkeypatch,
                                                capsys):
    """A bad value never starts anything and never shows a traceback: exit status 2 and
    one line on stderr naming the argument and what it accepts."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"t": 0, "hash_ids": [1]}\n')
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("kvtier serve started a server"))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert name in lines[0] and accepts in lines[0], lines[0]
    assert "Traceback" not in err and not out


class Started(Exception):
    pass


def test_serve_starts_vllm_with_telemetry_off(monkeypatch, capsys):
    """kvtier serve execs vLLM's server with its arguments, and with VLLM_NO_USAGE_STATS=1
    and DO_NOT_TRACK=1 in its environment, whatever the caller's environment says."""
    seen = {}

    def execve(path, argv, env):
        seen.update(argv=argv, env=env)
        raise Started

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    monkeypatch.delenv("VLLM_NO_USAGE_STATS", raising=False)
    with pytest.raises(Started):
        main(["serve", "some/model", "--port", "8123", "--dram-bytes", "1GiB",
              "--max-num-seqs", "4"])
    argv, env = seen["argv"], seen["env"]
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
    assert argv[argv.index("--model") + 1] == "some/model"
    assert argv[argv.index("--port") + 1] == "8123" and argv.count("--port") == 1
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1])[
        "kv_connector_extra_config"] == {"dram_bytes": "1GiB"}
    assert argv[-2:] == ["--max-num-seqs", "4"]


def test_servers_started_by_kvtier_have_telemetry_off(monkeypatch, tmp_path):
    """kvtier.serving.Server (the demo's, the tests') sets the same environment."""
    import subprocess

    from kvtier import serving
    seen = {}

    def popen(cmd, env, **kw):
        seen["env"] = env
        raise Started

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.delenv("VLLM_HOST_IP", raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    monkeypatch.delenv("VLLM_NO_USAGE_STATS", raising=False)
    with pytest.raises(Started):
        serving.Server("m", {}, [], env={"VLLM_NO_USAGE_STATS": "0", "X": "1"}).start()
    env = seen["env"]
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1" and env["X"] == "1"
    assert env["VLLM_HOST_IP"] == "127.0.0.1"


def test_unknown_command_prints_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "serve" in capsys.readouterr().err


def test_store_stats_verify_gc(tmp_path, capsys):
    pool = HostPool(1, record_bytes(PAYLOAD))
    ranks = [DiskStore(tmp_path, NS, r, 2) for r in (0, 1)]
    for i in range(6):                       # blocks 0-1 old, 2-5 recent; both ranks
        for s in ranks:
            write(s, pool, i, age=7200 if i < 2 else 10 * (6 - i))
    assert main(["store", "stats", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["total"]["records"] == 12
    assert stats["namespaces"][0]["age_histogram"][">=1d"] == 0
    # Corrupt one record: verify finds it (exit 1), --delete removes it.
    victim = ranks[1].path((3).to_bytes(16, "big"))
    data = bytearray(victim.read_bytes())
    data[HEADER_BYTES + 1] ^= 1
    victim.write_bytes(data)
    assert main(["store", "verify", str(tmp_path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out == {"records": 12, "bad": 1, "by_reason": {"checksum": 1}}
    assert main(["store", "verify", str(tmp_path), "--delete"]) == 0
    capsys.readouterr()
    assert not victim.exists()
    # gc: TTL 1 h drops blocks 0-1 (both ranks); a budget of 2 blocks keeps the newest.
    one_block = 2 * record_bytes(PAYLOAD)
    assert main(["store", "gc", str(tmp_path), "--ttl-seconds", "3600", "--max-bytes",
                 str(2 * one_block), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed_blocks"]["expired"] == 2
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and len(p.name) == 32)
    assert left == sorted([(4).to_bytes(16, "big").hex(), (5).to_bytes(16, "big").hex()] * 2)
    assert main(["store", "gc", str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------ demo (no vLLM)

class FakeDemoServer:
    """Serves a prompt it has seen before as a hit from ``source`` (50 ms),
    anything else as a recompute (500 ms) on a fake clock; /metrics reports
    vLLM's cached-tokens-by-source counter."""

    def __init__(self, seen: set, source: str, clock: list):
        self.seen, self.source, self.clock = seen, source, clock
        self.by_source: dict[str, int] = {}
        self.calls: list[tuple] = []

    def complete(self, prompt, max_tokens):
        key = tuple(prompt)
        hit = key in self.seen
        cached = (len(prompt) - 1) // 32 * 32 if hit else 0
        if hit:
            self.by_source[self.source] = self.by_source.get(self.source, 0) + cached
        self.seen.add(key)
        self.calls.append((key, hit))
        self.clock[0] += 0.05 if hit else 0.5
        return {"usage": {"prompt_tokens": len(prompt),
                          "prompt_tokens_details": {"cached_tokens": cached}}}

    def metrics(self):
        return "\n".join(
            f'vllm:prompt_tokens_cached_by_source_total{{engine="0",model_name="m",'
            f'source="{k}"}} {float(v)}' for k, v in self.by_source.items())


def test_demo_phases_time_each_resend_beside_a_fresh_recompute(capsys):
    import io
    import random

    from kvtier.cli import cached_by_source, demo_phase, demo_summary, demo_table

    rng = random.Random(1)
    contexts = [[rng.randrange(256) for _ in range(200)] for _ in range(4)]
    fresh_made = []

    def fresh(n):
        f = [rng.randrange(256) for _ in range(n)]
        fresh_made.append(tuple(f))
        return f

    clock, seen, rows, out = [0.0], set(), [], io.StringIO()
    tick = lambda: clock[0]   # noqa: E731
    first = FakeDemoServer(seen, "host", clock)
    demo_phase(first, "cold", contexts, fresh, rows, clock=tick, out=out)
    demo_phase(first, "dram", contexts, fresh, rows, clock=tick, out=out)
    restarted = FakeDemoServer(seen, "disk", clock)   # the disk store survived
    demo_phase(restarted, "disk", contexts, fresh, rows, clock=tick, out=out)

    assert len(rows) == 3 * 4 * 2
    # the agents' order alternates: recompute first for agents 0, 2; kvtier first for 1, 3
    assert [r["what"] for r in rows[:4]] == ["recompute", "kvtier", "kvtier", "recompute"]
    # every recompute is a fresh context of the agent's length, never served from a cache
    rec = [r for r in rows if r["what"] == "recompute"]
    assert all(r["cached"] == 0 and r["tokens"] == 200 and not r["source"] for r in rec)
    assert len(set(fresh_made)) == 12 and not set(fresh_made) & {tuple(c) for c in contexts}
    s = demo_summary(rows)
    assert s["cold"]["kvtier_ms"] == s["cold"]["recompute_ms"] == pytest.approx(500.0)
    assert s["cold"]["kvtier_cached_by_source"] == {}
    assert s["dram"]["kvtier_ms"] == pytest.approx(50.0)
    assert s["dram"]["recompute_over_kvtier"] == pytest.approx(10.0)
    assert s["dram"]["kvtier_cached_by_source"] == {"host": 4 * 192}
    assert s["disk"]["kvtier_cached_by_source"] == {"disk": 4 * 192}
    demo_table(s, out=out)
    text = out.getvalue()
    assert "3 after a restart" in text and "kvtier disk 768" in text and "10.00x" in text
    assert cached_by_source(restarted.metrics()) == {"disk": 768.0}
