"""Reactive rules that early warnings are compared with, each read from a run's per-step series
(the training loss, the total gradient norm before clipping). Each returns the first step at
which it fires (its "warning"), or ``None``; a non-finite value fires every rule.

* :func:`spike_detection` — Lightning's ``SpikeDetection`` (``lightning.fabric.utilities.spike``)
  at its defaults but ``warmup``: ``mode="min"``, ``window=10``, ``rtol=2``, ``atol=None``,
  ``finite_only=True``. A loss fires when it is non-finite, or when it is higher than the last
  loss and ``|loss − mean| ≥ 2·mean`` over the running mean of the last 10 losses (so, for
  positive losses, loss ≥ 3× that mean). The first ``warmup`` (1) losses are not judged. The
  callback counts its warm-up in the epoch's ``batch_idx`` (so a run of one batch per epoch is
  never judged); here it is counted in steps.
* :func:`olmo_spike` — OLMo-core's skip-step rule (``SkipStepOptimizer``): a loss above the mean
  of the previous 128 finite losses by more than 6 of their standard deviations (with Bessel's
  correction), judged once 64 losses are known (``max(2, 128 // 2)``).
* :func:`zclip` — ZClip's z-score of the gradient norm (``mode="zscore"``): the first 25 norms
  set the mean and variance (population); then the norm fires when
  ``(g − μ)/(σ + 1e-6) > 2.5``, else μ ← α·μ + (1 − α)·g and σ² ← α·σ² + (1 − α)·(g − μ)² with the
  new μ, α = 0.97. ZClip itself clips instead of firing and lets a NaN through; here a
  non-finite norm fires.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence


def spike_detection(
    losses: Sequence[float], window: int = 10, rtol: float = 2.0, warmup: int = 1
) -> int | None:
    recent: deque[float] = deque(maxlen=window)
    last = 0.0
    for step, loss in enumerate(losses):
        if step >= warmup:
            if not math.isfinite(loss):
                return step
            finite = [v for v in recent if not math.isnan(v)]  # the mean metric drops NaNs
            if finite and not loss - last <= 0:
                mean = sum(finite) / len(finite)
                if abs(loss - mean) >= abs(rtol * mean):
                    return step
        recent.append(loss)  # finite_only=True updates with every loss that is not a spike
        last = loss
    return None


def olmo_spike(losses: Sequence[float], window: int = 128, sigmas: float = 6.0) -> int | None:
    judged_from = max(2, window // 2) - 1  # judged once this many + 1 losses are known
    for step, loss in enumerate(losses):
        if step < judged_from:
            continue
        previous = [v for v in losses[max(0, step - window) : step] if math.isfinite(v)]
        if not math.isfinite(loss) or len(previous) < 2:
            return step
        mean = statistics.fmean(previous)
        if loss > mean + sigmas * statistics.stdev(previous):
            return step
    return None


def zclip(
    norms: Sequence[float], alpha: float = 0.97, z: float = 2.5, warmup: int = 25
) -> int | None:
    mean = var = 0.0
    for step, norm in enumerate(norms):
        if not math.isfinite(norm):
            return step
        if step < warmup - 1:
            continue
        if step == warmup - 1:
            first = norms[:warmup]
            mean = sum(first) / warmup
            var = sum((v - mean) ** 2 for v in first) / warmup
            continue
        if (norm - mean) / (math.sqrt(var) + 1e-6) > z:
            return step
        mean = alpha * mean + (1 - alpha) * norm
        var = alpha * var + (1 - alpha) * (norm - mean) ** 2
    return None


#: The rules by name, each with the series it reads.
BASELINES = {
    "SpikeDetection": ("losses", spike_detection),
    "OLMo 6σ": ("losses", olmo_spike),
    "ZClip z>2.5": ("grad_norms", zclip),
}
