"""Grokking detection: when a run memorises, when it generalises, and how the two relate.

Pure functions (numpy and torch only); :class:`dynlens.GrokkingMonitor` calls them live and
``dynlens report`` calls them on logged curves, so the two always agree.

Definitions
-----------
Given accuracy curves sampled at increasing steps and a threshold τ (default 0.99, the
"99% validation accuracy" of Power et al. 2022):

* memorisation step  m = first step with train accuracy ≥ τ;
* generalisation step g = first step with validation accuracy ≥ τ;
* delay d = g − m (negative when validation reaches τ first);
* transition steps: how long validation accuracy takes to climb from 10% to 90% of its total
  rise (max − first value) — small for an abrupt grokking transition, large for a gradual one;
* kind, following the phase names of Liu et al. 2022 (*Towards Understanding Grokking: An
  Effective Theory of Representation Learning*), with their delay threshold of 1000 steps:

  =================  ===========================================
  ``comprehension``  both reached, d < ``grokking_delay``
  ``grokking``       both reached, d ≥ ``grokking_delay``
  ``memorization``   train reached, validation did not
  ``confusion``      train did not reach τ (the model has not fit its training data)
  =================  ===========================================

"First step" means first crossing: a curve that reaches τ and falls back still counts as having
reached it at the crossing. Points whose value is NaN are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

Kind = Literal["comprehension", "grokking", "memorization", "confusion"]

#: Integer codes of the live ``phase`` scalar: nothing reached yet, memorised, generalised.
PHASES = {"learning": 0, "memorized": 1, "generalized": 2}


@dataclass(frozen=True)
class GrokkingReport:
    """What :func:`detect_grokking` found. Steps are ``None`` when never reached."""

    memorized_step: int | None
    generalized_step: int | None
    delay: int | None
    kind: Kind
    transition_steps: int | None
    threshold: float

    @property
    def phase(self) -> int:
        """Live phase code (:data:`PHASES`): 0 learning, 1 memorised, 2 generalised."""
        if self.generalized_step is not None and self.memorized_step is not None:
            return PHASES["generalized"]
        if self.memorized_step is not None:
            return PHASES["memorized"]
        return PHASES["learning"]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _as_1d(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"Expected `{name}` to be one-dimensional, got shape {array.shape}.")
    return array


def _first_at_least(steps: np.ndarray, values: np.ndarray, level: float) -> int | None:
    # NaN >= level is False, so NaN points are skipped without special-casing.
    hits = np.flatnonzero(values >= level)
    return int(steps[hits[0]]) if hits.size else None


def transition_steps(
    steps: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray
) -> int | None:
    """Steps for ``values`` to climb from 10% to 90% of its total rise (max − first value).

    ``None`` when the curve never rises. NaN points are ignored.

    >>> transition_steps([0, 10, 20, 30, 40], [0.0, 0.05, 0.5, 0.95, 1.0])  # 0.1 at 20, 0.9 at 30
    10
    """
    s = _as_1d("steps", steps)
    v = _as_1d("values", values)
    finite = np.isfinite(v)
    s, v = s[finite], v[finite]
    if v.size < 2:
        return None
    rise = v.max() - v[0]
    if not rise > 0:
        return None
    start = _first_at_least(s, v, v[0] + 0.1 * rise)
    end = _first_at_least(s, v, v[0] + 0.9 * rise)
    # Both exist: the maximum itself is at or above either level.
    assert start is not None and end is not None
    return end - start


def detect_grokking(
    steps: Sequence[int] | np.ndarray,
    train_acc: Sequence[float] | np.ndarray,
    val_acc: Sequence[float] | np.ndarray,
    *,
    threshold: float = 0.99,
    grokking_delay: int = 1000,
) -> GrokkingReport:
    """Find the memorisation and generalisation steps and classify the run.

    Args:
        steps: strictly increasing steps at which both accuracies were measured.
        train_acc: training accuracy at each step (fractions in [0, 1]; NaN = not measured).
        val_acc: validation accuracy at each step (same conventions).
        threshold: accuracy τ that counts as reached (Power et al. 2022 use 0.99).
        grokking_delay: smallest delay, in steps, classified as grokking (Liu et al. 2022: 1000).

    Example — a run that memorises at step 200 and generalises at step 4600:

    >>> r = detect_grokking([0, 200, 2000, 4600], [0.1, 1.0, 1.0, 1.0], [0.0, 0.02, 0.3, 0.995])
    >>> (r.memorized_step, r.generalized_step, r.delay, r.kind)
    (200, 4600, 4400, 'grokking')
    """
    s = _as_1d("steps", steps)
    train = _as_1d("train_acc", train_acc)
    val = _as_1d("val_acc", val_acc)
    if not (len(s) == len(train) == len(val)):
        raise ValueError(
            "Expected `steps`, `train_acc` and `val_acc` of equal length, got "
            f"{len(s)}, {len(train)} and {len(val)}."
        )
    if np.any(np.diff(s) <= 0):
        raise ValueError("Expected strictly increasing `steps`; sort the points and drop repeats.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"Expected `threshold` in (0, 1], got {threshold}.")
    if grokking_delay < 0:
        raise ValueError(f"Expected a non-negative `grokking_delay`, got {grokking_delay}.")

    memorized = _first_at_least(s, train, threshold)
    generalized = _first_at_least(s, val, threshold)
    delay = generalized - memorized if memorized is not None and generalized is not None else None
    kind: Kind
    if memorized is None:
        kind = "confusion"
    elif generalized is None:
        kind = "memorization"
    elif delay is not None and delay >= grokking_delay:
        kind = "grokking"
    else:
        kind = "comprehension"
    return GrokkingReport(
        memorized_step=memorized,
        generalized_step=generalized,
        delay=delay,
        kind=kind,
        transition_steps=transition_steps(s, val) if generalized is not None else None,
        threshold=float(threshold),
    )


def weight_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm ‖θ‖₂ of all ``parameters``, as a 0-dim float32 tensor on their device.

    Omnigrok (Liu et al. 2022) ties generalisation to the weight norm falling towards a
    "Goldilocks zone". No host synchronisation: call ``.item()`` only when logging.
    """
    norms = [torch.linalg.vector_norm(p.detach().float()) for p in parameters]
    if not norms:
        raise ValueError("Expected at least one parameter to take the norm of.")
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
