"""Statistics across ranks and onto the host: one collective per reduction, one host copy.

A monitor declares how each field of its statistics reduces across ranks
(``Monitor.add_state(..., reduce=...)``) and, at log time, :meth:`Monitor.sync` hands the fields
that hold values to :func:`sync_to_host`. That flattens every value, joins those that reduce
alike into one tensor per reduction, runs one ``trainer.strategy.reduce`` per reduction, and
brings everything to the host in one copy. The reductions:

* ``"sum"``, ``"max"``, ``"min"``, ``"mean"``: across ranks (sums of counts and squares, maxima,
  means of per-rank estimates);
* ``"local"``: not reduced, only brought to the host in the same copy (a value that is already
  the same on every rank, such as one computed from DDP-averaged gradients);
* ``"by_field"``: a dataclass of sufficient statistics whose class says how each field reduces:
  its fields named in ``SUMS`` add, those in ``MAXIMA`` take the maximum, those in ``MINIMA``
  the minimum (:class:`dynlens.logits.OutputLogitSums`,
  :class:`dynlens.attention.AttentionLogitSums`), so the pure layer's declaration is the only
  one; a field it names in none of them is a host value kept as it is (a count of chunks).

A value is a tensor (any shape), a number (known on the host: filled in on the device, not
copied there, which would wait for the device's queue), a dataclass (with ``"by_field"``), or a
dict of these (each entry reduced alike). On the host it comes back as a float for a number or
a 0-dim tensor, nested lists of floats of the tensor's shape otherwise (as ``Tensor.tolist``
gives them; reduced in float64, or float32 on MPS, which has no float64), a dataclass of the same
class holding floats, or a dict of these.

Every rank must call it at the same steps with the same names, shapes and reductions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch

Reduce = Literal["sum", "max", "min", "mean", "local", "by_field"]
REDUCTIONS: tuple[str, ...] = ("sum", "max", "min", "mean", "local", "by_field")
#: A dataclass's class attribute naming its fields of each reduction (see the module doc).
FIELD_REDUCTIONS: dict[str, str] = {"SUMS": "sum", "MAXIMA": "max", "MINIMA": "min"}


def field_reductions(stats: Any) -> dict[str, str]:
    """``{field: reduction}`` of a dataclass of statistics, read off its ``SUMS``, ``MAXIMA``
    and ``MINIMA``; a field named in none of them must hold no tensor (it stays as it is).

        >>> from dynlens.attention import AttentionLogitSums
        >>> field_reductions(AttentionLogitSums(max_logit=3.0, sum_squares=5.0, count=2.0))
        {'max_logit': 'max', 'sum_squares': 'sum', 'count': 'sum'}
    """
    ops = {
        name: op
        for attribute, op in FIELD_REDUCTIONS.items()
        for name in getattr(type(stats), attribute, ())
    }
    for f in dataclasses.fields(stats):
        if f.name not in ops and isinstance(getattr(stats, f.name), torch.Tensor):
            raise TypeError(
                f"{type(stats).__name__}.{f.name} holds a tensor but is named in none of SUMS, "
                "MAXIMA or MINIMA: say how it reduces across ranks"
            )
    return {f.name: ops[f.name] for f in dataclasses.fields(stats) if f.name in ops}


def _leaves(value: Any, op: str, path: tuple[Any, ...], out: list) -> None:
    """Flatten ``value`` into ``(path, leaf, reduction)`` triples, in a fixed order."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _leaves(item, op, (*path, key), out)
    elif op == "by_field":
        if not dataclasses.is_dataclass(value) or isinstance(value, type):
            raise TypeError(f"reduce='by_field' needs a dataclass of statistics, got {value!r}")
        for name, field_op in field_reductions(value).items():
            out.append(((*path, name), getattr(value, name), field_op))
    else:
        out.append((path, value, op))


def _rebuild(
    value: Any, op: str, path: tuple[Any, ...], host: Mapping[tuple[Any, ...], Any]
) -> Any:
    """``value``'s structure with its leaves replaced by their host values."""
    if isinstance(value, Mapping):
        return {key: _rebuild(item, op, (*path, key), host) for key, item in value.items()}
    if op == "by_field":
        return type(value)(
            **{
                f.name: host.get((*path, f.name), getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.init
            }
        )
    return host[path]


def sync_to_host(
    trainer: Any, values: Mapping[str, tuple[Any, Reduce]], device: torch.device | None = None
) -> dict[str, Any]:
    """Reduce ``{name: (value, reduction)}`` across ranks and bring it to the host (module doc).

    ``device`` is where numbers are filled in (default: the first tensor's, else the strategy's
    root device). Call it on every rank, at the same steps, with the same names.
    """
    leaves: list[tuple[tuple[Any, ...], Any, str]] = []
    for name, (value, op) in values.items():
        _leaves(value, op, (name,), leaves)
    if not leaves:
        return {}
    if device is None:
        tensors = (leaf for _, leaf, _ in leaves if isinstance(leaf, torch.Tensor))
        first = next(tensors, None)
        device = first.device if first is not None else trainer.strategy.root_device
    wide = torch.float32 if device.type == "mps" else torch.float64
    flat = [
        leaf.detach().to(device=device, dtype=wide).reshape(-1)
        if isinstance(leaf, torch.Tensor)
        else torch.full((1,), float(leaf), dtype=wide, device=device)
        for _, leaf, _ in leaves
    ]
    sizes = [t.numel() for t in flat]
    for reduction in dict.fromkeys(o for _, _, o in leaves if o != "local"):
        group = [i for i, (_, _, o) in enumerate(leaves) if o == reduction]
        joined = torch.cat([flat[i] for i in group]) if len(group) > 1 else flat[group[0]]
        reduced = trainer.strategy.reduce(joined, reduce_op=reduction)
        for i, part in zip(group, reduced.split([sizes[i] for i in group]), strict=True):
            flat[i] = part
    on_host = torch.cat(flat).tolist()  # the one host copy
    host: dict[tuple[Any, ...], Any] = {}
    start = 0
    for (path, leaf, _), size in zip(leaves, sizes, strict=True):
        part = on_host[start : start + size]
        start += size
        scalar = not isinstance(leaf, torch.Tensor) or leaf.dim() == 0
        host[path] = part[0] if scalar else _nested(part, tuple(leaf.shape))
    return {name: _rebuild(value, op, (name,), host) for name, (value, op) in values.items()}


def _nested(flat: list[float], shape: tuple[int, ...]) -> list[Any]:
    """``flat`` as nested lists of ``shape`` (what ``Tensor.tolist`` gives)."""
    if len(shape) <= 1:
        return flat
    stride = len(flat) // shape[0] if shape[0] else 0
    return [_nested(flat[i * stride : (i + 1) * stride], shape[1:]) for i in range(shape[0])]
