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
    """How many users should run now.

    Every ``interval`` seconds it judges the requests *started* since the last
    change. Within SLO: that user count is recorded as good and, unless frozen,
    ``step`` users are added (up to ``max_users``). Violated: the ramp freezes and
    falls back to the last good count (``step`` fewer users if none was good),
    where it holds. ``step=0`` is a fixed user count that is still judged, so
    ``max_users_within_slo`` is reported either way. A window with fewer than
    ``min_requests`` finished requests is not judged yet (the window grows),
    unless it has waited ``patience`` intervals with a request in flight for
    longer than the TTFT limit: that counts as a violation.
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
        self.frozen = False
        self.max_users_within_slo: int | None = None
        self.history: list[dict] = []

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
        if ok:
            if self.slo.active:
                self.max_users_within_slo = max(self.max_users_within_slo or 0, users)
            if not self.frozen and self.step:
                self.target = users + self.step
                if self.max_users:
                    self.target = min(self.target, self.max_users)
        elif self.step and not self.frozen:
            self.frozen = True
            self.target = self.max_users_within_slo or max(1, users - self.step)
        self.history.append({"t": now, "users": users, "ok": ok, **fig,
                             "next_users": self.target})
        self.since = now
        return self.target
