"""Reading the log-probabilities a :class:`dynlens.CrossEntropyLoss` computes, as it does.

When the loss is a :class:`dynlens.CrossEntropyLoss` computed on the very logits a monitor
measures (the same memory, e.g. ``logits.flatten(0, 1)``), the monitor can measure the loss's own
log-probabilities inside its forward (:meth:`~dynlens.CrossEntropyLoss.register_log_probs_hook`)
instead of computing them again; the loss and its gradients stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...nn import CrossEntropyLoss
from ..context import in_own_forward


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
        #: The module's :class:`dynlens.CrossEntropyLoss` modules (found by :meth:`attach`).
        self.losses: list[CrossEntropyLoss] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen: list[tuple[torch.Tensor, torch.Tensor, Any]] = []

    def attach(self, model: nn.Module, owner: str = "") -> None:
        """Find the model's :class:`dynlens.CrossEntropyLoss` modules (once: walking every
        module at each measured step would cost a large model dearly). Call from ``setup``."""
        self.detach()
        self.losses = [m for m in model.modules() if isinstance(m, CrossEntropyLoss)]

    def detach(self) -> None:
        self.disarm()
        self.losses, self._seen = [], []

    def arm(self) -> None:
        """Start measuring the losses' forwards (a measured micro-batch begins; idempotent
        within it)."""
        if not self._handles:
            self._seen = []
            self._handles = [loss.register_log_probs_hook(self._record) for loss in self.losses]

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

    def take(self, logits: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        """``(target, measurement)`` of the loss's call on exactly ``logits`` — an input of shape
        ``(N, C)`` in the same memory, as ``logits.flatten(0, -2)`` is; ``None`` when no loss saw
        them. Each call is handed over once."""
        if not self._seen or logits.dim() == 0:
            return None
        for k, (input, target, measurement) in enumerate(self._seen):
            if same_memory(input, logits) and input.shape[-1] == logits.shape[-1]:
                del self._seen[k]  # handed over: the tap holds the logits no longer
                return target, measurement
        return None

    def disarm(self) -> None:
        """Stop measuring (what was measured and not taken yet stays for :meth:`take` until the
        next :meth:`arm`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


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
