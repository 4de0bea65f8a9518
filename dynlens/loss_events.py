"""Divergence and loss spikes, read from the stream of training losses.

Two events that a run's loss says by itself, each defined by what the loss did against its own
scale and noise, so that they mean the same in a run whose loss sits at 2.3 and in one that
trains to 1e-9:

* a **spike**: a loss above the mean of the previous :data:`NOISE_WINDOW` losses by more than
  :data:`SPIKE_SIGMAS` of their standard deviations (the rule of OLMo-core's stability monitor:
  6 σ over the last 128 values), once at least :data:`MIN_NOISE_POINTS` losses are known; the
  loss may come back down (a spike is not a divergence);
* a **divergence**: a non-finite loss, or a loss that leaves what the run had reached, and stays
  away: above its lowest value ``L_min`` by more than each of :data:`DIVERGENCE_SIGMAS` times the
  noise of the recent losses (the spread of their step-to-step differences, a robust standard
  deviation that neither a loss falling steadily nor a spike inflates),
  :data:`DIVERGENCE_GROUND` × (``L_start`` − ``L_min``) and :data:`DIVERGENCE_FLOOR` ×
  ``L_start``, where ``L_start`` is the mean of the first :data:`START_STEPS` losses, at
  :data:`DIVERGENCE_STEPS` steps in a row (a spike that comes back is not one); it happened at
  the first of them. A loss of 1e-8 after a lowest 1e-9 is no divergence when the run started at
  2.3: it has not given back any of the ground it covered.

:class:`LossWatch` keeps what the rules need (the lowest loss, the start, the last
:data:`NOISE_WINDOW` losses, the spikes so far) and is fed each step's loss in order. Plain
Python, no torch.

>>> watch = LossWatch()
>>> flat = [e for step in range(40) for e in watch.observe(step, 2.0 + 0.01 * (step % 2))]
>>> flat, [(e.step, e.kind, round(e.threshold, 3)) for e in watch.observe(40, 2.5)]
([], [(40, 'spike', 2.035)])
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DIVERGENCE_FLOOR",
    "DIVERGENCE_GROUND",
    "DIVERGENCE_SIGMAS",
    "DIVERGENCE_STEPS",
    "MIN_NOISE_POINTS",
    "NOISE_WINDOW",
    "SPIKE_SIGMAS",
    "START_STEPS",
    "LossEvent",
    "LossWatch",
]

#: The recent losses whose mean and standard deviation the rules use (OLMo-core: 128).
NOISE_WINDOW = 128
#: Fewest recent losses for a standard deviation: before that, no spike and only a non-finite
#: loss is a divergence.
MIN_NOISE_POINTS = 16
#: A spike: above the recent mean by this many recent standard deviations (OLMo-core: 6).
SPIKE_SIGMAS = 6.0
#: A divergence: above the lowest loss by this many recent standard deviations...
DIVERGENCE_SIGMAS = 6.0
#: ... and by this share of the ground the loss covered from its start to its lowest.
DIVERGENCE_GROUND = 0.5
#: ... and by this share of the loss at the start (a loss that never fell, and a noiseless one,
#: must rise by a tenth of where it started).
DIVERGENCE_FLOOR = 0.1
#: ... at this many steps in a row.
DIVERGENCE_STEPS = 10
#: The loss at the start: the mean of this many first losses.
START_STEPS = 10


@dataclass(frozen=True)
class LossEvent:
    """A spike or a divergence at ``step``: the loss and the threshold it passed."""

    step: int
    kind: Literal["spike", "divergence"]
    loss: float
    threshold: float

    def describe(self) -> str:
        """The event as a sentence."""
        if not math.isfinite(self.loss):
            return f"the training loss is {self.loss}"
        if self.kind == "spike":
            return (
                f"the training loss {self.loss:.4g} is above the mean of its last losses by more "
                f"than {SPIKE_SIGMAS:g} standard deviations ({self.threshold:.4g})"
            )
        return (
            f"the training loss {self.loss:.4g} left its lowest value by more than its noise and "
            f"{DIVERGENCE_GROUND:g} of the ground it had covered ({self.threshold:.4g}), and "
            "stayed away"
        )


def _mean_std(values: Iterable[float]) -> tuple[float, float]:
    values = list(values)
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class LossWatch:
    """The spike and divergence rules over a stream of training losses (module docstring).

    Its state, kept in checkpoints by the monitor: :attr:`loss_min`, :attr:`start` (the sum and
    count of the first losses), :attr:`recent`, :attr:`spikes`, :attr:`observed` and
    :attr:`away`.
    """

    def __init__(self) -> None:
        #: The lowest finite loss so far.
        self.loss_min = math.inf
        #: The first :data:`START_STEPS` finite losses' sum and count.
        self.start: list[float] = [0.0, 0.0]
        #: The last :data:`NOISE_WINDOW` finite losses.
        self.recent: deque[float] = deque(maxlen=NOISE_WINDOW)
        #: Spikes so far, and the losses observed so far.
        self.spikes = 0
        self.observed = 0
        #: The steps in a row above the divergence threshold so far: ``[first step, loss,
        #: threshold, steps]`` (``None`` when the last loss was not).
        self.away: list[float] | None = None

    @property
    def start_loss(self) -> float:
        """``L_start``: the mean of the first losses (NaN before any)."""
        total, count = self.start
        return total / count if count else math.nan

    @property
    def spike_rate(self) -> float:
        """Spikes per loss observed (OLMo-core's spike score); NaN before any loss."""
        return self.spikes / self.observed if self.observed else math.nan

    @property
    def noise(self) -> float:
        """The noise of the recent losses about their trend: the median absolute deviation of
        their step-to-step differences, × 1.4826 (a normal's standard deviation) / √2 (a
        difference holds two losses' noise); a smooth trend and a few spikes leave it alone.
        NaN with too few losses."""
        if len(self.recent) < MIN_NOISE_POINTS:
            return math.nan
        steps = [b - a for a, b in itertools.pairwise(self.recent)]
        middle = statistics.median(steps)
        return 1.4826 * statistics.median(abs(d - middle) for d in steps) / math.sqrt(2)

    @property
    def divergence_threshold(self) -> float:
        """The loss above which a finite loss is a divergence (inf while undefined)."""
        noise, start = self.noise, self.start_loss
        if math.isnan(noise) or math.isnan(start):
            return math.inf
        ground = max(start - self.loss_min, 0.0)
        rise = max(
            DIVERGENCE_SIGMAS * noise, DIVERGENCE_GROUND * ground, DIVERGENCE_FLOOR * abs(start)
        )
        return self.loss_min + rise

    @property
    def spike_threshold(self) -> float:
        """The loss above which the next loss is a spike (inf while undefined)."""
        if len(self.recent) < MIN_NOISE_POINTS:
            return math.inf
        mean, std = _mean_std(self.recent)
        return mean + SPIKE_SIGMAS * std

    def observe(self, step: int, loss: float) -> list[LossEvent]:
        """Take the loss of ``step`` (steps in order): the spike and the divergence it is, if
        any (a non-finite loss is a divergence, and is left out of the statistics)."""
        self.observed += 1
        if not math.isfinite(loss):
            return [LossEvent(int(step), "divergence", loss, math.inf)]
        events = []
        spike, divergence = self.spike_threshold, self.divergence_threshold
        if loss > spike:
            self.spikes += 1
            events.append(LossEvent(int(step), "spike", loss, spike))
        if self.away is not None and loss > self.away[2]:  # still away from what was reached
            self.away[3] += 1
        elif loss > divergence:
            self.away = [float(step), loss, divergence, 1.0]
        else:
            self.away = None
        if self.away is not None and self.away[3] >= DIVERGENCE_STEPS:
            first, first_loss, threshold, _ = self.away
            events.append(LossEvent(int(first), "divergence", first_loss, threshold))
            self.away = None
        if self.start[1] < START_STEPS:
            self.start = [self.start[0] + loss, self.start[1] + 1]
        self.loss_min = min(self.loss_min, loss)
        self.recent.append(loss)
        return events
