"""SLOs on TTFT and per-request output speed, and the user ramp that respects them."""

from __future__ import annotations

from dataclasses import dataclass, field

from .metrics import percentile


@dataclass(frozen=True)
class SLO:
    ttft_max: float | None = None       # s, every request in the window
    ttft_avg: float | None = None       # s, window mean
    ttft_p95: float | None = None       # s, window p95
    min_tokens_per_s: float | None = None  # per-request output tokens/s (1/TPOT), window mean

    @property
    def active(self) -> bool:
        return any(v is not None for v in
                   (self.ttft_max, self.ttft_avg, self.ttft_p95, self.min_tokens_per_s))

    def request_ok(self, r) -> bool:
        """One request within SLO (for goodput): its own TTFT and speed."""
        if not r.ok:
            return False
        limit = min([x for x in (self.ttft_max, self.ttft_p95, self.ttft_avg) if x is not None],
                    default=None)
        if limit is not None and r.ttft > limit:
            return False
        tps = r.tokens_per_s
        return self.min_tokens_per_s is None or tps is None or tps >= self.min_tokens_per_s

    def check(self, results) -> tuple[bool, dict]:
        """(ok, figures) over a window of results; failed requests violate it."""
        ttfts = [r.ttft for r in results if r.ok]
        speeds = [r.tokens_per_s for r in results if r.ok and r.tokens_per_s is not None]
        fig = {"n": len(results), "errors": sum(not r.ok for r in results),
               "ttft_max": max(ttfts, default=None),
               "ttft_avg": sum(ttfts) / len(ttfts) if ttfts else None,
               "ttft_p95": percentile(ttfts, 95),
               "tokens_per_s": sum(speeds) / len(speeds) if speeds else None}
        ok = fig["errors"] == 0
        for k in ("ttft_max", "ttft_avg", "ttft_p95"):
            lim = getattr(self, k)
            if lim is not None and fig[k] is not None and fig[k] > lim:
                ok = False
        if (self.min_tokens_per_s is not None and fig["tokens_per_s"] is not None
                and fig["tokens_per_s"] < self.min_tokens_per_s):
            ok = False
        return ok, fig


@dataclass
class RampController:
    """How many users should run now: a ramp that holds the load inside the SLO.

    Every ``interval`` seconds it judges the requests *started* since the last
    change. Within SLO: ``step`` users are added (up to ``max_users``).
    Violated: ``step`` users are removed (at least one stays). So the load
    climbs to the server's capacity and then oscillates around it; a violation
    in a cold-cache first window does not end the ramp. ``step=0`` is a fixed
    user count that is still judged.

    ``max_users_within_slo``: the largest user count judged within SLO in at
    least half of its windows (one lucky window does not count when most
    failed). A window with fewer than ``min_requests`` finished requests is not
    judged yet (the window grows), unless it has waited ``patience`` intervals
    with a request in flight for longer than the TTFT limit: that counts as a
    violation.
    """

    start_users: int
    step: int = 0
    interval: float = 30.0
    max_users: int = 0
    slo: SLO = field(default_factory=SLO)
    min_requests: int = 8
    patience: int = 3

    def __post_init__(self):
        self.target = self.start_users
        self.since = 0.0
        self.history: list[dict] = []
        self._verdicts: dict[int, list[int]] = {}   # users -> [ok windows, violated windows]

    @property
    def max_users_within_slo(self) -> int | None:
        if not self.slo.active:
            return None
        good = [u for u, (ok, bad) in self._verdicts.items() if ok and ok >= bad]
        return max(good, default=None)

    def update(self, now: float, results, in_flight_starts=()) -> int:
        if now - self.since < self.interval:
            return self.target
        window = [r for r in results if r.start >= self.since]
        if len(window) < self.min_requests:
            limit = self.slo.ttft_max or self.slo.ttft_p95 or self.slo.ttft_avg
            stuck = limit is not None and any(now - s > limit for s in in_flight_starts
                                              if s >= self.since)
            if not (stuck and now - self.since >= self.patience * self.interval):
                return self.target
            ok, fig = False, {"n": len(window), "stuck": True}
        else:
            ok, fig = self.slo.check(window) if self.slo.active else (True, {"n": len(window)})
        users = self.target
        self._verdicts.setdefault(users, [0, 0])[0 if ok else 1] += 1
        if self.step:
            self.target = users + self.step if ok else max(1, users - self.step)
            if self.max_users:
                self.target = min(self.target, self.max_users)
        self.history.append({"t": now, "users": users, "ok": ok, **fig,
                             "next_users": self.target})
        self.since = now
        return self.target
