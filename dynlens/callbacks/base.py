"""The machinery every dynlens callback shares (the monitor contract of DESIGN.md).

A monitor subclasses :class:`Monitor`, sets ``name`` (the ``<monitor>`` part of its metric keys),
describes its TensorBoard panel in :meth:`Monitor.panel`, and in its hooks measures, then calls
:meth:`Monitor.log_metrics` and :meth:`Monitor.log_event`. The base provides:

* **cadence** in optimizer steps, one rule for every monitor (:meth:`Monitor.is_due`: every n
  steps, or a :class:`~dynlens.callbacks.schedule.BudgetSchedule` for a compute ``budget``),
  never during the sanity check;
* **declared state** (:meth:`Monitor.add_state`, :mod:`dynlens.callbacks.state`): checkpoints,
  resets between logging intervals and the move back to the device follow from one declaration
  per field; pooling between logs (:attr:`Monitor.pools_between_logs`, :meth:`Monitor.flush`);
* **logging** to every Lightning logger at Lightning's own logging step, so dynlens charts line up
  with the run's ``self.log`` metrics whatever ``log_every_n_steps`` is, and into
  ``trainer.callback_metrics`` so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them;
* **TensorBoard extras**: one custom-scalars layout per run merged from every attached monitor's
  panel, and text events for discrete events, each carrying its reason (:mod:`dynlens.events`;
  ``once=True`` for an event that fires once per run);
* **DDP helpers** (:meth:`Monitor.reduce`, :meth:`Monitor.reduce_to_host`: one collective per
  reduction and one host copy) that run on every rank; side effects on rank 0 only;
* **validators** (:mod:`dynlens.callbacks.validate`) and a ``state_key`` built from the
  identifying arguments;
* **failing soft**: a hook decorated with :func:`fail_soft` that raises mid-run warns once and
  disables its monitor; training goes on. :class:`ConfigurationError` is the exception: a set-up
  mistake stops the run with a message that names the fix.

Adding a monitor
----------------

1. **The numbers** go in the pure measurement layer (``dynlens/<topic>.py``, no Lightning
   import), each with a test against a closed-form or brute-force value on a tiny case.
2. **The callback** is one module, ``dynlens/callbacks/<topic>.py``: a :class:`Monitor` subclass
   that validates its arguments in ``__init__`` (:mod:`dynlens.callbacks.validate`), declares
   every field of its state there with :meth:`Monitor.add_state`, measures in its hooks when
   :meth:`Monitor.is_due` says so, through a capture of :mod:`dynlens.callbacks.capture` where
   it needs logits or attention, and logs through :meth:`Monitor.log_metrics` and
   :meth:`Monitor.log_event` (with a reason). It re-implements none of the above.
3. **Export** it from ``dynlens/callbacks/__init__.py`` and ``dynlens/__init__.py``, and list it
   in the README's table of metric keys.
4. **Conformance**: add a factory to ``FACTORIES`` in ``tests/test_conformance.py``; the suite
   then checks the monitor contract on it (drop-in on both Lightning packages, no observer
   effect, DDP, the resume round trip of ``tests/test_resume_roundtrip.py``), and refuses a
   monitor it does not list.
5. **The report**, if the monitor logs something worth summarising: one family module in
   ``dynlens/report/families/`` (see :mod:`dynlens.report.summary`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from rich import get_console

from .._lightning import Callback
from ..events import format_event
from .context import (  # noqa: F401  (re-exported)
    SHARDED_STRATEGIES,
    in_own_forward,
    logging_step,
    own_forward,
    sharding_strategy,
)
from .layout import (  # noqa: F401  (re-exported)
    Chart,
    layout,
    tag_regex,
    tensorboard_writers,
    write_layout,
)
from .state import StateField, get_nested, is_missing, set_nested, to_device
from .validate import (  # noqa: F401  (re-exported: monitors import them from here)
    ConfigurationError,
    check_bool,
    check_callable,
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_positive_int,
    check_positive_number,
)

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


class Monitor(Callback):
    """Base class of dynlens callbacks. Subclasses set :attr:`name` and implement hooks.

    Args:
        every_n_steps: measure every this many training steps (where the monitor measures on
            training steps). A step is a batch after which the optimizer stepped, counted as
            Lightning's logging step counts them: ``trainer.global_step`` with one optimizer,
            one per batch when manual optimisation steps several optimizers per batch.
        prefix: first part of every metric key, ``<prefix>/<monitor>/<quantity>``.
        verbose: print event lines (rank 0) to the console.
    """

    #: The ``<monitor>`` part of metric keys, e.g. ``"grokking"``.
    name: ClassVar[str] = "monitor"

    def __init__(self, *, every_n_steps: int = 1, prefix: str = "dynlens", verbose: bool = True):
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ConfigurationError(f"Expected `prefix` to be a non-empty str, got {prefix!r}.")
        self.prefix = prefix.strip("/")
        self.verbose = verbose
        #: Why the monitor switched itself off mid-run, or ``None`` while it is active.
        self.disabled_reason: str | None = None
        self._failed_side_effects: set[str] = set()
        self._states: dict[str, StateField] = {}
        #: Discrete events so far: dicts with ``step``, ``reason`` and ``message`` (kept in state).
        self.events: list[dict[str, Any]]
        self.add_state("events", list, save=_copy_events, load=_copy_events)
        if self.pools_between_logs:
            # measured steps not logged yet, and the latest measured step (to log them at)
            self.add_state("_pending_since_log", False, key="pending.since_log", pooled=True)
            self.add_state("_last_measured", 0, key="pending.last_measured")

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
    def is_due(
        self,
        trainer: Any,
        every_n_steps: int | None = None,
        *,
        step: int | None = None,
        schedule: Any = None,
    ) -> bool:
        """Whether this training step is measured: the one cadence rule of every monitor.

        Never in the sanity check or outside training. With a ``schedule`` (a
        :class:`~dynlens.callbacks.schedule.BudgetSchedule`, for a ``budget``) the schedule
        decides; else every ``every_n_steps``-th step (default: the monitor's own). ``step``
        defaults to :func:`logging_step`; a monitor counting its own steps passes them.
        """
        if trainer.sanity_checking or not trainer.training:
            return False
        step = logging_step(trainer) if step is None else step
        if schedule is not None:
            return schedule.due(trainer, step)
        return step % (self.every_n_steps if every_n_steps is None else every_n_steps) == 0

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
        return min(step - step % n + n for n in (cadences or (self.every_n_steps,)))

    # ----------------------------------------------------------------------------- set-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Lightning reads `state_key` at every hook call (its profiler names the call by it),
        # about six times a step: the key is built once per set-up, from the configuration
        self._frozen_state_key = None
        self._frozen_state_key = self.state_key
        if stage == "fit":
            self.reset_pooled()  # a new fit starts a new logging interval
            if not trainer.loggers and trainer.is_global_zero:
                warnings.warn(NO_LOGGER_WARNING, UserWarning, stacklevel=2)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        device = getattr(pl_module, "device", None)
        for field in self._states.values():
            if field.device and device is not None:  # restored from a checkpoint on the CPU
                setattr(self, field.name, to_device(getattr(self, field.name), device))
        if trainer.is_global_zero:
            write_layout(trainer)

    # ----------------------------------------------------------------------------- pooling
    #: Whether the monitor pools measurements on the device between two logs. Such a monitor
    #: declares its pooled fields with ``pooled=True``, calls :meth:`mark_measured` for each
    #: measured step and implements :meth:`flush`; a run that ends with measured steps not yet
    #: logged (``EarlyStopping``, ``max_epochs``) has them flushed at ``on_train_end``.
    pools_between_logs: ClassVar[bool] = False

    def mark_measured(self, step: int) -> None:
        """A step was measured and pooled, not logged yet."""
        self._pending_since_log = True
        self._last_measured = int(step)

    def flush(self, trainer: Any, step: int, last: bool = False) -> None:
        """Log what was pooled since the last log, at ``step`` (monitors that pool implement it;
        ``last``: the run ends inside a logging interval, see :meth:`interval_ends`)."""
        raise NotImplementedError

    @fail_soft
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.pools_between_logs and self._pending_since_log:
            self.flush(trainer, self._last_measured, last=True)

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
        self, what: str, action: Callable[..., Any], *args, **kwargs
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

    def fired(self, reason: str) -> bool:
        """Whether an event with this ``reason`` was recorded (this run or before a resume)."""
        return any(e["reason"] == reason for e in self.events)

    def log_event(
        self, trainer: Any, step: int, reason: str, message: str, *, once: bool = False
    ) -> bool:
        """Record a discrete event: kept in state, written as TensorBoard text, printed (rank 0).

        ``reason`` is a short machine-readable code (``"memorized"``), ``message`` a sentence.
        The TensorBoard text carries both (:func:`dynlens.events.format_event`:
        ``"`memorized` · step 9: ..."``), so ``dynlens report`` reads the reason, not the wording.
        With ``once`` an event whose reason already :meth:`fired` is not recorded again. Returns
        whether it was recorded.
        """
        if once and self.fired(reason):
            return False
        text = format_event(reason, f"step {step}: {message}")  # refuses a malformed reason
        self.events.append({"step": int(step), "reason": reason, "message": message})
        if not trainer.is_global_zero:
            return
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

    def panel(self) -> dict[str, Chart]:
        """This monitor's TensorBoard custom-scalars charts: ``{chart title: chart}``."""
        return {}

    @property
    def panel_ready(self) -> bool:
        """Whether :meth:`panel` knows its charts. A monitor whose charts depend on what the run
        turns out to have (attention layers) says False until it knows, then calls
        :func:`write_layout`; the run's one layout waits for it."""
        return True

    def multiline(self, *quantities: str) -> Chart:
        """A multiline chart of exactly these quantities (anchored tag regexes)."""
        return ["Multiline", [tag_regex(self.key(q)) for q in quantities]]

    def margin(self, value: str, lower: str, upper: str) -> Chart:
        """A margin chart: ``value`` with a band from ``lower`` to ``upper``."""
        return ["Margin", [self.key(value), self.key(lower), self.key(upper)]]

    # ----------------------------------------------------------------------------- DDP
    @staticmethod
    def reduce(trainer: Any, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """All-reduce across ranks (``"mean"``, ``"sum"`` or ``"max"``). Call it on every rank."""
        return trainer.strategy.reduce(tensor, reduce_op=op)

    @classmethod
    def reduce_to_host(
        cls, trainer: Any, parts: Mapping[str, tuple[torch.Tensor, str | None]]
    ) -> dict[str, list[float]]:
        """All-reduce many tensors, ``{name: (tensor, op)}``, in one collective per ``op``
        (``None``: the tensor is already the same on every rank), and bring them all to the host
        in one copy: ``{name: its values, flattened}``, in float64 (float32 on MPS). Call it on
        every rank with the same names, at log time."""
        names = list(parts)
        if not names:
            return {}
        wide = torch.float32 if parts[names[0]][0].device.type == "mps" else torch.float64
        flat = {n: parts[n][0].reshape(-1).to(wide) for n in names}
        for op in dict.fromkeys(op for _, op in parts.values() if op is not None):
            group = [n for n in names if parts[n][1] == op]
            joined = torch.cat([flat[n] for n in group]) if len(group) > 1 else flat[group[0]]
            reduced = cls.reduce(trainer, joined, op)
            flat.update(zip(group, reduced.split([flat[n].numel() for n in group]), strict=True))
        values = torch.cat([flat[n] for n in names]).cpu().tolist()  # the one host copy
        out, start = {}, 0
        for n in names:
            out[n], start = values[start : start + flat[n].numel()], start + flat[n].numel()
        return out

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
    def add_state(
        self,
        name: str,
        default: Any,
        *,
        key: str | None = None,
        persistent: bool = True,
        pooled: bool = False,
        device: bool = False,
        save: Callable[[Any], Any] | None = None,
        load: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Declare a field of the monitor's state and set it to ``default``
        (:mod:`dynlens.callbacks.state`): ``key`` in checkpoints (default ``name`` without its
        leading underscore; dotted keys nest), ``persistent`` (in checkpoints), ``pooled``
        (pooled between logs: reset when a fit starts), ``device`` (moved to the module's device
        when training starts), ``save``/``load`` (to and from the checkpoint's form). Returns the
        default it set, so a declaration can carry the attribute's type:
        ``self.onset_step: int | None = self.add_state("onset_step", None)``."""
        if name in self._states:
            raise RuntimeError(f"{type(self).__name__} declares the state {name!r} twice.")
        field = StateField(
            name, default, key or name.lstrip("_"), persistent, pooled, device, save, load
        )
        self._states[name] = field
        setattr(self, name, field.fresh())
        return getattr(self, name)

    def reset_pooled(self) -> None:
        """Reset every ``pooled`` field to its default (nothing measured since the last log)."""
        for field in self._states.values():
            if field.pooled:
                setattr(self, field.name, field.fresh())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for field in self._states.values():
            if field.persistent:
                set_nested(state, field.key, field.to_checkpoint(getattr(self, field.name)))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Tolerant of older or partial checkpoints: a field they lack gets its default, and
        # pooled fields that checkpoints do not carry start empty.
        for field in self._states.values():
            value = get_nested(state_dict, field.key) if field.persistent else None
            if field.persistent and not is_missing(value):
                setattr(self, field.name, field.from_checkpoint(value))
            elif field.persistent or field.pooled:
                setattr(self, field.name, field.fresh())


def _copy_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(e) for e in events]
