"""The early-warning policy: when a forecast becomes a warning, when a warning clears, and when
an instability has happened.

:class:`dynlens.EarlyWarningMonitor` measures a signal per instability (the median logit gap
for Softmax Collapse, the training loss for divergence, the largest attention logit for
attention blow-up) and hands each measured point to a :class:`WarningPolicy`, which decides
everything else from the points alone: it fits the recent points of each signal
(:func:`dynlens.forecast.steps_to_threshold`), says whether the instability is now surely
coming within the horizon often enough in a row to warn, whether an active warning has
cleared, and whether the instability itself has happened (the events' definitions below). The
policy is plain Python over :mod:`dynlens.forecast` (no Lightning, no torch): a plain training
loop can use it, and its tests feed it points directly.

The instabilities and their events:

* ``collapse``: more than :data:`COLLAPSE_SHARE` of a measured step's samples in Softmax
  Collapse (``SoftmaxCollapseMonitor``'s onset rule), in the loss's precision;
* ``divergence``: the training loss non-finite, or leaving what the run had reached by more than
  its noise and half the ground it covered, and staying away (:mod:`dynlens.loss_events`);
* ``attention``: the largest attention logit of a measured step above :data:`ATTENTION_LIMIT`;
* ``spike``: a training loss above the mean of the last 128 by 6 of their standard deviations
  (:mod:`dynlens.loss_events`; detected at every step, forecast from the stability limit).

>>> policy = WarningPolicy(("attention",), horizon=100, window=4, consecutive=1)
>>> for step in (10, 20, 30, 40):  # a logit growing as a power of the step, towards 1e4
...     forecast = policy.forecast("attention", step, 2.0 * step**2, ATTENTION_LIMIT)
>>> round(forecast.expected_step), policy.decide("attention", forecast)
(71, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from .crossing import Crossing, limit_crossing
from .events import INSTABILITIES, Instability, WarningReason
from .forecast import Forecast, TrendKind, decelerating, steps_to_threshold
from .loss_events import LossEvent, LossWatch

#: A prediction of when an instability comes: a signal's trend to its threshold, or the
#: scheduled learning rate's crossing of the stability limit.
Prediction = Forecast | Crossing
Setting = int | Literal["auto"]

__all__ = [
    "ATTENTION_LIMIT",
    "AUTO",
    "COLLAPSE_SHARE",
    "CONSECUTIVE",
    "DENSE_POINTS",
    "HORIZONS",
    "HORIZON_SHARE",
    "LIMITED",
    "MAX_POINTS",
    "MIN_HORIZON",
    "MIN_POINTS",
    "RATIO_POINTS",
    "SIGNALS",
    "WINDOWS",
    "WINDOW_SHARE",
    "WarningPolicy",
    "per_instability",
    "warning_record",
]

#: The instabilities forecast from the stability limit along the update too (the scheduled
#: learning rate's crossing of η_c, :mod:`dynlens.crossing`): a step size past what the network
#: can follow makes the loss rise, for a step or two (a spike) or for good (a divergence).
LIMITED: tuple[Instability, ...] = ("divergence", "spike")
#: Collapse: more than this share of a measured step's samples in Softmax Collapse.
COLLAPSE_SHARE = 0.5
#: Attention: the largest attention logit of a measured step above this.
ATTENTION_LIMIT = 1e4

#: The signal each instability's trend is forecast from: (its quantity, the trend it follows); a
#: spike has no trend of its own (its forecast is the stability limit's, :data:`LIMITED`).
SIGNALS: dict[str, tuple[str, TrendKind]] = {
    "collapse": ("gap_median", "power"),
    "divergence": ("loss", "exponential"),
    "attention": ("max_logit", "power"),
}
#: Fewest points a trend may be fitted to (the bend of a parabola needs four).
MIN_POINTS = 4
#: ``"auto"`` (a window or a horizon that grows with the run).
AUTO: Literal["auto"] = "auto"
#: The default window of each trend: ``"auto"``, the points of the last :data:`WINDOW_SHARE` of
#: the steps so far (at least :data:`MIN_POINTS` of them, the older ones thinned beyond
#: :data:`MAX_POINTS`), so that its span grows with the run: an event at step 300 and one at step
#: 30,000 are seen through windows of the same share of their run. Chosen on the development
#: half of ``benchmarks/early_warning_general.py`` (benchmarks/RESULTS.md, 2026-12-07).
WINDOWS: dict[str, Setting] = dict.fromkeys(INSTABILITIES, AUTO)
WINDOW_SHARE = 0.5
MAX_POINTS = 64
#: The default horizon of each instability: ``"auto"``, an instability expected within
#: :data:`HORIZON_SHARE` of the steps so far (at least :data:`MIN_HORIZON` steps): the same share
#: of lead at every timescale (the development half, as the windows).
HORIZONS: dict[str, Setting] = dict.fromkeys(INSTABILITIES, AUTO)
HORIZON_SHARE = 0.5
MIN_HORIZON = 1
#: Signals are measured densely early on, about this many times per doubling of the run
#: (:func:`dynlens.callbacks.schedule.dense_cadence`), so that an event at step 300 has points
#: to be forecast from; the update ratio (two forward passes) about :data:`RATIO_POINTS` times.
DENSE_POINTS = 8
RATIO_POINTS = 4
#: The default measured points in a row at which an instability must be surely within the
#: horizon before a warning. Chosen on the benchmark's seeds 4-11 (benchmarks/RESULTS.md): the
#: false alarms there were forecasts that held for one or two points; the divergence, which comes
#: within a few hundred steps of its first trend, warns at the first point.
CONSECUTIVE: dict[str, int] = {"collapse": 2, "divergence": 1, "attention": 3, "spike": 1}


def per_instability(
    name: str,
    given: Setting | Mapping[str, Setting] | None,
    defaults: Mapping[str, Setting],
    least: int = 1,
) -> dict[str, Setting]:
    """A setting given as one value for every instability, or as a mapping instability → value
    (instabilities not in it, and ``None``, take ``defaults``); each a whole number of at least
    ``least``, or ``"auto"`` where the setting takes it (a window or a horizon that grows with
    the run). A ``ValueError`` says what is wrong.

        >>> per_instability("window", {"collapse": 32, "spike": "auto"}, WINDOWS)
        {'collapse': 32, 'divergence': 'auto', 'attention': 'auto', 'spike': 'auto'}
    """
    values = given if isinstance(given, Mapping) else dict.fromkeys(INSTABILITIES, given)
    for key in values:
        if key not in INSTABILITIES:
            raise ValueError(f"Expected the keys of `{name}` among {INSTABILITIES}, got {key!r}.")
    settings: dict[str, Setting] = {}
    for instability in INSTABILITIES:
        value = values.get(instability)
        if value is None:
            value = defaults[instability]
        elif value == AUTO and name in ("window", "horizon"):
            value = AUTO
        elif isinstance(value, bool) or not isinstance(value, int) or value < least:
            auto = " or 'auto'" if name in ("window", "horizon") else ""
            raise ValueError(f"Expected `{name}` to be an int >= {least}{auto}, got {given!r}.")
        settings[instability] = value
    return settings


class WarningPolicy:
    """Forecasts, warnings and events of the watched ``instabilities`` (module docstring).

    A **forecast** (:meth:`forecast`) fits the last ``window`` points of an instability's signal
    and extrapolates them to its threshold; none is made from points that bend down
    (:func:`dynlens.forecast.decelerating`), nor past the step where a rising learning rate stops
    rising (``rise_ends_before``: a signal that climbs with the learning rate may stop when it
    does), nor once the instability happened. A **warning** (:meth:`decide`) needs the
    instability surely within ``horizon`` steps (even at the slow end of the trend's range,
    :meth:`dynlens.forecast.Forecast.surely_within`) at ``consecutive`` measured points in a
    row; one warning per instability until it clears: the trend surely moves away, or puts the
    instability beyond twice the horizon even at the fast end of its range
    (:meth:`cleared`). ``horizon``, ``window`` and ``consecutive`` take one number for every
    instability or a mapping per instability (:func:`per_instability`; defaults
    :data:`HORIZONS`, :data:`WINDOWS`, :data:`CONSECUTIVE`); ``z`` is the standard errors a
    slope must be from 0.

    Its state, kept in checkpoints by the monitor: :attr:`happened`, :attr:`history`,
    :attr:`active`, :attr:`in_a_row` and the loss events' :attr:`losses`.
    """

    def __init__(
        self,
        instabilities: Sequence[Instability] = INSTABILITIES,
        *,
        horizon: Setting | Mapping[str, Setting] | None = None,
        window: Setting | Mapping[str, Setting] | None = None,
        consecutive: int | Mapping[str, int] | None = None,
        z: float = 2.0,
    ) -> None:
        if isinstance(instabilities, str) or not instabilities:
            raise ValueError(
                f"Expected a non-empty sequence of {INSTABILITIES}, got {instabilities!r}: e.g. "
                "('collapse',)."
            )
        for instability in instabilities:
            if instability not in INSTABILITIES:
                raise ValueError(
                    f"Expected instabilities among {INSTABILITIES}, got {instability!r}."
                )
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
            raise ValueError(f"Expected `z` to be a positive number, got {z!r}.")
        self.instabilities: tuple[Instability, ...] = tuple(dict.fromkeys(instabilities))
        #: The steps ahead within which each instability is warned of.
        self.horizons = per_instability("horizon", horizon, HORIZONS)
        #: The points each trend is fitted to.
        self.windows = per_instability("window", window, WINDOWS, least=MIN_POINTS)
        #: The measured points in a row each warning needs.
        self.consecutive = {
            k: int(v) for k, v in per_instability("consecutive", consecutive, CONSECUTIVE).items()
        }
        self.z = float(z)
        #: The step each instability happened at (``None`` until it does).
        self.happened: dict[str, int | None] = dict.fromkeys(self.instabilities)
        #: Each signal's recent points, ``[step, value]``.
        self.history: dict[str, list[list[float]]] = {}
        #: Instabilities with a warning that has not cleared.
        self.active: list[str] = []
        #: Per instability, the measured points in a row at which it was surely within the horizon.
        self.in_a_row: dict[str, int] = {}
        #: The training losses so far, for divergence and spikes.
        self.losses = LossWatch()

    def watches(self, instability: str) -> bool:
        return instability in self.instabilities

    def ongoing(self, instability: str) -> bool:
        """Watched and not happened yet: still forecast."""
        return self.watches(instability) and self.happened.get(instability) is None

    # ----------------------------------------------------------------------------- events
    @property
    def divergence_threshold(self) -> float:
        """The loss above which a finite loss leaves what the run had reached (inf while
        undefined: :meth:`dynlens.loss_events.LossWatch.divergence_threshold`)."""
        return self.losses.divergence_threshold

    def collapsed(self, share: float) -> bool:
        """A measured step with this share of its samples collapsed is a collapse."""
        return share > COLLAPSE_SHARE

    def attention_blew_up(self, max_logit: float) -> bool:
        """A measured step with this largest attention logit is an attention blow-up."""
        return max_logit > ATTENTION_LIMIT

    def scan_losses(self, steps: Sequence[int], losses: Sequence[float]) -> list[LossEvent]:
        """Take the training losses of these steps, in order: the spikes and the divergence
        among them (:class:`dynlens.loss_events.LossWatch`)."""
        return [e for s, v in zip(steps, losses, strict=True) for e in self.losses.observe(s, v)]

    def happen(self, instability: str, step: int) -> bool:
        """Record that ``instability`` happened at ``step`` (its warning, if active, is done);
        False if it had happened before."""
        if self.happened.get(instability) is not None:
            return False
        self.happened[instability] = int(step)
        if instability in self.active:
            self.active.remove(instability)
        return True

    # ----------------------------------------------------------------------------- forecasts
    def horizon_at(self, instability: str, step: float) -> float:
        """The steps ahead within which ``instability`` is warned of, at ``step``: the fixed
        horizon, or with ``"auto"`` :data:`HORIZON_SHARE` of the steps so far."""
        horizon = self.horizons[instability]
        return max(MIN_HORIZON, HORIZON_SHARE * step) if horizon == AUTO else float(horizon)

    def _add_point(
        self, name: str, window: Setting, step: float, value: float
    ) -> list[list[float]]:
        """Add a point to the history ``name`` and keep its window: the last ``window`` points,
        or with ``"auto"`` those of the last :data:`WINDOW_SHARE` of the steps (at least
        :data:`MIN_POINTS`), every other older one dropped while there are more than
        :data:`MAX_POINTS`."""
        points = self.history.setdefault(name, [])
        points.append([float(step), float(value)])
        if window != AUTO:
            del points[: -int(window)]
            return points
        start = (1.0 - WINDOW_SHARE) * step
        keep = next((i for i, (s, _) in enumerate(points) if s >= start), len(points))
        del points[: min(keep, max(len(points) - MIN_POINTS, 0))]
        while len(points) > MAX_POINTS:
            half = len(points) // 2
            del points[:half:2]
        return points

    def _enough(self, points: list[list[float]], window: Setting) -> bool:
        return len(points) >= (MIN_POINTS if window == AUTO else int(window))

    def forecast(
        self,
        instability: str,
        step: float,
        value: float,
        threshold: float,
        rise_ends_before: Callable[[float], int | None] | None = None,
    ) -> Forecast | None:
        """Add the point ``(step, value)`` to the instability's signal and forecast when the
        signal reaches ``threshold`` from its window; ``None`` when there is no forecast to act
        on (see the class docstring). ``rise_ends_before(step)``: the step at which a rising
        learning rate stops rising before ``step``, ``None`` if it does not."""
        kind = SIGNALS[instability][1]
        if not math.isfinite(value) or (kind != "linear" and value <= 0):
            return None
        if kind == "power" and step <= 0:
            return None  # a power of the step: from step 1 on
        if self.happened.get(instability) is not None:
            return None  # it happened: no more forecasts of it
        window = self.windows[instability]
        points = self._add_point(instability, window, step, value)
        if not self._enough(points, window) or not math.isfinite(threshold):
            return None
        steps, values = zip(*points, strict=True)
        forecast = steps_to_threshold(steps, values, threshold, kind=kind, rising=True, z=self.z)
        horizon = self.horizon_at(instability, forecast.trend.last_step)
        if instability not in self.active and not (
            forecast.within(2 * horizon) or forecast.surely_within(horizon)
        ):
            return None  # nothing is logged or decided from it: the bend is not worth a fit
        expected = forecast.expected_step
        if (
            expected is not None
            and rise_ends_before is not None
            and rise_ends_before(expected) is not None
        ):
            return None  # the learning rate stops rising first: the signal may stop too
        if decelerating(steps, values, kind=kind, z=self.z):
            return None  # levelling off: a line would reach what the signal may not
        return forecast

    def forecast_limit(
        self, step: float, limit: float, rates_ahead: Sequence[float]
    ) -> Crossing | None:
        """Add a measurement of the stability limit along the update, η_c (the learning rate
        over the update ratio), and forecast when the scheduled learning rate reaches it
        (:func:`dynlens.crossing.limit_crossing`; ``rates_ahead[k]``: the rate ``k`` steps after
        ``step``). Its window is divergence's."""
        if self.happened.get("divergence") is not None or not (0 < limit < math.inf):
            return None
        window = self.windows["divergence"]
        points = self._add_point("limit", window, step, limit)
        if not self._enough(points, window):
            return None
        steps, limits = zip(*points, strict=True)
        return limit_crossing(steps, limits, rates_ahead, z=self.z)

    def decide(self, instability: str, *predictions: Prediction | None) -> bool:
        """Whether the instability's predictions at a measured point (one per signal that made
        one; ``None`` for none) raise a warning now; updates which warnings are active and the
        points in a row. A warning needs one prediction surely within the horizon at
        ``consecutive`` points in a row; an active warning is dropped once every prediction
        :meth:`cleared`; a bending or missing fit says nothing."""
        given = [p for p in predictions if p is not None]
        if self.happened.get(instability) is not None:
            return False
        if instability in self.active:
            if given and all(self.cleared(instability, p) for p in given):
                self.active.remove(instability)
            return False
        if not any(p.surely_within(self.horizon_at(instability, _last_step(p))) for p in given):
            self.in_a_row[instability] = 0
            return False
        self.in_a_row[instability] = self.in_a_row.get(instability, 0) + 1
        if self.in_a_row[instability] < self.consecutive[instability]:
            return False
        self.in_a_row[instability] = 0
        self.active.append(instability)
        return True

    def cleared(self, instability: str, prediction: Prediction) -> bool:
        """The trend surely moves away, or puts the instability beyond twice the horizon even at
        the fast end of its range."""
        horizon = self.horizon_at(instability, _last_step(prediction))
        if isinstance(prediction, Crossing):
            return prediction.cleared(horizon, self.z)
        trend = prediction.trend
        if trend.slope < -self.z * trend.slope_stderr:
            return True
        return prediction.lower is not None and prediction.lower - trend.last_step > 2 * horizon

    def sooner(self, instability: str, *predictions: Prediction | None) -> Prediction | None:
        """Of an instability's predictions from several signals, the one to decide from: the
        one surely within the horizon soonest at its slow end, else the earliest expected."""
        given = [p for p in predictions if p is not None]
        sure = [
            p
            for p in given
            if p.surely_within(self.horizon_at(instability, _last_step(p))) and p.upper is not None
        ]
        if sure:
            return min(sure, key=lambda p: p.upper or math.inf)
        timed = [p for p in given if p.expected_step is not None]
        return min(timed, key=lambda p: p.expected_step or math.inf) if timed else None


def _last_step(prediction: Prediction) -> int:
    return prediction.trend.last_step


def warning_record(
    instability: str, step: int, prediction: Prediction, detail: str = ""
) -> dict[str, Any]:
    """The record of a warning raised at ``step`` from ``prediction``: ``event``, ``step``,
    ``expected_step`` (the crossing, rounded up), ``reason`` (``warn_<instability>``),
    ``signal`` (the quantity whose prediction spoke) and a ``message`` that says what is expected
    when, from which signal, and ``detail``.

        >>> f = steps_to_threshold([10, 20, 30, 40], [1.0, 2.0, 3.0, 4.0], 10.0)
        >>> warning_record("collapse", 40, f)["message"]
        'collapse expected at step 100 (in 60 steps, range 100–100): gap_median is trending to 10'
    """
    assert prediction.expected_step is not None  # surely within the horizon: it crosses
    expected = math.ceil(prediction.expected_step)
    if isinstance(prediction, Crossing):
        signal = "stability_limit"
        why = (
            f"the scheduled learning rate reaches the stability limit along the update "
            f"(η_c = {prediction.trend.value_at(expected):.3g})"
        )
    else:
        signal = SIGNALS[instability][0]
        why = f"{signal} is trending to {prediction.threshold:.4g}"
    message = (
        f"{instability} expected at step {expected} (in {expected - step} steps, range "
        f"{prediction.range_text()}): {why}"
    )
    return {
        "event": instability,
        "step": int(step),
        "expected_step": expected,
        "reason": WarningReason.warning(instability).value,
        "signal": signal,
        "message": message + (f"; {detail}" if detail else ""),
    }
