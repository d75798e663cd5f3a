"""The fleet planner: a trace replayed over N replicas, each with its own tiers
(kvtier.cache.tier.Tier, as :func:`kvtier.plan.replay.replay` gives one), a router
choosing the replica of each request, and optionally a cluster-wide shared tier
(a Mooncake-store-like tier behind every replica's own tiers).

The events are the single replay's: arrivals in time order, completions first at equal
times (ordered by end time), a hit = the longest prefix live in the replica's tiers or the
shared tier (a block counts for the fastest tier holding it), and at completion every
block of the request is ``Tier.add``-ed, last block first, in each of the replica's
tiers and then in the shared tier (write-through: a block any replica stored is visible
to every replica from the shared tier, under its capacity and TTL). With one replica and
no shared tier this is exactly ``replay()``.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from operator import is_
from typing import Any, Callable, Sequence

from kvtier.cache.tier import EVICT_CAPACITY, EVICT_TTL, Tier
from kvtier.plan.replay import (Progress, ReplayResult, TierSpec, _label, _lookup_multi,
                                _StderrProgress, map_trace)
from kvtier.plan.sizing import row
from kvtier.plan.traces import PlanError, Trace

ROUTINGS = ("session", "random", "least-loaded")
SHARED = "shared"          # the shared tier's name in results


@dataclass(frozen=True)
class Fleet:
    """``replicas`` replicas behind a ``routing`` router; ``shared``: the cluster tier's
    capacity in tokens (None: no shared tier; its TTL is the replicas' kvtier TTL);
    ``seed``: the random router's."""

    replicas: int
    routing: str = "session"
    shared: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise PlanError(f"replicas: {self.replicas} must be >= 1")
        if self.routing not in ROUTINGS:
            raise PlanError(f"{self.routing!r} is not a routing ({', '.join(ROUTINGS)})")
        if self.shared is not None and not self.shared >= 0:
            raise PlanError(f"shared tier: capacity {self.shared} must be >= 0")


@dataclass
class FleetResult(ReplayResult):
    """A replay's totals over the fleet: hits, evictions and peaks per tier name summed
    over the replicas (the shared tier's as ``"shared"``, last in ``tiers``)."""

    fleet: Fleet | None = None
    replica_of: list[int] = field(default_factory=list)   # per request, in arrival order
    requests_by_replica: list[int] = field(default_factory=list)
    shared_written_tokens: float = 0.0


def shared_ttl(tiers: Sequence[TierSpec]) -> float:
    """The shared tier's TTL: that of the replicas' kvtier tiers (the last one not
    vLLM's GPU cache, "hbm"), as kvtier would give its remote tier its ttl_seconds."""
    return next((s.ttl_s for s in reversed(tiers) if s.name != "hbm"), tiers[-1].ttl_s)


def session_replica(session: int, replicas: int) -> int:
    """The replica a session sticks to: a fixed 64-bit mix of its id (splitmix64's
    finaliser), modulo the replicas -- like a router hashing a session header."""
    z = (session + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % replicas


def replay_fleet(trace: Trace, tiers: Sequence[TierSpec], fleet: Fleet, *,
                 progress: Progress | None = None) -> FleetResult:
    """Replay ``trace`` over ``fleet.replicas`` replicas with tiers ``tiers`` each (fastest
    first), routed by ``fleet.routing``, with the shared tier if ``fleet.shared``.

    Routing, at each arrival (after the completions due by then):

    - ``session``: :func:`session_replica` of the request's session (``trace.session``);
    - ``random``: ``random.Random(seed).randrange(replicas)``, one draw per request in
      arrival order;
    - ``least-loaded``: the replica with the fewest requests in flight (arrived, not
      completed), the lowest index on a tie.
    """
    if not tiers:
        raise PlanError("replay needs at least one tier")
    if any(s.admission for s in tiers):
        raise PlanError("the fleet replays inclusive tiers: no disk admission policy")
    if fleet.routing == "session" and trace.session is None and len(trace):
        raise PlanError("session routing needs the requests' sessions; this trace has none")
    t0 = time.perf_counter()
    c0 = time.process_time()
    R = fleet.replicas
    specs = list(tiers)
    shared = None
    if fleet.shared is not None:
        specs.append(TierSpec(SHARED, fleet.shared, shared_ttl(tiers)))
        shared = Tier(SHARED, fleet.shared, specs[-1].ttl_s)
    names = [s.name for s in specs]
    own = len(tiers)
    objs = [[Tier(s.name, s.capacity_tokens, s.ttl_s) for s in tiers]
            + ([] if shared is None else [shared]) for _ in range(R)]
    gets = [[o.get for o in row_] for row_ in objs]
    adds = [[o.add for o in row_] for row_ in objs]
    single = len(specs) == 1
    kv_tier = [s.name != "hbm" for s in specs]   # a request's TTL: kvtier's tiers only
    bt = trace.block_tokens
    arrival = trace.arrival.tolist()
    end = trace.end.tolist()
    n_in = trace.input_tokens.tolist()
    last = trace.last_tokens.tolist()
    off = trace.offsets.tolist()
    keys_np = trace.keys
    n_req = len(arrival)
    req_ttl = trace.ttl.tolist() if trace.ttl is not None else None
    route = _router(fleet, trace)
    in_flight = [0] * R
    replica_of = [0] * n_req

    hit_tokens = 0
    hit_by_tier = [0] * len(specs)
    prefilled = 0
    peak = [0.0] * len(specs)
    pending: list[tuple[float, int, list[int], int]] = []   # (end, i, keys, last)
    consume = deque(maxlen=0).extend

    def complete(t_end: float, i: int, keys: list[int], lt: int) -> None:
        r = replica_of[i]
        in_flight[r] -= 1
        ttl = req_ttl[i] if req_ttl is not None else 0.0
        keys = keys[::-1]                       # last block first
        sizes = None
        if lt != bt and keys:
            sizes = [bt] * len(keys)
            sizes[0] = lt
        for j, add in enumerate(adds[r]):
            sz = repeat(bt) if sizes is None else sizes
            if ttl and kv_tier[j]:
                consume(map(add, keys, sz, repeat(t_end), repeat(None), repeat(False),
                            repeat(True), repeat(ttl)))
            else:
                consume(map(add, keys, sz, repeat(t_end)))
            u = objs[0][j].used if j >= own else sum(o[j].used for o in objs)
            if u > peak[j]:
                peak[j] = u

    last_report = time.monotonic()
    for i in range(n_req):
        t = arrival[i]
        while pending and pending[0][0] <= t:
            complete(*heapq.heappop(pending))
        r = route(i, in_flight)
        replica_of[i] = r
        in_flight[r] += 1
        keys = keys_np[off[i]:off[i + 1]].tolist()
        n = len(keys)
        if single:
            get0 = gets[r][0]
            k = next(compress(count(), map(is_, map(get0, keys, repeat(t)), repeat(None))), n)
            by = None
        else:
            k, by, last_tier = _lookup_multi(gets[r], keys, t)
        if k:
            tok = min(n_in[i], k * bt if k < n else (n - 1) * bt + last[i])
            hit_tokens += tok
            if by is None:
                hit_by_tier[0] += tok
            else:
                for j, cnt in enumerate(by):
                    hit_by_tier[j] += cnt * bt
                hit_by_tier[last_tier] -= k * bt - tok
        prefilled += n - k
        heapq.heappush(pending, (end[i], i, keys, last[i]))
        if progress is not None and not i & 255:
            now = time.monotonic()
            if now - last_report >= 5.0:
                progress(i, n_req)
                last_report = now
    while pending:
        complete(*heapq.heappop(pending))
    if progress is not None:
        progress(n_req, n_req)

    evictions: dict[str, dict[str, int]] = {}
    for j, nm in enumerate(names):
        group = [objs[0][j]] if j >= own else [o[j] for o in objs]
        evictions[nm] = {c: sum(o.stats.evictions[c] for o in group)
                         for c in (EVICT_CAPACITY, EVICT_TTL)}
    by_replica = [0] * R
    for r in replica_of:
        by_replica[r] += 1
    return FleetResult(
        tiers=specs, requests=n_req, input_tokens=sum(n_in), hit_tokens=hit_tokens,
        hit_tokens_by_tier=dict(zip(names, hit_by_tier)), blocks=trace.num_blocks,
        blocks_prefilled=prefilled, distinct_blocks=trace.distinct_blocks,
        peak_used_tokens=dict(zip(names, peak)), evictions=evictions,
        replay_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
        written_tokens=sum(o[own - 1].stats.inserted for o in objs),
        fleet=fleet, replica_of=replica_of, requests_by_replica=by_replica,
        shared_written_tokens=shared.stats.inserted if shared is not None else 0.0)


def _router(fleet: Fleet, trace: Trace) -> Callable[[int, list[int]], int]:
    """``route(i, in_flight) -> replica`` of request ``i``."""
    R = fleet.replicas
    if fleet.routing == "session":
        sessions = trace.session.tolist() if trace.session is not None else []
        table: dict[int, int] = {}

        def by_session(i: int, in_flight: list[int]) -> int:
            s = sessions[i]
            r = table.get(s)
            if r is None:
                r = table[s] = session_replica(s, R)
            return r
        return by_session
    if fleet.routing == "random":
        draw = random.Random(fleet.seed).randrange
        return lambda i, in_flight: draw(R)
    return lambda i, in_flight: min(range(R), key=in_flight.__getitem__)


# --------------------------------------------------------------------------- sweeps
def fleet_configs(configs: Sequence[Sequence[TierSpec]], replicas: Sequence[int],
                  routings: Sequence[str], shared: Sequence[float] = (), seed: int = 0
                  ) -> list[tuple[list[TierSpec], Fleet]]:
    """Every tier config x replicas x routing, each without the shared tier and then
    with each capacity in ``shared``."""
    out = []
    for c in configs:
        for n in replicas:
            for rt in routings:
                for sh in [None, *shared]:
                    out.append((list(c), Fleet(int(n), rt, sh, seed)))
    return out


def _fleet_item(trace: Trace, args: tuple) -> FleetResult:
    tiers, fleet, label = args
    return replay_fleet(trace, tiers, fleet,
                        progress=_StderrProgress(label) if label else None)


def fleet_label(tiers: Sequence[TierSpec], fleet: Fleet) -> str:
    sh = "" if fleet.shared is None else \
        " + " + _label([TierSpec(SHARED, fleet.shared, shared_ttl(tiers))])
    return f"{fleet.replicas} x [{_label(tiers)}] {fleet.routing}{sh}"


def replay_fleets(trace: Trace, runs: Sequence[tuple[Sequence[TierSpec], Fleet]], *,
                  jobs: int = 1, progress: bool = False,
                  on_result: Callable[[int, FleetResult], None] | None = None
                  ) -> list[FleetResult]:
    """:func:`replay_fleet` for each (tiers, fleet), in ``jobs`` processes, in order."""
    if trace.num_blocks * len(runs) < 2_000_000:
        jobs = 1
    items = [(list(t), f, fleet_label(t, f) if progress else None) for t, f in runs]
    return map_trace(trace, _fleet_item, items, jobs=jobs, on_result=on_result)


def fleet_row(res: FleetResult, kv_bytes_per_token: int | None = None) -> dict[str, Any]:
    """A JSON row (kind ``"fleet"``): :func:`kvtier.plan.sizing.row`'s fields for the
    fleet's totals (``tiers`` lists a replica's tiers, then the shared tier), where
    ``capacity_tokens``, ``peak_working_set_tokens`` and ``written_tokens`` are those
    of the replicas' last own tier (its peak and writes summed over the replicas),
    plus ``replicas``, ``routing``, ``seed``, ``shared_tier`` (false / true),
    ``shared_written_tokens`` and ``shared_peak_tokens`` (the shared tier's inserts and
    peak, 0 without one) and ``requests_by_replica``."""
    f = res.fleet
    last = [s for s in res.tiers if s.name != SHARED][-1]
    out = row(res, kv_bytes_per_token)
    out["kind"] = "fleet"
    out["capacity_tokens"] = None if math.isinf(last.capacity_tokens) else last.capacity_tokens
    out["peak_working_set_tokens"] = res.peak_used_tokens[last.name]
    if kv_bytes_per_token:
        out["capacity_bytes"] = (None if math.isinf(last.capacity_tokens)
                                 else int(last.capacity_tokens * kv_bytes_per_token))
        out["peak_working_set_bytes"] = int(out["peak_working_set_tokens"]
                                            * kv_bytes_per_token)
    out.update({"replicas": f.replicas, "routing": f.routing, "seed": f.seed,
                "shared_tier": f.shared is not None,
                "shared_written_tokens": res.shared_written_tokens,
                "shared_peak_tokens": res.peak_used_tokens.get(SHARED, 0.0),
                "requests_by_replica": res.requests_by_replica})
    return out
