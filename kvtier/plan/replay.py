"""Replaying a trace through kvtier's own cache policy (kvtier.cache.tier.Tier):
one or more tiers, hit rates, prefills per block, a timeline."""

from __future__ import annotations

import heapq
import math
import sys
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from operator import is_, is_not
from typing import Callable, Sequence


from kvtier.cache.admission import DiskAdmission
from kvtier.cache.tier import EVICT_CAPACITY, EVICT_TTL, Tier
from kvtier.plan.traces import TIER_NAMES, PlanError, Trace
from kvtier.plan.units import fmt_tokens, fmt_ttl

@dataclass(frozen=True)
class TierSpec:
    """One cache level: its name, capacity (tokens; inf = unbounded) and TTL (s)."""

    name: str
    capacity_tokens: float = math.inf
    ttl_s: float = math.inf
    # The last tier of a hierarchy (the disk): which blocks it is written
    # (kvtier.cache.admission); None: every tier holds every block (inclusive).
    admission: str | None = None


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
    written_tokens: int = 0    # tokens written into the last tier (disk writes)

    @property
    def written_per_hit_token(self) -> float:
        """Disk (last tier) tokens written per hit token: bytes written per byte served."""
        return self.written_tokens / self.hit_tokens if self.hit_tokens else math.inf

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
    written = [0]
    adm = None
    if len(objs) >= 2 and tiers[-1].admission is not None:
        adm = DiskAdmission(tiers[-1].admission, tiers[-1].ttl_s)
        disk, above = objs[-1], objs[-2]
        adds_above = [o.add for o in objs[:-1]]
        clock = [0.0]

        def write(key, size: int, t: float) -> None:
            if disk.add(key, size, t, ttl=ttl_now[0]) is not None:
                written[0] += size

        def evicted(key, entry, cause: str) -> None:   # DRAM lets a block go
            if adm.at_dram_evict(cause == EVICT_TTL) and disk.live(key, clock[0]) is None:
                write(key, entry.size, clock[0])
        above._on_evict = evicted
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
    req_ttl = trace.ttl.tolist() if trace.ttl is not None else None
    # a request's TTL applies to kvtier's tiers, not to vLLM's GPU cache
    kv_tier = [s.name != "hbm" for s in tiers]

    hit_tokens = 0
    hit_by_tier = [0] * len(objs)
    prefilled = 0
    peak = [0.0] * len(objs)
    pending: list[tuple[float, int, list[int], int]] = []   # (end, i, keys, last)
    ttl_now = [0.0]   # the TTL the request being completed asked for
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
        if adm is not None:
            complete_admitted(t_end, keys, sizes)
            return
        ttl = ttl_now[0]
        for j, add in enumerate(adds):
            if ttl and kv_tier[j]:
                consume(map(add, keys, repeat(bt) if sizes is None else sizes, repeat(t_end),
                            repeat(None), repeat(False), repeat(True), repeat(ttl)))
            else:
                consume(map(add, keys, repeat(bt) if sizes is None else sizes, repeat(t_end)))
            u = objs[j].used
            if u > peak[j]:
                peak[j] = u

    def complete_admitted(t_end: float, keys: list[int], sizes: list[int] | None) -> None:
        """As kvtier's scheduler stores a finished request's blocks: every tier
        above the disk holds them; the disk is refreshed where it has a block and
        written where the admission policy says so."""
        clock[0] = t_end
        ttl = ttl_now[0]
        for n, key in enumerate(keys):
            size = bt if sizes is None else sizes[n]
            in_above = above.live(key, t_end) is not None
            for j, add in enumerate(adds_above):
                add(key, size, t_end, ttl=ttl if kv_tier[j] else 0.0)
            if disk.live(key, t_end) is not None:
                disk.add(key, size, t_end, ttl=ttl)
            elif adm.at_hit(key, t_end) if in_above else adm.at_store(key, t_end):
                write(key, size, t_end)
        for j, o in enumerate(objs):
            if o.used > peak[j]:
                peak[j] = o.used

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

    def complete_next() -> None:
        """The earliest pending completion: the timeline up to it, then its blocks."""
        e, j, ks, lt = heapq.heappop(pending)
        if timeline is not None:
            sample_until(e)
        ttl_now[0] = req_ttl[j] if req_ttl is not None else 0.0
        complete(e, ks, lt)

    last_report = time.monotonic()
    for i in range(n_req):
        t = arrival[i]
        while pending and pending[0][0] <= t:
            complete_next()
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
        complete_next()
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
        replay_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, timeline=timeline,
        written_tokens=written[0] if adm is not None else objs[-1].stats.inserted)


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
                 hbm_ttl: float = math.inf,
                 admissions: Sequence[str] = ()) -> list[list[TierSpec]]:
    """The grid to replay: ``ttls`` x ``capacities`` (one tier, "cache"), or
    ``ttls`` x hbm x dram x nvme (a hierarchy; the TTL applies to DRAM and NVMe, HBM --
    vLLM's GPU prefix cache -- uses ``hbm_ttl``); each hierarchy once per disk
    admission policy in ``admissions`` (for its last tier)."""
    levels = [(n, v) for n, v in zip(TIER_NAMES, (hbm, dram, nvme)) if v]
    if levels and capacities:
        raise PlanError("give either one tier's capacities (--capacity-tokens/--capacity-bytes)"
                        " or a hierarchy (--hbm/--dram/--nvme), not both")
    if admissions and len(levels) < 2:
        raise PlanError("--disk-admission needs a hierarchy (e.g. --dram and --nvme): "
                        "it decides what the last tier is written")
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
        for g in grid:
            for a in admissions or [None]:
                out.append(g[:-1] + [TierSpec(g[-1].name, g[-1].capacity_tokens,
                                              g[-1].ttl_s, a)])
    return out


_FORK_TRACE: Trace | None = None


def _fork_job(args: tuple) -> object:
    fn, item = args
    return fn(_FORK_TRACE, item)


def map_trace(trace: Trace, fn: Callable[[Trace, object], object], items: Sequence[object], *,
              jobs: int = 1, on_result: Callable[[int, object], None] | None = None) -> list:
    """``fn(trace, item)`` for each item, in ``jobs`` forked processes where available
    (they inherit the trace, never pickled; ``fn`` must be a module-level function);
    the results in order, each also handed to ``on_result`` as it comes."""
    global _FORK_TRACE
    jobs = max(1, min(jobs, len(items)))
    results: list = [None] * len(items)
    import multiprocessing as mp
    if jobs > 1 and "fork" in mp.get_all_start_methods():
        from concurrent.futures import ProcessPoolExecutor, as_completed
        _FORK_TRACE = trace     # inherited by the forked workers, never pickled
        try:
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
                futs = {ex.submit(_fork_job, (fn, item)): i for i, item in enumerate(items)}
                for f in as_completed(futs):
                    i = futs[f]
                    results[i] = f.result()
                    if on_result:
                        on_result(i, results[i])
        finally:
            _FORK_TRACE = None
    else:
        for i, item in enumerate(items):
            results[i] = fn(trace, item)
            if on_result:
                on_result(i, results[i])
    return results


def _replay_item(trace: Trace, args: tuple) -> ReplayResult:
    tiers, sample, progress_label = args
    prog = _StderrProgress(progress_label) if progress_label else None
    return replay(trace, tiers, sample_interval_s=sample, progress=prog)


def replay_many(trace: Trace, configs: Sequence[Sequence[TierSpec]], *, jobs: int = 1,
                sample_interval_s: float | None = None, progress: bool = False,
                on_result: Callable[[int, ReplayResult], None] | None = None
                ) -> list[ReplayResult]:
    """Replay each config (in ``jobs`` forked processes where available), in order."""
    configs = [list(c) for c in configs]
    if trace.num_blocks * len(configs) < 2_000_000:
        jobs = 1            # a process pool costs more than it saves
    items = [(c, sample_interval_s, _label(c) if progress else None) for c in configs]
    return map_trace(trace, _replay_item, items, jobs=jobs, on_result=on_result)


def _label(tiers: Sequence[TierSpec]) -> str:
    return " ".join(f"{s.name}={fmt_tokens(s.capacity_tokens)}@{fmt_ttl(s.ttl_s)}"
                    + (f"[{s.admission}]" if s.admission else "") for s in tiers)


class _StderrProgress:
    def __init__(self, label: str):
        self.label = label

    def __call__(self, done: int, total: int) -> None:
        if done < total:
            print(f"[kvtier plan] {self.label}: {done}/{total} requests "
                  f"({100 * done / max(total, 1):.0f}%)", file=sys.stderr, flush=True)
