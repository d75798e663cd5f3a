"""``kvtier plan``: trace-driven TTL / capacity planner.

Replays request traces through kvtier's own cache policy, :class:`kvtier.cache.tier.Tier`
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

Fleet: ``plan.replay_fleet(trace, tiers, plan.Fleet(4, "session", shared=math.inf))``
replays over 4 replicas with a cluster-wide shared tier (``--replicas``).

Modules: ``traces`` (the readers), ``replay`` (through kvtier.cache.tier.Tier),
``fleet`` (N replicas, a router, a shared tier), ``sizing`` (from replays to answers),
``units`` and ``report`` (the command line's input and output), ``plots``, ``cli``.
"""

from kvtier.plan.cli import main
from kvtier.plan.fleet import ROUTINGS, Fleet, FleetResult, fleet_row, replay_fleet, replay_fleets
from kvtier.plan.replay import ReplayResult, TierSpec, Timeline, replay, replay_many, tier_configs
from kvtier.plan.sizing import Sizing, kv_bytes_per_token, row, size_for, size_rows, sweep
from kvtier.plan.traces import FORMATS, PlanError, Trace, detect_format, load
from kvtier.plan.units import parse_capacity, parse_ttl

__all__ = ["FORMATS", "ROUTINGS", "Fleet", "FleetResult", "PlanError", "ReplayResult",
           "Sizing", "TierSpec", "Timeline", "Trace", "detect_format", "fleet_row",
           "kv_bytes_per_token", "load", "main", "parse_capacity", "parse_ttl", "replay",
           "replay_fleet", "replay_fleets", "replay_many", "row", "size_for", "size_rows",
           "sweep", "tier_configs"]
