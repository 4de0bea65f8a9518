"""What the run is doing now, as every monitor reads it: the logging step, the step's loss,
whether a forward pass is a monitor's own, whether the strategy shards the parameters."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import torch


def logging_step(trainer: Any) -> int:
    """The step Lightning itself gives ``self.log`` values logged at this moment.

    It counts optimizer steps (batches that stepped), equals ``trainer.global_step`` until the
    step's ``on_train_batch_end`` has run, and is restored from checkpoints.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def loss_of(outputs: Any) -> torch.Tensor | None:
    """The training loss in ``training_step``'s outputs (a tensor, or a dict's ``"loss"``);
    ``None`` when there is none of one element. Under automatic optimisation Lightning hands on
    the loss divided by ``accumulate_grad_batches``."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


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
