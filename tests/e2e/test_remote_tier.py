"""The cluster tier on real vLLM servers (issue 19): a Mooncake master and one
dedicated storage client on loopback (tests.cluster), two kvtier servers in their
own processes on disks of their own (no shared directory).

Engine A serves six prompts and publishes their blocks; engine B serves the same
prompts with >= 95% of their full blocks from the cluster, and the same greedy
answers as vLLM without a connector. Then the master is killed while B serves:
B goes on (recompute), the failed calls are counted; a new master comes up, A
publishes again, and B loads from the cluster again.
"""

import time

import pytest

from kvtier.serving import Server, cpu_defaults, metric_value
from tests.cluster import needs_mooncake
from tests.conftest import needs_vllm
from tests.helpers import (BLOCKS_PER_PROMPT, FULL_BLOCK_TOKENS, prompts, same_greedy, server,
                           shared_store_config)

pytestmark = [pytest.mark.e2e, needs_vllm, needs_mooncake]


def answer(resp):
    lp = resp["choices"][0]["logprobs"]
    cached = (resp["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return lp["tokens"], lp["top_logprobs"], cached


def ask(s, prompt):
    return answer(s.complete(prompt, logprobs=5))


def published(s) -> float:
    return metric_value(s.metrics(), "kvtier_stored_blocks_total", tier="remote")


def not_published(m: str) -> float:
    """Records written to disk whose publication failed or was skipped."""
    return (metric_value(m, "kvtier_remote_errors_total", op="put")
            + metric_value(m, "kvtier_skipped_stores_total", reason="remote_unavailable")
            + metric_value(m, "kvtier_skipped_stores_total", reason="remote_backpressure"))


def wait_published(s, n: float, timeout: float = 60) -> None:
    """Until ``n`` records are published; fails at once when the rest will not be."""
    deadline = time.monotonic() + timeout
    lost_before = not_published(s.metrics())
    while True:
        m = s.metrics()
        done = metric_value(m, "kvtier_stored_blocks_total", tier="remote")
        if done >= n:
            return
        if done + not_published(m) - lost_before >= n or time.monotonic() > deadline:
            kv = "\n".join(line for line in m.splitlines() if line.startswith("kvtier_"))
            raise AssertionError(f"{done} blocks published, expected {n}\n{kv}")
        time.sleep(0.2)


def test_a_second_engine_serves_from_the_cluster_and_survives_the_master(model_dir, tmp_path,
                                                                          mooncake):
    ps = prompts(6, seed=31)
    later = prompts(8, seed=32)[6:]
    with Server(model_dir, None, cpu_defaults(1024) + ["--seed", "0"], connector=False,
                log_path=str(tmp_path / "base.log")) as base:
        refs = [ask(base, p) for p in ps + later]

    # Generous lookup timeouts: on a loaded 2-core CI host a lookup can exceed a few
    # hundred ms, and the tier is then skipped for retry_seconds (publications too).
    cfg = {**shared_store_config(tmp_path), "shared": False}
    a_cfg = {**cfg, "remote": mooncake.remote(lookup_timeout_ms=5000, retry_seconds=2)}
    b_cfg = {**cfg, "remote": mooncake.remote(lookup_timeout_ms=2000, retry_seconds=2)}
    with server(model_dir, tmp_path / "a", tmp_path / "a.log", **a_cfg) as a, \
            server(model_dir, tmp_path / "b", tmp_path / "b.log", **b_cfg) as b:
        for p in ps:
            ask(a, p)
        wait_published(a, len(ps) * BLOCKS_PER_PROMPT)

        got = [ask(b, p) for p in ps]
        m = b.metrics()
        hit = metric_value(m, "kvtier_hit_tokens_total", tier="remote")
        assert hit >= 0.95 * len(ps) * FULL_BLOCK_TOKENS, m
        for (toks, top, cached), (rtoks, rtop, _) in zip(got, refs):
            assert cached >= 0.95 * FULL_BLOCK_TOKENS
            assert same_greedy(toks, top, rtoks, rtop), (toks, rtoks)
        assert metric_value(m, "kvtier_remote_errors_total", op="lookup") == 0
        print(f"cluster tier: B loaded {hit:.0f} of {len(ps) * FULL_BLOCK_TOKENS} full-block "
              f"tokens from the cluster; cached per prompt {[g[2] for g in got]}")

        # The master dies while B serves: B recomputes, counts the errors, lives.
        mooncake.kill_master()
        for p, ref in zip(later, refs[len(ps):]):
            toks, top, _ = ask(b, p)
            assert same_greedy(toks, top, ref[0], ref[1])
        m = b.metrics()
        errors = sum(metric_value(m, "kvtier_remote_errors_total", op=op)
                     for op in ("lookup", "get", "put"))
        assert errors >= 1, m
        print(f"master killed: {len(later)} prompts served, {errors:.0f} cluster errors counted")
        assert metric_value(m, "kvtier_hit_tokens_total", tier="remote") == hit

        # A new master (it knows no records): A publishes again, B loads from it.
        mooncake.start_master()
        fresh = prompts(40, seed=33)
        for i, p in enumerate(fresh):
            before = published(a)
            ask(a, p)
            try:   # A's writes of this prompt, all published once A has reconnected
                wait_published(a, before + BLOCKS_PER_PROMPT, timeout=5)
                break
            except AssertionError:
                assert i < len(fresh) - 1, "A never published to the new master"
        time.sleep(3)   # past B's retry_seconds since its last failed call
        ask(b, p)
        assert metric_value(b.metrics(), "kvtier_hit_tokens_total",
                            tier="remote") >= hit + 0.95 * FULL_BLOCK_TOKENS
