"""The machinery every dynlens callback shares (the monitor contract of DESIGN.md).

A monitor subclasses :class:`Monitor`, sets :attr:`~Monitor.name` (the ``<monitor>`` part of its
metric keys) and :attr:`~Monitor.reasons` (its enum of event reasons, :mod:`dynlens.events`),
describes its TensorBoard panel in :meth:`Monitor.panel`, and in its hooks measures, then calls
:meth:`Monitor.log_metrics` and :meth:`Monitor.log_event`. The base provides:

* **cadence** in optimizer steps, one rule for every monitor (:meth:`Monitor.is_due`): every
  ``every_n_steps`` steps, or, with a compute ``budget``, the steps a
  :class:`~dynlens.callbacks.schedule.BudgetSchedule` chooses; never during the sanity check.
  The base owns the schedule, times the training between measurements with ``clock``, times
  each measurement in :meth:`Monitor.measuring` and keeps the schedule in the checkpoint
  (``"schedule"``);
* **declared state** (:meth:`Monitor.add_state`, :mod:`dynlens.callbacks.state`): checkpoints,
  resets, the move back to the device and the **reduction across ranks** follow from one
  declaration per field; :meth:`Monitor.sync` reduces every field that holds a value in one
  collective per reduction and brings them to the host in one copy (:mod:`~.sync`). Monitors
  that pool measurements between logs derive from :class:`~dynlens.callbacks.pooling.PooledMonitor`;
* **logging** to every Lightning logger at Lightning's own logging step, so dynlens charts line up
  with the run's ``self.log`` metrics whatever ``log_every_n_steps`` is, and into
  ``trainer.callback_metrics`` so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them;
* **TensorBoard extras**: one custom-scalars layout per run merged from every attached monitor's
  panel, and text events for discrete events, each carrying its reason (``once=True`` for an
  event that fires once per run);
* **validators** (:mod:`dynlens.callbacks.validate`) and a ``state_key`` built from the
  identifying arguments;
* **failing soft**: a hook decorated with :func:`fail_soft` that raises mid-run warns once and
  disables its monitor; training goes on. :class:`ConfigurationError` is the exception: a set-up
  mistake stops the run with a message that names the fix.

Every hook a monitor overrides is marked ``@override`` and calls the base's hook (the base's
hooks carry the schedule, the layout and the pooled flush).

Adding a monitor
----------------

A new monitor touches these places; the rest follows from them (the package's exports, the
conformance suite's list, the report's reasons by monitor and its table order):

1. **The numbers**: pure functions in the measurement layer (``dynlens/<topic>.py``, no
   Lightning import), each with a test against a closed-form or brute-force value on a tiny case
   (``tests/test_<topic>.py``).
2. **The callback**: one module, ``dynlens/callbacks/<topic>.py``, holding a :class:`Monitor`
   subclass that validates its arguments in ``__init__`` (:mod:`dynlens.callbacks.validate`),
   declares every field of its state there with :meth:`Monitor.add_state` (with ``reduce=`` for
   what is reduced across ranks), measures in its hooks when :meth:`Monitor.is_due` says so,
   through a capture of :mod:`dynlens.callbacks.capture` where it needs logits or attention,
   and logs through :meth:`Monitor.log_metrics` and :meth:`Monitor.log_event`; and one line
   exporting it in ``dynlens/callbacks/__init__.py`` (``dynlens`` exports what that exports;
   written out so that type checkers and editors see the name, and a conformance test fails
   when a monitor is not exported).
3. **Its tests**: ``tests/callbacks/test_<topic>.py``, short real ``Trainer`` runs asserting on
   what was logged, and a ``conformance_monitor(eval_set)`` function there returning a small
   instance: the conformance suite (``tests/test_conformance.py``) finds it and checks the whole
   monitor contract on it (drop-in on both Lightning packages, no observer effect, NaN, bf16,
   DDP, resume).
4. **Its reasons**: one :class:`~dynlens.events.Reason` enum in ``dynlens/events.py`` naming the
   monitor, ``class TopicReason(Reason, monitor="topic")``; the report finds it by that name.
5. **The README**: its section, with its keys. **CHANGELOG.md**: the entry.
6. **The report**, if it logs something worth summarising: one family module in
   ``dynlens/report/families/`` declaring its place in the tables (:mod:`dynlens.report.family`).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from rich import get_console
from typing_extensions import override

from ..compat import Callback
from ..events import Reason, format_event, join_events
from .context import logging_step
from .layout import Chart, tag_regex, tensorboard_writers, write_layout
from .schedule import BudgetSchedule, check_cadence, dense_cadence
from .state import DeclaredState, to_device
from .validate import ConfigurationError, check_callable

NO_LOGGER_WARNING = (
    "dynlens: this Trainer has no logger, so dynlens metrics reach only `trainer.callback_metrics` "
    "and the console. Pass `logger=TensorBoardLogger('runs')` (or any Lightning logger) to record "
    "them."
)

Hook = TypeVar("Hook", bound=Callable[..., Any])


def fail_soft(hook: Hook) -> Hook:
    """Run a hook of a :class:`Monitor`; on an unexpected error warn once and disable the monitor.

    A disabled monitor's hooks do nothing for the rest of the run, so one bad measurement
    (a NaN, an op without a double-backward rule) never kills a long training job.
    """

    @functools.wraps(hook)
    def guarded(self: Monitor, *args: Any, **kwargs: Any) -> Any:
        if self.disabled_reason is not None:
            return None
        try:
            return hook(self, *args, **kwargs)
        except ConfigurationError:
            raise
        except Exception as exc:
            self.disable(f"{type(exc).__name__} in `{hook.__name__}`: {exc}")
            return None

    return guarded  # type: ignore[return-value]


class Monitor(DeclaredState, Callback):
    """Base class of dynlens callbacks. Subclasses set :attr:`name` and :attr:`reasons` and
    implement hooks (module docstring).

    Args:
        every_n_steps: measure every this many training steps (where the monitor measures on
            training steps), exclusive with ``budget``; 1 when neither is given. A step is a
            batch after which the optimizer stepped, counted as Lightning's logging step counts
            them:
            ``trainer.global_step`` with one optimizer, one per batch when manual optimisation
            steps several optimizers per batch (a monitor may count its own steps:
            :meth:`cadence_step`).
        budget: a fraction of training time, in (0, 1), to spend measuring instead of a fixed
            ``every_n_steps``: the :class:`~dynlens.callbacks.schedule.BudgetSchedule` then
            chooses the steps (for monitors that take a budget).
        clock: a ``() -> seconds`` function timing training and measurements; inject a fake one
            for deterministic tests.
        prefix: first part of every metric key, ``<prefix>/<monitor>/<quantity>``.
        verbose: print event lines (rank 0) to the console.
    """

    #: The ``<monitor>`` part of metric keys, e.g. ``"grokking"``.
    name: ClassVar[str] = "monitor"
    #: The enum of this monitor's event reasons (:mod:`dynlens.events`).
    reasons: ClassVar[type[Reason]] = Reason
    #: Whether measurements are timed without a ``budget`` too (for an ``overhead`` to log).
    timed: ClassVar[bool] = False
    #: Measure densely early on, about this many times per doubling of the run, up to the fixed
    #: cadence (:func:`~dynlens.callbacks.schedule.dense_cadence`); 0: the fixed cadence only.
    dense_points: int = 0

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        budget: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        check_cadence(every_n_steps, budget)
        if every_n_steps is None and budget is None:
            every_n_steps = 1
        check_callable("clock", clock, signature="() -> seconds", allow_none=False)
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ConfigurationError(f"Expected `prefix` to be a non-empty str, got {prefix!r}.")
        self.every_n_steps = every_n_steps
        self.budget = None if budget is None else float(budget)
        self.prefix = prefix.strip("/")
        self.verbose = verbose
        #: Why the monitor switched itself off mid-run, or ``None`` while it is active.
        self.disabled_reason: str | None = None
        self._failed_side_effects: set[str] = set()
        DeclaredState.__init__(self)
        self._trainer: weakref.ref[Any] | None = None  # the current fit's (charges the schedule)
        #: Discrete events so far: dicts with ``step``, ``reason`` and ``message`` (kept in state).
        self.events: list[dict[str, Any]] = self.add_state(
            "events", list, save=lambda events: [dict(e) for e in events]
        )
        #: Times training and measurements; with a ``budget`` it chooses the steps to measure at.
        self.schedule: BudgetSchedule | None = None
        if self.budget is not None or self.timed:
            self.schedule = self.add_state(
                "schedule",
                lambda: BudgetSchedule(self.budget, clock),
                save=BudgetSchedule.state_dict,
                load=self._restore_schedule,
            )

    # ----------------------------------------------------------------------------- identity
    def state_key_fields(self) -> dict[str, Any]:
        """Arguments that identify this configuration; two monitors with equal fields clash."""
        return {"prefix": self.prefix}

    @property
    def state_key(self) -> str:
        frozen = getattr(self, "_frozen_state_key", None)
        return frozen or self._generate_state_key(**self.state_key_fields())

    def key(self, quantity: str) -> str:
        """Full metric key of ``quantity``: ``<prefix>/<name>/<quantity>``."""
        return f"{self.prefix}/{self.name}/{quantity}"

    # ----------------------------------------------------------------------------- cadence
    def cadence_step(self, trainer: Any) -> int:
        """The step the cadence counts: :func:`logging_step` (a monitor that counts its own
        steps, across fits say, overrides it)."""
        return logging_step(trainer)

    def is_due(self, trainer: Any, every_n_steps: int | None = None) -> bool:
        """Whether this training step is measured: the one cadence rule of every monitor.

        Never in the sanity check or outside training. With a ``budget`` the schedule decides
        (call it then at every step that could be measured, on every rank: its first decision
        is broadcast from rank 0); else every ``every_n_steps``-th :meth:`cadence_step` (default:
        the monitor's own cadence; a monitor measuring a second quantity at another cadence
        passes it), densely early on with :attr:`dense_points`.
        """
        if trainer.sanity_checking or not trainer.training:
            return False
        step = self.cadence_step(trainer)
        if every_n_steps is None and self.budget is not None:
            assert self.schedule is not None
            return self.schedule.due(trainer, step)
        cadence = self.every_n_steps if every_n_steps is None else every_n_steps
        assert cadence is not None
        if self.dense_points:
            cadence = dense_cadence(step, cadence, self.dense_points)
        return step % cadence == 0

    @contextlib.contextmanager
    def measuring(self, trainer: Any, device: torch.device) -> Iterator[None]:
        """Time the measurement run inside the block against the training (with a schedule):
        training is charged up to here, the block to measuring, and with a ``budget`` the next
        step is decided after it, on every rank. A block that raises is not counted."""
        if self.schedule is None:
            yield
            return
        step = self.cadence_step(trainer)
        start = self.schedule.measure_start(step, device)
        yield
        self.schedule.measured(trainer, step, start, device)

    @property
    def overhead(self) -> float | None:
        """Measurement time ÷ training time so far (``None`` untimed, or before any training)."""
        return None if self.schedule is None else self.schedule.overhead

    # ----------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Lightning reads `state_key` at every hook call (its profiler names the call by it),
        # about six times a step: the key is built once per set-up, from the configuration
        self._frozen_state_key = None
        self._frozen_state_key = self.state_key
        if stage == "fit":
            self._trainer = weakref.ref(trainer)
            if not trainer.loggers and trainer.is_global_zero:
                warnings.warn(NO_LOGGER_WARNING, UserWarning, stacklevel=2)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._trainer = None  # the trainer is let go

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        device = getattr(pl_module, "device", None)
        for field in self._states.values():
            if field.device and device is not None:  # restored from a checkpoint on the CPU
                field.set(self, to_device(field.get(self), device))
        self.write_layout(trainer)
        if self.schedule is not None:
            self.schedule.train_start(self.cadence_step(trainer))

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule is not None:
            self.schedule.train_end(self.cadence_step(trainer))

    # ----------------------------------------------------------------------------- logging
    def log_metrics(
        self, trainer: Any, metrics: Mapping[str, torch.Tensor | float], step: int | None = None
    ) -> dict[str, float]:
        """Send ``{quantity: value}`` to every logger and to ``trainer.callback_metrics``.

        Tensor values are moved to the host together (one synchronisation). Keys are prefixed to
        ``<prefix>/<name>/<quantity>``; ``step`` defaults to :func:`logging_step`. Returns the
        logged floats.
        """
        if not metrics:
            return {}
        values: dict[str, float] = {}
        tensor_names: list[str] = []
        tensors: list[torch.Tensor] = []
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                tensor_names.append(name)
                tensors.append(value.detach().reshape(()))
            else:
                values[name] = float(value)
        if tensors:  # one device-to-host copy for all tensor values
            device = tensors[0].device
            dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS lacks float64
            stacked = torch.stack([t.to(device=device, dtype=dtype) for t in tensors])
            values.update(zip(tensor_names, stacked.cpu().tolist(), strict=True))
        logged = {self.key(name): values[name] for name in metrics}
        as_tensor = torch.tensor(list(logged.values()))
        trainer.callback_metrics.update(zip(logged, as_tensor.unbind(), strict=True))
        if trainer.is_global_zero:
            step = logging_step(trainer) if step is None else step
            for logger in trainer.loggers:
                self._rank_zero_side_effect(
                    f"{type(logger).__name__}.log_metrics", logger.log_metrics, logged, step=step
                )
        return logged

    def _rank_zero_side_effect(
        self, what: str, action: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        """Run a rank-0-only side effect (a logger, a writer, the console); if it fails, warn once
        per kind and keep measuring. Disabling the monitor here, on rank 0 alone, would leave the
        other ranks waiting in its next collective."""
        try:
            action(*args, **kwargs)
        except Exception as exc:
            if what not in self._failed_side_effects:
                self._failed_side_effects.add(what)
                warnings.warn(
                    f"dynlens {type(self).__name__}: {what} failed ({type(exc).__name__}: {exc}); "
                    "the monitor keeps measuring and its values still reach "
                    "trainer.callback_metrics.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def fired(self, reason: Reason | str) -> bool:
        """Whether an event with this ``reason`` was recorded (this run or before a resume)."""
        return any(e["reason"] == reason for e in self.events)

    def log_event(
        self, trainer: Any, step: int, reason: Reason | str, message: str, *, once: bool = False
    ) -> bool:
        """Record a discrete event: kept in state, written as TensorBoard text, printed (rank 0).

        ``reason`` is a member of :attr:`reasons` (or its value: ``"memorized"``), ``message`` a
        sentence. The TensorBoard text carries both (:func:`dynlens.events.format_event`:
        ``"`memorized` · step 9: ..."``), so ``dynlens report`` reads the reason, not the wording.
        With ``once`` an event whose reason already :meth:`fired` is not recorded again. Returns
        whether it was recorded (on every rank: the side effects are rank 0's).
        """
        try:
            code = self.reasons(reason).value
        except (ValueError, TypeError):  # not a member (TypeError: an enum without members)
            raise ValueError(
                f"{reason!r} is not a reason of {type(self).__name__}: add it to "
                f"{self.reasons.__name__} in dynlens/events.py (one of "
                f"{[r.value for r in self.reasons]})"
            ) from None
        if once and self.fired(code):
            return False
        text = format_event(code, f"step {step}: {message}")
        self.events.append({"step": int(step), "reason": code, "message": message})
        if not trainer.is_global_zero:
            return True
        # TensorBoard shows one text per step (the last): each write carries the step's events
        same_step = []
        for event in reversed(self.events):
            if event["step"] != int(step):
                break
            same_step.append(format_event(event["reason"], f"step {step}: {event['message']}"))
        text = join_events(same_step[::-1]) if len(same_step) > 1 else text
        for writer in tensorboard_writers(trainer):
            self._rank_zero_side_effect(
                "SummaryWriter.add_text",
                writer.add_text,
                f"{self.prefix}/{self.name}/events",
                text,
                step,
            )
        if self.verbose:
            # rich's shared console, so lines print cleanly above a live progress display.
            self._rank_zero_side_effect(
                "printing to the console",
                get_console().print,
                f"[bold cyan]dynlens[/] {self.name} · step {step}: {message}",
                highlight=False,
                soft_wrap=True,
            )
        return True

    # ----------------------------------------------------------------------------- the panel
    def panel(self) -> dict[str, Chart]:
        """This monitor's TensorBoard custom-scalars charts: ``{chart title: chart}``."""
        return {}

    @property
    def panel_ready(self) -> bool:
        """Whether :meth:`panel` knows its charts. A monitor whose charts depend on what the run
        turns out to have (attention layers) says False until it knows, then calls
        :meth:`write_layout`; the run's one layout waits for it."""
        return True

    def write_layout(self, trainer: Any, *, final: bool = False) -> None:
        """Write the run's one layout, of every monitor attached to ``trainer``, once every
        monitor's panel is ready (``final``: whatever is ready); rank 0 only."""
        if trainer.is_global_zero:
            monitors = [cb for cb in trainer.callbacks if isinstance(cb, Monitor)]
            write_layout(trainer, monitors, final=final)

    def multiline(self, *quantities: str) -> Chart:
        """A multiline chart of exactly these quantities (anchored tag regexes)."""
        return ["Multiline", [tag_regex(self.key(q)) for q in quantities]]

    def margin(self, value: str, lower: str, upper: str) -> Chart:
        """A margin chart: ``value`` with a band from ``lower`` to ``upper``."""
        return ["Margin", [self.key(value), self.key(lower), self.key(upper)]]

    # ----------------------------------------------------------------------------- failing soft
    def disable(self, reason: str) -> None:
        """Switch the monitor off for the rest of the run with one warning naming ``reason``."""
        self.disabled_reason = reason
        warnings.warn(
            f"dynlens {type(self).__name__} disabled itself and training goes on: {reason}",
            RuntimeWarning,
            stacklevel=3,
        )

    # ----------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer() if self._trainer is not None else None
        if self.schedule is not None and trainer is not None:
            # a checkpoint mid-run: the training so far counts
            self.schedule.charge(self.cadence_step(trainer))
        return super().state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.schedule is not None and "schedule" not in state_dict and "next_step" in state_dict:
            # the layout before the base owned the schedule: its keys at the top level
            state_dict = {**state_dict, "schedule": state_dict}
        super().load_state_dict(state_dict)

    def _restore_schedule(self, saved: Mapping[str, Any]) -> BudgetSchedule:
        assert self.schedule is not None
        self.schedule.load_state_dict(dict(saved))
        return self.schedule
