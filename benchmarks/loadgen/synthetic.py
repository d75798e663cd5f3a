"""Synthetic agent swarm: an orchestrator and sub-agents over a shared context.

Each swarm is one session. Every agent's prompt starts with the same system
prompt + tool definitions (``system_tokens``, shared by *all* swarms, as one
coding agent's system prompt is) followed by the swarm's task (shared by the
swarm's agents). The orchestrator's context then grows turn by turn (tool
results, user messages) until it reaches ``high_watermark`` tokens; a
summarisation turn then replaces the history by a short summary, a new chain
(a compaction). Now and then the orchestrator launches a few sub-agents in
parallel; each starts from system + task + its instructions, runs a short
tool loop and returns a result that the orchestrator reads on its next turn.

Think times, output lengths and per-turn context growth are drawn from the
traces' empirical distributions (:meth:`TraceStats.from_dir`), or from built-in
quantiles measured on the 40 weka-cc-dev Claude Code traces (think time median
9 s, p90 141 s; output median 207 tokens; growth median 676 tokens/turn).
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import random
from dataclasses import dataclass

from .workload import TRACE_BLOCK, Session, SubAgent, Turn

_PCTS = (0, 10, 25, 50, 75, 90, 99, 100)


class Quantiles:
    """Inverse-CDF sampling from a quantile table (piecewise linear)."""

    def __init__(self, pcts, values):
        self.p = [x / 100.0 for x in pcts]
        self.v = list(values)

    @classmethod
    def of(cls, data, pcts=tuple(range(0, 101))) -> "Quantiles":
        xs = sorted(data)
        vals = [xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] for p in pcts]
        return cls(pcts, vals)

    def sample(self, rng: random.Random) -> float:
        u = rng.random()
        i = min(max(1, bisect.bisect_right(self.p, u)), len(self.p) - 1)
        p0, p1, v0, v1 = self.p[i - 1], self.p[i], self.v[i - 1], self.v[i]
        return v0 + (v1 - v0) * ((u - p0) / (p1 - p0) if p1 > p0 else 0.0)

    def median(self) -> float:
        return self.v[bisect.bisect_left(self.p, 0.5)]


@dataclass
class TraceStats:
    think: Quantiles      # s between a response and the next request
    output: Quantiles     # output tokens per turn
    growth: Quantiles     # new input tokens per turn (context growth)

    @classmethod
    def builtin(cls) -> "TraceStats":
        # Measured on /work/shared/traces/weka-cc-dev (40 Claude Code sessions).
        return cls(Quantiles(_PCTS, (0, 4, 5, 9, 26, 141, 2416, 10000)),
                   Quantiles(_PCTS, (1, 105, 136, 207, 420, 896, 4120, 32000)),
                   Quantiles(_PCTS, (0, 191, 341, 676, 1584, 3514, 12371, 60000)))

    @classmethod
    def from_dir(cls, trace_dir: str) -> "TraceStats":
        think, out, growth = [], [], []
        for path in sorted(glob.glob(os.path.join(trace_dir, "*.json"))):
            with open(path) as f:
                reqs = [r for r in json.load(f)["requests"] if r.get("type") != "subagent"]
            out += [r["out"] for r in reqs]
            for a, b in zip(reqs, reqs[1:]):
                if b.get("think_time") is not None:
                    think.append(b["think_time"])
                if b["in"] >= a["in"]:
                    growth.append(b["in"] - a["in"])
        if not (think and out and growth):
            raise ValueError(f"no usable requests in {trace_dir}")
        return cls(Quantiles.of(think), Quantiles.of(out), Quantiles.of(growth))


@dataclass(frozen=True)
class SwarmConfig:
    """Sizes in trace tokens (64 per hash id), before any Scale."""

    system_tokens: int = 17_000     # system prompt + tools (trace medians: 4k + 13k)
    task_tokens: int = 2_000
    high_watermark: int = 120_000   # context size that triggers a summary
    summary_tokens: int = 3_000     # context left after a summary (+ system + task)
    summary_output: int = 1_500
    turns: int = 40                 # orchestrator turns per swarm
    spawn_prob: float = 0.15        # chance a turn launches sub-agents ...
    max_subagents: int = 3          # ... 1..max_subagents of them, in parallel
    subagent_turns: int = 8         # mean turns of a sub-agent
    subagent_think_scale: float = 0.3   # sub-agents run tool loops: shorter thinks
    result_tokens: int = 1_500      # a sub-agent's result, read by the orchestrator
    api_s_per_token: float = 0.03   # estimated response time per output token (for `t`)


def _blocks(tokens: float) -> int:
    return max(1, round(tokens / TRACE_BLOCK))


class _Ids:
    def __init__(self, base: int):
        self.next = base

    def take(self, tokens: float) -> list[int]:
        n = _blocks(tokens)
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


def swarm_session(index: int, stats: TraceStats, cfg: SwarmConfig = SwarmConfig(),
                  seed: int = 0) -> Session:
    """One orchestrator session (with its sub-agents), deterministic in (index, seed)."""
    rng = random.Random(f"swarm/{seed}/{index}")
    name = f"swarm{index}"
    system = list(range(1, _blocks(cfg.system_tokens) + 1))   # shared namespace
    ids = _Ids(len(system) + 1)
    common = system + ids.take(cfg.task_tokens)
    nshared = len(system)

    def turn(hash_ids, out, t, think, agent, index):
        return Turn(list(hash_ids), len(hash_ids) * TRACE_BLOCK, int(out), t, think,
                    name, agent, index, nshared)

    turns: list[Turn] = []
    subs: list[SubAgent] = []
    ctx = list(common)
    t = 0.0
    pending_results = 0
    for i in range(cfg.turns):
        think = stats.think.sample(rng) if i else 0.0
        ctx += ids.take(stats.growth.sample(rng) + pending_results)
        pending_results = 0
        out = stats.output.sample(rng)
        if len(ctx) * TRACE_BLOCK >= cfg.high_watermark:
            # Summarise the whole context, then continue from a fresh, short chain.
            t += think
            turns.append(turn(ctx, cfg.summary_output, t, think, "main", len(turns)))
            t += cfg.summary_output * cfg.api_s_per_token
            ctx = common + ids.take(cfg.summary_tokens)
            think = 0.0
        t += think
        turns.append(turn(ctx, out, t, think, "main", len(turns)))
        t += out * cfg.api_s_per_token
        if rng.random() < cfg.spawn_prob:
            for _ in range(rng.randint(1, cfg.max_subagents)):
                agent = f"{name}/sub{len(subs)}"
                sub = _subagent(agent, common, ids, stats, cfg, rng, turn)
                subs.append(SubAgent(agent, t, 0.0, len(turns) - 1, sub))
                pending_results += cfg.result_tokens
    return Session(name, turns, subs)


def _subagent(agent, common, ids, stats, cfg, rng, turn) -> Session:
    n = max(1, round(rng.expovariate(1.0 / cfg.subagent_turns)))
    ctx = list(common) + ids.take(cfg.task_tokens / 4)
    turns, t = [], 0.0
    for j in range(n):
        think = stats.think.sample(rng) * cfg.subagent_think_scale if j else 0.0
        if j:
            ctx += ids.take(stats.growth.sample(rng))
        out = stats.output.sample(rng)
        t += think
        turns.append(turn(ctx, out, t, think, agent, j))
        t += out * cfg.api_s_per_token
    return Session(agent, turns)


def swarm_sessions(n: int, stats: TraceStats, cfg: SwarmConfig = SwarmConfig(),
                   seed: int = 0) -> list[Session]:
    return [swarm_session(i, stats, cfg, seed) for i in range(n)]
