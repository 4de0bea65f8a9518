"""Adam's diagonal preconditioner, for the preconditioned sharpness λ_max(P⁻¹H)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params_by_name: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The diagonal preconditioner P = √v̂ + ε of Adam/AdamW, per named parameter.

    Cohen et al. (2022), *Adaptive Gradient Methods at the Edge of Stability*: Adam's step is
    θ ← θ − η P⁻¹ m̂ with P = diag(√v̂ + ε) and v̂ = v / (1 − β₂ᵗ), the bias-corrected second moment
    (``exp_avg_sq``, or ``max_exp_avg_sq`` with ``amsgrad``). The preconditioned sharpness is
    λ_max(P^{-1/2} H P^{-1/2}) = λ_max(P⁻¹H): pass the result as ``preconditioner=`` to
    :func:`top_eigenvalue` and compare it with :func:`adam_sharpness_threshold`.

    Args:
        optimizer: a ``torch.optim.Adam``/``AdamW`` (or anything with the same state layout) that
            has taken at least one step.
        params_by_name: the optimizer's own parameter tensors by name, e.g.
            ``dict(model.named_parameters())`` (looked up by identity).

    Returns:
        ``name -> P`` tensors (detached copies), shaped like the parameters.
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, Tensor] = {}
    for name, p in params_by_name.items():
        group = groups.get(id(p))
        if group is None:
            raise ValueError(
                f"parameter {name!r} is not one of the optimizer's parameters: pass the model's "
                "own tensors, e.g. dict(model.named_parameters())"
            )
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state or "step" not in state:
            raise ValueError(
                f"no Adam state (`exp_avg_sq`, `step`) for parameter {name!r}: call after at least "
                "one optimizer step, with a torch Adam or AdamW optimizer"
            )
        step = float(state["step"])
        beta2 = float(group["betas"][1])
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        bias_correction = 1.0 - beta2**step
        out[name] = (second.detach() / bias_correction).sqrt() + float(group["eps"])
    return out
