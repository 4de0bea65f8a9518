"""Getting a training step's output logits and targets without changing the model.

Shared by every monitor that looks at output logits (softmax collapse, logit growth), so they all
find logits the same way and fail with the same advice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from .base import ConfigurationError, in_own_forward

TargetsArg = Literal["auto"] | Callable[[Any], torch.Tensor] | None
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def _logits_of(output: Any) -> torch.Tensor | None:
    """The logits in a module's output: a tensor, the first of a tuple, or a ``logits`` field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        value = output.get("logits")
        return value if isinstance(value, torch.Tensor) else None
    value = getattr(output, "logits", None)  # e.g. Hugging Face ModelOutput
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class LogitsCapture:
    """Finds a training step's logits: a forward hook on a named module, or the step's outputs.

    Args:
        logits_module: dotted name of the submodule whose output is the logits (``"head"``,
            ``"model.lm_head"``). A forward hook records its output during measured steps only.
            ``None``: read ``outputs[output_key]`` of ``training_step`` instead.
        output_key: key of the logits in the dict ``training_step`` returns.
    """

    def __init__(self, logits_module: str | None = None, output_key: str = "logits") -> None:
        if logits_module is not None and (not isinstance(logits_module, str) or not logits_module):
            raise ConfigurationError(
                f"Expected `logits_module` to be a submodule name such as 'head', got "
                f"{logits_module!r}."
            )
        self.logits_module = logits_module
        self.output_key = output_key
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._armed = False
        self._captured: list[torch.Tensor] = []

    def advice(self, owner: str) -> str:
        """The two ways to give ``owner`` the logits, for error messages."""
        return (
            f"{owner} needs the output logits. Either return them from training_step, "
            f"`return {{'loss': loss, '{self.output_key}': logits.detach()}}`, or name the module "
            f"that produces them: `{owner}(logits_module='head')`."
        )

    def attach(self, pl_module: nn.Module, owner: str) -> None:
        """Register the forward hook (when a module is named). Call from ``setup``."""
        self.detach()
        if self.logits_module is None:
            return
        try:
            module = pl_module.get_submodule(self.logits_module)
        except AttributeError:
            names = [name for name, _ in pl_module.named_modules() if name]
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise ConfigurationError(
                f"{owner}(logits_module={self.logits_module!r}): no such submodule. "
                f"The model has: {shown}."
            ) from None
        self._handle = module.register_forward_hook(self._record)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.disarm()

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed and not in_own_forward():  # not another monitor's replay or evaluation
            logits = _logits_of(output)
            if logits is not None:
                self._captured.append(logits.detach())

    def arm(self) -> None:
        """Start recording the hooked module's outputs (a measured training step begins)."""
        self._armed = True
        self._captured = []

    def disarm(self) -> None:
        self._armed = False
        self._captured = []

    def take(self, outputs: Any) -> list[torch.Tensor]:
        """The logits of the step that just ran (several when the hooked module ran repeatedly),
        then stop recording. Empty when none were found."""
        if self.logits_module is not None:
            captured = self._captured
        else:
            logits = outputs.get(self.output_key) if isinstance(outputs, Mapping) else None
            captured = [logits.detach()] if isinstance(logits, torch.Tensor) else []
        self.disarm()
        return captured


class LogProbsTap:
    """Measures the log-probabilities a :class:`dynlens.CrossEntropyLoss` computes, as it does.

    A monitor that needs ``log_softmax`` of the logits the loss sees reads the loss's own (through
    :meth:`dynlens.CrossEntropyLoss.register_log_probs_hook`) instead of running the pass again:
    ``measure(input, target, log_probs)`` runs inside the loss's forward, and only its result is
    kept, so the log-probabilities are freed with the autograd graph as they would be without the
    monitor. The hooks are registered only while armed (a measured step): at other steps the loss
    runs ``F.cross_entropy`` as it always does, and a copy of the module never carries them.
    """

    def __init__(self, measure: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]) -> None:
        self._measure = measure
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen: list[tuple[torch.Tensor, torch.Tensor, Any]] = []

    def arm(self, losses: list[nn.Module]) -> None:
        """Start measuring the forwards of ``losses`` (idempotent within a step)."""
        if not self._handles:
            self._handles = [loss.register_log_probs_hook(self._record) for loss in losses]

    def _record(
        self, module: nn.Module, input: torch.Tensor, target: torch.Tensor, log_probs: torch.Tensor
    ) -> None:
        # (N, C) rows only, and not another monitor's replay of the step
        if input.dim() != 2 or in_own_forward():
            return
        input = input.detach()
        try:
            measurement = self._measure(input, target, log_probs)
        except Exception:  # never break the training step: the monitor measures the logits itself
            return
        self._seen.append((input, target, measurement))

    def measured(self, logits: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        """``(target, measurement)`` of the loss's call on exactly ``logits`` — an input of shape
        ``(N, C)`` in the same memory, as ``logits.flatten(0, -2)`` is; ``None`` when no loss saw
        them."""
        if not self._seen or logits.dim() == 0:
            return None
        for input, target, measurement in self._seen:
            if same_memory(input, logits) and input.shape[-1] == logits.shape[-1]:
                return target, measurement
        return None

    def disarm(self) -> None:
        """Stop measuring and drop what was measured."""
        if self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles, self._seen = [], []


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` hold the same elements in the same memory, whatever their shapes (a
    contiguous view of the other)."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.numel() == b.numel()
        and a.dtype == b.dtype
        and a.is_contiguous()
        and b.is_contiguous()
        and a.device == b.device
    )


def batch_targets(batch: Any, targets: TargetsArg, logits: torch.Tensor) -> torch.Tensor | None:
    """Class-index targets for ``logits`` from the batch, or ``None`` when there are none.

    ``"auto"`` takes the second element of a tuple/list batch or a ``labels``/``targets``/``y``
    entry of a dict batch, when it is an integer tensor shaped like ``logits.shape[:-1]``;
    a callable receives the batch and returns the targets.
    """
    if targets is None:
        return None
    if callable(targets):
        found = targets(batch)
    elif isinstance(batch, Mapping):
        found = next((batch[k] for k in TARGET_KEYS if k in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        found = batch[1]
    else:
        found = None
    usable = (
        isinstance(found, torch.Tensor)
        and not found.is_floating_point()
        and found.shape == logits.shape[:-1]
    )
    if usable:
        return found.to(logits.device)
    if callable(targets):
        shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
        raise ConfigurationError(
            f"The `targets` function returned {shape}; expected integer class indices of shape "
            f"{tuple(logits.shape[:-1])} (the logits' shape without the class dimension)."
        )
    return None
