"""The loss, recomputed without side effects: the replay behind ``HessianMonitor``.

:func:`loss_closure` turns a LightningModule's ``training_step`` (or a user ``loss_fn``) into a
``θ ↦ loss`` that :mod:`dynlens.curvature` can differentiate twice, evaluated at the parameters it
is given through ``torch.func.functional_call``. Each evaluation of the replay:

* records nothing through ``self.log``/``self.log_dict`` (:func:`logging_suppressed`);
* runs outside autocast, in float32 when the module holds lower-precision floats (its parameters,
  buffers and the batch's floating tensors are then upcast copies);
* leaves the module's buffers alone: BatchNorm layers in train mode see ``None`` running
  statistics (so they normalise with the batch statistics, as the training step does, and update
  nothing, also under vmap), every other buffer is a fresh copy;
* is not counted by other monitors' captures (it runs inside ``own_forward``).

Around a measurement, :func:`_rng_restored` forks the global RNG streams (CPU, and the device's)
and restores them on exit: the global RNG streams are untouched, so the trained weights are
bit-identical to a run without the monitor. The probes come from :func:`probe_generator`, a
function of (seed, rank, step) only, with no generator state to checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from .context import own_forward

__all__ = [
    "UserLossFn",
    "logging_suppressed",
    "loss_closure",
    "losses_across_step",
    "map_tensors",
    "probe_generator",
    "replay",
]

UserLossFn = Callable[[Any, Any], Any]  # (pl_module, batch) -> loss tensor (or {"loss": ...})

#: BatchNorm buffers replaced by ``None`` during a train-mode measurement: BatchNorm then uses
#: the batch statistics, exactly as the training step does, and updates nothing (also under vmap).
_BATCHNORM_STATE = ("running_mean", "running_var", "num_batches_tracked")


class _Call(nn.Module):
    """Holds the LightningModule so ``functional_call`` can swap its parameters around any call
    (``training_step``, a user ``loss_fn``), not only around ``forward``."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.module, *args)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def logging_suppressed(module: nn.Module) -> Iterator[None]:
    """``self.log``/``self.log_dict`` of ``module`` record nothing inside the block."""
    names = ("log", "log_dict")
    saved = {name: module.__dict__[name] for name in names if name in module.__dict__}
    for name in names:
        # Instance attributes shadow the methods; nn.Module.__setattr__ is bypassed on purpose.
        object.__setattr__(module, name, _no_log)
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                object.__setattr__(module, name, saved[name])
            else:
                module.__dict__.pop(name, None)


def _as_loss(out: Any) -> Tensor:
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise ValueError(
            f"HessianMonitor needs the loss, but the step returned {type(out).__name__}: return "
            "the loss tensor (or a dict with 'loss') from training_step, or pass "
            "HessianMonitor(loss_fn=lambda module, batch: ...)"
        )
    return out


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (in mappings, named tuples, lists and
    tuples, each rebuilt as its own type); other objects pass through."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: map_tensors(v, fn) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    return map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


def loss_closure(
    module: nn.Module,
    batch: Any,
    batch_idx: int,
    loss_fn: UserLossFn | None = None,
) -> tuple[dict[str, Tensor], Callable[[dict[str, Tensor]], Tensor]]:
    """The point θ and a side-effect-free ``θ ↦ loss`` of ``module`` on ``batch``.

    The loss is ``module.training_step(batch, batch_idx)`` (a tensor, or a dict's ``"loss"``),
    or ``loss_fn(module, batch)``, evaluated at the parameters it is given through
    ``torch.func.functional_call``, so that :mod:`dynlens.curvature` can differentiate it twice.
    Each evaluation:

    * records nothing through ``self.log``;
    * runs outside autocast, in float32 when the module holds lower-precision floats (its
      parameters, buffers and the batch's floating tensors are then upcast copies);
    * leaves the module's buffers alone: BatchNorm layers in train mode see ``None`` running
      statistics (so they normalise with the batch statistics, as the training step does, and
      update nothing), every other buffer is a fresh copy.

    Returns ``(params, loss_of)``: the trainable parameters by name (detached; upcast copies when
    needed) and the function of them.
    """
    params, loss_on, prepare = replay(module, batch_idx, loss_fn)
    batch = prepare(batch)
    return params, lambda p: loss_on(p, batch)


def replay(
    module: nn.Module, batch_idx: int, loss_fn: UserLossFn | None = None
) -> tuple[dict[str, Tensor], Callable[[dict[str, Tensor], Any], Tensor], Callable[[Any], Any]]:
    """:func:`loss_closure` for any batch: ``(params, loss_on, prepare)`` with
    ``loss_on(params, prepare(batch))`` the loss on ``batch`` (``prepare`` upcasts its floats
    where the replay runs in float32)."""
    trainable = {k: p for k, p in module.named_parameters() if p.requires_grad}
    frozen = {k: p for k, p in module.named_parameters() if not p.requires_grad}
    buffers: dict[str, Tensor | None] = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            train_bn = isinstance(sub, _BatchNorm) and sub.training
            buffers[key] = None if train_bn and name in _BATCHNORM_STATE else buf
    tensors = [
        *trainable.values(),
        *frozen.values(),
        *(b for b in buffers.values() if b is not None),
    ]
    upcast = any(t.is_floating_point() and t.element_size() < 4 for t in tensors)
    dtype = torch.float32
    if upcast:
        params = {k: p.detach().to(dtype) for k, p in trainable.items()}
        fixed = {k: p.detach().to(dtype) for k, p in frozen.items()}
    else:
        params = {k: p.detach() for k, p in trainable.items()}
        fixed = {}

    def fresh(b: Tensor | None) -> Tensor | None:
        if b is None:
            return None
        return b.detach().to(dtype) if upcast and b.is_floating_point() else b.detach().clone()

    if loss_fn is None:
        wrapper = _Call(module, lambda m, b, i: m.training_step(b, i))
    else:
        wrapper = _Call(module, lambda m, b, i: loss_fn(m, b))
    device_type = next(iter(params.values())).device.type if params else "cpu"

    def loss_on(p: dict[str, Tensor], batch: Any) -> Tensor:
        state: dict[str, Tensor | None] = {f"module.{k}": fresh(b) for k, b in buffers.items()}
        state.update({f"module.{k}": v for k, v in fixed.items()})
        state.update({f"module.{k}": v for k, v in p.items()})
        with (
            logging_suppressed(module),
            torch.autocast(device_type, enabled=False),
            own_forward(),  # other monitors' captures must not count the replay
        ):
            # a None buffer (BatchNorm's running statistics in training mode) is accepted and
            # set to None, so BatchNorm normalises by the batch's statistics; the stub says
            # dict[str, Tensor]
            out = functional_call(wrapper, state, (batch, batch_idx), strict=False)  # type: ignore[arg-type]
        return _as_loss(out)

    def prepare(batch: Any) -> Any:
        return _cast_floats(batch, dtype) if upcast else batch

    return params, loss_on, prepare


def losses_across_step(
    module: nn.Module, batch: Any, batch_idx: int, before: Mapping[str, Tensor]
) -> Tensor:
    """The loss on ``batch`` at the parameters ``before`` an optimizer step and at the module's
    current ones, ``[before, after]`` (float32), by two forward passes of the replay under
    ``no_grad``. Both start from the same global RNG state, so dropout draws the same masks at
    both points, and the RNG streams are restored after each (:func:`_rng_restored`)."""
    params, loss_of = loss_closure(module, batch, batch_idx)
    device = next(iter(params.values())).device
    losses = []
    with torch.no_grad():
        for point in ({k: before.get(k, v).to(v.dtype) for k, v in params.items()}, params):
            with _rng_restored(device):
                losses.append(loss_of(point).detach().float().reshape(()))
    return torch.stack(losses)


def _rng_restored(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Fork the global RNG streams (CPU, and ``device``'s) and restore them on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if device.type == "cuda" else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def probe_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The probes' source for one measurement: a function of (seed, rank, step) only.

    Ranks draw independent probes (so averaging them shrinks the error), each step new ones, and
    a resumed run draws exactly the probes the uninterrupted run would have, with no generator
    state to checkpoint.
    """
    mixed = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)
