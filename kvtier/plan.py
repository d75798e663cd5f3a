"""``kvtier plan``: trace-driven TTL / capacity planner.

Replays request traces through kvtier's own cache policy, :class:`kvtier.index.Tier`
(LRU within a TTL, under a capacity), so its answers are the product's behaviour, not a
separate model's. See docs/planning.md for the semantics, the formats and worked answers.

Python API::

    from kvtier import plan
    trace = plan.load(["../shared/traces/weka-cc-dev"], "kv-cache-tester")
    res = plan.replay(trace, [plan.TierSpec("cache", math.inf, 3600.0)])
    res.hit_rate, res.prefills_per_block
    rows = plan.sweep(trace, ttls=[60, 300, 3600, math.inf], capacities=[1e6, math.inf])

Command line: ``kvtier plan PATH... --format kv-cache-tester --ttl 60,300,3600,inf``
(:func:`main`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import re
import sys
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from operator import is_, is_not
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from kvtier.cliargs import ArgumentParser, integer, number
from kvtier.index import EVICT_CAPACITY, EVICT_TTL, Tier

FORMATS = ("auto", "kv-cache-tester", "mooncake", "jsonl")
TIER_NAMES = ("hbm", "dram", "nvme")
_NATIVE_BLOCK = {"mooncake": 512}
_FAST_ID_BITS = 40          # key = namespace << 40 | id for ids in [0, 2**40)


class PlanError(ValueError):
    """Bad input: unreadable trace, inconsistent options."""


# --------------------------------------------------------------------------- traces
@dataclass
class Trace:
    """Requests ready to replay, sorted by arrival.

    Request ``i`` arrives at ``arrival[i]`` (s), completes at ``end[i]``, has
    ``input_tokens[i]`` prompt tokens and the block keys ``keys[offsets[i]:offsets[i+1]]``
    (ints; equal key = equal block and equal prefix, within its namespace). Every block
    holds ``block_tokens`` tokens except a request's last one, which holds ``last_tokens[i]``.
    """

    block_tokens: int
    arrival: np.ndarray
    end: np.ndarray
    input_tokens: np.ndarray
    last_tokens: np.ndarray
    offsets: np.ndarray
    keys: np.ndarray
    sources: list[str] = field(default_factory=list)
    namespaces: int = 0
    _distinct: int | None = None

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def num_blocks(self) -> int:
        return int(self.offsets[-1])

    @property
    def distinct_blocks(self) -> int:
        if self._distinct is None:
            self._distinct = int(np.unique(self.keys).size) if self.keys.size else 0
        return self._distinct

    @property
    def total_input_tokens(self) -> int:
        return int(self.input_tokens.sum())

    @property
    def span_s(self) -> float:
        if not len(self):
            return 0.0
        return float(max(self.end.max(), self.arrival.max()) - self.arrival.min())

    def summary(self) -> dict[str, Any]:
        return {"sources": len(self.sources), "namespaces": self.namespaces,
                "requests": len(self), "input_tokens": self.total_input_tokens,
                "blocks": self.num_blocks, "distinct_blocks": self.distinct_blocks,
                "block_tokens": self.block_tokens, "span_s": self.span_s}


@dataclass
class _Req:
    t: float
    end: float
    input_tokens: int
    keys: list[int]
    last_tokens: int


class _Builder:
    """Collects requests; maps (namespace, hash id) to int keys."""

    def __init__(self, block_tokens: int):
        self.block_tokens = block_tokens
        self.reqs: list[_Req] = []
        self.sources: list[str] = []
        self._ns: dict[Any, int] = {}
        self._interned: dict[tuple, int] = {}
        self.offset_s = 0.0         # added to the times of the file being read

    def namespace(self, name: Any) -> int:
        ns = self._ns.get(name)
        if ns is None:
            ns = self._ns[name] = len(self._ns)
        return ns

    def keys(self, ns: int, ids: Sequence[Any]) -> list[int]:
        """Int keys for hash ids of namespace ``ns`` (small ints: arithmetic; else interned)."""
        base = ns << _FAST_ID_BITS
        try:
            if all(type(h) is int and 0 <= h < (1 << _FAST_ID_BITS) for h in ids):
                return [base + h for h in ids]
        except TypeError:
            pass
        out = []
        interned = self._interned
        for h in ids:
            if isinstance(h, list):
                h = tuple(h)
            k = interned.get((ns, h))
            if k is None:
                k = interned[(ns, h)] = -1 - len(interned)
            out.append(k)
        return out

    def add(self, t: float, end: float, input_tokens: int | None, keys: list[int],
            native_block: int, source: str) -> None:
        """One request whose ``keys`` are blocks of ``native_block`` tokens (last maybe partial)."""
        bt = self.block_tokens
        n = len(keys)
        hashed = n * native_block
        if input_tokens is None:
            input_tokens = hashed
        if input_tokens < 0 or not math.isfinite(t) or not math.isfinite(end) or end < t:
            raise PlanError(f"{source}: bad request (t={t}, end={end}, input={input_tokens})")
        # the trace's own last block holds what is left of the prompt (Mooncake hashes a
        # partial last block); never more than a block, never less than one token
        last_native = native_block
        if n and input_tokens < hashed:
            last_native = max(1, input_tokens - (n - 1) * native_block)
        if bt != native_block:          # coarsen: keep full groups only (like vLLM / kvtier)
            m = bt // native_block
            full = n // m
            if full * m == n and n and last_native < native_block:
                full -= 1   # the last group holds a partial trace block: not a full block
            keys = keys[m - 1:full * m:m]
            n, last_native = full, bt
        self.reqs.append(_Req(t + self.offset_s, end + self.offset_s, int(input_tokens), keys,
                              int(last_native) if n else bt))

    def build(self) -> Trace:
        reqs = sorted(self.reqs, key=lambda r: r.t)   # stable: ties keep file order
        lens = np.fromiter((len(r.keys) for r in reqs), dtype=np.int64, count=len(reqs))
        offsets = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        keys = np.empty(int(offsets[-1]), dtype=np.int64)
        for r, o in zip(reqs, offsets[:-1]):
            keys[o:o + len(r.keys)] = r.keys
        return Trace(
            _distinct=int(np.unique(keys).size),
            block_tokens=self.block_tokens,
            arrival=np.array([r.t for r in reqs], dtype=np.float64),
            end=np.array([r.end for r in reqs], dtype=np.float64),
            input_tokens=np.array([r.input_tokens for r in reqs], dtype=np.int64),
            last_tokens=np.array([r.last_tokens for r in reqs], dtype=np.int64),
            offsets=offsets, keys=keys, sources=list(self.sources),
            namespaces=len(self._ns))


def _files(paths: Iterable[str | os.PathLike], suffixes: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in suffixes)
            if not found:
                raise PlanError(f"{p}: no {'/'.join(suffixes)} files in this directory")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise PlanError(f"{p}: no such file or directory")
    return out


def _check_block(block_tokens: int, native: int, source: str) -> None:
    if block_tokens <= 0 or block_tokens % native:
        raise PlanError(f"{source}: --block-tokens {block_tokens} must be a positive multiple "
                        f"of the trace's block size ({native} tokens)")


def read_kv_cache_tester(b: _Builder, path: Path) -> None:
    """One kv-cache-tester conversation (``{id, block_size, hash_id_scope, requests}``).

    Request time = ``t``; completion = ``t + api_time`` (0 when absent). Sub-agents
    (``{"type": "subagent", t, requests}``) run at parent ``t`` + their own ``t`` and
    share the conversation's hash-id namespace (``hash_id_scope: "local"``; ``"global"``
    shares one namespace across files).
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: not a kv-cache-tester JSON trace ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise PlanError(f"{path}: not a kv-cache-tester trace (no 'requests' list)")
    native = int(doc.get("block_size", 64))
    _check_block(b.block_tokens, native, str(path))
    scope = doc.get("hash_id_scope", "local")
    ns = b.namespace(("kvct-global",) if scope == "global" else ("kvct", str(path.resolve())))
    src = str(path)
    b.sources.append(src)

    def walk(reqs: list, base: float) -> None:
        for r in reqs:
            if r.get("type") == "subagent":
                walk(r.get("requests") or [], base + float(r.get("t", 0.0)))
                continue
            try:
                t = base + float(r["t"])
                ids = r["hash_ids"]
                api = r.get("api_time")
                end = t + (float(api) if api is not None and api > 0 else 0.0)
                n_in = r.get("in")
            except (KeyError, TypeError, ValueError) as e:
                raise PlanError(f"{path}: bad request {str(r)[:120]} ({e})") from None
            b.add(t, end, None if n_in is None else int(n_in), b.keys(ns, ids), native, src)

    walk(doc["requests"], 0.0)


def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        fh = path.open()
    except OSError as e:
        raise PlanError(f"{path}: {e}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise PlanError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise PlanError(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, rec


def read_mooncake(b: _Builder, path: Path, native: int = 512) -> None:
    """Mooncake trace: ``{timestamp (ms), input_length, output_length, hash_ids}`` per line.

    Hash ids are chained 512-token blocks, global across the file's requests (one
    namespace per file); the last block may be partial. No latency is recorded:
    completion = arrival.
    """
    _check_block(b.block_tokens, native, str(path))
    ns = b.namespace(("mooncake", str(path.resolve())))
    src = str(path)
    b.sources.append(src)
    for lineno, rec in _jsonl(path):
        try:
            t = float(rec["timestamp"]) / 1000.0
            ids = rec["hash_ids"]
            n_in = rec.get("input_length")
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{path}:{lineno}: not a Mooncake record ({e})") from None
        b.add(t, t, None if n_in is None else int(n_in), b.keys(ns, ids), native, src)


def _token_keys(ns: int, tokens: Sequence[int], block: int) -> list[int]:
    """Chained keys of the full ``block``-token blocks of ``tokens`` (deterministic)."""
    keys = []
    prev = ns
    for i in range(0, len(tokens) - block + 1, block):
        prev = hash((prev, tuple(tokens[i:i + block])))
        keys.append(prev)
    return keys


def read_jsonl(b: _Builder, path: Path, hash_block: int | None = None) -> None:
    """kvtier's own JSONL: one request per line.

    ``t`` (s, required); ``hash_ids`` (chained block hashes, blocks of ``hash_block``
    tokens, default ``--block-tokens``) or ``tokens`` (token ids: hashed here into full
    blocks); optional ``input_tokens``, ``output_tokens``, ``duration`` (s: completion =
    t + duration, default 0), ``namespace`` (hash ids match only within a namespace;
    default one global namespace; ``session`` is accepted as its alias).
    """
    native = hash_block or b.block_tokens
    src = str(path)
    b.sources.append(src)
    for lineno, rec in _jsonl(path):
        where = f"{path}:{lineno}"
        if "t" not in rec:
            raise PlanError(f"{where}: missing 't' (arrival time in seconds)")
        try:
            t = float(rec["t"])
            dur = float(rec.get("duration") or 0.0)
        except (TypeError, ValueError):
            raise PlanError(f"{where}: 't' and 'duration' must be numbers (seconds)") from None
        if dur < 0:
            raise PlanError(f"{where}: negative duration")
        ns = b.namespace(("jsonl", str(rec.get("namespace", rec.get("session", "")))))
        n_in = rec.get("input_tokens")
        if "hash_ids" in rec:
            _check_block(b.block_tokens, native, where)
            ids = rec["hash_ids"]
            if not isinstance(ids, list):
                raise PlanError(f"{where}: 'hash_ids' must be a list")
            keys = b.keys(ns, ids)
            blk = native
        elif "tokens" in rec:
            toks = rec["tokens"]
            if not isinstance(toks, list):
                raise PlanError(f"{where}: 'tokens' must be a list of token ids")
            keys = _token_keys(ns, toks, b.block_tokens)
            blk = b.block_tokens
            if n_in is None:
                n_in = len(toks)
        else:
            raise PlanError(f"{where}: needs 'hash_ids' or 'tokens'")
        try:
            n_in = None if n_in is None else int(n_in)
        except (TypeError, ValueError):
            raise PlanError(f"{where}: 'input_tokens' must be an integer") from None
        b.add(t, t + dur, n_in, keys, blk, where)


def detect_format(path: Path) -> str:
    """kv-cache-tester (.json with 'requests'), mooncake ('timestamp' lines) or jsonl."""
    if not path.exists():
        raise PlanError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in (".json", ".jsonl"))
        if not files:
            raise PlanError(f"{path}: no .json/.jsonl files to detect a format from")
        path = files[0]
    with path.open() as fh:
        head = fh.read(4096)
    if path.suffix == ".json" or head.lstrip().startswith("{\n") or '"requests"' in head:
        if '"requests"' in head or '"hash_id_scope"' in head:
            return "kv-cache-tester"
    first = head.splitlines()[0] if head else ""
    if '"timestamp"' in first and '"input_length"' in first:
        return "mooncake"
    return "jsonl"


def load(paths: Sequence[str | os.PathLike], fmt: str = "auto", block_tokens: int | None = None,
         hash_block_tokens: int | None = None, stagger_s: float = 0.0) -> Trace:
    """Read traces (files or directories) into one :class:`Trace`.

    ``block_tokens``: the planner's block (default: the trace's own block: 64 for the
    kv-cache-tester traces, 512 for Mooncake, required for jsonl unless ``tokens`` with
    the default 64); it must be a multiple of the trace's block. ``hash_block_tokens``:
    block size behind jsonl ``hash_ids`` (default ``block_tokens``). ``stagger_s``: file
    ``i`` (in path order, directories sorted) starts ``i x stagger_s`` later (default: all
    files keep their own times, so kv-cache-tester conversations all start at 0).
    """
    if not paths:
        raise PlanError("no trace paths given")
    if fmt not in FORMATS:
        raise PlanError(f"unknown format {fmt!r}; one of {FORMATS}")
    if fmt == "auto":
        fmts = {detect_format(Path(p)) for p in paths}
        if len(fmts) > 1:
            raise PlanError(f"paths mix formats {sorted(fmts)}; pass --format")
        fmt = fmts.pop()
    suffixes = (".json",) if fmt == "kv-cache-tester" else (".jsonl", ".json")
    files = _files(paths, suffixes)
    if block_tokens is None:
        if fmt == "kv-cache-tester":
            try:
                with files[0].open() as fh:
                    m = re.search(r'"block_size"\s*:\s*(\d+)', fh.read(1 << 16))
            except OSError:
                m = None
            block_tokens = int(m.group(1)) if m else 64
        elif fmt == "mooncake":
            block_tokens = _NATIVE_BLOCK["mooncake"]
        else:
            block_tokens = hash_block_tokens or 64
    b = _Builder(int(block_tokens))
    for i, f in enumerate(files):
        b.offset_s = i * stagger_s
        if fmt == "kv-cache-tester":
            read_kv_cache_tester(b, f)
        elif fmt == "mooncake":
            read_mooncake(b, f)
        else:
            read_jsonl(b, f, hash_block_tokens)
    return b.build()


# --------------------------------------------------------------------------- replay
@dataclass(frozen=True)
class TierSpec:
    """One cache level: its name, capacity (tokens; inf = unbounded) and TTL (s)."""

    name: str
    capacity_tokens: float = math.inf
    ttl_s: float = math.inf


@dataclass
class Timeline:
    """Samples every ``interval_s`` of trace time: the live tokens of each tier (its
    working set: expired entries dropped first), and the prompt / hit tokens of the
    requests that arrived since the previous sample."""

    interval_s: float
    t: list[float] = field(default_factory=list)
    used: dict[str, list[float]] = field(default_factory=dict)
    input_tokens: list[int] = field(default_factory=list)
    hit_tokens: list[int] = field(default_factory=list)

    def hit_rate(self, window: int = 1) -> list[float]:
        """Token-weighted hit rate over the last ``window`` samples (nan: no arrivals)."""
        out = []
        hit = inp = 0
        for i, (h, n) in enumerate(zip(self.hit_tokens, self.input_tokens)):
            hit += h
            inp += n
            if i >= window:
                hit -= self.hit_tokens[i - window]
                inp -= self.input_tokens[i - window]
            out.append(hit / inp if inp else math.nan)
        return out


@dataclass
class ReplayResult:
    tiers: list[TierSpec]
    requests: int
    input_tokens: int
    hit_tokens: int
    hit_tokens_by_tier: dict[str, int]
    blocks: int
    blocks_prefilled: int
    distinct_blocks: int
    peak_used_tokens: dict[str, float]
    evictions: dict[str, dict[str, int]]
    replay_s: float
    cpu_s: float = 0.0
    timeline: Timeline | None = None

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def hit_rate_by_tier(self) -> dict[str, float]:
        n = self.input_tokens or 1
        return {k: v / n for k, v in self.hit_tokens_by_tier.items()}

    @property
    def prefills_per_block(self) -> float:
        return self.blocks_prefilled / self.distinct_blocks if self.distinct_blocks else 0.0


Progress = Callable[[int, int], None]


def replay(trace: Trace, tiers: Sequence[TierSpec], *, sample_interval_s: float | None = None,
           progress: Progress | None = None) -> ReplayResult:
    """Replay ``trace`` through kvtier ``Tier`` objects (``tiers``: fastest first).

    Events, in time order (completions before arrivals at equal times):

    - arrival at ``t``: the hit is the longest prefix of the request's blocks each live
      (present, unexpired) in some tier, looked up with ``Tier.get(key, t)``; a hit block
      counts for the fastest tier holding it; the other blocks are prefilled;
    - completion at ``end``: every block of the request is used: ``Tier.add(key, size,
      end)`` in every tier (refreshes last use and LRU position, or inserts after
      evicting expired then LRU entries), last block first, as kvtier's scheduler
      refreshes a finished request (the prefix's first block is evicted last). Tiers are
      thus inclusive (write-through).
    """
    if not tiers:
        raise PlanError("replay needs at least one tier")
    t0 = time.perf_counter()
    c0 = time.process_time()
    objs = [Tier(s.name, s.capacity_tokens, s.ttl_s) for s in tiers]
    names = [s.name for s in tiers]
    gets = [o.get for o in objs]
    adds = [o.add for o in objs]
    single = len(objs) == 1
    get0 = gets[0]
    bt = trace.block_tokens
    arrival = trace.arrival.tolist()
    end = trace.end.tolist()
    n_in = trace.input_tokens.tolist()
    last = trace.last_tokens.tolist()
    off = trace.offsets.tolist()
    keys_np = trace.keys
    n_req = len(arrival)

    hit_tokens = 0
    hit_by_tier = [0] * len(objs)
    prefilled = 0
    peak = [0.0] * len(objs)
    pending: list[tuple[float, int, list[int], int]] = []   # (end, i, keys, last)
    consume = deque(maxlen=0).extend

    timeline = None
    next_sample = math.inf
    win_hit = win_in = 0
    if sample_interval_s and sample_interval_s > 0 and n_req:
        timeline = Timeline(float(sample_interval_s), used={n: [] for n in names})
        next_sample = arrival[0]

    def complete(t_end: float, keys: list[int], lt: int) -> None:
        keys = keys[::-1]
        sizes = None
        if lt != bt and keys:
            sizes = [bt] * len(keys)
            sizes[0] = lt
        for j, add in enumerate(adds):
            consume(map(add, keys, repeat(bt) if sizes is None else sizes, repeat(t_end)))
            u = objs[j].used
            if u > peak[j]:
                peak[j] = u

    def sample_until(t_now: float) -> None:
        nonlocal next_sample, win_hit, win_in
        while next_sample <= t_now:
            timeline.t.append(next_sample)
            for o, nm in zip(objs, names):
                o.expire(next_sample)
                timeline.used[nm].append(float(o.used))
            timeline.hit_tokens.append(win_hit)
            timeline.input_tokens.append(win_in)
            win_hit = win_in = 0
            next_sample += timeline.interval_s

    last_report = time.monotonic()
    for i in range(n_req):
        t = arrival[i]
        while pending and pending[0][0] <= t:
            e, _, ks, lt = heapq.heappop(pending)
            if timeline is not None:
                sample_until(e)
            complete(e, ks, lt)
        if timeline is not None:
            sample_until(t)
        keys = keys_np[off[i]:off[i + 1]].tolist()
        n = len(keys)
        if single:
            # position of the first miss; lazy, so lookups stop there (all in C)
            k = next(compress(count(), map(is_, map(get0, keys, repeat(t)), repeat(None))), n)
            by = None
        else:
            k, by, last_tier = _lookup_multi(gets, keys, t)
        if k:
            tok = min(n_in[i], k * bt if k < n else (n - 1) * bt + last[i])
            hit_tokens += tok
            if by is None:
                hit_by_tier[0] += tok
            else:
                # blocks count bt tokens each, but the prefix's last one only what
                # makes the total `tok` (a partial block, or a prompt ending early)
                for j, cnt in enumerate(by):
                    hit_by_tier[j] += cnt * bt
                hit_by_tier[last_tier] -= k * bt - tok
            if timeline is not None:
                win_hit += tok
        if timeline is not None:
            win_in += n_in[i]
        prefilled += n - k
        heapq.heappush(pending, (end[i], i, keys, last[i]))
        if progress is not None and not i & 255:
            now = time.monotonic()
            if now - last_report >= 5.0:
                progress(i, n_req)
                last_report = now
    while pending:
        e, _, ks, lt = heapq.heappop(pending)
        if timeline is not None:
            sample_until(e)
        complete(e, ks, lt)
    if timeline is not None:
        sample_until(next_sample)   # close the last window
    if progress is not None:
        progress(n_req, n_req)
    return ReplayResult(
        tiers=list(tiers), requests=n_req, input_tokens=sum(n_in), hit_tokens=hit_tokens,
        hit_tokens_by_tier=dict(zip(names, hit_by_tier)), blocks=trace.num_blocks,
        blocks_prefilled=prefilled, distinct_blocks=trace.distinct_blocks,
        peak_used_tokens=dict(zip(names, peak)),
        evictions={o.name: {EVICT_CAPACITY: o.stats.evictions[EVICT_CAPACITY],
                            EVICT_TTL: o.stats.evictions[EVICT_TTL]} for o in objs},
        replay_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, timeline=timeline)


def _lookup_multi(gets: list, keys: list[int], t: float) -> tuple[int, list[int], int]:
    """Longest prefix live in some tier, how many of its blocks each tier serves (a block
    counts for the fastest tier holding it; slower tiers are asked only about blocks the
    faster ones lack), and the tier serving the prefix's last block."""
    todo: Sequence[int] = range(len(keys))   # positions not found yet, ascending
    served: list[list[int]] = []
    rep = repeat(t)
    for j, get in enumerate(gets):
        if not todo:
            served.append([])
            continue
        found = list(map(get, keys if j == 0 else [keys[p] for p in todo], rep))
        served.append(list(compress(todo, map(is_not, found, repeat(None)))))
        todo = list(compress(todo, map(is_, found, repeat(None))))
    limit = todo[0] if todo else len(keys)
    by = [bisect_left(s, limit) for s in served]
    last = next((j for j, (s, c) in enumerate(zip(served, by)) if c and s[c - 1] == limit - 1),
                0)
    return limit, by, last


# --------------------------------------------------------------------------- sweeps
def tier_configs(ttls: Sequence[float], capacities: Sequence[float] | None = None, *,
                 hbm: Sequence[float] | None = None, dram: Sequence[float] | None = None,
                 nvme: Sequence[float] | None = None,
                 hbm_ttl: float = math.inf) -> list[list[TierSpec]]:
    """The grid to replay: ``ttls`` x ``capacities`` (one tier, "cache"), or
    ``ttls`` x hbm x dram x nvme (a hierarchy; the TTL applies to DRAM and NVMe, HBM --
    vLLM's GPU prefix cache -- uses ``hbm_ttl``)."""
    levels = [(n, v) for n, v in zip(TIER_NAMES, (hbm, dram, nvme)) if v]
    if levels and capacities:
        raise PlanError("give either one tier's capacities (--capacity-tokens/--capacity-bytes)"
                        " or a hierarchy (--hbm/--dram/--nvme), not both")
    out: list[list[TierSpec]] = []
    for ttl in ttls:
        if not levels:
            for cap in capacities or [math.inf]:
                out.append([TierSpec("cache", cap, ttl)])
            continue
        grid: list[list[TierSpec]] = [[]]
        for name, caps in levels:
            t = hbm_ttl if name == "hbm" else ttl
            grid = [g + [TierSpec(name, c, t)] for g in grid for c in caps]
        out.extend(grid)
    return out


_FORK_TRACE: Trace | None = None


def _replay_job(args: tuple) -> ReplayResult:
    tiers, sample, progress_label = args
    prog = _StderrProgress(progress_label) if progress_label else None
    return replay(_FORK_TRACE, tiers, sample_interval_s=sample, progress=prog)


def replay_many(trace: Trace, configs: Sequence[Sequence[TierSpec]], *, jobs: int = 1,
                sample_interval_s: float | None = None, progress: bool = False,
                on_result: Callable[[int, ReplayResult], None] | None = None
                ) -> list[ReplayResult]:
    """Replay each config (in ``jobs`` forked processes where available), in order."""
    global _FORK_TRACE
    configs = [list(c) for c in configs]
    jobs = max(1, min(jobs, len(configs)))
    if trace.num_blocks * len(configs) < 2_000_000:
        jobs = 1            # a process pool costs more than it saves
    labels = [_label(c) if progress else None for c in configs]
    results: list[ReplayResult | None] = [None] * len(configs)
    import multiprocessing as mp
    if jobs > 1 and "fork" in mp.get_all_start_methods():
        from concurrent.futures import ProcessPoolExecutor, as_completed
        _FORK_TRACE = trace     # inherited by the forked workers, never pickled
        try:
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
                futs = {ex.submit(_replay_job, (c, sample_interval_s, lab)): i
                        for i, (c, lab) in enumerate(zip(configs, labels))}
                for f in as_completed(futs):
                    i = futs[f]
                    results[i] = f.result()
                    if on_result:
                        on_result(i, results[i])
        finally:
            _FORK_TRACE = None
    else:
        for i, (c, lab) in enumerate(zip(configs, labels)):
            results[i] = replay(trace, c, sample_interval_s=sample_interval_s,
                                progress=_StderrProgress(lab) if lab else None)
            if on_result:
                on_result(i, results[i])
    return results  # type: ignore[return-value]


def sweep(trace: Trace, ttls: Sequence[float], capacities: Sequence[float] | None = None, *,
          jobs: int = 1, sample_interval_s: float | None = None,
          kv_bytes_per_token: int | None = None,
          **hierarchy: Any) -> list[dict[str, Any]]:
    """Rows (see :func:`row`) for every TTL x capacity (or hierarchy) combination."""
    configs = tier_configs(ttls, capacities, **hierarchy)
    res = replay_many(trace, configs, jobs=jobs, sample_interval_s=sample_interval_s)
    return [row(r, kv_bytes_per_token) for r in res]


def _none_if_inf(x: float) -> float | None:
    return None if math.isinf(x) else x


def row(res: ReplayResult, kv_bytes_per_token: int | None = None) -> dict[str, Any]:
    """One JSON-able result: ``ttl_s`` / ``capacity_tokens`` (null = none / unbounded) are
    those of the last (largest) tier; ``tiers`` lists every tier."""
    last = res.tiers[-1]
    peak = res.peak_used_tokens[last.name]
    out: dict[str, Any] = {
        "kind": "sweep",
        "ttl_s": _none_if_inf(last.ttl_s),
        "capacity_tokens": _none_if_inf(last.capacity_tokens),
        "tiers": [{"name": s.name, "capacity_tokens": _none_if_inf(s.capacity_tokens),
                   "ttl_s": _none_if_inf(s.ttl_s)} for s in res.tiers],
        "hit_rate": res.hit_rate,
        "hit_rate_by_tier": res.hit_rate_by_tier,
        "prefills_per_block": res.prefills_per_block,
        "requests": res.requests,
        "input_tokens": res.input_tokens,
        "hit_tokens": res.hit_tokens,
        "blocks": res.blocks,
        "blocks_prefilled": res.blocks_prefilled,
        "distinct_blocks": res.distinct_blocks,
        "peak_working_set_tokens": peak,
        "evictions": res.evictions,
        "replay_s": round(res.replay_s, 3),
        "cpu_s": round(res.cpu_s, 3),
    }
    if kv_bytes_per_token:
        out["kv_bytes_per_token"] = kv_bytes_per_token
        out["capacity_bytes"] = (None if math.isinf(last.capacity_tokens)
                                 else int(last.capacity_tokens * kv_bytes_per_token))
        out["peak_working_set_bytes"] = int(peak * kv_bytes_per_token)
    return out


# --------------------------------------------------------------------------- sizing
@dataclass
class Sizing:
    """Smallest one-tier capacities reaching ``target x unbounded hit rate`` at ``ttl_s``."""

    ttl_s: float
    unbounded_hit_rate: float
    peak_working_set_tokens: float
    capacity_tokens: dict[float, float]              # target fraction -> smallest capacity
    hit_rate: dict[float, float]                     # target fraction -> its hit rate
    curve: list[tuple[float, float]]                 # (capacity, hit rate), every probe
    check: ReplayResult | None = None                # DRAM + NVMe at the two answers


def size_for(trace: Trace, ttl: float, targets: Sequence[float] = (0.95,), *, jobs: int = 1,
             rel_tol: float = 0.02, grid_points: int = 5, progress: bool = False,
             unbounded: ReplayResult | None = None,
             on_result: Callable[[int, ReplayResult], None] | None = None) -> Sizing:
    """Smallest capacity (tokens) of one LRU-within-TTL tier whose hit rate reaches
    ``f x`` the unbounded-capacity hit rate at the same TTL, for each ``f`` in
    ``targets``, to within ``rel_tol``. Assumes hit rate grows with capacity (LRU).

    The unbounded replay's peak working set P is enough for everything (a tier of P
    tokens never evicts for capacity); a log grid P/100..P brackets each answer, then
    geometric bisection narrows it. An answer is the smallest probed capacity that
    reaches its goal. ``unbounded``: a one-tier unbounded replay at ``ttl`` already made."""
    for f in targets:
        if not 0 < f <= 1:
            raise PlanError(f"target {f}: must be a fraction in (0, 1]")
    base = unbounded
    if base is None or len(base.tiers) != 1 or base.tiers[0].ttl_s != ttl or \
            not math.isinf(base.tiers[0].capacity_tokens):
        base = replay_many(trace, [[TierSpec("cache", math.inf, ttl)]], progress=progress,
                           on_result=on_result)[0]
    H = base.hit_rate
    P = float(base.peak_used_tokens["cache"])
    probes: dict[float, float] = {P: H}

    def run(caps: Iterable[float]) -> None:
        todo = sorted({c for c in caps if c not in probes})
        if todo:
            res = replay_many(trace, [[TierSpec("cache", c, ttl)] for c in todo], jobs=jobs,
                              progress=progress, on_result=on_result)
            probes.update(zip(todo, (r.hit_rate for r in res)))

    if P > 0:
        run(float(round(P * 10 ** e)) for e in np.linspace(-2, 0, grid_points)[:-1])
    answers: dict[float, float] = {}
    brackets: dict[float, tuple[float, float]] = {}
    for f in targets:
        goal = f * H * (1 - 1e-12)
        ok = [c for c in sorted(probes) if probes[c] >= goal]
        hi = ok[0] if ok else P
        below = [c for c in sorted(probes) if c < hi]
        brackets[f] = (below[-1] if below else 0.0, hi)
    while True:
        mids = {}
        for f, (lo, hi) in brackets.items():
            if lo > 0 and hi / lo > 1 + rel_tol:
                mids[f] = float(round(math.sqrt(lo * hi)))
            elif lo == 0 and hi >= 2:
                mids[f] = float(round(hi / 2))   # below the grid: halve (rare)
        mids = {f: m for f, m in mids.items() if brackets[f][0] < m < brackets[f][1]}
        if not mids:
            break
        run(mids.values())
        for f, m in mids.items():
            lo, hi = brackets[f]
            brackets[f] = (lo, m) if probes[m] >= f * H * (1 - 1e-12) else (m, hi)
    for f, (lo, hi) in brackets.items():
        answers[f] = hi
    return Sizing(ttl_s=ttl, unbounded_hit_rate=H, peak_working_set_tokens=P,
                  capacity_tokens=answers, hit_rate={f: probes[c] for f, c in answers.items()},
                  curve=sorted(probes.items()))


def size_rows(sz: Sizing, kv_bytes_per_token: int | None = None,
              names: dict[float, str] | None = None) -> list[dict[str, Any]]:
    """JSON rows of a sizing: one ``kind: "size"`` per target, ``"size-probe"`` per probe."""
    out = []
    for f, c in sz.capacity_tokens.items():
        r = {"kind": "size", "tier": (names or {}).get(f), "target": f,
             "ttl_s": _none_if_inf(sz.ttl_s), "capacity_tokens": c,
             "hit_rate": sz.hit_rate[f], "unbounded_hit_rate": sz.unbounded_hit_rate,
             "peak_working_set_tokens": sz.peak_working_set_tokens}
        if kv_bytes_per_token:
            r["capacity_bytes"] = int(c * kv_bytes_per_token)
        out.append(r)
    for c, h in sz.curve:
        r = {"kind": "size-probe", "ttl_s": _none_if_inf(sz.ttl_s), "capacity_tokens": c,
             "hit_rate": h}
        if kv_bytes_per_token:
            r["capacity_bytes"] = int(c * kv_bytes_per_token)
        out.append(r)
    if sz.check is not None:
        out.append(row(sz.check, kv_bytes_per_token) | {"kind": "size-check"})
    return out


# --------------------------------------------------------------------------- model sizes
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2,
                "bfloat16": 2, "bf16": 2, "fp8": 1, "float8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
                "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}


def kv_bytes_per_token(config: dict[str, Any], dtype: str | None = None) -> int:
    """KV-cache bytes per token of a Hugging Face ``config.json``:
    2 (K and V) x layers x KV heads x head dim x dtype bytes (MLA models: layers x
    (kv_lora_rank + qk_rope_head_dim) x dtype bytes). ``dtype`` overrides the config's
    (e.g. ``fp8`` for an FP8 KV cache)."""
    c = config
    if "num_hidden_layers" not in c and isinstance(c.get("text_config"), dict):
        c = c["text_config"]
    try:
        layers = int(c["num_hidden_layers"])
        dt = str(dtype or c.get("torch_dtype") or c.get("dtype") or config.get("torch_dtype")
                 or "bfloat16").lower().replace("torch.", "")
        nbytes = _DTYPE_BYTES[dt]
        if c.get("kv_lora_rank"):
            return layers * (int(c["kv_lora_rank"]) + int(c.get("qk_rope_head_dim", 0))) * nbytes
        heads = int(c["num_attention_heads"])
        kv_heads = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    except KeyError as e:
        raise PlanError(f"model config: missing {e} (or unknown dtype)") from None
    return 2 * layers * kv_heads * head_dim * nbytes


# --------------------------------------------------------------------------- parsing
_BYTE_UNITS = {"b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
               "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}
_NUM_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_INF = ("inf", "infinite", "unbounded", "none", "∞")


def parse_ttl(text: str) -> float:
    """Seconds: ``60``, ``5m``, ``1h``, ``2d``, ``inf``."""
    t = text.strip().lower()
    if t in _INF:
        return math.inf
    m = _NUM_RE.match(t)
    mult = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    if not m or m.group(2) not in mult:
        raise PlanError(f"cannot read TTL {text!r}: use seconds, 5m, 1h or inf")
    v = float(m.group(1)) * mult[m.group(2)]
    if not v > 0:
        raise PlanError(f"TTL {text!r} must be > 0")
    return v


def parse_capacity(text: str, kv_bytes: int | None, plain: str = "tokens") -> float:
    """Tokens from ``5e6`` (a plain number: tokens, or bytes when ``plain == "bytes"``),
    ``5e6tok``, a byte size (``64GiB``, ``512MB``: needs the KV bytes per token) or ``inf``."""
    t = text.strip().lower()
    if t in _INF:
        return math.inf
    m = _NUM_RE.match(t)
    if not m:
        raise PlanError(f"cannot read size {text!r}")
    v, unit = float(m.group(1)), m.group(2)
    if unit in ("tok", "tokens") or (unit == "" and plain == "tokens"):
        return v
    if unit and unit not in _BYTE_UNITS:
        raise PlanError(f"cannot read size {text!r}: unknown unit {unit!r}")
    if not kv_bytes:
        raise PlanError(f"size {text!r} is in bytes: give --kv-bytes-per-token or --model-config")
    return float(math.floor(v * _BYTE_UNITS.get(unit, 1) / kv_bytes))


def _list(text: str, conv: Callable[[str], float]) -> list[float]:
    vals = [conv(x) for x in text.split(",") if x.strip()]
    if not vals:
        raise PlanError(f"empty list {text!r}")
    return vals


# --------------------------------------------------------------------------- output
def fmt_ttl(s: float | None) -> str:
    if s is None or math.isinf(s):
        return "inf"
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n and s % n == 0:
            return f"{s / n:g} {unit}"
    return f"{s:g} s"


def fmt_tokens(n: float | None) -> str:
    if n is None or math.isinf(n):
        return "unbounded"
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.3g}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float | None) -> str:
    if n is None or math.isinf(n):
        return "unbounded"
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


def _label(tiers: Sequence[TierSpec]) -> str:
    return " ".join(f"{s.name}={fmt_tokens(s.capacity_tokens)}@{fmt_ttl(s.ttl_s)}" for s in tiers)


def table(rows: Sequence[dict[str, Any]], kv_bytes: int | None = None) -> str:
    """The terminal table of sweep rows."""
    rows = [r for r in rows if r.get("kind", "sweep") == "sweep"]
    if not rows:
        return ""
    names = [t["name"] for t in rows[0]["tiers"]]
    multi = len(names) > 1
    head = ["TTL"] + ([f"{n}" for n in names] if multi else ["capacity"]) + ["hit rate"]
    if multi:
        head += [f"from {n}" for n in names]
    head += ["prefills/block", "peak working set"]
    body = []
    for r in rows:
        cells = [fmt_ttl(r["ttl_s"])]
        for t in r["tiers"]:
            c = t["capacity_tokens"]
            txt = fmt_tokens(c)
            if kv_bytes and c is not None:
                txt += f" ({fmt_bytes(c * kv_bytes)})"
            cells.append(txt)
        cells.append(f"{r['hit_rate']:.3f}")
        if multi:
            cells += [f"{r['hit_rate_by_tier'][n]:.3f}" for n in names]
        cells.append(f"{r['prefills_per_block']:.2f}")
        ws = fmt_tokens(r["peak_working_set_tokens"]) + " tok"
        if kv_bytes:
            ws += f" ({fmt_bytes(r['peak_working_set_tokens'] * kv_bytes)})"
        cells.append(ws)
        body.append(cells)
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda cs: "  ".join(c.rjust(w) if i else c.ljust(w)      # noqa: E731
                               for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def sizing_text(sz: Sizing, kv_bytes: int | None, names: dict[float, str]) -> str:
    out = [f"Sizing at TTL {fmt_ttl(sz.ttl_s)}: unbounded-capacity hit rate "
           f"{sz.unbounded_hit_rate:.3f}, peak working set {fmt_tokens(sz.peak_working_set_tokens)}"
           f" tokens" + (f" ({fmt_bytes(sz.peak_working_set_tokens * kv_bytes)})" if kv_bytes
                         else "")]
    for f in sorted(sz.capacity_tokens):
        c = sz.capacity_tokens[f]
        who = names.get(f, "a tier")
        out.append(f"  {who}: >= {fmt_tokens(c)} tokens"
                   + (f" = {fmt_bytes(c * kv_bytes)}" if kv_bytes else "")
                   + f" reaches {f:.0%} of it (hit rate {sz.hit_rate[f]:.3f})")
    if sz.check is not None:
        by = sz.check.hit_rate_by_tier
        out.append("  check, DRAM + NVMe at those sizes: hit rate "
                   f"{sz.check.hit_rate:.3f} = "
                   + " + ".join(f"{v:.3f} {k}" for k, v in by.items()))
    return "\n".join(out)


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_timeline(results: Sequence[ReplayResult], path: str | os.PathLike,
                  kv_bytes: int | None = None, title: str = "") -> None:
    """Working set (live tokens of the last tier) and hit rate over time, one line per run."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    span = max((r.timeline.t[-1] - r.timeline.t[0] for r in results
                if r.timeline is not None and r.timeline.t), default=0.0)
    window_s = 600.0 if span >= 6 * 3600 else max(span / 30, 1.0)
    for r in results:
        tl = r.timeline
        if tl is None or not tl.t:
            continue
        last = r.tiers[-1]
        t0 = tl.t[0]
        hours = [(x - t0) / 3600 for x in tl.t]
        used = np.array(tl.used[last.name], dtype=float)
        used[used <= 0] = np.nan                 # log scale: an empty cache is a gap
        lab = f"TTL {fmt_ttl(last.ttl_s)}"
        if not math.isinf(last.capacity_tokens):
            lab += f", capacity {fmt_tokens(last.capacity_tokens)}"
        if kv_bytes:
            a1.plot(hours, used * kv_bytes / 2**30, label=lab)
        else:
            a1.plot(hours, used, label=lab)
        win = max(1, int(round(window_s / tl.interval_s)))
        a2.plot(hours, tl.hit_rate(win), label=f"{lab} (overall {r.hit_rate:.3f})")
    a1.set_yscale("log")
    a1.set_ylabel("working set (GiB of KV)" if kv_bytes else "working set (tokens)")
    a1.set_title(title or "Working set (live cached blocks) and hit rate over time")
    a1.legend(fontsize=8)
    a1.grid(alpha=.3, which="both")
    a2.set_ylabel(f"hit rate (token-weighted,\n{fmt_ttl(round(window_s))} window)")
    a2.set_xlabel("trace time (h)")
    a2.set_ylim(0, 1.02)
    a2.legend(fontsize=8, loc="lower right")
    a2.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Hit rate vs capacity (a line per TTL) and vs TTL (a line per capacity)."""
    rows = [r for r in rows if r.get("kind", "sweep") == "sweep"]
    ttls = sorted({r["ttl_s"] if r["ttl_s"] is not None else math.inf for r in rows})
    caps = sorted({r["capacity_tokens"] if r["capacity_tokens"] is not None else math.inf
                   for r in rows})
    if len(ttls) < 2 and len(caps) < 2:
        return False
    plt = _plt()
    panels = int(len(caps) > 1) + int(len(ttls) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    key = lambda r, k: math.inf if r[k] is None else r[k]   # noqa: E731
    if len(caps) > 1:
        ax = axes.pop(0)
        finite = [c for c in caps if math.isfinite(c)]
        xinf = max(finite) * 3 if finite else 1.0
        for ttl in ttls:
            pts = sorted((key(r, "capacity_tokens"), r["hit_rate"]) for r in rows
                         if key(r, "ttl_s") == ttl)
            ax.plot([xinf if math.isinf(c) else c for c, _ in pts], [h for _, h in pts],
                    marker="o", label=f"TTL {fmt_ttl(ttl)}")
        ax.set_xscale("log")
        ax.set_xlabel("capacity (tokens; rightmost point: unbounded)")
        ax.set_ylabel("hit rate")
        ax.grid(alpha=.3, which="both")
        ax.legend(fontsize=8)
    if len(ttls) > 1:
        ax = axes.pop(0)
        finite = [t for t in ttls if math.isfinite(t)]
        xinf = max(finite) * 3 if finite else 1.0
        for cap in caps:
            pts = sorted((key(r, "ttl_s"), r["hit_rate"]) for r in rows
                         if key(r, "capacity_tokens") == cap)
            ax.plot([xinf if math.isinf(t) else t for t, _ in pts], [h for _, h in pts],
                    marker="o", label=f"capacity {fmt_tokens(cap)}")
        ax.set_xscale("log")
        ax.set_xlabel("TTL (s; rightmost point: no TTL)")
        ax.set_ylabel("hit rate")
        ax.grid(alpha=.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sizing(sz: Sizing, path: str | os.PathLike, kv_bytes: int | None = None,
                names: dict[float, str] | None = None, title: str = "") -> None:
    """Hit rate vs capacity at the sizing TTL, the goals and the answers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    scale = kv_bytes / 2**30 if kv_bytes else 1.0
    xs = [c * scale for c, _ in sz.curve if c > 0]
    ys = [h for c, h in sz.curve if c > 0]
    ax.plot(xs, ys, marker=".", color="C0", label=f"one tier, TTL {fmt_ttl(sz.ttl_s)}")
    ax.axhline(sz.unbounded_hit_rate, color="gray", ls=":",
               label=f"unbounded capacity: {sz.unbounded_hit_rate:.3f}")
    for i, f in enumerate(sorted(sz.capacity_tokens)):
        c = sz.capacity_tokens[f] * scale
        col = f"C{i + 1}"
        who = (names or {}).get(f, "capacity")
        txt = fmt_bytes(sz.capacity_tokens[f] * kv_bytes) if kv_bytes else \
            fmt_tokens(sz.capacity_tokens[f]) + " tokens"
        ax.axhline(f * sz.unbounded_hit_rate, color=col, ls="--", lw=.8)
        ax.axvline(c, color=col, ls="--", lw=.8)
        ax.plot([c], [sz.hit_rate[f]], "o", color=col,
                label=f"{who}: {txt} -> {sz.hit_rate[f]:.3f} ({f:.0%} of unbounded)")
    ax.set_xscale("log")
    ax.set_xlabel("capacity (GiB of KV)" if kv_bytes else "capacity (tokens)")
    ax.set_ylabel("hit rate (token-weighted)")
    ax.set_title(title or f"Hit rate vs capacity at TTL {fmt_ttl(sz.ttl_s)}")
    ax.grid(alpha=.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
class _StderrProgress:
    def __init__(self, label: str):
        self.label = label

    def __call__(self, done: int, total: int) -> None:
        if done < total:
            print(f"[kvtier plan] {self.label}: {done}/{total} requests "
                  f"({100 * done / max(total, 1):.0f}%)", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="kvtier plan",
        description="Replay request traces through kvtier's cache policy (index.Tier: LRU "
                    "within a TTL, under a capacity) and report hit rates, prefills per "
                    "block and working sets for TTL / capacity choices. See "
                    "docs/planning.md.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="trace files or directories")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="trace format (default: detected from the first file)")
    p.add_argument("--block-tokens", type=integer(1), default=None,
                   help="tokens per cached block (default: the trace's: 64 kv-cache-tester, "
                        "512 Mooncake, 64 jsonl); a multiple of the trace's block")
    p.add_argument("--hash-block-tokens", type=integer(1), default=None,
                   help="jsonl: tokens per block behind 'hash_ids' (default --block-tokens)")
    p.add_argument("--stagger", type=number(0, above=False), default=0.0, metavar="SECONDS",
                   help="start the i-th trace file i x SECONDS later (default 0: every "
                        "kv-cache-tester conversation starts at time 0)")
    p.add_argument("--ttl", default="60,300,3600,inf",
                   help="TTLs to sweep, comma list of seconds (or 5m, 1h, inf) "
                        "[%(default)s]")
    p.add_argument("--capacity-tokens", default=None,
                   help="one tier's capacities, comma list of tokens or inf [inf]")
    p.add_argument("--capacity-bytes", default=None,
                   help="one tier's capacities as byte sizes (64GiB, 1TiB, inf); needs "
                        "--kv-bytes-per-token or --model-config")
    for n, what in (("hbm", "GPU prefix cache (vLLM's; TTL --hbm-ttl)"),
                    ("dram", "kvtier's DRAM tier"), ("nvme", "kvtier's disk tier")):
        p.add_argument(f"--{n}", default=None,
                       help=f"hierarchy mode: {what} capacity, comma list; plain numbers "
                            "are tokens, sizes with a unit (64GiB) bytes")
    p.add_argument("--hbm-ttl", default="inf", help="TTL of the HBM tier [inf]")
    p.add_argument("--kv-bytes-per-token", type=integer(1), default=None,
                   help="KV-cache bytes per token (e.g. 131072 for Llama-3-8B in bf16)")
    p.add_argument("--model-config", default=None,
                   help="a model's config.json: KV bytes per token = 2 x layers x KV heads x "
                        "head dim x dtype bytes")
    p.add_argument("--kv-dtype", default=None, help="KV-cache dtype override (fp8, bfloat16)")
    p.add_argument("--size-ttl", default=None,
                   help="also size the tiers at this TTL: smallest capacity reaching "
                        "--target (NVMe) and --dram-target (DRAM) of the unbounded hit rate")
    p.add_argument("--target", type=number(0, maximum=1), default=0.95,
                   help="fraction of the unbounded-capacity hit rate the whole cache "
                        "(the NVMe tier) must reach [%(default)s]")
    p.add_argument("--dram-target", type=number(0, maximum=1), default=None,
                   help="fraction the DRAM tier alone must reach (e.g. 0.8); omit for a "
                        "single answer")
    p.add_argument("--json", action="store_true",
                   help="print the rows as a JSON list on stdout instead of the table")
    p.add_argument("--plot", metavar="DIR", default=None, help="write PNG plots to DIR")
    p.add_argument("--sample-interval", type=number(0), default=None,
                   help="timeline sample interval in trace seconds [span/400]")
    p.add_argument("--jobs", type=integer(1), default=None,
                   help="parallel replays [number of CPUs]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``kvtier plan``; returns the exit status (argparse's own: 0 for --help, 2 for bad
    usage; 2 for unreadable traces or inconsistent options)."""
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    say = (lambda *a: None) if args.quiet else (   # noqa: E731
        lambda *a: print("[kvtier plan]", *a, file=sys.stderr, flush=True))
    try:
        return _main(args, say)
    except PlanError as e:
        print(f"kvtier plan: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, say: Callable[..., None]) -> int:
    kv = args.kv_bytes_per_token
    if args.model_config:
        try:
            cfg = json.loads(Path(args.model_config).read_text())
        except (OSError, ValueError) as e:
            raise PlanError(f"{args.model_config}: {e}") from None
        kv = kv_bytes_per_token(cfg, args.kv_dtype)
        say(f"KV cache: {kv} bytes/token ({fmt_bytes(kv)}) from {args.model_config}")
    def arg(name: str, parse: Callable[[], Any]) -> Any:
        """``parse()``, its PlanError naming the argument it read."""
        try:
            return parse()
        except PlanError as e:
            raise PlanError(f"argument {name}: {e}") from None

    ttls = arg("--ttl", lambda: _list(args.ttl, parse_ttl))
    caps = None
    if args.capacity_tokens and args.capacity_bytes:
        raise PlanError("give --capacity-tokens or --capacity-bytes, not both")
    if args.capacity_tokens:
        caps = arg("--capacity-tokens", lambda: _list(
            args.capacity_tokens, lambda x: parse_capacity(x, kv, "tokens")))
    elif args.capacity_bytes:
        caps = arg("--capacity-bytes", lambda: _list(
            args.capacity_bytes, lambda x: parse_capacity(x, kv, "bytes")))
    hier = {n: arg(f"--{n}", lambda n=n: _list(getattr(args, n),
                                                lambda x: parse_capacity(x, kv, "tokens")))
            for n in TIER_NAMES if getattr(args, n)}
    hbm_ttl = arg("--hbm-ttl", lambda: parse_ttl(args.hbm_ttl))
    size_ttl = arg("--size-ttl", lambda: parse_ttl(args.size_ttl)) if args.size_ttl else None
    configs = tier_configs(ttls, caps, hbm_ttl=hbm_ttl, **hier)
    jobs = args.jobs or os.cpu_count() or 1

    t0 = time.perf_counter()
    trace = load(args.paths, args.format, args.block_tokens, args.hash_block_tokens,
                 args.stagger)
    s = trace.summary()
    say(f"loaded {s['requests']} requests, {s['input_tokens']:,} prompt tokens, "
        f"{s['blocks']:,} blocks ({s['distinct_blocks']:,} distinct) of {trace.block_tokens} "
        f"tokens from {s['sources']} file(s), span {s['span_s'] / 3600:.1f} h "
        f"in {time.perf_counter() - t0:.1f} s")
    if not len(trace):
        raise PlanError("the trace has no requests")
    sample = args.sample_interval or max(trace.span_s / 400, 1.0)

    n_replays = [0]

    def done(i: int, r: ReplayResult) -> None:
        n_replays[0] += 1
        say(f"{_label(r.tiers)}: hit rate {r.hit_rate:.3f}, prefills/block "
            f"{r.prefills_per_block:.2f} ({r.replay_s:.1f} s, {r.cpu_s:.1f} s CPU)")

    t1 = time.perf_counter()
    results = replay_many(trace, configs, jobs=jobs, sample_interval_s=sample,
                          progress=not args.quiet and trace.num_blocks > 2_000_000,
                          on_result=done)
    say(f"{len(configs)} replay(s) in {time.perf_counter() - t1:.1f} s")
    rows = [row(r, kv) for r in results]

    sz = None
    names: dict[float, str] = {}
    if args.size_ttl:
        targets = [args.target] + ([args.dram_target] if args.dram_target else [])
        names = {args.target: "NVMe (whole cache)" if args.dram_target else "capacity"}
        if args.dram_target:
            names[args.dram_target] = "DRAM"
        st = size_ttl
        t2 = time.perf_counter()
        base = next((r for r in results if len(r.tiers) == 1 and r.tiers[0].ttl_s == st
                     and math.isinf(r.tiers[0].capacity_tokens)), None)
        sz = size_for(trace, st, targets, jobs=jobs, unbounded=base, on_result=done)
        if args.dram_target:
            d, n = sz.capacity_tokens[args.dram_target], sz.capacity_tokens[args.target]
            sz.check = replay(trace, [TierSpec("dram", d, st), TierSpec("nvme", max(n, d), st)])
        say(f"sizing: {n_replays[0] - len(configs) + bool(args.dram_target)} replays in "
            f"{time.perf_counter() - t2:.1f} s")
        rows += size_rows(sz, kv, {f: ("dram" if f == args.dram_target and args.dram_target
                                       else "nvme" if args.dram_target else "cache")
                                   for f in targets})

    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows, kv))
        if sz is not None:
            print()
            print(sizing_text(sz, kv, names))
    if args.plot:
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        # timeline: per TTL, the run with the largest (last-tier) capacity
        best: dict[float, ReplayResult] = {}
        for r in results:
            k = r.tiers[-1].ttl_s
            if k not in best or r.tiers[-1].capacity_tokens >= best[k].tiers[-1].capacity_tokens:
                best[k] = r
        plot_timeline([best[k] for k in sorted(best)], out / "timeline.png", kv)
        written = ["timeline.png"]
        if plot_sweep(rows, out / "sweep.png"):
            written.append("sweep.png")
        if sz is not None:
            plot_sizing(sz, out / "sizing.png", kv, names)
            written.append("sizing.png")
        say("plots: " + ", ".join(str(out / w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
