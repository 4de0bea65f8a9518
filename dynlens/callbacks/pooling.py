"""Monitors that pool measurements on the device between two logs, and log as Lightning does.

A monitor that measures cheaply every few steps (``SoftmaxCollapseMonitor``,
``LogitGrowthMonitor``) should neither move its values to the host at every measured step (a
host sync per step) nor log more often than the run logs its own ``self.log`` values. It derives
from :class:`PooledMonitor`: it declares its pooled fields with ``pooled=True``, calls
:meth:`~PooledMonitor.mark_measured` for each measured step, asks :meth:`~PooledMonitor.logs_now`
whether the step ends a logging interval, and implements :meth:`~PooledMonitor.flush`; a run
that ends with measured steps not yet logged (``EarlyStopping``, ``max_epochs``) has them flushed
at ``on_train_end``.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from .base import Monitor, fail_soft
from .context import logging_step


class PooledMonitor(Monitor):
    """A :class:`~dynlens.callbacks.base.Monitor` that pools measurements between logs (module
    docstring). Its ``every_n_steps`` is a fixed cadence (no ``budget``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # measured steps not logged yet, and the latest measured step (to log them at)
        self._pending_since_log: bool = self.add_state(
            "_pending_since_log", False, key="pending.since_log", pooled=True
        )
        self._last_measured: int = self.add_state("_last_measured", 0, key="pending.last_measured")

    def mark_measured(self, step: int) -> None:
        """A step was measured and pooled, not logged yet."""
        self._pending_since_log = True
        self._last_measured = int(step)

    def flush(self, trainer: Any, step: int, last: bool = False) -> None:
        """Log what was pooled since the last log, at ``step`` (``last``: the run ends inside a
        logging interval, see :meth:`interval_ends`)."""
        raise NotImplementedError

    def logs_now(self, trainer: Any, *cadences: int) -> bool:
        """Whether measurements pooled on the device are logged at this (measured) step.

        True at the last step of each of Lightning's logging intervals (``log_every_n_steps``
        steps, the steps ``self.log`` values are written at) on which one of ``cadences``
        (default: ``every_n_steps``) measures, and when no measurement is left before
        ``max_steps``. So ``every_n_steps=1`` measures every step and logs as often as Lightning
        does, and with ``log_every_n_steps=1`` (or a cadence of at least ``log_every_n_steps``)
        every measured step is logged.
        """
        return self.interval_ends(trainer, *cadences) or self._none_left(trainer, *cadences)

    def interval_ends(self, trainer: Any, *cadences: int) -> bool:
        """This is the last step of its logging interval on which one of ``cadences`` measures
        (see :meth:`logs_now`). A log for any other reason (the run ends inside an interval)
        keeps the pooled measurements in the monitor's state as well, so that a run resumed from
        a checkpoint saved now pools them into the interval as an uninterrupted run would."""
        step = logging_step(trainer)
        interval = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        return self._upcoming(step, cadences) // interval != step // interval

    def run_ends_inside_interval(self, trainer: Any, *cadences: int) -> bool:
        """No measurement is left before ``max_steps`` and this step does not end its logging
        interval: a log now is partial, and its pooled measurements are kept (see
        :meth:`interval_ends`)."""
        return self._none_left(trainer, *cadences) and not self.interval_ends(trainer, *cadences)

    def _none_left(self, trainer: Any, *cadences: int) -> bool:
        max_steps = getattr(trainer, "max_steps", -1)
        upcoming = self._upcoming(logging_step(trainer), cadences)
        return isinstance(max_steps, int) and 0 < max_steps <= upcoming

    def _upcoming(self, step: int, cadences: tuple[int, ...]) -> int:
        """The next step after ``step`` on which one of ``cadences`` measures."""
        every = cadences or (self.every_n_steps,)
        return min(step - step % n + n for n in every if n is not None)

    def reset_pooled(self) -> None:
        """Reset every ``pooled`` field to its default (nothing measured since the last log)."""
        for field in self._states.values():
            if field.pooled:
                field.set(self, field.fresh())

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.reset_pooled()  # a new fit starts a new logging interval

    @override
    @fail_soft
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._pending_since_log:
            self.flush(trainer, self._last_measured, last=True)
        super().on_train_end(trainer, pl_module)
