"""Run users against a server: replay sessions, ramp users, record everything.

Two ways to bound a run:

* **timed** (``LoadConfig.sessions == 0``): users pick sessions for
  ``duration`` seconds (optionally ramped within an SLO); configurations that
  run at different speeds serve different requests;
* **fixed request set** (``sessions = N``): the first ``N`` sessions of the
  workload (:meth:`Workload.request_set`, longest first), served to the end;
  the run's length is its *makespan* (first request sent to last answer
  received) and every configuration serves exactly the same requests.
  ``arrival="closed"``: ``users`` users each take the next session of the set
  when they finish one (closed loop, think times inside sessions).
  ``arrival="poisson"``: open loop; session ``i`` starts at the ``i``-th
  arrival of a Poisson process of ``rate`` sessions/s (seeded: the same
  times for every configuration), however many are already running. Within a
  session, in both modes, a turn is sent only after the previous turn of its
  agent was answered (plus its think time): its prompt extends that turn's
  prompt and answer, so sending it earlier would not be the same request.
"""

from __future__ import annotations

import asyncio
import collections
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from .client import RequestResult, complete
from .metrics import counters_delta, percentile, server_counters, stats
from .slo import SLO, RampController
from .workload import (Scale, Session, TokenMap, Turn, Workload, block_keys,
                       describe_request_set)

TIMINGS = ("think", "original")
ARRIVALS = ("closed", "poisson")


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Start times (s) of ``n`` sessions: 0, then exponential gaps of mean 1/rate."""
    if rate <= 0:
        raise ValueError(f"poisson arrivals need rate > 0 (sessions/s), not {rate!r}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


class Player:
    """Replays one session: its turns in order, its sub-agents concurrently.

    Timing ``think``: a turn is sent its (scaled) think time after the previous
    turn of the same agent finished; a sub-agent starts its (scaled) gap after
    the parent turn it follows finished. Timing ``original``: a turn is sent at
    its agent's start + ``t`` * time_scale, but never before the previous turn
    finished (its prompt contains that turn's answer); a sub-agent starts at the
    session start + its ``t`` * time_scale. The parent never waits for its
    sub-agents; the session ends when all of them did.
    """

    def __init__(self, send, scale: Scale, timing: str = "think",
                 stopped=lambda: False, clock=time.monotonic, sleep=asyncio.sleep,
                 tick: float = 0.25):
        if timing not in TIMINGS:
            raise ValueError(f"timing must be one of {TIMINGS}, not {timing!r}")
        self.send, self.scale, self.timing = send, scale, timing
        self.stopped, self.clock, self.sleep, self.tick = stopped, clock, sleep, tick

    async def sleep_until(self, when: float) -> bool:
        """Sleep until ``when``; False if stopped meanwhile."""
        while not self.stopped():
            dt = when - self.clock()
            if dt <= 0:
                return True
            await self.sleep(min(dt, self.tick))
        return False

    async def play(self, session: Session, start: float | None = None) -> None:
        start = self.clock() if start is None else start
        subs_after = collections.defaultdict(list)
        for sa in session.subagents:
            subs_after[sa.after].append(sa)
        tasks: list[asyncio.Task] = []

        def launch(after: int, anchor: float):
            for sa in subs_after.get(after, ()):
                if self.timing == "think":
                    at = anchor + self.scale.think(sa.gap)
                else:
                    at = start + sa.t * self.scale.time_scale
                tasks.append(asyncio.ensure_future(self._play_at(sa.session, at)))

        launch(-1, start)
        prev_end = start
        try:
            for i, turn in enumerate(session.turns):
                if self.timing == "think":
                    when = prev_end + (self.scale.think(turn.think) if i else 0.0)
                else:
                    when = max(prev_end, start + turn.t * self.scale.time_scale)
                if not await self.sleep_until(when):
                    break
                await self.send(turn)
                prev_end = self.clock()
                launch(i, prev_end)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _play_at(self, session: Session, at: float) -> None:
        if await self.sleep_until(at):
            await self.play(session, start=at)


@dataclass
class LoadConfig:
    duration: float = 300.0           # timed mode: s of load (no new requests after it)
    users: int = 4                    # initial (or fixed) concurrent users (closed loop)
    ramp_step: int = 0                # users added per ramp interval (0: fixed)
    ramp_interval: float = 30.0
    max_users: int = 64
    slo: SLO = field(default_factory=SLO)
    timing: str = "think"
    block_size: int = 32              # server KV block size (for re-prefill counts)
    progress_interval: float = 5.0
    request_timeout: float = 600.0
    drain_timeout: float = 15.0       # s to let in-flight requests finish at the end
    # fixed request set (see the module doc); sessions == 0: timed mode
    sessions: int = 0                 # the first N sessions of the workload, served to the end
    arrival: str = "closed"           # closed | poisson
    rate: float = 0.0                 # poisson: sessions started per second
    arrival_seed: int = 0
    order: str = "longest-first"      # dispatch order of the set (Workload.request_set)
    time_limit: float = 0.0           # fixed set: stop after this many s (0: none); the
                                      # summary then says complete: false

    def __post_init__(self):
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, not {self.arrival!r}")
        if self.arrival == "poisson" and (self.sessions <= 0 or self.rate <= 0):
            raise ValueError("arrival=poisson needs a fixed request set (sessions > 0) "
                             "and rate > 0 (sessions/s)")

    @property
    def fixed(self) -> bool:
        return self.sessions > 0


class _Run:
    def __init__(self, url, model, workload: Workload, cfg: LoadConfig, log):
        self.url, self.model, self.workload, self.cfg, self.log = url, model, workload, cfg, log
        self.scale = workload.scale
        self.tokens = TokenMap(self.scale)
        self.results: list[RequestResult] = []
        self.in_flight: dict[int, float] = {}
        self.prefills: collections.Counter = collections.Counter()
        self.seen: set = set()
        self.stop = False
        self.ctl = RampController(cfg.users, cfg.ramp_step, cfg.ramp_interval,
                                  cfg.max_users, cfg.slo)
        self.timeline: list[dict] = []
        self.user_tasks: dict[int, asyncio.Task] = {}
        self.user_errors: list[str] = []
        self.request_set: list[Session] = []
        self.request_set_info: dict | None = None
        self.arrivals: list[float] = []
        self.active = 0                  # fixed set: sessions being played
        self.sessions_done = 0
        self.timed_out = False
        if cfg.fixed:
            self.request_set = workload.request_set(cfg.sessions, cfg.order)
            self.request_set_info = describe_request_set(self.request_set, self.scale,
                                                         cfg.block_size)
            if cfg.arrival == "poisson":
                self.arrivals = poisson_arrivals(len(self.request_set), cfg.rate,
                                                 cfg.arrival_seed)

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def send(self, turn: Turn, user: int) -> None:
        prompt = self.tokens.prompt(turn)
        r = RequestResult(user, turn.namespace, turn.agent, turn.index, self.now())
        key = id(r)
        self.in_flight[key] = r.start
        try:
            await complete(self.http, self.url, self.model, prompt,
                           self.scale.max_tokens(turn), r, self.t0)
        finally:
            del self.in_flight[key]
        self.results.append(r)
        if r.ok:
            keys = block_keys(turn, self.scale, self.cfg.block_size)
            self.seen.update(keys)
            if r.cached_tokens is not None:
                self.prefills.update(keys[r.cached_tokens // self.cfg.block_size:])

    async def user(self, uid: int) -> None:
        def stopped():
            return self.stop or uid >= self.ctl.target

        async def send(turn):
            await self.send(turn, uid)

        player = Player(send, self.scale, self.cfg.timing, stopped)
        while not stopped():
            await player.play(self.workload.next_session())

    def spawn_users(self) -> None:
        for uid in range(self.ctl.target):
            task = self.user_tasks.get(uid)
            if task is not None and task.done() and not task.cancelled() and task.exception():
                e = task.exception()
                self.user_errors.append(f"user {uid}: {type(e).__name__}: {e}")
                print(f"[loadgen] {self.user_errors[-1]}", file=self.log, flush=True)
            if task is None or task.done():
                self.user_tasks[uid] = asyncio.ensure_future(self.user(uid))

    def bucket(self, t_from: float, t_to: float) -> dict:
        rs = [r for r in self.results if t_from <= r.end < t_to]
        ok = [r for r in rs if r.ok]
        dt = max(t_to - t_from, 1e-9)
        prompt = sum(r.prompt_tokens for r in ok if r.cached_tokens is not None)
        cached = sum(r.cached_tokens for r in ok if r.cached_tokens is not None)
        ttfts = [r.ttft for r in ok]
        users = self.active if self.cfg.fixed else self.ctl.target
        return {"t": t_to, "users": users,
                "active_users": self.active if self.cfg.fixed
                else sum(not t.done() for t in self.user_tasks.values()),
                "requests": len(ok), "errors": len(rs) - len(ok),
                "output_tok_s": sum(r.output_tokens for r in ok) / dt,
                "prompt_tokens": prompt, "cached_tokens": cached,
                "hit_rate": cached / prompt if prompt else None,
                "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95)}

    def progress(self, b: dict) -> None:
        def f(x, fmt):
            return "-" if x is None else fmt % x
        print(f"[loadgen {b['t']:6.0f}s] users {b['users']:3d}  reqs {len(self.results):5d} "
              f"(+{b['requests']}, err {b['errors']})  out {b['output_tok_s']:7.1f} tok/s  "
              f"hit {f(b['hit_rate'] and 100 * b['hit_rate'], '%3.0f%%')}  "
              f"ttft p50 {f(b['ttft_p50'], '%.2f')}s p95 {f(b['ttft_p95'], '%.2f')}s",
              file=self.log, flush=True)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout)
        # force_close: a connection per request. With keep-alive, a request sent on
        # a connection the server is closing as idle (uvicorn: after 5 s) fails with
        # ServerDisconnectedError; runs that slow down at the end (few users left)
        # lost a few requests that way. A localhost connect costs ~1 ms.
        conn = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=conn) as http:
            self.http = http
            if self.cfg.fixed:
                await self.run_fixed()
                return
            self.t0 = time.monotonic()
            self.ctl.since = 0.0
            self.spawn_users()
            last = 0.0
            while (now := self.now()) < self.cfg.duration:
                await asyncio.sleep(min(1.0, self.cfg.duration - now))
                now = self.now()
                self.ctl.update(now, self.results, list(self.in_flight.values()))
                self.spawn_users()
                if now - last >= self.cfg.progress_interval or now >= self.cfg.duration:
                    b = self.bucket(last, now)
                    self.timeline.append(b)
                    self.progress(b)
                    last = now
            self.stop = True
            tasks = [t for t in self.user_tasks.values() if not t.done()]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self.cfg.drain_timeout)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            self.elapsed = self.now()
            for uid, t in self.user_tasks.items():
                if t.done() and not t.cancelled() and t.exception():
                    e = t.exception()
                    self.user_errors.append(f"user {uid}: {type(e).__name__}: {e}")


    async def play(self, uid: int, session: Session) -> None:
        async def send(turn):
            await self.send(turn, uid)

        self.active += 1
        try:
            await Player(send, self.scale, self.cfg.timing, lambda: self.stop).play(session)
        finally:
            self.active -= 1
            self.sessions_done += 1

    async def run_fixed(self) -> None:
        """Serve the fixed request set to the end (or to ``time_limit``)."""
        queue = collections.deque(self.request_set)

        async def user(uid: int) -> None:      # closed loop: the next session when done
            while queue and not self.stop:
                await self.play(uid, queue.popleft())

        async def arrive(i: int, session: Session, at: float) -> None:   # open loop
            while not self.stop and (dt := at - self.now()) > 0:
                await asyncio.sleep(min(dt, 0.25))
            if not self.stop:
                await self.play(i, session)

        self.t0 = time.monotonic()
        if self.cfg.arrival == "closed":
            n = min(self.cfg.users, len(self.request_set))
            tasks = {u: asyncio.ensure_future(user(u)) for u in range(n)}
        else:
            tasks = {i: asyncio.ensure_future(arrive(i, s, at))
                     for i, (s, at) in enumerate(zip(self.request_set, self.arrivals))}
        self.user_tasks = tasks
        pending = set(tasks.values())
        last = 0.0
        while pending:
            _, pending = await asyncio.wait(pending, timeout=1.0)
            now = self.now()
            if self.cfg.time_limit and now >= self.cfg.time_limit and not self.stop:
                self.stop = self.timed_out = True
                print(f"[loadgen] time limit {self.cfg.time_limit:.0f} s reached: "
                      f"{self.sessions_done}/{len(self.request_set)} sessions done",
                      file=self.log, flush=True)
                if pending:
                    _, pending = await asyncio.wait(pending, timeout=self.cfg.drain_timeout)
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    pending = set()
            if now - last >= self.cfg.progress_interval or not pending:
                b = self.bucket(last, now + (1e-6 if not pending else 0.0))
                self.timeline.append(b)
                self.progress(b)
                last = now
        self.elapsed = max((r.end for r in self.results), default=self.now())
        for uid, t in tasks.items():
            if t.done() and not t.cancelled() and t.exception():
                e = t.exception()
                self.user_errors.append(f"user {uid}: {type(e).__name__}: {e}")


async def fetch_text(url: str, path: str, timeout: float = 10.0) -> str | None:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url.rstrip("/") + path) as r:
                return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def default_model(url: str) -> str:
    import json
    text = await fetch_text(url, "/v1/models")
    if not text:
        raise RuntimeError(f"cannot list models at {url}/v1/models")
    return json.loads(text)["data"][0]["id"]


async def run_load(url: str, workload: Workload, cfg: LoadConfig, model: str | None = None,
                   log=sys.stderr) -> dict:
    """Run the load; return the result document (summary, timeline, requests, metrics)."""
    model = model or await default_model(url)
    text = await fetch_text(url, "/metrics")
    before = server_counters(text) if text else None
    run = _Run(url, model, workload, cfg, log)
    await run.run()
    text = await fetch_text(url, "/metrics")
    after = server_counters(text) if text else None
    return {"summary": summarize(run, counters_delta(before, after)),
            "timeline": run.timeline,
            "ramp": run.ctl.history,
            "reprefill_histogram": reprefill_histogram(run.prefills),
            "metrics": {"before": before, "after": after},
            "requests": [r.to_dict() for r in run.results]}


def reprefill_histogram(prefills: collections.Counter) -> dict[int, int]:
    """{times a block was prefilled again after its first prefill: number of blocks}."""
    hist = collections.Counter(n - 1 for n in prefills.values())
    return dict(sorted(hist.items()))


def summarize(run: _Run, delta: dict | None) -> dict:
    rs, slo, cfg = run.results, run.cfg, run.cfg
    slo = cfg.slo
    ok = [r for r in rs if r.ok]
    if cfg.fixed:
        # Fixed request set: rates over the makespan (first request sent at 0 to
        # the last answer), every request counted.
        el = max(run.elapsed, 1e-9)
        in_window = ok
    else:
        # Rates count the requests that finished within the load window; latency
        # figures also include those that finished while draining.
        el = max(min(run.elapsed, cfg.duration), 1e-9)
        in_window = [r for r in ok if r.end <= el]
    out_tokens = sum(r.output_tokens for r in in_window)
    with_cache = [r for r in ok if r.cached_tokens is not None]
    c_prompt = sum(r.prompt_tokens for r in with_cache)
    c_cached = sum(r.cached_tokens for r in with_cache)
    client_hit = c_cached / c_prompt if c_prompt else None
    good = [r for r in in_window if slo.request_ok(r)]
    within, fig = slo.check(ok) if ok else (False, {})
    out = {
        "mode": "fixed" if cfg.fixed else "timed",
        "duration_s": el,
        "drained_s": 0.0 if cfg.fixed else run.elapsed - el,
        "users_final": None if cfg.fixed else run.ctl.target,
        "max_users_within_slo": None if cfg.fixed else run.ctl.max_users_within_slo,
        "slo": {k: v for k, v in vars(slo).items()},
        "slo_met_overall": within if slo.active else None,
        "requests_ok": len(ok), "requests_failed": len(rs) - len(ok),
        "errors": sorted({r.error for r in rs if not r.ok})[:5],
        "user_errors": run.user_errors[:5],
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / el,
        "requests_per_s": len(in_window) / el,
        "goodput_rps": len(good) / el,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens_client": c_cached if with_cache else None,
        "hit_rate_client": client_hit,
        "hit_rate": (delta or {}).get("hit_rate") if (delta or {}).get("hit_rate") is not None
        else client_hit,
        "cached_by_source": (delta or {}).get("cached_by_source"),
        "preemptions": (delta or {}).get("preemptions"),
        "server": delta,
        "ttft": stats(r.ttft for r in ok),
        "tpot": stats(r.tpot for r in ok),
        "e2e": stats(r.e2e for r in ok),
        "working_set_blocks": len(run.seen),
        "prefilled_blocks": sum(run.prefills.values()),
        "reprefilled_blocks": sum(n - 1 for n in run.prefills.values()),
    }
    if cfg.fixed:
        info = run.request_set_info
        out.update(
            makespan_s=el, arrival=cfg.arrival, users=cfg.users if cfg.arrival == "closed"
            else None, rate=cfg.rate if cfg.arrival == "poisson" else None,
            request_set=info, requests_expected=info["requests"],
            sessions_done=run.sessions_done,
            complete=(not run.timed_out and len(ok) == len(rs) == info["requests"]
                      and run.sessions_done == info["sessions"]))
    return out
