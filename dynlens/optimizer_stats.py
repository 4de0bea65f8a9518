"""First-order statistics of an optimizer step: norms per block, the step taken, Adam's second
moment, and spikes.

Every quantity is built from sums that add across the shards of sharded parameters, so that a
run whose ranks each hold a shard of θ reduces the sums first and takes square roots after:

* ``Σ g²``, ``Σ θ²``, ``Σ Δθ²`` per tensor (:func:`squared_norms`) summed per block
  (:func:`block_sums`), and ``Σ Δθ·g``; from them
  ‖g‖, ‖θ‖, the update's norm ‖Δθ‖ (the step the optimizer really took, whatever it is),
  update-to-weight ‖Δθ‖/‖θ‖ and cos(Δθ, −g) (:func:`step_quantities`);
* for the Adam family, with v̂ = v / (1 − β₂ᵗ) the bias-corrected second moment, the number of
  coordinates and of those where √v̂ < ε (the ε regime, where an update no longer follows its
  gradient: Wortsman et al. 2023), and a histogram of log₁₀(g² / v̂) over coordinates (how far v̂
  lags the gradient it should follow: Bai et al. 2025 show spikes follow when v lags), whose
  median and 99th percentile are read to a tenth of a decade (:func:`adam_sums`,
  :func:`histogram_quantile`);
* a spike: a value above the mean of the earlier ones by more than ``sigma`` of their standard
  deviations (OLMo-core: 6 σ over the last 128) (:func:`is_spike`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

#: log₁₀(g² / v̂) histogram: bins of a tenth of a decade over [-LOG_RANGE, LOG_RANGE], with one
#: more bin at each end for what lies beyond.
LOG_RANGE, BINS_PER_DECADE = 6, 10
HISTOGRAM_BINS = 2 * LOG_RANGE * BINS_PER_DECADE + 2


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """``Σ x²`` of each tensor, as one float64 vector on the first tensor's device."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    return torch.stack([t.detach().double().square().sum().to(device) for t in tensors])


def block_sums(values: Tensor, index: Tensor, blocks: int) -> Tensor:
    """Per-tensor ``values`` summed into ``blocks`` blocks (``index[i]``: tensor i's block)."""
    return torch.zeros(blocks, dtype=values.dtype, device=values.device).index_add_(
        0, index.to(values.device), values
    )


def step_quantities(
    g2: float, w2: float, d2: float | None, dot: float | None, used2: float | None = None
) -> dict[str, float]:
    """From the (reduced) sums: ``grad_norm``, ``param_norm`` and, with the update,
    ``update_norm``, ``update_to_weight`` = ‖Δθ‖/‖θ‖ and ``cos_update_grad`` = cos(Δθ, −g),
    with ``dot`` = Σ Δθ·g and ``used2`` = Σ g² of the gradient the optimizer used (after
    clipping; default ``g2``).

    Example (plain SGD at learning rate 0.1 on g = (3, 4), θ = (0, 10): Δθ = −0.1·g):
        >>> q = step_quantities(g2=25.0, w2=100.0, d2=0.25, dot=-2.5)
        >>> q["grad_norm"], q["update_norm"], q["update_to_weight"], q["cos_update_grad"]
        (5.0, 0.5, 0.05, 1.0)
    """
    found = {"grad_norm": math.sqrt(g2), "param_norm": math.sqrt(w2)}
    if d2 is not None and dot is not None:
        update = math.sqrt(d2)
        found["update_norm"] = update
        found["update_to_weight"] = update / found["param_norm"] if w2 > 0 else math.nan
        scale = update * math.sqrt(g2 if used2 is None else used2)
        found["cos_update_grad"] = -dot / scale if scale > 0 else math.nan
    return found


def adam_moments(optimizer: torch.optim.Optimizer) -> dict[Tensor, tuple[Tensor, float]]:
    """``{parameter: (v̂, ε)}`` for the parameters an Adam-family optimizer has stepped (its
    state holds ``exp_avg_sq`` and ``step``; the group ``betas`` and ``eps``): v̂ = v / (1 − β₂ᵗ)."""
    found = {}
    for group in optimizer.param_groups:
        betas, eps = group.get("betas"), group.get("eps")
        if betas is None or eps is None:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            v, step = state.get("exp_avg_sq"), state.get("step")
            if not isinstance(v, Tensor) or step is None:
                continue
            t = float(step)
            if t < 1:
                continue
            found[p] = (v.detach().double() / (1.0 - float(betas[1]) ** t), float(eps))
    return found


def adam_sums(grads: Iterable[tuple[Tensor, Tensor, float]], device: torch.device) -> Tensor:
    """``[coordinates, below ε, *histogram]`` over every coordinate of ``(g, v̂, ε)``: the
    coordinates where √v̂ < ε, and the histogram of log₁₀(g² / v̂) (:data:`HISTOGRAM_BINS` bins;
    coordinates with v̂ = 0 and g = 0 left out, v̂ = 0 with g ≠ 0 in the top bin)."""
    total = torch.zeros(2 + HISTOGRAM_BINS, dtype=torch.float64, device=device)
    for g, v_hat, eps in grads:
        g2 = g.detach().double().square().reshape(-1).to(device)
        v = v_hat.reshape(-1).to(device)
        total[0] += g2.numel()
        total[1] += (v.sqrt() < eps).sum()
        ratio = torch.log10(g2 / v)  # NaN where both are 0, ∞ where only v̂ is
        seen = (~ratio.isnan()).double()
        ratio = ratio.nan_to_num(nan=0.0, posinf=2.0 * LOG_RANGE, neginf=-2.0 * LOG_RANGE)
        bins = ((ratio + LOG_RANGE) * BINS_PER_DECADE).floor().clamp(-1, HISTOGRAM_BINS - 2) + 1
        total[2:].scatter_add_(0, bins.long(), seen)  # no host synchronisation
    return total


def histogram_quantile(histogram: Sequence[float], q: float) -> float:
    """The ``q`` quantile of g² / v̂ from :func:`adam_sums`'s histogram: the upper edge of the bin
    that holds it, 10^edge (0 and ∞ for the end bins); NaN for an empty histogram.

    Example (one coordinate per bin from log₁₀ = -6 to 6: the median is in the bin [-0.1, 0)):
        >>> histogram_quantile([0.0] + [1.0] * 120 + [0.0], 0.5)
        1.0
    """
    count = sum(histogram)
    if count <= 0:
        return math.nan
    running = 0.0
    for i, n in enumerate(histogram):
        running += n
        if running >= q * count:
            if i == 0:
                return 0.0
            if i == len(histogram) - 1:
                return math.inf
            return 10.0 ** (i / BINS_PER_DECADE - LOG_RANGE)
    return math.inf


def is_spike(history: Sequence[float], value: float, sigma: float = 6.0, least: int = 8) -> bool:
    """``value`` lies above the mean of ``history`` by more than ``sigma`` standard deviations
    (population), with at least ``least`` finite values in it; never for a non-finite value.

    Example:
        >>> is_spike([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0], 2.0)
        True
        >>> is_spike([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0], 1.2)
        False
    """
    finite = [h for h in history if math.isfinite(h)]
    if len(finite) < least or not math.isfinite(value):
        return False
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((h - mean) ** 2 for h in finite) / len(finite))
    return value > mean + sigma * std


def block_index(names: Sequence[str], partition: Mapping[str, Sequence[str]]) -> Tensor:
    """For each parameter name, the position of its block in ``partition`` (block → names)."""
    where = {n: i for i, members in enumerate(partition.values()) for n in members}
    return torch.tensor([where[n] for n in names], dtype=torch.long)
