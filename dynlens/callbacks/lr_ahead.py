"""The learning rate ahead: the rates the trainer's schedule will give, and where it stops
raising them.

A divergence comes when the learning rate passes the stability limit: its crossing can be
forecast from the rates ahead (:func:`dynlens.crossing.limit_crossing`). And a signal that rises
while the learning rate rises (the training loss during a warm-up, at the edge of stability) may
stop rising when the learning rate does; a forecast drawn through it should not be believed past
that step. The schedule's future is read by stepping the trainer's step-interval schedulers
forward on the spot and putting everything back: their state, and every parameter group's
settings (learning rates, momenta), so training sees nothing.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

#: At most this many scheduler steps are taken to look ahead at one call.
MOST_STEPS = 5000


class LRAhead:
    """Where the learning rate of ``trainer`` stops rising, read from its schedulers.

    Only schedulers stepped every step (Lightning's ``interval="step"``) are read; epoch-interval
    ones, and ``ReduceLROnPlateau`` (whose future depends on a metric), count as constant. The
    learning rate is the largest of every parameter group of every optimizer. A schedule is
    assumed to depend on the step only, so a peak once found is kept until it is passed.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._peak: int | None = None  # a peak found ahead, as a global step
        self._rising_to: int = -1  # the learning rate rises at least up to this global step

    def rates(self, ahead: int) -> list[float]:
        """The learning rate now and after each of the next ``ahead`` steps (at most
        :data:`MOST_STEPS`), as the schedule gives it; the last rate read stays on where the
        schedule cannot be read further (a constant rate without a scheduler)."""
        now = largest_rate(self.trainer.optimizers)
        ahead = int(min(max(ahead, 0), MOST_STEPS))
        configs = self._configs()
        rates = [now]
        if configs:
            try:
                rates = _rates_ahead(configs, self.trainer.optimizers, ahead)
            except Exception:  # a scheduler whose state cannot be kept aside: unknown ahead
                rates = [now]
        return rates + [rates[-1]] * (ahead + 1 - len(rates))

    def _configs(self) -> list[Any]:
        return [
            c
            for c in getattr(self.trainer, "lr_scheduler_configs", ())
            if c.interval == "step" and not isinstance(c.scheduler, ReduceLROnPlateau)
        ]

    def rise_ends_before(self, step: float) -> int | None:
        """The global step, before ``step``, from which the learning rate stops rising, if it
        rises at the next step; ``None`` when it does not rise now, rises up to ``step`` or
        beyond, or the schedule cannot be read."""
        now = int(self.trainer.global_step)
        if self._peak is not None and now < self._peak:
            return self._peak if self._peak < step else None
        if now < self._rising_to and step <= self._rising_to:
            return None
        self._peak = None
        configs = self._configs()
        ahead = math.ceil(min(float(MOST_STEPS), step - now))
        if not configs or ahead < 1:
            return None
        every = max(max(int(c.frequency or 1), 1) for c in configs)
        try:
            rates = _rates_ahead(configs, self.trainer.optimizers, ahead + every)
        except Exception:  # a scheduler whose state cannot be kept aside: its future is unknown
            return None
        if not max(rates[1 : every + 1], default=-math.inf) > rates[0]:
            return None  # not rising now (or the schedule could not be stepped)
        # the last rise before the rate falls, or stays put for as long as the least often
        # stepped scheduler's period
        last = 0
        for k in range(1, len(rates)):
            if rates[k] > rates[k - 1]:
                last = k
            elif rates[k] < rates[k - 1] or k - last >= every:
                self._peak = now + last
                return self._peak if self._peak < step else None
        self._rising_to = now + last
        return None


def _rates_ahead(configs: list, optimizers: list, steps: int) -> list[float]:
    """The learning rate now and after each of the next ``steps`` steps, every scheduler stepped
    as Lightning steps it (every ``frequency`` steps), up to the first step a scheduler refuses
    (one past its last step); then every scheduler and parameter group as it was."""
    saved = [copy.deepcopy(c.scheduler.state_dict()) for c in configs]
    groups = [
        [{k: copy.copy(v) for k, v in g.items() if k != "params"} for g in o.param_groups]
        for o in optimizers
    ]
    rates = [largest_rate(optimizers)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k in range(1, steps + 1):
                try:
                    for c in configs:
                        if k % max(int(c.frequency or 1), 1) == 0:
                            c.scheduler.step()
                except Exception:  # a scheduler refused (OneCycleLR past its last step, a
                    break  # user's function out of its range): the future is known up to here
                rates.append(largest_rate(optimizers))
    finally:
        for c, state in zip(configs, saved, strict=True):
            c.scheduler.load_state_dict(state)
        for o, kept in zip(optimizers, groups, strict=True):
            for g, settings in zip(o.param_groups, kept, strict=True):
                g.update(settings)
    return rates


def largest_rate(optimizers: list) -> float:
    """The largest learning rate of every parameter group of ``optimizers``."""
    return max((float(g.get("lr", 0.0)) for o in optimizers for g in o.param_groups), default=0.0)
