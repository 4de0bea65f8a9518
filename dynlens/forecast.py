"""Forecasting an instability before it happens: trends, steps to a threshold, update curvature.

Every monitor reports an instability once it is there; these functions say how far away it is,
from the signals dynlens already logs. Plain numpy and torch, no Lightning.

* :func:`fit_trend` fits a window of logged points by least squares: a straight line
  (``"linear"``: the top-vs-runner-up logit gap growing towards ln(2/eps) before Softmax
  Collapse, Prieto et al. 2025), a straight line through the logarithms (``"exponential"``: the
  training loss running away by a constant factor per step), or through the logarithms of both
  the values and the steps (``"power"``: the max attention logit, a product of weight norms that
  grow polynomially under Adam, Wortsman et al. 2023), with the slope's standard error.
* :func:`steps_to_threshold` extrapolates the fit to the step at which it crosses a threshold,
  with the range the slope's uncertainty gives, and says whether the trend is clear enough
  (the slope at least ``z`` standard errors away from 0) to be believed.
* :func:`update_ratio` is the same ratio from the step itself, with two forward passes: the loss
  before and after the step on the same batch and the first-order decrease −gᵀΔθ give the
  secant of the loss along the step (exact on a quadratic).
* :func:`critical_step_size` and :func:`update_curvature` measure the curvature along the update
  the optimizer takes with forward passes alone: the *critical sharpness* λ_c = 2/η_c, with η_c
  the smallest step size along the update direction at which the loss would rise (Kalra et al.
  2026, arXiv 2601.16979), found by a line search of at most ``max_evals`` losses. On a quadratic
  loss with Hessian H, from θ with gradient g along a direction u, the loss after a step η·u
  changes by −η gᵀu + ½ η² uᵀHu, so η_c = 2 gᵀu / uᵀHu and λ_c = uᵀHu / gᵀu; for u = g
  (gradient descent) λ_c = gᵀHg / gᵀg, the curvature along the gradient. The ratio of the step
  the optimizer takes to η_c is the stability ratio along the update (≥ 1: the step would raise
  the loss). No double backward: it works where Hessian-vector products do not (fused
  attention, ``torch.compile``, FSDP).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

TrendKind = Literal["linear", "exponential", "power"]
TREND_KINDS: tuple[str, ...] = get_args(TrendKind)

#: The share by which the slope at a window's end must fall below its average for
#: :func:`decelerating`.
LEVELLING = 0.1

__all__ = [
    "CriticalStep",
    "Forecast",
    "Trend",
    "critical_step_size",
    "decelerating",
    "fit_trend",
    "optimizer_update",
    "steps_to_threshold",
    "update_curvature",
    "update_ratio",
]


@dataclass(frozen=True)
class Trend:
    """A least-squares line ``y ≈ intercept + slope · x`` through a window of points: ``x`` the
    steps and ``y`` the values (``kind="linear"``), ``y`` their natural logarithms
    (``"exponential"``), or both logarithms (``"power"``: ``value ≈ e^intercept · step^slope``)."""

    kind: TrendKind
    slope: float  #: per step (e-folds per step if exponential, the exponent of a power law)
    intercept: float  #: at step 0
    slope_stderr: float  #: standard error of the slope (inf with two points: no residual left)
    last_step: int  #: the window's last step
    points: int

    def value_at(self, step: float) -> float:
        """The fitted signal at ``step`` (in the signal's own units, not its logarithm)."""
        y = self.intercept + self.slope * (math.log(step) if self.kind == "power" else step)
        return y if self.kind == "linear" else math.exp(y)


def fit_trend(
    steps: Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    *,
    kind: TrendKind = "linear",
) -> Trend:
    """Least-squares trend of ``values`` over ``steps`` (at least two distinct steps).

    ``kind="exponential"`` fits ``ln(values)`` (every value must be positive): a signal that grows
    by a constant factor per step is a straight line there. ``kind="power"`` fits ``ln(values)``
    against ``ln(steps)`` (steps counted from the run's start, all positive): a signal that grows
    as a power of the step — a product of weight norms, each growing by about the learning rate
    per step under Adam — is a straight line there. The slope's standard error is the textbook
    one, ``sqrt(RSS / (n − 2) / Σ(x − x̄)²)``.

    Example:
        >>> fit_trend([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0]).slope
        2.0
    """
    if kind not in TREND_KINDS:
        raise ValueError(f"Expected `kind` one of {TREND_KINDS}, got {kind!r}.")
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1:
        raise ValueError(f"Expected steps and values of one length, got {t.shape} and {y.shape}.")
    if not (np.isfinite(t).all() and np.isfinite(y).all()):
        raise ValueError("steps and values must be finite.")
    if kind != "linear" and (y <= 0).any():
        raise ValueError("An exponential or power trend needs positive values.")
    if len(np.unique(t)) < 2:
        raise ValueError("A trend needs at least two distinct steps.")
    if kind == "power" and (t <= 0).any():
        raise ValueError("A power trend needs positive steps (counted from the run's start).")
    last_step = int(t.max())
    t, y = _axes(t, y, kind)
    dt = t - t.mean()
    sxx = float(dt @ dt)
    slope = float(dt @ (y - y.mean()) / sxx)
    intercept = float(y.mean() - slope * t.mean())
    n = len(t)
    if n > 2:
        residual = y - (intercept + slope * t)
        stderr = math.sqrt(float(residual @ residual) / (n - 2) / sxx)
    else:
        stderr = math.inf
    return Trend(kind, slope, intercept, stderr, last_step, n)


def _axes(t: np.ndarray, y: np.ndarray, kind: TrendKind) -> tuple[np.ndarray, np.ndarray]:
    """The axes a trend of ``kind`` is a straight line in: the values' logarithms unless
    linear, the steps' too for a power law."""
    return (np.log(t) if kind == "power" else t), (y if kind == "linear" else np.log(y))


def decelerating(
    steps: Sequence[float], values: Sequence[float], *, kind: TrendKind = "linear", z: float = 2.0
) -> bool:
    """Whether the points bend down: the quadratic term of a least-squares parabola through them
    (in the axes of ``kind``, as :func:`fit_trend`'s) is negative by at least ``z`` standard
    errors, and the slope at the window's end is at least :data:`LEVELLING` (10%) below the
    window's average slope (so that rounding errors on a straight line do not count); or the
    last quarter of the points rises slower than the whole by ``z`` of its standard errors and by
    :data:`LEVELLING` of the whole's slope (a jump that levelled off, such as a catapult of the
    loss, which a parabola centred on the jump does not see bend). A straight
    line drawn through a signal that is levelling off (the fast rise of the logit gap while a
    model memorises, before its slow growth) reaches a threshold the signal does not; a forecast
    is not to be believed on such points. At least four points.

    Example:
        >>> decelerating([0, 1, 2, 3, 4], [0.0, 3.0, 4.0, 4.5, 4.7])
        True
    """
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1 or len(np.unique(t)) < 4:
        raise ValueError("A parabola's bend needs at least four distinct steps, one value each.")
    t, y = _axes(t, y, kind)
    u = (t - t.mean()) / max(float(np.ptp(t)), 1e-300)  # centred and scaled: a stable design
    design = np.stack([np.ones_like(u), u, u * u], axis=1)
    coef, _, _, _ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    dof = len(t) - 3
    if dof <= 0:
        return False
    variance = float(residual @ residual) / dof
    stderr = math.sqrt(variance * float(np.linalg.inv(design.T @ design)[2, 2]))
    # in u the slope at the window's end is b + c against b on average: a bend that matters
    if coef[2] < -z * stderr and -coef[2] > LEVELLING * abs(coef[1]):
        return True
    # a jump that levelled off (a parabola centred on it does not bend): the last quarter of
    # the points rises slower than the whole by more than z of its standard errors, and by more
    # than LEVELLING of the whole's slope
    later = len(t) - len(t) // 4
    if len(np.unique(t[later:])) < 3:
        return False
    whole = fit_trend(t, y)  # t and y transformed already: straight lines
    recent = fit_trend(t[later:], y[later:])
    drop = whole.slope - recent.slope
    return bool(drop > z * recent.slope_stderr and drop > LEVELLING * abs(whole.slope))


@dataclass(frozen=True)
class Forecast:
    """When a trend crosses a threshold (see :func:`steps_to_threshold`)."""

    trend: Trend
    threshold: float
    #: The step at which the fitted trend reaches the threshold; the window's last step when the
    #: fit is already past it; ``None`` when it moves away or is flat.
    expected_step: float | None
    #: Expected steps from the window's last step (``None`` with ``expected_step``).
    steps_to: float | None
    #: Range of the crossing for the slope ± ``z`` standard errors (``upper`` is inf when the
    #: slope could be 0 within them).
    lower: float | None
    upper: float | None
    #: The slope is at least ``z`` standard errors from 0 towards the threshold (or the fit is
    #: already past it).
    confident: bool

    def within(self, horizon: float) -> bool:
        """A confident forecast of the crossing within ``horizon`` steps of the last point."""
        return self.confident and self.steps_to is not None and self.steps_to <= horizon

    def surely_within(self, horizon: float) -> bool:
        """The crossing within ``horizon`` steps of the last point even at the slow end of the
        range (the slope ``z`` standard errors lower): for ``z=2`` a one-sided 97.5% bound."""
        return (
            self.confident
            and self.upper is not None
            and self.upper - self.trend.last_step <= horizon
        )

    def range_text(self) -> str:
        """The range of the crossing as text, ``"lower–upper"`` (``∞`` for no upper end)."""
        if self.lower is None or self.upper is None:
            return "none"
        upper = "∞" if math.isinf(self.upper) else f"{self.upper:.0f}"
        return f"{self.lower:.0f}–{upper}"


def steps_to_threshold(
    steps: Sequence[float],
    values: Sequence[float],
    threshold: float,
    *,
    kind: TrendKind = "linear",
    rising: bool = True,
    z: float = 2.0,
) -> Forecast:
    """Fit a trend to the points and extrapolate it to ``threshold``.

    The event is the signal rising above ``threshold`` (``rising=True``) or falling below it.
    The crossing is where the fitted line, ``intercept + slope · x``, meets the threshold (its
    logarithm for an exponential or power trend; ``x`` the step, or its logarithm for a power
    trend); the steps to it are counted from the window's last step,
    and a fit already past the threshold there gives 0. The range ``lower``–``upper`` holds the
    fitted value at the last step and moves the slope by ± ``z`` standard errors; the forecast is
    ``confident`` when the slope is at least ``z`` standard errors from 0 towards the threshold.

    Example:
        >>> f = steps_to_threshold([0, 10, 20, 30], [1.0, 2.0, 3.0, 4.0], 10.0)
        >>> f.expected_step, f.steps_to
        (90.0, 60.0)
    """
    trend = fit_trend(steps, values, kind=kind)
    if kind != "linear" and not threshold > 0:
        raise ValueError(f"An {kind} trend reaches only a positive threshold.")
    level = float(threshold) if kind == "linear" else math.log(threshold)
    last = float(trend.last_step)
    step_at: Callable[[float], float]
    if kind == "power":  # the line is in ln(step): crossings map back through exp
        here, step_at = math.log(last), _exp_step
    else:
        here, step_at = last, float
    sign = 1.0 if rising else -1.0
    # how far the fitted signal still has to go, and its speed, both towards the event
    gap = sign * (level - (trend.intercept + trend.slope * here))
    speed, spread = sign * trend.slope, z * trend.slope_stderr
    if gap <= 0:
        return Forecast(trend, threshold, last, 0.0, last, last, True)
    if speed <= 0:
        return Forecast(trend, threshold, None, None, None, None, False)
    expected = step_at(here + gap / speed)
    upper = step_at(here + gap / (speed - spread)) if speed > spread else math.inf
    return Forecast(
        trend,
        threshold,
        expected,
        expected - last,
        step_at(here + gap / (speed + spread)),
        upper,
        speed >= spread,
    )


def _exp_step(log_step: float) -> float:
    """The step whose logarithm is ``log_step`` (inf beyond what a float holds)."""
    return math.exp(log_step) if log_step < 700 else math.inf


@dataclass(frozen=True)
class CriticalStep:
    """The line search's result (see :func:`critical_step_size`)."""

    #: η_c: the smallest step size found at which the loss rises (the bracket's midpoint).
    step_size: float
    #: η_c lies in [lower, upper]: the loss did not rise at ``lower`` and rose at ``upper``.
    lower: float
    upper: float
    #: Losses evaluated (the first, at step 0, included).
    evaluations: int

    @property
    def sharpness(self) -> float:
        """λ_c = 2 / η_c."""
        return 2.0 / self.step_size


def critical_step_size(
    rise: Callable[[float], float], initial: float, *, max_evals: int = 10
) -> CriticalStep | None:
    """The smallest step size η > 0 with ``rise(η) > 0``, bracketed then bisected.

    ``rise(η)`` is the change of the loss after a step of size η along the update direction
    (``L(θ − η·u) − L(θ)``). From ``initial`` (the optimizer's own step size) the search doubles
    or halves until the sign changes, then bisects the bracket with the evaluations left; at most
    ``max_evals`` calls of ``rise``. ``None`` when no rise was found within them (the loss falls
    along the whole range tried: no critical step there). When the loss rose at every step tried,
    η_c is below the smallest of them: ``lower`` is 0 and ``step_size`` that smallest step, an
    upper bound. A NaN loss counts as a rise (:func:`update_curvature`).

    Example (a quadratic whose loss rises beyond η = 2):
        >>> c = critical_step_size(lambda eta: eta * eta - 2 * eta, 1.0, max_evals=30)
        >>> round(c.step_size, 6)
        2.0
    """
    if not initial > 0:
        raise ValueError(f"Expected a positive initial step size, got {initial!r}.")
    if max_evals < 2:
        raise ValueError(f"Expected `max_evals` >= 2 (a bracket needs two), got {max_evals!r}.")
    evals = 1
    eta = float(initial)
    rises = rise(eta) > 0
    lower, upper = (0.0, eta) if rises else (eta, math.inf)
    while evals < max_evals and (lower == 0.0 or math.isinf(upper)):
        eta = eta / 2 if rises else eta * 2
        evals += 1
        if rise(eta) > 0:
            upper = min(upper, eta)
            if not rises:
                break
        else:
            lower = max(lower, eta)
            if rises:
                break
    if math.isinf(upper):
        return None
    while evals < max_evals and lower > 0:
        mid = (lower + upper) / 2
        evals += 1
        if rise(mid) > 0:
            upper = mid
        else:
            lower = mid
    return CriticalStep((lower + upper) / 2 if lower > 0 else upper, lower, upper, evals)


def update_curvature(
    loss_fn: Callable[[Mapping[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    *,
    step_size: float,
    max_evals: int = 10,
) -> CriticalStep | None:
    """Critical step size and sharpness along ``direction`` at ``params``, by forward passes.

    ``loss_fn`` maps a dict name → tensor to a scalar loss (e.g. through
    ``torch.func.functional_call``); ``direction`` is the update u the optimizer would subtract
    (its step is ``step_size · u``: for SGD u is the gradient and ``step_size`` the learning rate).
    The losses at θ and at θ − η·u are compared under ``no_grad``; ``params`` are not changed.
    ``step_size / result.step_size`` is the stability ratio along the update (≥ 1: the step the
    optimizer takes would raise the loss).
    """
    with torch.no_grad():
        base = float(loss_fn(params))
        if not math.isfinite(base):
            raise FloatingPointError(f"the loss is {base}: no curvature along the update")

        def rise(eta: float) -> float:
            moved = {k: p - eta * direction[k] if k in direction else p for k, p in params.items()}
            value = float(loss_fn(moved))
            return math.inf if math.isnan(value) else value - base

        return critical_step_size(rise, step_size, max_evals=max_evals)


def update_ratio(loss_before: float, loss_after: float, decrease: float) -> float:
    """The stability ratio of a step Δθ, η/η_c along it, from the losses on one batch.

    ``decrease`` is the first-order decrease −gᵀΔθ (g the gradient the step used). The quadratic
    through L(θ), the slope gᵀΔθ and L(θ + Δθ) has curvature ΔθᵀHΔθ = 2 (L(θ+Δθ) − L(θ) + d), so
    the ratio is ``1 − (loss_before − loss_after) / decrease``: below 1 the step lowers the loss,
    at 1 the loss is back where it was (the step is the critical one, λ_c = 2/η), above 1 the step
    raises it. For gradient descent on a quadratic (Δθ = −η·g) it is η·gᵀHg / (2 gᵀg), the
    step size over 2/λ_c of :func:`update_curvature`. NaN when ``decrease`` is not positive (the
    step does not descend to first order: no ratio).

    Example (L = 2x² at x = 1, gradient 4, a gradient step of size 0.25 lands at x = 0 with a
    first-order decrease of 4; η·λ/2 = 0.25 · 4 / 2):
        >>> update_ratio(loss_before=2.0, loss_after=0.0, decrease=4.0)
        0.5
    """
    if not decrease > 0:
        return math.nan
    return 1.0 - (float(loss_before) - float(loss_after)) / float(decrease)


def optimizer_update(
    optimizer: torch.optim.Optimizer, named: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The change ``Δθ`` that ``optimizer``'s next step would make to the ``named`` parameters,
    from their current ``.grad``, without changing anything.

    The step is taken by a copy of the optimizer (its class, hyperparameters and state) on
    copies of the parameters, so it is exact for any optimizer whose constructor takes parameter
    groups (SGD with momentum, Adam, AdamW, ...). ``-Δθ / lr`` is the update direction to give
    :func:`update_curvature` with ``step_size=lr``. Parameters without a gradient do not move.
    Costs a copy of the parameters and of the optimizer's state.
    """
    index = {id(p): name for name, p in named.items()}
    shadows: dict[int, Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            q = p.detach().clone().requires_grad_(p.requires_grad)
            q.grad = None if p.grad is None else p.grad.detach().clone()
            shadows[id(p)] = q
            params.append(q)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    try:
        # the concrete class's constructor (SGD(params, lr=...), ...), not Optimizer's, which
        # also wants `defaults`; one that does not take groups alone is the TypeError below
        shadow = type(optimizer)(groups)  # type: ignore[call-arg]
    except TypeError as exc:
        raise TypeError(
            f"optimizer_update needs an optimizer built from parameter groups; "
            f"{type(optimizer).__name__} is not ({exc})."
        ) from None
    shadow.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    with torch.no_grad():
        shadow.step()
    moved = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in index:
                moved[index[id(p)]] = (shadows[id(p)] - p).detach()
    return moved
