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
  (:mod:`dynlens.loss_events`; detected at every step, not forecast).

>>> policy = WarningPolicy(("attention",), horizon=100, window=4, consecutive=1)
>>> for step in (10, 20, 30, 40):  # a logit growing as a power of the step, towards 1e4
...     forecast = policy.forecast("attention", step, 2.0 * step**2, ATTENTION_LIMIT)
>>> round(forecast.expected_step), policy.decide("attention", forecast)
(71, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from .events import INSTABILITIES, Instability, WarningReason
from .forecast import Forecast, TrendKind, decelerating, steps_to_threshold
from .loss_events import LossEvent, LossWatch

__all__ = [
    "ATTENTION_LIMIT",
    "COLLAPSE_SHARE",
    "CONSECUTIVE",
    "HORIZONS",
    "MIN_POINTS",
    "SIGNALS",
    "WINDOWS",
    "WarningPolicy",
    "per_instability",
    "warning_record",
]

#: Collapse: more than this share of a measured step's samples in Softmax Collapse.
COLLAPSE_SHARE = 0.5
#: Attention: the largest attention logit of a measured step above this.
ATTENTION_LIMIT = 1e4

#: The signal each instability is forecast from: (its quantity, the trend it follows); a spike
#: is detected, not forecast.
SIGNALS: dict[str, tuple[str, TrendKind]] = {
    "collapse": ("gap_median", "power"),
    "divergence": ("loss", "exponential"),
    "attention": ("max_logit", "power"),
}
#: Fewest points a trend may be fitted to (the bend of a parabola needs four).
MIN_POINTS = 4
#: The default window of each trend, in measured points: 16 (160 steps at the default cadence),
#: and 32 for the logit gap, which grows over thousands of steps.
WINDOWS: dict[str, int] = {"collapse": 32, "divergence": 16, "attention": 16, "spike": 16}
#: The default horizon of each instability, in steps: 500, and 1,000 for collapse, whose logit
#: gap grows over thousands of steps (chosen by replaying the benchmark's seeds 4-15,
#: benchmarks/RESULTS.md, fourth round).
HORIZONS: dict[str, int] = {"collapse": 1000, "divergence": 500, "attention": 500, "spike": 500}
#: The default measured points in a row at which an instability must be surely within the
#: horizon before a warning. Chosen on the benchmark's seeds 4-11 (benchmarks/RESULTS.md): the
#: false alarms there were forecasts that held for one or two points; the divergence, which comes
#: within a few hundred steps of its first trend, warns at the first point.
CONSECUTIVE: dict[str, int] = {"collapse": 2, "divergence": 1, "attention": 3, "spike": 1}


def per_instability(
    name: str, given: int | Mapping[str, int] | None, defaults: Mapping[str, int], least: int = 1
) -> dict[str, int]:
    """A setting given as one number for every instability, or as a mapping instability →
    number (instabilities not in it, and ``None``, take ``defaults``); each a whole number of
    at least ``least``. A ``ValueError`` says what is wrong.

        >>> per_instability("horizon", {"collapse": 2000}, HORIZONS)
        {'collapse': 2000, 'divergence': 500, 'attention': 500, 'spike': 500}
    """
    values = given if isinstance(given, Mapping) else dict.fromkeys(INSTABILITIES, given)
    for key in values:
        if key not in INSTABILITIES:
            raise ValueError(f"Expected the keys of `{name}` among {INSTABILITIES}, got {key!r}.")
    settings: dict[str, int] = {}
    for instability in INSTABILITIES:
        value = values.get(instability)
        if value is None:
            value = defaults[instability]
        elif isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"Expected `{name}` to be an int >= {least}, got {given!r}.")
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
        horizon: int | Mapping[str, int] | None = None,
        window: int | Mapping[str, int] | None = None,
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
        self.consecutive = per_instability("consecutive", consecutive, CONSECUTIVE)
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
    def forecast(
        self,
        instability: str,
        step: float,
        value: float,
        threshold: float,
        rise_ends_before: Callable[[float], int | None] | None = None,
    ) -> Forecast | None:
        """Add the point ``(step, value)`` to the instability's signal and forecast when the
        signal reaches ``threshold`` from its last ``window`` points; ``None`` when there is no
        forecast to act on (see the class docstring). ``rise_ends_before(step)``: the step at
        which a rising learning rate stops rising before ``step``, ``None`` if it does not."""
        kind = SIGNALS[instability][1]
        if not math.isfinite(value) or (kind != "linear" and value <= 0):
            return None
        if kind == "power" and step <= 0:
            return None  # a power of the step: from step 1 on
        if self.happened.get(instability) is not None:
            return None  # it happened: no more forecasts of it
        points = self.history.setdefault(instability, [])
        points.append([float(step), float(value)])
        window = self.windows[instability]
        del points[:-window]
        if len(points) < window or not math.isfinite(threshold):
            return None
        steps, values = zip(*points, strict=True)
        forecast = steps_to_threshold(steps, values, threshold, kind=kind, rising=True, z=self.z)
        horizon = self.horizons[instability]
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

    def decide(self, instability: str, forecast: Forecast | None) -> bool:
        """Whether ``forecast`` (the instability's forecast at a measured point, ``None`` for
        none) raises a warning now; updates which warnings are active and the points in a row.
        An active warning that :meth:`cleared` is dropped; a bending or missing fit says
        nothing."""
        if self.happened.get(instability) is not None:
            return False
        if instability in self.active:
            if forecast is not None and self.cleared(instability, forecast):
                self.active.remove(instability)
            return False
        if forecast is None or not forecast.surely_within(self.horizons[instability]):
            self.in_a_row[instability] = 0
            return False
        self.in_a_row[instability] = self.in_a_row.get(instability, 0) + 1
        if self.in_a_row[instability] < self.consecutive[instability]:
            return False
        self.in_a_row[instability] = 0
        self.active.append(instability)
        return True

    def cleared(self, instability: str, forecast: Forecast) -> bool:
        """The trend surely moves away, or puts the instability beyond twice the horizon even at
        the fast end of its range."""
        trend = forecast.trend
        if trend.slope < -self.z * trend.slope_stderr:
            return True
        horizon = self.horizons[instability]
        return forecast.lower is not None and forecast.lower - trend.last_step > 2 * horizon


def warning_record(instability: str, step: int, forecast: Forecast, detail: str = "") -> dict:
    """The record of a warning raised at ``step`` from ``forecast``: ``event``, ``step``,
    ``expected_step`` (the crossing, rounded up), ``reason`` (``warn_<instability>``) and a
    ``message`` that says what is expected when, from which signal, and ``detail``.

        >>> f = steps_to_threshold([10, 20, 30, 40], [1.0, 2.0, 3.0, 4.0], 10.0)
        >>> warning_record("collapse", 40, f)["message"]
        'collapse expected at step 100 (in 60 steps, range 100–100): gap_median is trending to 10'
    """
    quantity, _ = SIGNALS[instability]
    assert forecast.expected_step is not None  # surely within the horizon: it crosses
    expected = math.ceil(forecast.expected_step)
    message = (
        f"{instability} expected at step {expected} (in {expected - step} steps, range "
        f"{forecast.range_text()}): {quantity} is trending to {forecast.threshold:.4g}"
    )
    return {
        "event": instability,
        "step": int(step),
        "expected_step": expected,
        "reason": WarningReason.warning(instability).value,
        "message": message + (f"; {detail}" if detail else ""),
    }
