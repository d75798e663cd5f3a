"""Is loading a hit faster than recomputing it? Both sides measured."""

from __future__ import annotations

import math


class LoadCostModel:
    """Is loading a hit faster than recomputing it? Both sides are measured.

    Load bandwidth per tier comes from the workers' timings of real loads;
    the prefill rate from the engine's own steps (prompt tokens per second of
    step time). Until a tier has ``min_samples`` load timings (the first ones
    pay one-time costs), loads are taken. A declined tier gets a probe load
    every ``probe_every_s`` so a recovered disk is noticed.
    """

    def __init__(self, alpha: float = 0.3, probe_every_s: float = 5.0,
                 fixed_cost_s: float = 0.0, min_samples: int = 3):
        self.alpha = alpha
        self.probe_every_s = probe_every_s
        self.fixed_cost_s = fixed_cost_s
        self.min_samples = min_samples
        self.samples: dict[str, int] = {}
        self.bandwidth: dict[str, float] = {}     # tier -> bytes/s
        self.prefill_rate: float | None = None    # tokens/s
        self._last_load: dict[str, float] = {}    # tier -> time of last taken load

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.bandwidth[tier] = self._ewma(self.bandwidth.get(tier), nbytes / seconds)
            self.samples[tier] = self.samples.get(tier, 0) + 1

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_rate = self._ewma(self.prefill_rate, tokens / seconds)

    def load_seconds(self, tier: str, nbytes: int) -> float | None:
        bw = self.bandwidth.get(tier)
        return None if bw is None else self.fixed_cost_s + nbytes / bw

    def worth_loading(self, tier: str, nbytes: int, tokens: int, now: float) -> bool:
        load = self.load_seconds(tier, nbytes)
        if load is None or self.prefill_rate is None \
                or self.samples.get(tier, 0) < self.min_samples:
            ok = True
        else:
            ok = load <= tokens / self.prefill_rate
            if not ok and now - self._last_load.get(tier, -math.inf) >= self.probe_every_s:
                ok = True   # probe: the tier may have recovered
        if ok:
            self._last_load[tier] = now
        return ok
