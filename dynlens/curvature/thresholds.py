"""Stability thresholds: 2/η, 2(1+β)/η, 38/η, …, and those of the optimizer in use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def gd_sharpness_threshold(lr: float) -> float:
    """Edge of stability for gradient descent: λ_max(H) = 2/η.

    Cohen, J. M., Kaur, S., Li, Y., Kolter, J. Z., & Talwalkar, A. (2021). *Gradient Descent on
    Neural Networks Typically Occurs at the Edge of Stability.* ICLR 2021. On a quadratic, GD with
    step η diverges along any direction with curvature above 2/η; full-batch training drives
    λ_max up to about 2/η and hovers there.

        >>> gd_sharpness_threshold(0.01)
        200.0
    """
    return 2.0 / _check_lr(lr)


def momentum_sharpness_threshold(lr: float, momentum: float) -> float:
    """Stability threshold for heavy-ball (Polyak) momentum β: λ_max(H) = 2(1 + β)/η.

    Cohen et al. (2021), appendix on momentum: on a quadratic, heavy-ball momentum with step η and
    momentum β is stable iff every curvature is below (2 + 2β)/η. (Nesterov momentum has a
    different threshold, (2 + 2β)/((1 + 2β)η).)

        >>> momentum_sharpness_threshold(0.01, 0.9)
        380.0
    """
    return (2.0 + 2.0 * _check_beta(momentum, "momentum")) / _check_lr(lr)


def sgd_trace_threshold(lr: float) -> float:
    """Linear stability of SGD at a global minimum: tr(H) ≤ 2/η.

    Wu, L., & Su, W. J. (2023). *The Implicit Regularization of Dynamical Stability in Stochastic
    Gradient Descent.* ICML 2023: if a global minimum is linearly stable for SGD, the trace of its
    Hessian is at most 2/η (GD constrains only λ_max). Compare with the Hutchinson/Hutch++ trace.

        >>> sgd_trace_threshold(0.1)
        20.0
    """
    return 2.0 / _check_lr(lr)


def adam_sharpness_threshold(lr: float, beta1: float = 0.9) -> float:
    """Adaptive edge of stability: λ_max(P⁻¹H) = (2 + 2β₁)/((1 − β₁)η), i.e. 38/η at β₁ = 0.9.

    Cohen, J. M., Ghorbani, B., Krishnan, S., et al. (2022). *Adaptive Gradient Methods at the Edge
    of Stability.* arXiv:2207.14484. Adam's update is EMA momentum (coefficient β₁) in the
    geometry of its preconditioner P; on a quadratic it is stable iff λ_max(P⁻¹H) is below this
    value, and the preconditioned sharpness (see :func:`adam_preconditioner`) equilibrates there.

        >>> round(adam_sharpness_threshold(0.001), 6)
        38000.0
    """
    beta1 = _check_beta(beta1, "beta1")
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * _check_lr(lr))


def _check_lr(lr: float) -> float:
    if not lr > 0:
        raise ValueError(f"Expected the learning rate to be positive, got {lr!r}")
    return float(lr)


def _check_beta(beta: float, name: str) -> float:
    if not 0 <= beta < 1:
        raise ValueError(f"Expected `{name}` in [0, 1), got {beta!r}")
    return float(beta)


# --------------------------------------------------------------------------------------------
# Stability thresholds of the optimizer in use
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stability:
    """The step size and thresholds that the measured curvature is compared with.

    Attributes:
        lr: η, the largest ``lr`` among the parameter groups that hold measured parameters.
        eos_threshold: the sharpness threshold of the optimizer on H itself (see
            :class:`HessianMonitor` for which formula applies).
        rule: the threshold's formula, for messages.
        trace_threshold: 2/η, the SGD linear-stability bound on tr(H) (Wu & Su 2023).
        adaptive: an Adam-family optimizer (its group has ``betas``): ``eos_threshold`` is then
            only a gradient-descent reference.
        precond_threshold: (2 + 2β₁)/((1 − β₁)η) for Adam-family optimizers once they have
            ``exp_avg_sq`` state, else None.
    """

    lr: float
    eos_threshold: float
    rule: str
    trace_threshold: float
    adaptive: bool = False
    precond_threshold: float | None = None


def nesterov_sharpness_threshold(lr: float, momentum: float) -> float:
    """Stability threshold of Nesterov momentum β: λ_max(H) = (2 + 2β)/((1 + 2β)η).

    Cohen et al. (2021), *Gradient Descent on Neural Networks Typically Occurs at the Edge of
    Stability*, appendix on momentum (quadratic analysis, as for heavy ball).

        >>> round(nesterov_sharpness_threshold(0.01, 0.9), 6)
        135.714286
    """
    return momentum_sharpness_threshold(lr, momentum) / (1.0 + 2.0 * momentum)


def stability(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> Stability | None:
    """Read η and the thresholds live from ``optimizer`` for the measured ``params``.

    Several parameter groups: η is the largest ``lr`` among the groups holding measured
    parameters (the fastest-moving direction sets the tightest threshold), and momentum/β₁ come
    from that group. ``None`` when the group has no positive ``lr`` (e.g. a warm-up at 0).
    """
    ids = {id(p) for p in params.values()}
    groups = [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]
    groups = groups or list(optimizer.param_groups)
    group = max(groups, key=lambda g: float(g.get("lr", 0.0)))
    lr = float(group.get("lr", 0.0))
    if not lr > 0:
        return None
    trace_threshold = sgd_trace_threshold(lr)
    momentum = float(group.get("momentum", 0.0) or 0.0)
    if "betas" in group:  # the Adam family
        has_state = any("exp_avg_sq" in optimizer.state.get(p, {}) for p in group["params"])
        return Stability(
            lr=lr,
            eos_threshold=gd_sharpness_threshold(lr),
            rule="2/η (a gradient-descent reference: Adam's own threshold is on P⁻¹H)",
            trace_threshold=trace_threshold,
            adaptive=True,
            precond_threshold=(
                adam_sharpness_threshold(lr, float(group["betas"][0])) if has_state else None
            ),
        )
    # SGD's signature (RMSprop also has "momentum", but no heavy-ball threshold applies to it).
    if momentum > 0 and "dampening" in group:
        dampening = float(group.get("dampening", 0.0))
        if group.get("nesterov", False):  # PyTorch requires dampening 0 with Nesterov
            threshold, rule = nesterov_sharpness_threshold(lr, momentum), "(2+2β)/((1+2β)η)"
        else:
            # PyTorch's heavy ball scales the gradient by (1 − dampening): an effective η(1 − d).
            threshold = momentum_sharpness_threshold(lr * (1.0 - dampening), momentum)
            rule = "2(1+β)/(η(1−dampening))" if dampening else "2(1+β)/η"
        return Stability(lr, threshold, rule, trace_threshold)
    return Stability(lr, gd_sharpness_threshold(lr), "2/η", trace_threshold)
