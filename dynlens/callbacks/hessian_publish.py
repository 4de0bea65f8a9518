"""The logging half of :class:`~dynlens.callbacks.hessian.HessianMonitor`: one measurement's
values, read against the optimizer's stability thresholds, logged, kept and announced.

The thresholds and ratios come from :func:`dynlens.curvature.thresholds.stability` (η, β and the
rule of the optimizer in use, read live); the spectrum is written as a TensorBoard histogram
(:func:`dynlens.curvature.spectrum_histogram`); crossing a threshold is an event.
"""

from __future__ import annotations

import math
from typing import Any

from .. import curvature
from ..curvature.thresholds import Stability, stability
from ..events import HessianReason
from .hessian_measure import HessianMeasuring, PooledSpectrum
from .layout import tensorboard_writers


class HessianPublishing(HessianMeasuring):
    """Logs what :class:`~dynlens.callbacks.hessian_measure.HessianMeasuring` measured (module
    docstring); the monitor declares the state it keeps (``latest``, ``history``)."""

    latest: dict[str, float]
    history: list[dict[str, float]]
    num_measurements: int
    last_spectrum: dict[str, Any] | None

    def _publish(
        self,
        trainer: Any,
        pl_module: Any,
        step: int,
        values: dict[str, float],
        spectrum: PooledSpectrum | None = None,
    ) -> None:
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        logged: dict[str, float] = {"loss": values["loss"], "one": 1.0}
        if self.trace:
            # Ranks' estimates are independent: Var(mean) = mean(Var) / ranks.
            stderr = math.sqrt(values["trace_var"] / world)
            logged.update(
                trace=values["trace"],
                trace_stderr=stderr,
                trace_lower=values["trace"] - stderr,
                trace_upper=values["trace"] + stderr,
            )
            if not math.isnan(values["frobenius"]):
                logged["frobenius"] = values["frobenius"]
            for block in self.partition or ():
                value = values[f"trace/{block}"]
                logged[f"trace/{block}"] = value
                logged[f"trace_stderr/{block}"] = math.sqrt(values[f"trace_var/{block}"] / world)
                if values["trace"] != 0:
                    logged[f"trace_share/{block}"] = value / values["trace"]
        if not math.isnan(values["product_error"]):
            logged["product_error"] = values["product_error"]
        if self.sharpness:
            logged["lambda_max"] = values["lambda_max"]
            # Lanczos's Ritz value θ ≤ λ_max, and an eigenvalue of H lies within ‖Hx − θx‖ of it
            for key in ("lambda_max_converged", "lambda_max_residual"):
                logged[key] = values[key]
            if not math.isnan(values["precond_lambda_max"]):
                logged["precond_lambda_max"] = values["precond_lambda_max"]
        for i, value in enumerate(spectrum.top if spectrum is not None else (), start=1):
            if math.isfinite(value):
                logged[f"spectrum_top/{i}"] = value
        rule = self._stability_values(trainer, pl_module, logged)
        overhead = self.overhead
        if overhead is not None:
            logged["overhead"] = overhead
        self.log_metrics(trainer, logged, step=step)
        if spectrum is not None:
            self._write_spectrum(trainer, step, spectrum)
        self.num_measurements += 1
        self.latest = dict(logged)
        extra: dict[str, float] = {k: values[k] for k in ("cold", "iterations") if k in values}
        self.history.append({"step": float(step), **logged, **extra})
        self._announce(trainer, step, logged, rule)

    def _write_spectrum(self, trainer: Any, step: int, spectrum: PooledSpectrum) -> None:
        """The spectrum as a TensorBoard histogram ``<prefix>/hessian/spectrum`` (rank 0): the
        Ritz values weighted by n·w (:func:`dynlens.curvature.spectrum_histogram`), so its counts
        sum to the number of parameters and its sum is n·Σ w λ, the quadrature's tr(H)."""
        edges, counts = curvature.spectrum_histogram(
            spectrum.nodes, spectrum.weights, spectrum.num_params
        )
        self.last_spectrum = {
            "step": step,
            "nodes": spectrum.nodes.tolist(),
            "weights": spectrum.weights.tolist(),
            "edges": edges.tolist(),
            "counts": counts.tolist(),
        }
        at, mass = edges[1::2], counts[::2]  # each node's bucket ends at the node
        for writer in tensorboard_writers(trainer):
            self._rank_zero_side_effect(
                "SummaryWriter.add_histogram_raw",
                writer.add_histogram_raw,
                self.key("spectrum"),
                min=edges[0].item(),
                max=edges[-1].item(),
                num=spectrum.num_params,
                sum=(mass * at).sum().item(),
                sum_squares=(mass * at**2).sum().item(),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=step,
            )

    def _announce(
        self, trainer: Any, step: int, logged: dict[str, float], rule: Stability | None
    ) -> None:
        if rule is not None and not rule.adaptive and logged.get("eos_ratio", 0.0) >= 1.0:
            self.log_event(
                trainer,
                step,
                HessianReason.EDGE_OF_STABILITY,
                f"edge of stability: λ_max = {logged['lambda_max']:.4g} reached the threshold "
                f"{rule.rule} = {rule.eos_threshold:.4g} (eos_ratio {logged['eos_ratio']:.3f})",
                once=True,
            )
        if logged.get("precond_ratio", 0.0) >= 1.0:
            self.log_event(
                trainer,
                step,
                HessianReason.ADAPTIVE_EDGE_OF_STABILITY,
                f"adaptive edge of stability: λ_max(P⁻¹H) = {logged['precond_lambda_max']:.4g} "
                f"reached (2+2β₁)/((1−β₁)η) = {logged['precond_threshold']:.4g}",
                once=True,
            )

    def _stability_values(
        self, trainer: Any, pl_module: Any, logged: dict[str, float]
    ) -> Stability | None:
        """Add the optimizer's thresholds and the ratios to them to ``logged``; the rule read."""
        optimizer = self._optimizer(trainer)
        measured = {k: p for k, p in pl_module.named_parameters() if p.requires_grad}
        rule = stability(optimizer, measured) if optimizer is not None else None
        if rule is not None:
            logged["lr"] = rule.lr
            if self.sharpness:
                logged["eos_threshold"] = rule.eos_threshold
                logged["eos_ratio"] = logged["lambda_max"] / rule.eos_threshold
            if self.trace:
                logged["trace_threshold"] = rule.trace_threshold
                logged["trace_ratio"] = logged["trace"] / rule.trace_threshold
            if rule.precond_threshold is not None and "precond_lambda_max" in logged:
                logged["precond_threshold"] = rule.precond_threshold
                logged["precond_ratio"] = logged["precond_lambda_max"] / rule.precond_threshold
        return rule
