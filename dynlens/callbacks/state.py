"""Declared monitor state: one declaration per field gives its reset, checkpoint and device.

A monitor declares each field of its state once, in ``__init__``::

    self.add_state("onset_step", None)                        # kept in checkpoints
    self.add_state("_counted", list, key="pending.rows", pooled=True, device=True,
                   save=rows_of, load=counts_from_rows)

and the base class (:class:`~dynlens.callbacks.base.Monitor`) derives the rest from the
declarations, the way torchmetrics' ``add_state`` does for metrics:

* **persistence** — ``state_dict`` holds every persistent field under its ``key`` (dotted keys
  nest: ``"pending.rows"`` is ``state["pending"]["rows"]``, the layout checkpoints have always
  had); ``load_state_dict`` restores each one, and a field the checkpoint lacks (an older or
  partial one) gets its default, so nothing is forgotten and nothing is left stale;
* **pooling** — ``pooled`` fields hold measurements pooled between two logs; they are reset when
  a fit starts (a new logging interval) and by :meth:`Monitor.reset_pooled`;
* **device** — ``device`` fields are moved, with every tensor inside them, to the module's device
  when training starts (a checkpoint restores them on the CPU);
* **reduction across ranks** — ``reduce`` fields (``"sum"``, ``"max"``, ``"min"``, ``"mean"``,
  ``"local"`` or ``"by_field"``, :mod:`dynlens.callbacks.sync`) hold a measurement's statistics
  until :meth:`DeclaredState.sync` reduces every one that holds a value, in one collective per
  reduction, brings them to the host in one copy and sets them back to their defaults.

``default`` is a value (copied for every reset) or a callable returning a fresh one (``list``,
``dict``, ``lambda: deque(maxlen=w)``). A field may live on another object than the monitor
(``owner``): a helper whose state the monitor checkpoints, such as the early-warning policy.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from .sync import REDUCTIONS, Reduce, sync_to_host

Convert = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class StateField:
    """One declared field of a monitor's state (see the module docstring)."""

    name: str
    default: Any
    key: str
    persistent: bool = True
    pooled: bool = False
    device: bool = False
    save: Convert | None = None
    load: Convert | None = None
    reduce: Reduce | None = None
    #: The object holding the attribute (``None``: the monitor itself), e.g. a policy object
    #: whose state the monitor keeps in its checkpoints.
    owner: Any = None

    def __post_init__(self) -> None:
        if self.reduce is not None and self.reduce not in REDUCTIONS:
            raise ValueError(f"`reduce` of state {self.name!r} must be one of {REDUCTIONS}")
        if self.reduce is not None and self.persistent:
            raise ValueError(
                f"state {self.name!r} is reduced across ranks at log time and set back to its "
                "default then: declare it persistent=False"
            )

    def get(self, monitor: Any) -> Any:
        """The field's value (on its owner, or on ``monitor``)."""
        return getattr(monitor if self.owner is None else self.owner, self.name)

    def set(self, monitor: Any, value: Any) -> None:
        setattr(monitor if self.owner is None else self.owner, self.name, value)

    def fresh(self) -> Any:
        """A new default value."""
        return self.default() if callable(self.default) else copy.deepcopy(self.default)

    def to_checkpoint(self, value: Any) -> Any:
        return self.save(value) if self.save is not None else copy.deepcopy(value)

    def from_checkpoint(self, value: Any) -> Any:
        return self.load(value) if self.load is not None else copy.deepcopy(value)


_MISSING = object()


def get_nested(state: Mapping[str, Any], key: str) -> Any:
    """``state[a][b]`` for ``key="a.b"``; a sentinel when any level is missing or ``None``."""
    node: Any = state
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def set_nested(state: dict[str, Any], key: str, value: Any) -> None:
    """Set ``state[a][b] = value`` for ``key="a.b"``, creating the levels."""
    *parents, last = key.split(".")
    node = state
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def is_missing(value: Any) -> bool:
    return value is _MISSING


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (in lists, tuples, dicts and dataclasses) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: to_device(getattr(value, f.name), device)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    return value


def floats_of(stats: Any) -> dict[str, Any]:
    """A dataclass of statistics (tensors and numbers) as host numbers, for a checkpoint."""
    return {
        f.name: float(v) if isinstance(v, torch.Tensor) else v
        for f in dataclasses.fields(stats)
        for v in (getattr(stats, f.name),)
    }


def tensors_of(cls: Any, saved: Mapping[str, Any], *, host: Collection[str] = ()) -> Any:
    """Statistics of class ``cls`` restored from :func:`floats_of`: float64 tensors again (a
    ``device`` field moves them when training starts), except the ``host`` fields, which stay
    numbers."""
    return cls(
        **{f: v if f in host else torch.tensor(v, dtype=torch.float64) for f, v in saved.items()}
    )


class DeclaredState:
    """What follows from the declarations (the module docstring): :meth:`add_state`,
    :meth:`sync`, ``state_dict`` and ``load_state_dict``. :class:`~dynlens.callbacks.base.Monitor`
    derives from it."""

    def __init__(self) -> None:
        self._states: dict[str, StateField] = {}

    def add_state(
        self,
        name: str,
        default: Any,
        *,
        key: str | None = None,
        persistent: bool = True,
        pooled: bool = False,
        device: bool = False,
        reduce: Reduce | None = None,
        save: Callable[[Any], Any] | None = None,
        load: Callable[[Any], Any] | None = None,
        owner: Any = None,
    ) -> Any:
        """Declare a field of the monitor's state and set it to ``default``
        (:mod:`dynlens.callbacks.state`): ``key`` in checkpoints (default ``name`` without its
        leading underscore; dotted keys nest), ``persistent`` (in checkpoints), ``pooled``
        (pooled between logs: reset when a fit starts), ``device`` (moved to the module's device
        when training starts), ``reduce`` (how :meth:`sync` reduces it across ranks:
        :mod:`dynlens.callbacks.sync`), ``save``/``load`` (to and from the checkpoint's form),
        ``owner`` (the object holding the attribute, if not the monitor). Returns the default it
        set, so a declaration can carry the attribute's type:
        ``self.onset_step: int | None = self.add_state("onset_step", None)``."""
        if name in self._states:
            raise RuntimeError(f"{type(self).__name__} declares the state {name!r} twice.")
        field = StateField(
            name,
            default,
            key or name.lstrip("_"),
            persistent,
            pooled,
            device,
            save,
            load,
            reduce,
            owner,
        )
        self._states[name] = field
        field.set(self, field.fresh())
        return field.get(self)

    def sync(self, trainer: Any) -> dict[str, Any]:
        """Reduce every ``reduce`` field that holds a value (not ``None``) across ranks and bring
        them all to the host: one collective per reduction, one host copy
        (:func:`dynlens.callbacks.sync.sync_to_host`); ``{field name: host value}``. The fields
        are set back to their defaults. Call it on every rank at the same steps, with the same
        fields holding values."""
        held = {
            name: (field.get(self), field.reduce)
            for name, field in self._states.items()
            if field.reduce is not None and field.get(self) is not None
        }
        for name in held:
            self._states[name].set(self, self._states[name].fresh())
        return sync_to_host(trainer, held)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for field in self._states.values():
            if field.persistent:
                set_nested(state, field.key, field.to_checkpoint(field.get(self)))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Tolerant of older or partial checkpoints: a field they lack gets its default, and
        # pooled fields that checkpoints do not carry start empty.
        for field in self._states.values():
            value = get_nested(state_dict, field.key) if field.persistent else None
            if field.persistent and not is_missing(value):
                field.set(self, field.from_checkpoint(value))
            elif field.persistent or field.pooled:
                field.set(self, field.fresh())
