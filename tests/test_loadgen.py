"""Fast tests of the load generator (no server): token mapping, scaling,
sub-agents, timing, SLO ramp, Prometheus parsing, synthetic swarm."""

import asyncio
import heapq
import json
import os
import random
from pathlib import Path

import pytest

from benchmarks.loadgen import (SLO, LoadConfig, Player, RampController, RequestResult, Scale,
                                Session, SubAgent, SwarmConfig, TokenMap, TraceStats, Turn,
                                Workload, block_keys, counters_delta, describe_request_set,
                                load_trace, load_traces, parse_prometheus, percentile,
                                poisson_arrivals, server_counters, swarm_session)
from benchmarks.loadgen.synthetic import Quantiles
from benchmarks.loadgen.workload import SHARED_NAMESPACE

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "weka-cc-dev"
needs_traces = pytest.mark.skipif(
    not TRACES.is_dir(),
    reason=f"weka-cc-dev traces not found at {TRACES} (expected ../shared relative to the repo)")


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def turn(ids, ns="conv", inp=None, **kw):
    return Turn(list(ids), inp if inp is not None else 64 * len(ids), 100, namespace=ns, **kw)


# ------------------------------------------------------------------ token mapping

@pytest.mark.parametrize("tph", [1, 8, 64])
def test_shared_hash_ids_share_exactly_their_tokens(tph):
    tm = TokenMap(Scale(tokens_per_hash=tph, vocab_size=50_000))
    a = tm.prompt(turn([1, 2, 3, 4, 5]))
    b = tm.prompt(turn([1, 2, 3, 9, 10, 11]))
    assert len(a) == 5 * tph and len(b) == 6 * tph
    assert a[:3 * tph] == b[:3 * tph]
    assert common_prefix(a, b) == 3 * tph          # differ right after the shared ids
    assert tm.prompt(turn([1, 2, 3, 4, 5])) == a    # deterministic


def test_namespaces_separate_conversations_and_shared_prefix_joins_them():
    tm = TokenMap(Scale(tokens_per_hash=8, vocab_size=50_000))
    a = tm.prompt(turn([1, 2, 3], ns="x"))
    b = tm.prompt(turn([1, 2, 3], ns="y"))
    assert common_prefix(a, b) == 0
    a = tm.prompt(turn([1, 2, 3], ns="x", shared_prefix=2))
    b = tm.prompt(turn([1, 2, 3], ns="y", shared_prefix=2))
    assert common_prefix(a, b) == 16
    assert tm.block(SHARED_NAMESPACE, 1) == a[:8]


def test_tokens_within_vocab():
    tm = TokenMap(Scale(tokens_per_hash=64, vocab_size=300))
    toks = tm.prompt(turn(range(1, 50), inp=49 * 64 + 40))
    assert len(toks) == 49 * 64 + 40
    assert min(toks) >= 0 and max(toks) < 300


def test_block_keys_follow_prefix_identity():
    sc = Scale(tokens_per_hash=8)
    a, b = turn(range(1, 17)), turn(list(range(1, 9)) + [100, 101, 102, 103])
    ka, kb = block_keys(a, sc, 32), block_keys(b, sc, 32)
    assert len(ka) == 16 * 8 // 32 and len(kb) == 12 * 8 // 32
    assert ka[:2] == kb[:2] and ka[2] != kb[2]
    # The tail of a partial trace block is private to the request.
    sc = Scale(tokens_per_hash=32)
    t1, t2 = turn([1, 2, 3, 4], inp=4 * 64 + 64 - 2, index=1), turn([1, 2, 3, 4], inp=4 * 64 + 62, index=2)
    k1, k2 = block_keys(t1, sc, 32), block_keys(t2, sc, 32)
    assert sc.tail_len(t1) == 31 and len(k1) == 4     # partial block: no key
    t1.input_tokens = t2.input_tokens = 4 * 64 + 64
    k1, k2 = block_keys(t1, sc, 32), block_keys(t2, sc, 32)
    assert k1[:4] == k2[:4] and len(k1) == 5 and k1[4] != k2[4]


# ------------------------------------------------------------------ scaling

def test_scaling_knobs():
    sc = Scale(tokens_per_hash=8, output_scale=0.1, max_output_tokens=50,
               time_scale=0.1, max_think=3.0)
    t = Turn([1] * 10, 10 * 64 + 32, 207)
    assert sc.prompt_len(t) == 80 + 4                  # 32 of 64 tail tokens -> 4 of 8
    assert sc.max_tokens(t) == 21
    assert sc.max_tokens(Turn([1], 64, 4000)) == 50    # capped
    assert sc.max_tokens(Turn([1], 64, 2)) == 1        # at least one
    assert sc.think(9.0) == pytest.approx(0.9)
    assert sc.think(2416.0) == 3.0                     # long tail capped
    assert Scale().prompt_len(t) == t.input_tokens     # 64 tokens per hash: as traced


def test_max_context_drops_long_turns_and_keeps_subagents_anchored():
    sub = Session("c", [turn([50, 51], agent="a1")])
    s = Session("c", [turn([1]), turn([1, 2, 3, 4]), turn([1, 2])],
                [SubAgent("a1", 5.0, 1.0, 1, sub)])
    w = Workload([s], Scale(tokens_per_hash=8, max_context=16))
    kept = w.sessions[0]
    assert [len(t.hash_ids) for t in kept.turns] == [1, 2]
    assert kept.subagents[0].after == 0               # its parent turn 1 was dropped
    with pytest.raises(ValueError):
        Workload([s], Scale(tokens_per_hash=8, max_context=4))


def test_sampling_sequential_random_and_fresh_copies():
    sessions = [Session(n, [turn([1, 2], ns=n)]) for n in ("a", "b", "c")]
    w = Workload(sessions, Scale(), "sequential")
    names = [w.next_session().turns[0].namespace for _ in range(7)]
    assert names == ["a", "b", "c", "a#1", "b#1", "c#1", "a#2"]
    r1 = Workload(sessions, Scale(), "random", seed=3)
    r2 = Workload(sessions, Scale(), "random", seed=3)
    assert [r1.next_session().name for _ in range(10)] == [r2.next_session().name for _ in range(10)]


def test_truncated_keeps_first_turns_and_drops_later_subagents():
    early = Session("c", [turn([50, 51], agent="a1", index=k) for k in range(4)])
    late = Session("c", [turn([60], agent="a2")])
    s = Session("c", [turn(range(1, 2 + k), index=k) for k in range(5)],
                [SubAgent("a1", 1.0, 0.5, 0, early), SubAgent("a2", 9.0, 0.5, 3, late)])
    t = s.truncated(2)
    assert [x.index for x in t.turns] == [0, 1]
    assert [sa.agent_id for sa in t.subagents] == ["a1"]          # a2 followed turn 3
    assert [x.index for x in t.subagents[0].session.turns] == [0, 1]
    assert t.num_turns() == 4 and s.num_turns() == 10
    assert s.truncated(0) is s
    w = Workload([s], Scale(tokens_per_hash=8), max_turns=3)
    assert w.sessions[0].num_turns() == 6 and w.describe()["max_turns"] == 3


def test_request_set_is_fixed_longest_first_and_fresh_copies():
    sessions = [Session(n, [turn([1, 2], ns=n, index=k) for k in range(m)])
                for n, m in (("a", 1), ("b", 3), ("c", 2))]
    w = Workload(sessions, Scale(), "sequential")
    first = w.request_set(5)
    w.next_session(), w.next_session()               # earlier picks change nothing
    assert w.request_set(5) == first
    # picks a b c a#1 b#1, longest first, ties in pick order
    assert [s.turns[0].namespace for s in first] == ["b", "b#1", "c", "a", "a#1"]
    assert [s.turns[0].namespace for s in w.request_set(5, "in-order")] == \
        ["a", "b", "c", "a#1", "b#1"]
    with pytest.raises(ValueError):
        w.request_set(2, "shortest-first")
    r = Workload(sessions, Scale(), "random", seed=5)
    assert r.request_set(6) == r.request_set(6)


def test_describe_request_set_counts_distinct_blocks_and_digests_prompts():
    sc = Scale(tokens_per_hash=32)
    a = Session("a", [turn([1, 2], ns="a", index=0), turn([1, 2, 3], ns="a", index=1)])
    b = Session("b", [turn([1, 2], ns="b", index=0)])
    d = describe_request_set([a, b], sc, 32)
    # a: blocks 1,2,3 (turn 1 re-uses 1,2); b: its own 1,2 (another namespace)
    assert (d["sessions"], d["requests"], d["working_set_blocks"]) == (2, 3, 5)
    assert d["prompt_tokens"] == 7 * 32 and d["output_tokens"] == 3 * 100
    assert describe_request_set([a, b], sc, 32)["digest"] == d["digest"]
    b2 = Session("b", [turn([1, 7], ns="b", index=0)])
    assert describe_request_set([a, b2], sc, 32)["digest"] != d["digest"]
    assert describe_request_set([b, a], sc, 32)["digest"] != d["digest"]   # order counts


def test_poisson_arrivals_are_seeded_exponential():
    t = poisson_arrivals(4000, 2.0, seed=1)
    assert t[0] == 0.0 and all(x < y for x, y in zip(t, t[1:]))
    gaps = [y - x for x, y in zip(t, t[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.06)
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.5 * 0.693, rel=0.08)   # median ln2/rate
    assert poisson_arrivals(10, 2.0, seed=1) == t[:10]
    assert poisson_arrivals(10, 2.0, seed=2) != t[:10]
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0.0)
    with pytest.raises(ValueError):
        LoadConfig(sessions=3, arrival="poisson")          # no rate
    with pytest.raises(ValueError):
        LoadConfig(rate=1.0, arrival="poisson")            # no fixed set
    with pytest.raises(ValueError):
        LoadConfig(arrival="burst")


# ------------------------------------------------------------------ traces, sub-agents

def write_trace(tmp_path):
    d = {"id": "trace_x", "block_size": 64, "hash_id_scope": "local", "requests": [
        {"t": 0.0, "type": "n", "in": 200, "out": 10, "hash_ids": [1, 2, 3],
         "api_time": 1.0, "think_time": 0.0},
        {"type": "subagent", "t": 2.0, "agent_id": "agent_001", "requests": [
            {"t": 0.0, "type": "n", "in": 128, "out": 5, "hash_ids": [90, 91],
             "api_time": 1.0, "think_time": 0.0},
            {"t": 3.0, "type": "n", "in": 192, "out": 5, "hash_ids": [90, 91, 92],
             "api_time": 1.0, "think_time": 2.0}]},
        {"t": 5.0, "type": "n", "in": 260, "out": 10, "hash_ids": [1, 2, 3, 4],
         "api_time": 1.0, "think_time": 4.0},
        {"t": 9.0, "type": "s", "in": 320, "out": 10, "hash_ids": [1, 2, 3, 4, 5]},
    ]}
    p = tmp_path / "trace_x.json"
    p.write_text(json.dumps(d))
    return p


def test_trace_loading_and_subagent_namespace(tmp_path):
    s = load_trace(str(write_trace(tmp_path)))
    assert [t.index for t in s.turns] == [0, 1, 2]
    assert s.turns[2].think == pytest.approx(9.0 - (5.0 + 1.0))   # derived from t/api_time
    (sa,) = s.subagents
    assert (sa.agent_id, sa.after, sa.t, sa.gap) == ("agent_001", 0, 2.0, 1.0)
    assert all(t.namespace == "trace_x" and t.agent == "agent_001" for t in sa.session.turns)
    copy = s.renamed("trace_x#1")
    assert {t.namespace for t in copy.all_turns()} == {"trace_x#1"}


class VirtualTime:
    """Deterministic virtual clock for asyncio tasks that only sleep through it."""

    def __init__(self):
        self.now, self.heap, self.seq = 0.0, [], 0

    def clock(self):
        return self.now

    async def sleep(self, dt):
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self.heap, (self.now + max(dt, 0.0), self.seq, fut))
        self.seq += 1
        await fut

    async def run(self, coro):
        task = asyncio.ensure_future(coro)
        while True:
            for _ in range(50):
                await asyncio.sleep(0)
            if task.done():
                return task.result()
            when, _, fut = heapq.heappop(self.heap)
            self.now = max(self.now, when)
            fut.set_result(None)


def replay(session, timing, scale=Scale()):
    vt = VirtualTime()
    sent = []

    async def send(t):
        sent.append((vt.now, t.agent, t.index, t.namespace))
        await vt.sleep(1.0)                         # every request takes 1 s

    player = Player(send, scale, timing, clock=vt.clock, sleep=vt.sleep)
    asyncio.run(vt.run(player.play(session, start=0.0)))
    return sorted(sent)


def test_subagent_timing_think_and_original(tmp_path):
    s = load_trace(str(write_trace(tmp_path)))
    # think: main0 0-1; sub starts 1 + gap 1 = 2, sub1 at 3 + think 2 = 5;
    # main1 at 1 + 4 = 5, main2 at 6 + 3 = 9. The parent does not wait for the sub-agent.
    assert replay(s, "think") == [
        (0.0, "main", 0, "trace_x"), (2.0, "agent_001", 0, "trace_x"),
        (5.0, "agent_001", 1, "trace_x"), (5.0, "main", 1, "trace_x"),
        (9.0, "main", 2, "trace_x")]
    # original: at the trace's t (sub-agent at parent start + 2, its turns relative to that).
    assert [(t, a, i) for t, a, i, _ in replay(s, "original")] == [
        (0.0, "main", 0), (2.0, "agent_001", 0), (5.0, "agent_001", 1),
        (5.0, "main", 1), (9.0, "main", 2)]
    # time scale 0.5 and a think cap of 1 s.
    got = replay(s, "think", Scale(time_scale=0.5, max_think=1.0))
    assert [(t, a, i) for t, a, i, _ in got] == [
        (0.0, "main", 0), (1.5, "agent_001", 0), (2.0, "main", 1), (3.5, "agent_001", 1),
        (4.0, "main", 2)]


@needs_traces
def test_real_traces_keep_prefix_structure():
    sc = Scale(tokens_per_hash=8, vocab_size=50_000)
    tm = TokenMap(sc)
    sessions = load_traces(str(TRACES))
    assert len(sessions) == 40
    checked = 0
    for s in sessions[:5]:
        for a, b in zip(s.turns, s.turns[1:8]):
            shared = common_prefix(a.hash_ids, b.hash_ids)
            pa, pb = tm.prompt(a), tm.prompt(b)
            assert len(pa) == sc.prompt_len(a)
            assert common_prefix(pa, pb) >= shared * 8
            if shared < min(len(a.hash_ids), len(b.hash_ids)):
                assert common_prefix(pa, pb) == shared * 8
            checked += 1
    assert checked > 20
    subs = [sa for s in sessions for sa in s.subagents]
    assert subs and all(t.namespace == s.turns[0].namespace
                        for s in sessions for sa in s.subagents for t in sa.session.turns)


# ------------------------------------------------------------------ SLO ramp

def res(start, ttft, tpot=0.01, ok=True):
    r = RequestResult(0, "s", "main", 0, start, end=start + ttft + 1, ttft=ttft, tpot=tpot,
                      output_tokens=10, ok=ok)
    return r


def test_slo_check_and_request_ok():
    slo = SLO(ttft_p95=1.0, min_tokens_per_s=20)
    ok, fig = slo.check([res(0, 0.2), res(0, 0.5)])
    assert ok and fig["ttft_max"] == 0.5
    assert not slo.check([res(0, 0.2)] * 10 + [res(0, 5.0)] * 2)[0]
    assert not slo.check([res(0, 0.2, tpot=0.1)])[0]          # 10 tok/s < 20
    assert not slo.check([res(0, 0.2), res(0, 0.1, ok=False)])[0]
    assert slo.request_ok(res(0, 0.5)) and not slo.request_ok(res(0, 1.5))
    assert not SLO().active and SLO(ttft_avg=1).active


def test_ramp_climbs_to_capacity_then_oscillates_around_it():
    ctl = RampController(2, step=2, interval=10, max_users=20, slo=SLO(ttft_p95=1.0),
                         min_requests=3)
    results = []
    latency = {2: 0.2, 4: 0.4, 6: 0.8, 8: 3.0}         # fake server: TTFT by user count
    seen = []
    for now in range(0, 201, 1):
        done = [r for r in results if r.end <= now]
        seen.append(ctl.update(float(now), done))
        if now % 2 == 0:                                # one request started every 2 s
            results.append(res(now, latency.get(ctl.target, 3.0)))
    assert ctl.max_users_within_slo == 6
    assert max(seen) == 8
    assert [h["users"] for h in ctl.history[:6]] == [2, 4, 6, 8, 6, 8]
    assert [h["ok"] for h in ctl.history[:6]] == [True, True, True, False, True, False]


def test_ramp_survives_a_cold_first_window():
    ctl = RampController(2, step=2, interval=10, max_users=8, slo=SLO(ttft_p95=1.0),
                         min_requests=1)
    assert ctl.update(10.0, [res(1, 5.0)]) == 1         # cold cache: violated, one user
    assert ctl.max_users_within_slo is None
    assert ctl.update(20.0, [res(11, 0.1)]) == 3        # warm: the ramp goes on
    assert ctl.update(30.0, [res(21, 0.1)]) == 5
    assert ctl.max_users_within_slo == 3


def test_ramp_counts_a_user_level_only_when_mostly_within_slo():
    ctl = RampController(4, step=2, interval=10, max_users=6, slo=SLO(ttft_max=1.0),
                         min_requests=1)
    ctl.update(10.0, [res(1, 0.1)])                     # 4 ok -> 6
    ctl.update(20.0, [res(11, 0.1)])                    # 6 ok once -> stays 6 (max)
    ctl.update(30.0, [res(21, 5.0)])                    # 6 violated -> 4
    ctl.update(40.0, [res(31, 0.1)])                    # 4 ok -> 6
    assert ctl.max_users_within_slo == 6                # 6: one ok, one violated
    ctl.update(50.0, [res(41, 5.0)])                    # 6 violated again
    assert ctl.max_users_within_slo == 4


def test_ramp_waits_for_enough_requests_and_detects_stuck_server():
    ctl = RampController(4, step=2, interval=10, slo=SLO(ttft_max=2.0), patience=3)
    assert ctl.update(10.0, [res(1, 0.1)] * 7) == 4     # too few finished: no decision
    assert ctl.update(12.0, [res(1, 0.1)] * 8) == 6     # the window grew: judged, ok
    ctl = RampController(4, step=2, interval=10, slo=SLO(ttft_max=2.0), patience=3)
    assert ctl.update(10.0, []) == 4
    assert ctl.update(20.0, [], in_flight_starts=[1.0]) == 4
    assert ctl.update(30.0, [], in_flight_starts=[1.0]) == 2   # stuck 29 s > 2 s
    assert ctl.history[-1]["stuck"] and not ctl.history[-1]["ok"]


def test_fixed_users_still_reports_max_within_slo():
    ctl = RampController(3, step=0, interval=5, slo=SLO(ttft_avg=1.0), min_requests=3)
    ctl.update(5.0, [res(1, 0.1)] * 3)
    assert ctl.target == 3 and ctl.max_users_within_slo == 3
    ctl.update(10.0, [res(6, 9.0)] * 3)
    assert ctl.target == 3 and ctl.max_users_within_slo == 3


# ------------------------------------------------------------------ metrics

SAMPLE = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
vllm:prompt_tokens_created{engine="0",model_name="m"} 1.79e+09
vllm:prompt_tokens_cached_total{engine="0",model_name="m"} 700.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 400.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 300.0
vllm:generation_tokens_total{engine="0",model_name="m"} 50.0
vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="m",source="device"} 400.0
vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="m",source="host"} 200.0
vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="m",source="disk"} 100.0
vllm:kv_cache_usage_perc{engine="0",model_name="m \\"x\\""} 0.5
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 12.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 30.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 12.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 6.0
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 12.0
"""


def test_prometheus_parsing_and_delta():
    s = parse_prometheus(SAMPLE)
    assert s["vllm:kv_cache_usage_perc"][0][0]["model_name"] == 'm "x"'
    assert s["vllm:time_to_first_token_seconds_bucket"][0][0]["le"] == "+Inf"
    after = server_counters(SAMPLE)
    assert after["prompt_tokens"] == 1000 and after["external_prefix_cache_hits"] == 300
    assert after["cached_by_source"] == {"device": 400, "host": 200, "disk": 100}
    assert after["preemptions"] is None
    before = server_counters(SAMPLE.replace("1000.0", "600.0").replace("700.0", "500.0")
                             .replace("} 200.0", "} 100.0"))
    d = counters_delta(before, after)
    assert d["prompt_tokens"] == 400 and d["cached_tokens"] == 200
    assert d["cached_by_source"]["host"] == 100 and d["cached_by_source"]["device"] == 0
    assert d["hit_rate"] == pytest.approx(0.5)
    assert after["queue_time_n"] == 12 and d["queue_time_s_mean"] is None   # no requests
    before2 = server_counters(SAMPLE.replace("} 30.0", "} 10.0").replace("} 12.0", "} 4.0"))
    d2 = counters_delta(before2, after)
    assert d2["queue_time_s_mean"] == pytest.approx(20.0 / 8)             # this run's own
    assert d2["prefill_time_s_mean"] == pytest.approx(0.0)                 # 6 - 6 over 8
    assert counters_delta(None, after) is None


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([0, 10], 95) == pytest.approx(9.5)


# ------------------------------------------------------------------ synthetic swarm

def test_swarm_shares_context_grows_and_summarises():
    cfg = SwarmConfig(system_tokens=6400, task_tokens=640, high_watermark=64 * 400,
                      summary_tokens=640, turns=60, spawn_prob=0.3)
    stats = TraceStats.builtin()
    s0, s1 = swarm_session(0, stats, cfg), swarm_session(1, stats, cfg)
    tm = TokenMap(Scale(tokens_per_hash=4, vocab_size=50_000))
    p0, p1 = tm.prompt(s0.turns[0]), tm.prompt(s1.turns[0])
    assert common_prefix(p0, p1) == 100 * 4            # the system prompt, across swarms
    sizes = [len(t.hash_ids) for t in s0.turns]
    assert max(sizes) * 64 >= cfg.high_watermark
    drops = [i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1]]
    assert drops, "context never summarised"
    i = drops[0]
    assert s0.turns[i - 1].output_tokens == cfg.summary_output   # the summary turn
    assert s0.subagents
    for sa in s0.subagents:
        first = sa.session.turns[0]
        assert first.hash_ids[:110] == s0.turns[0].hash_ids[:110]   # system + task
        assert first.namespace == s0.turns[0].namespace and first.agent == sa.agent_id
    assert swarm_session(0, stats, cfg) == s0                        # deterministic


def test_quantiles_sampling():
    q = Quantiles.of(list(range(1001)))
    rng = random.Random(0)
    xs = sorted(q.sample(rng) for _ in range(4000))
    assert 450 < xs[2000] < 550 and xs[0] >= 0 and xs[-1] <= 1000
    assert TraceStats.builtin().think.median() == 9


@needs_traces
def test_trace_stats_from_traces():
    st = TraceStats.from_dir(str(TRACES))
    assert 5 <= st.think.median() <= 15          # README: think time median 10 s
    assert 100 <= st.output.median() <= 400


# ------------------------------------------------------------------ end to end, fake server

class FakeServer:
    """An in-process OpenAI-compatible server that streams tokens and reports a
    simulated prefix-cache hit; it records every prompt and the concurrency."""

    def __init__(self, delay: float = 0.002):
        self.delay = delay
        self.cached_blocks: set = set()
        self.totals = {"prompt": 0, "cached": 0}
        self.prompts: list[tuple] = []
        self.starts: list[float] = []
        self.in_flight = self.max_in_flight = 0

    async def __aenter__(self):
        from aiohttp import web

        async def models(_):
            return web.json_response({"data": [{"id": "fake"}]})

        async def metrics(_):
            t = self.totals
            return web.Response(text=(
                f'vllm:prompt_tokens_total{{engine="0"}} {t["prompt"]}\n'
                f'vllm:prompt_tokens_cached_total{{engine="0"}} {t["cached"]}\n'
                f'vllm:num_preemptions_total{{engine="0"}} 3\n'
                f'vllm:prompt_tokens_cached_by_source_total{{source="device"}} {t["cached"]}\n'))

        async def completions(req):
            body = await req.json()
            prompt, n = body["prompt"], body["max_tokens"]
            assert body["stream"] and all(isinstance(t, int) for t in prompt)
            self.prompts.append(tuple(prompt))
            self.starts.append(asyncio.get_running_loop().time())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                hit = 0
                while ((hit + 1) * 32 <= len(prompt) - 1
                       and tuple(prompt[:(hit + 1) * 32]) in self.cached_blocks):
                    hit += 1
                for j in range(len(prompt) // 32):
                    self.cached_blocks.add(tuple(prompt[:(j + 1) * 32]))
                self.totals["prompt"] += len(prompt)
                self.totals["cached"] += hit * 32
                resp = web.StreamResponse()
                await resp.prepare(req)
                for _ in range(n):
                    await asyncio.sleep(self.delay)
                    await resp.write(b'data: {"choices": [{"text": "x", "index": 0}]}\n\n')
                usage = {"prompt_tokens": len(prompt), "completion_tokens": n,
                         "prompt_tokens_details": {"cached_tokens": hit * 32}}
                await resp.write(
                    f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                return resp
            finally:
                self.in_flight -= 1

        app = web.Application()
        app.add_routes([web.get("/v1/models", models), web.get("/metrics", metrics),
                        web.post("/v1/completions", completions)])
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def test_run_load_against_fake_openai_server(tmp_path):
    """The whole loop (client SSE parsing, ramp, metrics, summary) on an in-process
    aiohttp server that streams tokens and reports a simulated prefix-cache hit."""
    from benchmarks.loadgen import run_load

    async def main():
        async with FakeServer() as srv:
            sessions = [Session(f"c{i}", [turn(range(1, 5 + 3 * k), ns=f"c{i}", index=k,
                                               think=1.0) for k in range(6)]) for i in range(3)]
            w = Workload(sessions, Scale(tokens_per_hash=16, time_scale=0.01, output_scale=0.05))
            cfg = LoadConfig(duration=2.5, users=1, ramp_step=1, ramp_interval=1.0, max_users=3,
                             slo=SLO(ttft_p95=5.0), progress_interval=1.0, block_size=32)
            return await run_load(srv.url, w, cfg, log=open(os.devnull, "w"))

    doc = asyncio.run(main())
    s = doc["summary"]
    assert s["mode"] == "timed"
    assert s["requests_ok"] > 6 and s["requests_failed"] == 0
    assert s["ttft"]["n"] == s["requests_ok"] and s["output_tok_s"] > 0
    assert 0 < s["hit_rate_client"] < 1
    assert s["hit_rate"] == pytest.approx(s["hit_rate_client"])   # from /metrics deltas
    assert s["cached_by_source"]["device"] == s["cached_tokens_client"]
    assert s["max_users_within_slo"] >= 2 and doc["ramp"]
    assert doc["timeline"] and sum(doc["reprefill_histogram"].values()) == s["working_set_blocks"]
    r = doc["requests"][0]
    assert r["prompt_tokens"] == 4 * 16 and r["output_tokens"] == 5 and r["tpot"] is not None


def fixed_set_workload():
    """Sessions of 1-5 turns (one with a sub-agent), think 1 s scaled to 10 ms."""
    sessions = []
    for i, m in enumerate((5, 1, 3, 2, 4, 1)):
        subs = []
        if i == 0:
            subs = [SubAgent("a1", 0.0, 0.5, 1, Session(
                "c0", [turn([70 + k, 71], ns="c0", agent="a1", index=k) for k in range(2)]))]
        sessions.append(Session(f"c{i}", [turn(range(1, 4 + 2 * k), ns=f"c{i}", index=k,
                                                think=1.0) for k in range(m)], subs))
    return Workload(sessions, Scale(tokens_per_hash=16, time_scale=0.01, output_scale=0.05))


def run_fixed(cfg, delay=0.002):
    from benchmarks.loadgen import run_load

    async def main():
        async with FakeServer(delay) as srv:
            doc = await run_load(srv.url, fixed_set_workload(), cfg, log=open(os.devnull, "w"))
            return doc, srv
    return asyncio.run(main())


@pytest.mark.parametrize("arrival", ["closed", "poisson"])
def test_fixed_request_set_is_served_exactly_once_to_the_end(arrival):
    w = fixed_set_workload()
    n = 8                                     # 6 sessions + two fresh copies (c0#1, c1#1)
    want = [t for s in w.request_set(n) for t in s.all_turns()]
    tm = TokenMap(w.scale)
    cfg = LoadConfig(users=2, sessions=n, arrival=arrival, rate=20.0, block_size=32,
                     progress_interval=0.2)
    doc, srv = run_fixed(cfg)
    s = doc["summary"]
    assert s["mode"] == "fixed" and s["complete"] and s["requests_failed"] == 0
    assert s["requests_expected"] == len(want) == s["requests_ok"] == 26   # 18 + 7 + 1
    # every prompt of the set, once each, nothing else
    assert sorted(srv.prompts) == sorted(tuple(tm.prompt(t)) for t in want)
    assert s["request_set"] == describe_request_set(w.request_set(n), w.scale, 32)
    ends = [r["end"] for r in doc["requests"]]
    assert s["makespan_s"] == pytest.approx(max(ends))
    assert s["output_tokens"] == sum(r["output_tokens"] for r in doc["requests"])
    assert s["output_tok_s"] == pytest.approx(s["output_tokens"] / s["makespan_s"])
    assert s["preemptions"] == 0                        # a delta of the server's counter
    assert sum(b["requests"] for b in doc["timeline"]) == len(want)
    # within a session, a turn starts after the previous turn of its agent ended
    by_agent = {}
    for r in sorted(doc["requests"], key=lambda r: r["start"]):
        key = (r["session"], r["agent"])
        if key in by_agent:
            assert r["start"] >= by_agent[key][1]
            assert r["turn"] > by_agent[key][0]
        by_agent[key] = (r["turn"], r["end"])
    if arrival == "closed":
        # two users, each at most its session's main agent + its sub-agent in flight
        # (c0 and c0#1, dealt first, both have one)
        assert srv.max_in_flight <= 4 and s["users"] == 2
    else:
        assert s["rate"] == 20.0 and s["users"] is None


def test_fixed_request_set_closed_loop_caps_concurrency_at_users():
    cfg = LoadConfig(users=1, sessions=5, block_size=32, progress_interval=0.2)
    doc, srv = run_fixed(cfg)
    # one user plays the sessions one after the other; session c0's sub-agent is the
    # only overlap (it runs beside its parent)
    assert doc["summary"]["complete"] and srv.max_in_flight <= 2
    starts = [(r["start"], r["session"]) for r in doc["requests"] if r["agent"] == "main"]
    order = [sess for _, sess in sorted(starts)]
    assert order.index("c4") < order.index("c3")       # longest first: c4 (4) before c3 (2)


def test_poisson_arrivals_start_sessions_at_their_times():
    cfg = LoadConfig(sessions=6, arrival="poisson", rate=4.0, arrival_seed=3, block_size=32,
                     progress_interval=0.2)
    doc, _ = run_fixed(cfg)
    at = poisson_arrivals(6, 4.0, 3)
    w = fixed_set_workload()
    firsts = {}
    for r in doc["requests"]:
        if r["agent"] == "main" and r["turn"] == 0:
            firsts[r["session"]] = r["start"]
    for s, t in zip(w.request_set(6), at):
        assert t - 0.01 <= firsts[s.name] <= t + 0.3


def test_fixed_request_set_time_limit_marks_the_run_incomplete():
    cfg = LoadConfig(users=1, sessions=8, block_size=32, time_limit=0.3, drain_timeout=5.0,
                     progress_interval=0.2)
    doc, _ = run_fixed(cfg, delay=0.05)
    s = doc["summary"]
    assert not s["complete"] and s["requests_ok"] < s["requests_expected"]
