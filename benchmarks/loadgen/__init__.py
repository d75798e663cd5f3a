"""kvtier agentic load generator: trace replay and a synthetic agent swarm.

Async (aiohttp) client for any OpenAI-compatible vLLM server. Requests go to
``/v1/completions`` streamed, with prompts as token-id lists (no tokenizer), to
measure per request TTFT, TPOT, end-to-end latency, prompt and cached tokens;
per run it reads the server's Prometheus ``/metrics`` before and after (cached
tokens by source: device, host, disk), and reports hit rate, output tokens/s,
goodput (requests within SLO per second) and the most users held within SLO.

Workloads:
  * replay of WEKA kv-cache-tester traces (Apache-2.0,
    github.com/callanjfox/kv-cache-tester): every 64-token hash id maps to
    ``--tokens-per-hash`` deterministic token ids, so prompts keep the real
    prefix structure; sub-agents run concurrently with their parent;
  * ``--synthetic``: an orchestrator + sub-agents swarm sharing a common
    context, growing to a high watermark and then summarised, with think
    times / output lengths / context growth drawn from the traces.

Runs: a **fixed request set** (``--sessions N``: the first N sessions, longest
first, served to the end; reports the makespan; ``--arrival closed`` with
``--users U`` or ``--arrival poisson --rate R`` sessions/s), or a **timed** run
(``--duration``) with fixed users (``--users N``) or a ramp (``--ramp-step K
--ramp-interval S``) that stops adding users when the SLO
(``--slo-ttft-max/avg/p95``, ``--slo-tokens-per-s``) is violated over a window
and holds the last good count.
Progress goes to stderr; the last stdout line is a JSON headline.

Usage (start the server with --enable-prompt-tokens-details for per-request
cached tokens; --block-size must match the server's):

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 \\
        --trace-dir ../shared/traces/weka-cc-dev --tokens-per-hash 8 \\
        --time-scale 0.1 --max-think 5 --output-scale 0.1 --max-context 8000 \\
        --users 2 --ramp-step 2 --ramp-interval 30 --slo-ttft-p95 2 \\
        --duration 300 --out results/run.json
"""

from .client import RequestResult, complete
from .metrics import counters_delta, parse_prometheus, percentile, server_counters
from .runner import LoadConfig, Player, poisson_arrivals, run_load
from .slo import SLO, RampController
from .synthetic import SwarmConfig, TraceStats, swarm_session, swarm_sessions
from .workload import (Scale, Session, SubAgent, TokenMap, Turn, Workload, block_keys,
                       describe_request_set, load_trace, load_traces)
from .cli import make_workload

__all__ = [
    "RequestResult", "complete", "counters_delta", "parse_prometheus", "percentile",
    "server_counters", "LoadConfig", "Player", "poisson_arrivals", "run_load", "SLO", "RampController",
    "SwarmConfig", "TraceStats", "swarm_session", "swarm_sessions", "Scale", "Session",
    "SubAgent", "TokenMap", "Turn", "Workload", "block_keys", "describe_request_set",
    "load_trace", "load_traces",
    "make_workload",
]
