"""The ``optimizer`` family: the gradient norm's range, update-to-weight per block, spikes and
Adam's ε regime."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..family import Column, Context, family, fmt_float, fmt_int
from ..reader import Series


def _finite(series: Series | None) -> np.ndarray:
    if series is None:
        return np.zeros(0)
    values = series.per_step().values
    return values[np.isfinite(values)]


def _median(series: Series | None) -> float | None:
    finite = _finite(series)
    return float(np.median(finite)) if finite.size else None


@family(
    "optimizer",
    order=55,
    title="Optimizer: gradients, updates, spikes",
    fields=(
        "measurements",
        "grad_norm_min",
        "grad_norm_median",
        "grad_norm_max",
        "update_to_weight_median",
        "largest_update_block",
        "largest_update_to_weight",
        "spikes",
        "first_spike_step",
        "eps_share_final",
    ),
    columns=(
        Column("grad_norm_min", "‖g‖ min", fmt_float(3)),
        Column("grad_norm_median", "median", fmt_float(3)),
        Column("grad_norm_max", "max", fmt_float(3)),
        Column("update_to_weight_median", "Δθ/θ median", fmt_float(4)),
        Column("largest_update_block", "fastest block"),
        Column("spikes", "spikes", fmt_int),
        Column("first_spike_step", "first at", fmt_int),
        Column("eps_share_final", "√v̂<ε share", fmt_float(3)),
    ),
)
def optimizer(ctx: Context) -> dict[str, Any] | None:
    """The gradient norm's range and median over the measured steps, the median update-to-weight
    ratio in total and the block whose median is largest (the block that moves fastest against
    its size), the spikes (``loss_spike`` and ``gradient_spike`` events) and the final share of
    Adam's coordinates in the ε regime."""
    grad = ctx.series("optimizer", "grad_norm")
    if grad is None:
        return None
    finite = _finite(grad)
    blocks = {
        name.removeprefix("update_to_weight/"): _median(series)
        for name, series in ctx.matching("optimizer", r"update_to_weight/.+").items()
    }
    medians = {name: m for name, m in blocks.items() if m is not None}
    fastest = max(medians, key=medians.__getitem__) if medians else None
    spikes = sorted(
        ctx.event_steps("optimizer", "loss_spike") + ctx.event_steps("optimizer", "gradient_spike")
    )
    return {
        "measurements": ctx.count(grad),
        "grad_norm_min": float(finite.min()) if finite.size else None,
        "grad_norm_median": float(np.median(finite)) if finite.size else None,
        "grad_norm_max": float(finite.max()) if finite.size else None,
        "update_to_weight_median": _median(ctx.series("optimizer", "update_to_weight")),
        "largest_update_block": fastest,
        "largest_update_to_weight": medians.get(fastest) if fastest is not None else None,
        "spikes": len(spikes),
        "first_spike_step": spikes[0] if spikes else None,
        "eps_share_final": ctx.last(ctx.series("optimizer", "adam/eps_share")),
    }
