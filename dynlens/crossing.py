"""When the scheduled learning rate will pass the stability limit along the update.

A run diverges when its step size passes what its network can follow. The limit can be measured
long before: the update ratio r = η/η_c along the step the optimizer took
(:func:`dynlens.forecast.update_ratio`, two forward passes; 1 at the edge of stability) gives
the critical step size η_c = η/r, the step size along the update at which the loss would rise
(Kalra et al. 2026, *critical sharpness*). The learning rate ahead is known too: the schedule
says it (:class:`dynlens.callbacks.lr_ahead.LRAhead` reads it). So the divergence can be
forecast by mechanism: the step at which the scheduled η(s) reaches the limit η_c(s),
extrapolated from its recent measurements, rather than by drawing a line through a loss that
stays flat until the crossing and explodes within tens of steps after it.

:func:`limit_crossing` fits ``ln η_c`` over the recent measurements by least squares (a limit
that shrinks or grows by a constant factor per step: progressive sharpening lowers it), and
finds the first step ahead at which ``ln η(s)`` reaches the fitted line. The range moves both
the line's level now and its slope by ± ``z`` standard errors: a limit measured about the rate
itself (gradient descent at the edge of stability, where the ratio hovers about 1 and the run
steadies itself) crosses only at the fast end, and so is no sure crossing; one that surely falls
through a rising rate, or that the rate surely rises through, is. Where the rate does not rise
at the crossing, a limit that falls to it is the edge of stability, at which descent steadies itself
(progressive sharpening stops there); what is sure there is a limit already below the rate by
more than its standard error and measured below it :data:`SUSTAINED` times in a row, the update
ratio sustained above 1 (Bai et al. 2025 see loss spikes follow it under Adam): the crossing is
then expected now. Plain Python and numpy.

>>> steps = [0, 10, 20, 30]
>>> limits = [1.0, 1.0, 1.0, 1.0]  # η_c = 1, steady
>>> rates = [0.5 * 1.01**k for k in range(200)]  # a geometric ramp from 0.5 at step 30
>>> c = limit_crossing(steps, limits, rates)
>>> round(c.expected_step), c.steps_to  # 30 + ln 2 / ln 1.01 = 99.7
(100, 70.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .forecast import Trend, fit_trend

__all__ = ["SUSTAINED", "Crossing", "limit_crossing"]

#: Under a rate that does not rise, the measurements of the limit in a row that must be below
#: the rate (the update ratio above 1) for a sure crossing: as many as a trend needs.
SUSTAINED = 4


@dataclass(frozen=True)
class Crossing:
    """The step at which the scheduled learning rate reaches the fitted stability limit.

    ``trend`` is the fit of η_c (an exponential trend, in its logarithm); ``expected_step`` the
    first step at or after the last measurement at which η(s) ≥ η_c(s) on the fit (``None``:
    not within the schedule read), ``lower`` and ``upper`` the same with the limit's level now
    and its slope each ± ``z`` standard errors (``upper`` inf when the slow end does not cross
    within the schedule read); ``confident`` when the slow end crosses too.
    """

    trend: Trend
    #: The learning rate at the crossing (``None`` without one).
    threshold: float | None
    expected_step: float | None
    steps_to: float | None
    lower: float | None
    upper: float | None
    confident: bool

    @property
    def last_step(self) -> int:
        return self.trend.last_step

    def within(self, horizon: float) -> bool:
        """The crossing within ``horizon`` steps of the last measurement."""
        return self.steps_to is not None and self.steps_to <= horizon

    def surely_within(self, horizon: float) -> bool:
        """Even the slow end of the range crosses within ``horizon`` steps."""
        return self.upper is not None and self.upper - self.last_step <= horizon

    def cleared(self, horizon: float, z: float) -> bool:
        """An active warning from it clears: even the fast end crosses beyond twice the
        horizon, or not within the schedule read."""
        return self.lower is None or self.lower - self.last_step > 2 * horizon

    def range_text(self) -> str:
        """``"lower–∞"``: the instability comes from the crossing on, after a delay the limit
        does not say (the loss must still grow from where it is)."""
        return "none" if self.lower is None else f"{self.lower:.0f}–∞"


def _first_reach(log_rates: np.ndarray, log_limit: float, slope: float) -> int | None:
    """The first ``k`` with ``log_rates[k] >= log_limit + slope · k``, else ``None``."""
    line = log_limit + slope * np.arange(len(log_rates), dtype=np.float64)
    hits = np.flatnonzero(log_rates >= line)
    return int(hits[0]) if hits.size else None


def limit_crossing(
    steps: Sequence[float], limits: Sequence[float], rates_ahead: Sequence[float], z: float = 2.0
) -> Crossing | None:
    """When the learning rate reaches the stability limit (module docstring).

    ``steps`` and ``limits``: the recent measurements of η_c (all positive); ``rates_ahead[k]``
    the learning rate at step ``last + k``, ``last`` the last measurement's step (the schedule as
    read; ``rates_ahead[0]`` is the rate now). ``None`` with fewer than two distinct steps or no
    positive rate.
    """
    if len(set(steps)) < 2 or not rates_ahead:
        return None
    trend = fit_trend(steps, limits, kind="exponential")
    rates = np.asarray(rates_ahead, dtype=np.float64)
    if not (rates > 0).any():
        return None
    log_rates = np.where(rates > 0, np.log(np.where(rates > 0, rates, 1.0)), -np.inf)
    last = float(trend.last_step)
    here = trend.intercept + trend.slope * last  # the fitted ln η_c now
    spread = z * trend.slope_stderr
    # the standard error of the fitted level now: the slope's times √(Σ(s − s̄)²/n + (last − s̄)²)
    t = np.asarray(steps, dtype=np.float64)
    level = z * trend.slope_stderr * math.sqrt(t.var() + (last - t.mean()) ** 2)

    def at(slope: float, shift: float = 0.0) -> float | None:
        k = _first_reach(log_rates, here + shift, slope)
        return None if k is None else last + k

    expected = at(trend.slope)
    if math.isfinite(spread):
        lower = at(trend.slope - spread, -level)
        upper = at(trend.slope + spread, level)
        k = None if upper is None else int(upper - last)
        if k is not None and not (k + 1 < len(rates) and rates[k + 1] > rates[k]):
            # a limit falling to a rate that does not rise there: the edge of stability, which
            # descent steadies itself at; only a limit surely below the rate now, and measured
            # below it the last SUSTAINED times, is sure (the ratio sustained above 1)
            below = all(v < rates[0] for v in list(limits)[-SUSTAINED:])
            if k > 0 or not below:
                upper = None
    else:  # two points: no spread known, no confidence
        lower, upper = expected, None
    return Crossing(
        trend=trend,
        threshold=None if expected is None else float(rates[int(expected - last)]),
        expected_step=expected,
        steps_to=None if expected is None else expected - last,
        lower=lower,
        upper=math.inf if upper is None and expected is not None else upper,
        confident=upper is not None,
    )
