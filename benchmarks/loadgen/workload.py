"""Workload model: sessions of turns whose prompts are chains of hash ids.

A *turn* is one request of one agent. Its prompt is the concatenation of the
token blocks of its ``hash_ids`` (chained: an equal id at the same position
means an equal block and an equal prefix before it) plus a short tail for the
trace's partial last block. Each hash id maps deterministically to
``tokens_per_hash`` token ids (SHAKE-128 of ``(namespace, hash_id)``), so two
prompts share exactly the tokens of their common hash-id prefix: the real
prefix structure of the trace, without a tokenizer.

The trace format is the one of WEKA's kv-cache-tester (Apache-2.0,
github.com/callanjfox/kv-cache-tester): ``{id, block_size: 64, hash_id_scope,
requests: [{t, in, out, hash_ids, api_time, think_time} |
{type: "subagent", t, agent_id, requests: [...]}]}``.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
from dataclasses import dataclass, field

TRACE_BLOCK = 64          # tokens per hash id in the traces
SHARED_NAMESPACE = "shared"


@dataclass(frozen=True)
class Scale:
    """Knobs that shrink a trace to a small machine."""

    tokens_per_hash: int = 64        # tokens sent per 64-token trace block
    vocab_size: int = 256            # token ids drawn from [0, vocab_size)
    output_scale: float = 1.0        # max_tokens = round(out * output_scale) ...
    max_output_tokens: int = 0       # ... capped here (0: no cap)
    time_scale: float = 1.0          # multiplies every trace time
    max_think: float = 0.0           # cap on a scaled think time, s (0: no cap)
    max_context: int = 0             # drop turns whose prompt exceeds this (0: keep)

    def prompt_len(self, turn: "Turn") -> int:
        return len(turn.hash_ids) * self.tokens_per_hash + self.tail_len(turn)

    def tail_len(self, turn: "Turn") -> int:
        rem = max(0, turn.input_tokens - TRACE_BLOCK * len(turn.hash_ids))
        return round(rem * self.tokens_per_hash / TRACE_BLOCK)

    def max_tokens(self, turn: "Turn") -> int:
        n = max(1, round(turn.output_tokens * self.output_scale))
        return min(n, self.max_output_tokens) if self.max_output_tokens else n

    def think(self, seconds: float) -> float:
        s = max(0.0, seconds) * self.time_scale
        return min(s, self.max_think) if self.max_think else s


@dataclass
class Turn:
    hash_ids: list[int]
    input_tokens: int            # trace input tokens (unscaled)
    output_tokens: int           # trace output tokens (unscaled)
    t: float = 0.0               # trace send time, s from its agent's start
    think: float = 0.0           # trace idle time before it, s after the previous turn ended
    namespace: str = ""
    agent: str = "main"
    index: int = 0
    shared_prefix: int = 0       # leading hash ids that live in SHARED_NAMESPACE

    def block_namespace(self, i: int) -> str:
        return SHARED_NAMESPACE if i < self.shared_prefix else self.namespace


@dataclass
class SubAgent:
    """A sub-agent launched by its parent; the parent does not wait for it."""

    agent_id: str
    t: float          # trace start time, s from the parent session's start
    gap: float        # trace time between the end of parent turn ``after`` and the start
    after: int        # index of the parent turn it follows (-1: before the first)
    session: "Session"


@dataclass
class Session:
    name: str
    turns: list[Turn]
    subagents: list[SubAgent] = field(default_factory=list)

    def all_turns(self):
        yield from self.turns
        for sa in self.subagents:
            yield from sa.session.all_turns()

    def renamed(self, namespace: str) -> "Session":
        """A copy whose private blocks live in ``namespace`` (a fresh conversation)."""
        return Session(
            namespace,
            [dataclasses.replace(t, namespace=namespace) for t in self.turns],
            [dataclasses.replace(sa, session=sa.session.renamed(namespace))
             for sa in self.subagents])

    def num_turns(self) -> int:
        """Requests of the session, its sub-agents' included."""
        return sum(1 for _ in self.all_turns())

    def truncated(self, max_turns: int) -> "Session":
        """The first ``max_turns`` turns of every agent; sub-agents launched after a
        dropped turn are dropped with it (0: the whole session)."""
        if max_turns <= 0:
            return self
        subs = [dataclasses.replace(sa, session=sa.session.truncated(max_turns))
                for sa in self.subagents if sa.after < max_turns]
        return Session(self.name, self.turns[:max_turns], [sa for sa in subs if sa.session.turns])

    def filtered(self, keep) -> "Session":
        """Drop the turns for which ``keep(turn)`` is false (and empty sub-agents)."""
        turns, subs, remap = [], [], {}
        for i, t in enumerate(self.turns):
            if keep(t):
                remap[i] = len(turns)
                turns.append(t)
            else:
                remap[i] = len(turns) - 1
        for sa in self.subagents:
            s = sa.session.filtered(keep)
            if s.turns:
                subs.append(dataclasses.replace(
                    sa, session=s, after=remap.get(sa.after, -1)))
        return Session(self.name, turns, subs)


class TokenMap:
    """hash id -> token ids, deterministic and cached."""

    def __init__(self, scale: Scale):
        self.n, self.vocab = scale.tokens_per_hash, scale.vocab_size
        self.scale = scale
        self._cache: dict[tuple[str, object], list[int]] = {}

    def block(self, namespace: str, key) -> list[int]:
        ck = (namespace, key)
        toks = self._cache.get(ck)
        if toks is None:
            toks = block_tokens(namespace, key, self.n, self.vocab)
            if len(self._cache) > 2_000_000:
                self._cache.clear()
            self._cache[ck] = toks
        return toks

    def prompt(self, turn: Turn) -> list[int]:
        out: list[int] = []
        for i, h in enumerate(turn.hash_ids):
            out += self.block(turn.block_namespace(i), h)
        tail = self.scale.tail_len(turn)
        if tail:
            key = f"tail/{turn.agent}/{turn.index}"
            out += block_tokens(turn.namespace, key, tail, self.vocab)
        return out


def block_tokens(namespace: str, key, n: int, vocab_size: int) -> list[int]:
    d = hashlib.shake_128(f"{namespace}\x1f{key}".encode()).digest(4 * n)
    return [int.from_bytes(d[4 * i:4 * i + 4], "little") % vocab_size for i in range(n)]


def block_keys(turn: Turn, scale: Scale, block_size: int) -> list[tuple]:
    """One identity per full server KV block of the prompt (for re-prefill counts).

    The block ending at token ``e`` is identified by the hash id covering ``e``
    and the offset of ``e`` inside it: chained ids make that the whole prefix.
    """
    tph, n_hash = scale.tokens_per_hash, len(turn.hash_ids)
    keys = []
    for j in range(scale.prompt_len(turn) // block_size):
        e = (j + 1) * block_size - 1
        h = e // tph
        if h < n_hash:
            keys.append((turn.block_namespace(h), turn.hash_ids[h], e % tph))
        else:
            keys.append((turn.namespace, "tail", turn.agent, turn.index, e))
    return keys


# --------------------------------------------------------------------------- traces

def load_trace(path: str) -> Session:
    with open(path) as f:
        d = json.load(f)
    ns = d["id"] if d.get("hash_id_scope", "local") == "local" else SHARED_NAMESPACE
    if d.get("block_size", TRACE_BLOCK) != TRACE_BLOCK:
        raise ValueError(f"{path}: block_size {d.get('block_size')} != {TRACE_BLOCK}")
    return _session(d["id"], d["requests"], ns, "main")


def _session(name: str, reqs: list[dict], ns: str, agent: str) -> Session:
    turns: list[Turn] = []
    subs: list[SubAgent] = []
    prev_end = None            # trace time the previous turn of this agent ended
    for r in reqs:
        if r.get("type") == "subagent":
            gap = r["t"] - prev_end if prev_end is not None else r["t"]
            agent_id = r.get("agent_id") or f"sub{len(subs)}"
            sub = _session(name, r["requests"], ns, agent_id)
            subs.append(SubAgent(agent_id, r["t"], max(0.0, gap), len(turns) - 1, sub))
            continue
        think = r.get("think_time")
        if think is None:
            think = max(0.0, r["t"] - prev_end) if prev_end is not None else 0.0
        turns.append(Turn(list(r["hash_ids"]), int(r["in"]), int(r["out"]),
                          float(r["t"]), float(think), ns, agent, len(turns)))
        prev_end = r["t"] + (r.get("api_time") or 0.0)
    return Session(name, turns, subs)


def load_traces(trace_dir: str, limit: int = 0) -> list[Session]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "*.json")))
    if not paths:
        raise FileNotFoundError(f"no *.json traces in {trace_dir}")
    return [load_trace(p) for p in (paths[:limit] if limit else paths)]


class Workload:
    """A working set of sessions that users pick from, in order or at random.

    Every pick is a fresh conversation: a session picked for the k-th time
    (k > 0) replays under the namespace ``name#k`` so it shares no private
    blocks with its earlier replays (blocks in the shared namespace stay shared).

    ``max_turns`` keeps the first turns of every agent of a session (after the
    ``max_context`` filter): a session's turns run one after the other, so its
    length bounds how short a run can be however fast the server is.

    :meth:`request_set` is the fixed list of the first ``n`` picks, the same on
    every call: what every configuration of a comparison serves.
    """

    def __init__(self, sessions: list[Session], scale: Scale,
                 sampling: str = "sequential", seed: int = 0, max_turns: int = 0):
        if sampling not in ("sequential", "random"):
            raise ValueError(f"sampling must be sequential or random, not {sampling!r}")
        fits = (lambda t: scale.prompt_len(t) <= scale.max_context) if scale.max_context \
            else (lambda t: True)
        self.sessions = [s2 for s in sessions
                         if (s2 := s.filtered(fits).truncated(max_turns)).turns]
        if not self.sessions:
            raise ValueError("no session has a turn within max_context")
        self.scale, self.sampling, self.seed, self.max_turns = scale, sampling, seed, max_turns
        self.rng = random.Random(seed)
        self.picks = 0
        self.copies: dict[str, int] = {}

    def _pick(self, i: int, rng: random.Random, copies: dict[str, int]) -> Session:
        if self.sampling == "sequential":
            s = self.sessions[i % len(self.sessions)]
        else:
            s = rng.choice(self.sessions)
        k = copies.get(s.name, 0)
        copies[s.name] = k + 1
        ns = s.turns[0].namespace
        if k == 0 or ns == SHARED_NAMESPACE:
            return s
        return s.renamed(f"{ns}#{k}")

    def next_session(self) -> Session:
        s = self._pick(self.picks, self.rng, self.copies)
        self.picks += 1
        return s

    def request_set(self, n: int, order: str = "longest-first") -> list[Session]:
        """The first ``n`` picks (as ``next_session`` would make them from a fresh
        start), in dispatch order: ``longest-first`` (most requests first, ties in
        pick order, so the run does not end on a long session started last) or
        ``in-order``."""
        if order not in ("longest-first", "in-order"):
            raise ValueError(f"order must be longest-first or in-order, not {order!r}")
        rng, copies = random.Random(self.seed), {}
        out = [self._pick(i, rng, copies) for i in range(n)]
        if order == "longest-first":
            out.sort(key=lambda s: -s.num_turns())      # stable: ties keep pick order
        return out

    def describe(self) -> dict:
        turns = [t for s in self.sessions for t in s.all_turns()]
        lens = [self.scale.prompt_len(t) for t in turns]
        return {"sessions": len(self.sessions), "turns": len(turns),
                "prompt_tokens_max": max(lens), "prompt_tokens_mean": sum(lens) / len(lens),
                "max_turns": self.max_turns}


def describe_request_set(sessions: list[Session], scale: Scale, block_size: int) -> dict:
    """Size and identity of a fixed request set: requests, tokens, distinct KV
    blocks of its prompts (the working set), and a digest of every prompt's
    identity so two runs can show they served the same requests."""
    h = hashlib.sha256()
    seen: set = set()
    requests = prompt = output = 0
    for s in sessions:
        for t in s.all_turns():
            requests += 1
            prompt += scale.prompt_len(t)
            output += scale.max_tokens(t)
            seen.update(block_keys(t, scale, block_size))
            h.update(f"{t.namespace}\x1f{t.agent}\x1f{t.index}\x1f{scale.prompt_len(t)}\x1f"
                     f"{scale.max_tokens(t)}\x1f{','.join(map(str, t.hash_ids))}\n".encode())
    return {"sessions": len(sessions), "requests": requests, "prompt_tokens": prompt,
            "output_tokens": output, "working_set_blocks": len(seen),
            "digest": h.hexdigest()[:16]}
