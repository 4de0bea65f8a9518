"""The machinery every dynlens callback shares (the monitor contract of DESIGN.md).

A monitor subclasses :class:`Monitor`, sets ``name`` (the ``<monitor>`` part of its metric keys),
describes its TensorBoard panel in :meth:`Monitor.panel`, and in its hooks measures, then calls
:meth:`Monitor.log_metrics` and :meth:`Monitor.log_event`. The base provides:

* **cadence** in optimizer steps (:meth:`Monitor.is_due`), never during the sanity check;
* **logging** to every Lightning logger at Lightning's own logging step, so dynlens charts line up
  with the run's ``self.log`` metrics whatever ``log_every_n_steps`` is, and into
  ``trainer.callback_metrics`` so ``EarlyStopping`` and ``ModelCheckpoint`` can monitor them;
* **TensorBoard extras**: one custom-scalars layout per run merged from every attached monitor's
  panel, and text events for discrete events, each carrying its reason (:mod:`dynlens.events`);
* **DDP helpers** (:meth:`Monitor.reduce`) that run on every rank; side effects on rank 0 only;
* **state** with a ``state_key`` built from the identifying arguments;
* **failing soft**: a hook decorated with :func:`fail_soft` that raises mid-run warns once and
  disables its monitor; training goes on. :class:`ConfigurationError` is the exception: a set-up
  mistake stops the run with a message that names the fix.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from rich import get_console

from .._lightning import Callback, is_tensorboard_logger
from ..events import format_event

# SummaryWriters that already hold a dynlens layout: one merged layout per run, whichever monitor
# gets there first writes it for all.
_LAYOUT_WRITTEN: weakref.WeakSet = weakref.WeakSet()

NO_LOGGER_WARNING = (
    "dynlens: this Trainer has no logger, so dynlens metrics reach only `trainer.callback_metrics` "
    "and the console. Pass `logger=TensorBoardLogger('runs')` (or any Lightning logger) to record "
    "them."
)

Chart = list  # ["Multiline", [tag regexes]] or ["Margin", [value, lower, upper]]
Hook = TypeVar("Hook", bound=Callable[..., Any])


# Set while a monitor runs forward passes of its own inside a training step (a Hessian replay,
# an evaluation), so the monitors that capture the training step's logits skip them.
_OWN_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dynlens_own_forward", default=False
)


@contextlib.contextmanager
def own_forward() -> Iterator[None]:
    """Mark the forward passes run inside this block as a monitor's own, not training's."""
    token = _OWN_FORWARD.set(True)
    try:
        yield
    finally:
        _OWN_FORWARD.reset(token)


def in_own_forward() -> bool:
    """True inside :func:`own_forward`: what runs now is not the training step's forward."""
    return _OWN_FORWARD.get()


class ConfigurationError(ValueError):
    """A monitor was set up wrongly; the message says how to fix it. Never swallowed."""


def check_positive_int(name: str, value: object) -> int:
    """Validate a count argument, e.g. ``every_n_steps``, with a message that names the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"Expected `{name}` to be a positive int, got {value!r}.")
    return value


def check_non_negative_int(name: str, value: object) -> int:
    """Validate an index, seed or delay argument (0 allowed), with a message that names the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"Expected `{name}` to be a non-negative int, got {value!r}.")
    return value


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


def logging_step(trainer: Any) -> int:
    """The step Lightning itself gives ``self.log`` values logged at this moment.

    It counts optimizer steps (batches that stepped), equals ``trainer.global_step`` until the
    step's ``on_train_batch_end`` has run, and is restored from checkpoints.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


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
        #: Discrete events so far: dicts with ``step``, ``reason`` and ``message`` (kept in state).
        self.events: list[dict[str, Any]] = []
        #: Why the monitor switched itself off mid-run, or ``None`` while it is active.
        self.disabled_reason: str | None = None
        self._failed_side_effects: set[str] = set()

    # ----------------------------------------------------------------------------- identity
    def state_key_fields(self) -> dict[str, Any]:
        """Arguments that identify this configuration; two monitors with equal fields clash."""
        return {"prefix": self.prefix}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_key_fields())

    def key(self, quantity: str) -> str:
        """Full metric key of ``quantity``: ``<prefix>/<name>/<quantity>``."""
        return f"{self.prefix}/{self.name}/{quantity}"

    # ----------------------------------------------------------------------------- cadence
    def is_due(self, trainer: Any) -> bool:
        """True on training steps that fall on the cadence; never in the sanity check."""
        if trainer.sanity_checking or not trainer.training:
            return False
        return logging_step(trainer) % self.every_n_steps == 0

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
        if stage == "fit" and not trainer.loggers and trainer.is_global_zero:
            warnings.warn(NO_LOGGER_WARNING, UserWarning, stacklevel=2)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero:
            write_layout(trainer)

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

    def log_event(self, trainer: Any, step: int, reason: str, message: str) -> None:
        """Record a discrete event: kept in state, written as TensorBoard text, printed (rank 0).

        ``reason`` is a short machine-readable code (``"memorized"``), ``message`` a sentence.
        The TensorBoard text carries both (:func:`dynlens.events.format_event`:
        ``"`memorized` · step 9: ..."``), so ``dynlens report`` reads the reason, not the wording.
        """
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
    def state_dict(self) -> dict[str, Any]:
        return {"events": [dict(e) for e in self.events]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Tolerant of older or partial checkpoints: missing entries keep their defaults.
        self.events = [dict(e) for e in state_dict.get("events", [])]


def tag_regex(tag: str) -> str:
    """Regex matching exactly ``tag``, anchored at both ends (``trace`` must not also match
    ``trace_stderr``)."""
    return "^" + re.escape(tag) + "$"


#: Strategies that shard parameters across ranks: no rank holds the whole of θ.
SHARDED_STRATEGIES = frozenset(
    {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy"}
)


def sharding_strategy(trainer: Any) -> str | None:
    """The name of the trainer's strategy when it shards the parameters (FSDP, DeepSpeed, ...),
    else ``None``: then every rank holds every parameter whole."""
    return next(
        (c.__name__ for c in type(trainer.strategy).__mro__ if c.__name__ in SHARDED_STRATEGIES),
        None,
    )


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (rank 0 only)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if is_tensorboard_logger(logger)]


def layout(monitors: list[Monitor]) -> dict[str, dict[str, Chart]]:
    """The merged custom-scalars layout of ``monitors``: one category per monitor."""
    merged: dict[str, dict[str, Chart]] = {}
    for monitor in monitors:
        charts = monitor.panel()
        if charts:
            merged.setdefault(f"{monitor.prefix}/{monitor.name}", {}).update(charts)
    return merged


def write_layout(trainer: Any, *, final: bool = False) -> None:
    """Write the layout of every dynlens monitor attached to ``trainer``, once per writer.

    TensorBoard shows one layout per run, so it is written once, when every monitor's panel is
    :attr:`~Monitor.panel_ready` (a chart appears only for what the run logs); ``final`` (the
    end of training) writes it whatever is ready. Called again and again, it writes once."""
    monitors = [cb for cb in trainer.callbacks if isinstance(cb, Monitor)]
    if not final and not all(m.panel_ready for m in monitors):
        return
    merged = layout(monitors)
    if not merged:
        return
    for writer in tensorboard_writers(trainer):
        if writer not in _LAYOUT_WRITTEN:
            writer.add_custom_scalars(merged)
            _LAYOUT_WRITTEN.add(writer)
