"""kvtier plan --replicas: the fleet planner (kvtier/plan/fleet.py).

Exact numbers on small traces for each routing and for the shared tier; one replica
must be exactly the single replay (kvtier.plan.replay.replay, the existing code path).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from kvtier import plan
from kvtier.plan import Fleet, PlanError, TierSpec
from kvtier.plan.fleet import replay_fleet, session_replica

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT.parent / "shared" / "traces" / "weka-cc-dev"
FIELDS = ("requests", "input_tokens", "hit_tokens", "hit_tokens_by_tier", "blocks",
          "blocks_prefilled", "distinct_blocks", "peak_used_tokens", "evictions",
          "written_tokens")


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def trace_of(tmp_path, recs, block=4):
    return plan.load([write_jsonl(tmp_path / "t.jsonl", recs)], "jsonl", block_tokens=block)


def same(a, b) -> None:
    for f in FIELDS:
        assert getattr(a, f) == getattr(b, f), f


def cache(cap=math.inf, ttl=math.inf):
    return [TierSpec("cache", cap, ttl)]


# Two conversations, two turns each; block = 4 tokens; 40 prompt tokens in all.
TWO_SESSIONS = [{"t": 0, "hash_ids": [1, 2], "namespace": "a"},
                {"t": 1, "hash_ids": [5, 6], "namespace": "b"},
                {"t": 10, "hash_ids": [1, 2, 3], "namespace": "a"},
                {"t": 11, "hash_ids": [5, 6, 7], "namespace": "b"}]


# --------------------------------------------------------------------------- sessions
def test_sessions_in_traces(tmp_path):
    tr = trace_of(tmp_path, TWO_SESSIONS + [{"t": 12, "hash_ids": [8], "session": "a"}])
    assert tr.session.tolist() == [0, 1, 0, 1, 0]          # namespace / its alias session
    conv = {"id": "c", "block_size": 64, "requests": [
        {"t": 0.0, "in": 64, "hash_ids": [1]},
        {"t": 5.0, "type": "subagent", "requests": [{"t": 1.0, "in": 64, "hash_ids": [2]}]}]}
    for name in "xy":
        (tmp_path / "kv").mkdir(exist_ok=True)
        (tmp_path / "kv" / f"{name}.json").write_text(json.dumps(conv | {"id": name}))
    tr = plan.load([tmp_path / "kv"], "kv-cache-tester")
    assert tr.session.tolist() == [0, 1, 0, 1]             # by conversation; sub-agents too
    scoped = json.dumps(conv | {"hash_id_scope": "global"})
    (tmp_path / "kv" / "x.json").write_text(scoped)
    (tmp_path / "kv" / "y.json").write_text(scoped)
    tr = plan.load([tmp_path / "kv"], "kv-cache-tester")
    assert tr.namespaces == 1 and tr.session.tolist() == [0, 1, 0, 1]   # any hash scope


def test_session_hash_is_fixed():
    # a fixed function of the session id (the figures in docs/planning.md depend on it)
    assert [session_replica(i, 4) for i in range(8)] == [3, 1, 2, 1, 2, 2, 0, 3]
    assert [session_replica(i, 2) for i in range(4)] == [1, 1, 0, 1]


# --------------------------------------------------------------------------- routing
def test_session_routing_hits_where_random_misses(tmp_path):
    tr = trace_of(tmp_path, TWO_SESSIONS)
    s = replay_fleet(tr, cache(), Fleet(2, "session"))
    assert s.replica_of == [1, 1, 1, 1]                     # both sessions hash to 1
    assert s.hit_tokens == 8 + 8 and s.blocks_prefilled == 6 and s.prefills_per_block == 1.0
    # random, seed 0: draws 1, 1, 0, 1: a's second turn lands on replica 0 and misses
    draw = random.Random(0).randrange
    assert [draw(2) for _ in range(4)] == [1, 1, 0, 1]
    r = replay_fleet(tr, cache(), Fleet(2, "random", seed=0))
    assert r.replica_of == [1, 1, 0, 1] and r.requests_by_replica == [1, 3]
    assert r.hit_tokens == 8 and r.blocks_prefilled == 2 + 2 + 3 + 1
    assert r.prefills_per_block == pytest.approx(8 / 6)
    assert r.hit_rate == pytest.approx(8 / 40)
    # the shared tier turns that cross-replica request into a hit
    rs = replay_fleet(tr, cache(), Fleet(2, "random", math.inf, seed=0))
    assert rs.hit_tokens == 16 and rs.hit_tokens_by_tier == {"cache": 8, "shared": 8}
    assert rs.prefills_per_block == 1.0
    assert rs.shared_written_tokens == 6 * 4                # every block, once
    # another seed: other draws (the seed is used)
    assert replay_fleet(tr, cache(), Fleet(2, "random", seed=1)).replica_of != r.replica_of


def test_each_replica_has_its_own_tiers(tmp_path):
    """Four replicas: sessions a, b hash to replicas 3 and 1, each with room for two
    blocks: both second turns hit. One replica of the same size: they evict each other."""
    tr = trace_of(tmp_path, TWO_SESSIONS)
    four = replay_fleet(tr, cache(8), Fleet(4, "session"))
    assert four.replica_of == [3, 1, 3, 1] and four.requests_by_replica == [0, 2, 0, 2]
    assert four.hit_tokens == 16
    assert four.peak_used_tokens == {"cache": 16}           # summed over the replicas
    one = replay_fleet(tr, cache(8), Fleet(1, "session"))
    assert one.hit_tokens == 0
    same(one, plan.replay(tr, cache(8)))


LEAST_LOADED = [{"t": 0, "hash_ids": [1, 2], "duration": 1, "namespace": "a"},   # -> 0
                {"t": 2, "hash_ids": [9], "duration": 20, "namespace": "x"},       # tie -> 0
                {"t": 3, "hash_ids": [1, 2, 3], "duration": 5, "namespace": "a"},  # 0 busy -> 1
                {"t": 4, "hash_ids": [1, 2, 3, 4], "namespace": "a"}]              # 1-1 tie -> 0


def test_least_loaded_routing_and_the_shared_tier(tmp_path):
    tr = trace_of(tmp_path, LEAST_LOADED)
    ll = replay_fleet(tr, cache(), Fleet(2, "least-loaded"))
    assert ll.replica_of == [0, 0, 1, 0]
    # the third request lands where its prefix is not: prefilled again; the fourth
    # finds [1, 2] on replica 0 ([1, 2, 3] is still in flight on replica 1)
    assert ll.hit_tokens == 8 and ll.blocks_prefilled == 2 + 1 + 3 + 2
    assert ll.prefills_per_block == pytest.approx(8 / 5)
    sh = replay_fleet(tr, cache(), Fleet(2, "least-loaded", math.inf))
    assert sh.hit_tokens_by_tier == {"cache": 8, "shared": 8}
    assert sh.blocks_prefilled == 2 + 1 + 1 + 2 and sh.prefills_per_block == pytest.approx(6 / 5)
    # session routing keeps a on one replica: a plain hit
    assert replay_fleet(tr, cache(), Fleet(2, "session")).hit_tokens == 16


def test_shared_tier_capacity_and_ttl(tmp_path):
    tr = trace_of(tmp_path, LEAST_LOADED)
    # room for one block: stored last block first, [1] evicts [2] and stays
    one = replay_fleet(tr, cache(), Fleet(2, "least-loaded", 4))
    assert one.hit_tokens_by_tier == {"cache": 8, "shared": 4}
    assert one.peak_used_tokens["shared"] == 4
    # the replicas' TTL: [1, 2] last used at t=1, asked for at t=3; TTL 2 s: expired
    for ttl, shared_hit in ((2.0, 0), (2.5, 8)):
        res = replay_fleet(tr, cache(ttl=ttl), Fleet(2, "least-loaded", math.inf))
        assert res.tiers[-1] == TierSpec("shared", math.inf, ttl)
        assert res.hit_tokens_by_tier["shared"] == shared_hit
    # behind a hierarchy: the TTL of kvtier's tiers, not of vLLM's GPU cache
    res = replay_fleet(tr, [TierSpec("hbm", 100), TierSpec("dram", 100, 60)],
                       Fleet(2, "random", 1000))
    assert res.tiers[-1] == TierSpec("shared", 1000, 60)


# --------------------------------------------------------------------------- one replica
def synthetic(tmp_path, sessions=12, turns=25, seed=7):
    """Conversations that grow a prefix turn by turn (plus a system prompt shared by
    all of one namespace), with think times, durations, partial last blocks and some
    per-request TTLs."""
    rng = np.random.default_rng(seed)
    recs = []
    for s in range(sessions):
        t, ids, nxt = float(rng.uniform(0, 50)), [0, 1], 1000 * (s + 1)
        for _ in range(turns):
            add = int(rng.integers(1, 6))
            ids = ids + list(range(nxt, nxt + add))
            nxt += add
            rec = {"t": t, "hash_ids": ids, "input_tokens": 4 * len(ids) - int(rng.integers(0, 4)),
                   "duration": float(rng.choice([0.0, rng.uniform(0, 8)])),
                   "namespace": f"ns{s % 3}"}
            if rng.random() < 0.15:
                rec["ttl"] = float(rng.choice([30, 120]))
            recs.append(rec)
            t += float(rng.exponential(20))
    return trace_of(tmp_path, recs)


CONFIGS = [cache(), cache(40, 25), cache(200),
           [TierSpec("hbm", 24), TierSpec("dram", 80, 25), TierSpec("nvme", 400, 25)],
           [TierSpec("hbm", 16, 10), TierSpec("dram", 60), TierSpec("nvme", math.inf, 60)],
           [TierSpec("dram", 40, 30), TierSpec("nvme", 120, 30)]]


@pytest.mark.parametrize("tiers", CONFIGS, ids=lambda c: "+".join(
    f"{s.name}{s.capacity_tokens:g}@{s.ttl_s:g}" for s in c))
def test_one_replica_is_the_single_replay(tmp_path, tiers):
    tr = synthetic(tmp_path)
    assert tr.ttl is not None and (tr.last_tokens < 4).any()
    base = plan.replay(tr, tiers)
    assert 0 < base.hit_tokens < base.input_tokens
    for routing in plan.ROUTINGS:
        same(replay_fleet(tr, tiers, Fleet(1, routing)), base)


def test_unbounded_shared_tier_is_one_big_cache(tmp_path):
    """Whatever the routing, replicas backed by an unbounded shared tier with their TTL
    hit exactly what one unbounded cache with that TTL hits (every completion stores
    every block in it; any replica finds it there)."""
    tr = synthetic(tmp_path)
    for ttl in (25, math.inf):
        big = plan.replay(tr, cache(ttl=ttl))
        for routing in plan.ROUTINGS:
            res = replay_fleet(tr, [TierSpec("dram", 40, ttl)], Fleet(5, routing, math.inf))
            assert res.hit_tokens == big.hit_tokens
            assert res.blocks_prefilled == big.blocks_prefilled
            # and holds what it holds: its peak is the big cache's peak working set
            assert res.peak_used_tokens["shared"] == big.peak_used_tokens["cache"]
            no = replay_fleet(tr, [TierSpec("dram", 40, ttl)], Fleet(5, routing))
            assert no.hit_tokens < res.hit_tokens


def test_one_replica_on_dev_traces():
    if not DEV.exists():
        pytest.skip(f"{DEV} not found: the shared traces sit beside the repo")
    tr = plan.load(sorted(DEV.glob("*.json"))[:6], "kv-cache-tester")
    tiers = [TierSpec("hbm", 2e5), TierSpec("dram", 5e5, 300), TierSpec("nvme", 2e6, 300)]
    same(replay_fleet(tr, tiers, Fleet(1, "random")), plan.replay(tr, tiers))


def test_fleet_errors(tmp_path):
    tr = trace_of(tmp_path, TWO_SESSIONS)
    with pytest.raises(PlanError, match="routing"):
        Fleet(2, "round-robin")
    with pytest.raises(PlanError, match=">= 1"):
        Fleet(0)
    with pytest.raises(PlanError, match="disk admission"):
        replay_fleet(tr, [TierSpec("dram", 8), TierSpec("nvme", 80, admission="second_use")],
                     Fleet(2))
    tr.session = None
    with pytest.raises(PlanError, match="sessions"):
        replay_fleet(tr, cache(), Fleet(2, "session"))


# --------------------------------------------------------------------------- CLI
def run(capsys, *argv) -> tuple[int, str, str]:
    rc = plan.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_fleet_rows(tmp_path, capsys):
    f = write_jsonl(tmp_path / "t.jsonl", TWO_SESSIONS)
    common = [f, "--block-tokens", "4", "--ttl", "60,inf", "--dram", "8", "--nvme", "inf",
              "--json", "-q"]
    rc, out, _ = run(capsys, *common, "--replicas", "1,2", "--routing", "session, random",
                     "--shared-tier", "inf")
    assert rc == 0
    rows = json.loads(out)
    assert len(rows) == 2 * 2 * 2 * 2                      # TTL x replicas x routing x shared
    assert rows == sorted(rows, key=lambda r: (r["ttl_s"] is None, r["replicas"],
                                               r["routing"] == "random", r["shared_tier"]))
    r2 = [r for r in rows if r["replicas"] == 2 and r["routing"] == "random"
          and r["ttl_s"] is None]
    assert [r["hit_tokens"] for r in r2] == [8, 16]        # as test_session_routing...
    assert r2[1]["hit_rate_by_tier"]["shared"] == pytest.approx(8 / 40)
    assert r2[0]["kind"] == "fleet" and r2[0]["requests_by_replica"] == [1, 3]
    assert r2[0]["capacity_tokens"] is None                # the replicas' last tier (nvme)
    assert [r["shared_peak_tokens"] for r in r2] == [0, 6 * 4]
    # one replica, no shared tier: the rows of the single-replica hierarchy
    rc, out, _ = run(capsys, *common)
    single = json.loads(out)
    one = [r for r in rows if r["replicas"] == 1 and r["routing"] == "session"
           and not r["shared_tier"]]
    for a, b in zip(one, single):
        for k in ("hit_rate", "hit_rate_by_tier", "prefills_per_block", "evictions",
                  "peak_working_set_tokens", "written_tokens"):
            assert a[k] == b[k], k
    rc, out, _ = run(capsys, f, "--block-tokens", "4", "--replicas", "2", "--routing",
                     "random", "--shared-tier", "1e3", "-q")
    assert rc == 0 and "from shared" in out and "1-3" in out


@pytest.mark.parametrize("argv, name", [
    (["--routing", "random"], "--routing"),                # needs --replicas
    (["--shared-tier", "1e6"], "--shared-tier"),
    (["--seed", "3"], "--seed"),
    (["--replicas", "0"], "--replicas"),
    (["--replicas", "2,x"], "--replicas"),
    (["--replicas", "2", "--routing", "round-robin"], "--routing"),
    (["--replicas", "2", "--shared-tier", "1GiB"], "--shared-tier"),
    (["--replicas", "2", "--dram", "8", "--nvme", "80", "--disk-admission", "second_use"],
     "--disk-admission"),
    (["--replicas", "2", "--size-ttl", "1h"], "--size-ttl"),
    (["--replicas", "2", "--plot", "plots"], "--plot"),
    (["--replicas", "2", "--seed", "-1"], "--seed"),
])
def test_cli_fleet_errors(tmp_path, capsys, argv, name):
    f = write_jsonl(tmp_path / "t.jsonl", TWO_SESSIONS)
    rc, out, err = run(capsys, f, "--block-tokens", "4", "-q", *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and f"argument {name}" in err, err
