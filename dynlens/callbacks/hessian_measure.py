"""The measuring half of :class:`~dynlens.callbacks.hessian.HessianMonitor`: one measurement.

A measurement replays the training loss at the current parameters (:mod:`.replay`), plans its
products under the memory limit, estimates the trace, the top eigenvalues (with Lanczos's
convergence and residual) and (with ``density``) the spectral density, falls back to finite
differences where the exact routes fail or do not fit, and averages across ranks. The monitor
class adds the hooks, cadence, logging and state; this mixin holds no state of its own.

Memory (``memory``): every pass of Hessian-vector products is metered (CUDA: the allocator's
``max_memory_allocated``; CPU: the process's peak RSS over its RSS just before training, so
that neither counts the interpreter, the libraries or what existed before ``fit``) and planned
under a limit, starting from one probe per pass and vectorising only as many probes as the
measured peaks say fit. Where the batch's loss is the mean of its samples' (:mod:`.microbatch`),
the products are exact micro-batch by micro-batch, in micro-batches of as many samples as the
measured peaks say fit (:mod:`dynlens.curvature.passes`). With ``memory="auto"`` the limit is
:data:`MEMORY_FACTOR` × the peak that training reaches: the monitor meters the first
:data:`METERED_STEPS` training steps, and a measurement before any of them (step 0) meters one
gradient of the measured loss first (what a training step's forward and backward hold). Out of
memory inside a measurement: what it held is freed and the pass retried with half the probes;
where even one sample's product does not fit, the monitor falls back to finite differences
(micro-batched too), and where that does not fit either it switches itself off.

Finite differences (of gradients at perturbed copies of θ; one gradient's memory) check each
measurement's products against the product at half the step; above :data:`FD_TOLERANCE` the loss
is not smooth at the step's scale and the monitor switches off rather than log wrong values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import curvature
from ..events import HessianReason
from .base import Monitor
from .context import logging_step, sharding_strategy
from .microbatch import micro_batched
from .replay import UserLossFn, _rng_restored, probe_generator, replay
from .validate import ConfigurationError

Memory = Literal["auto"] | int | None

#: ``memory="auto"``: a measurement may bring the memory in use to this many times the peak of
#: a training step (DESIGN.md, the monitor contract: bounded memory).
MEMORY_FACTOR = 2.0
#: Training steps metered for that peak (the first may allocate the optimizer's state lazily).
METERED_STEPS = 2

#: The quantities measured on each rank and averaged across ranks (a rank whose measurement
#: failed holds only ``failed``: NaN stands in for the rest, so every rank reduces the same).
REDUCED = (
    "failed",
    "loss",
    "trace",
    "trace_var",
    "frobenius",
    "lambda_max",
    "lambda_max_converged",  # averaged: the share of ranks whose Lanczos converged
    "lambda_max_residual",
    "precond_lambda_max",
    "product_error",
)
#: Finite differences whose self-check estimates a larger relative error than this switch the
#: monitor off: the loss is not smooth at the step's scale (e.g. ReLU kinks), and the values
#: would not be the Hessian's.
FD_TOLERANCE = 0.05


@dataclass(frozen=True, eq=False)
class PooledSpectrum:
    """The spectral density of one measurement, pooled over ranks (``_pooled_spectrum``)."""

    nodes: Tensor  # Ritz values of every run of every rank, float64 on the CPU
    weights: Tensor  # their weights, summing to 1
    top: list[float]  # the top eigenvalues, descending (NaN where a rank had fewer)
    num_params: int


class HessianMeasuring(Monitor):
    """The measuring of :class:`~dynlens.callbacks.hessian.HessianMonitor`: one measurement
    (module docstring). The monitor sets the configuration and declares the state below."""

    # configuration (HessianMonitor's arguments)
    probe_batch: Any
    loss_fn: UserLossFn | None
    estimator: str
    num_probes: int
    trace: bool
    sharpness: bool
    preconditioned: bool
    density: bool
    density_iter: int
    density_runs: int
    density_top_k: int
    max_iter: int
    tol: float
    cold_start_every: int
    optimizer_index: int
    route: curvature.Route
    memory: Memory
    memory_meter: curvature.MemoryMeter | None
    seed: int
    #: The blocks' parameter names, once set up (``None`` without ``blocks``).
    partition: dict[str, list[str]] | None
    # state: the memory limit and training's metered peak, the route in use, the warm starts
    _limit: curvature.MemoryLimit | None
    _train_peak: int | None
    _metered_steps: int
    _metering: bool
    _route: str
    _since_cold: int
    _eigvec: dict[str, Tensor] | None
    _precond_eigvec: dict[str, Tensor] | None
    _probe_on_device: Any
    _precond_refused: bool
    _local_spectrum: curvature.SpectralDensity | None

    def _memory(self, device: torch.device) -> curvature.MemoryMeter:
        if self.memory_meter is None:
            self.memory_meter = curvature.memory_meter(device)
        return self.memory_meter

    def _memory_limit(self, device: torch.device) -> curvature.MemoryLimit | None:
        """The limit of this measurement (``None`` without one); ``"auto"`` follows training's
        metered peak."""
        if self.memory is None:
            return None
        if self.memory == "auto":
            peak, floor = self._train_peak or 0, self._memory(device).resolution
            limit = max(int(MEMORY_FACTOR * peak), floor)
        else:
            limit = int(self.memory)
        if self._limit is None:
            self._limit = curvature.MemoryLimit(max(limit, 1), meter=self._memory(device))
        if self._limit.meter is None:  # restored from a checkpoint
            self._limit.meter = self._memory(device)
        self._limit.limit = max(limit, 1)
        return self._limit

    def _declare_reduced(self) -> None:
        """The statistics a measurement reduces across ranks (state that :meth:`sync` takes)."""
        self._measured: dict[str, float] | None = self.add_state(
            "_measured", None, persistent=False, reduce="mean"
        )
        self._spectrum_rows: Tensor | None = self.add_state(
            "_spectrum_rows", None, persistent=False, reduce="sum"
        )

    def _measure_everywhere(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> tuple[dict[str, float], PooledSpectrum | None, str | None]:
        """Measure on this rank's batch and average with the other ranks (every rank calls it
        at the same steps): the values, the pooled spectrum (with ``density``), and why this
        rank's measurement failed (``None`` if it did not)."""
        local, failure = self._measure_locally(trainer, pl_module, batch, batch_idx)
        # the blocks follow the fixed quantities, in the partition's order: alike on every rank
        keys = REDUCED + tuple(
            f"{quantity}/{block}"
            for block in self.partition or ()
            for quantity in ("trace", "trace_var")
        )
        self._measured = {k: local.get(k, math.nan) for k in keys}
        if self.density:
            self._spectrum_rows = self._spectrum_rows_of(trainer, pl_module.device)
        host = self.sync(trainer)
        values = dict(host["_measured"])
        for key in ("cold", "iterations"):  # this rank's Lanczos: not averaged
            if key in local:
                values[key] = local[key]
        spectrum = self._pooled_spectrum(trainer, host["_spectrum_rows"]) if self.density else None
        return values, spectrum, failure

    def _measure_locally(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> tuple[dict[str, float], str | None]:
        try:
            return self._measure(trainer, pl_module, batch, batch_idx), None
        except ConfigurationError:
            raise
        except Exception as exc:
            # Reported after the reduction, so every rank switches off at the same step.
            return {"failed": 1.0}, f"{type(exc).__name__}: {exc}"

    def _measure(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> dict[str, float]:
        try:
            return self._measure_on(trainer, pl_module, batch, batch_idx)
        except curvature.CurvatureError as exc:
            if self.route not in ("auto", "tuned") or self._route == "finite_difference":
                raise
            self._fall_back(trainer, exc)
        return self._measure_on(trainer, pl_module, batch, batch_idx)

    def _fall_back(self, trainer: Any, exc: curvature.CurvatureError) -> None:
        """Switch to finite differences for the rest of the run, with one warning and event."""
        self._route = "finite_difference"
        why = "memory" if isinstance(exc, curvature.CurvatureMemoryError) else "no_exact_route"
        message = (
            f"curvature by finite differences of gradients from now on (each measurement "
            f"estimates their relative error, logged as product_error), because the exact "
            f"Hessian-vector products "
            f"{'do not fit in memory' if why == 'memory' else 'cannot be taken'}: {exc}"
        )
        warnings.warn(
            f"dynlens HessianMonitor: {message}", curvature.CurvatureFallbackWarning, stacklevel=2
        )
        self.log_event(trainer, logging_step(trainer), HessianReason.FINITE_DIFFERENCE, message)
        self.events[-1]["why"] = why

    def _measure_on(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> dict[str, float]:
        if self.probe_batch is not None:
            if self._probe_on_device is None:
                self._probe_on_device = pl_module.transfer_batch_to_device(
                    self.probe_batch, pl_module.device, 0
                )
            batch, batch_idx = self._probe_on_device, 0
        self._local_spectrum = None  # a retry by finite differences starts afresh
        params, loss_on, prepare = replay(pl_module, batch_idx, self.loss_fn)
        batch = prepare(batch)
        loss_of: Callable[[dict[str, Tensor]], Tensor] = lambda p: loss_on(p, batch)  # noqa: E731
        device = next(iter(params.values())).device
        # Grad stays enabled: a training_step may differentiate inside (e.g. a gradient penalty).
        with _rng_restored(device):
            if self.memory == "auto" and self._train_peak is None:
                loss = self._meter_gradient(loss_of, params, device)
            else:
                loss = float(loss_of(params).detach())
        memory = self._memory_limit(device)
        if memory is not None and math.isfinite(loss):
            # exact products micro-batch by micro-batch where the batch's graph does not fit
            with _rng_restored(device):
                split, why = micro_batched(pl_module, batch, params, loss_on)
            loss_of = split or loss_of
            if why is not None:
                self.log_event(
                    trainer,
                    logging_step(trainer),
                    HessianReason.WHOLE_BATCH,
                    f"exact products over the whole batch only, never micro-batch by "
                    f"micro-batch: {why}",
                    once=True,
                )
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss} at step {logging_step(trainer)}: curvature is undefined there"
            )
        out = {"failed": 0.0, "loss": loss}
        generator = probe_generator(self.seed, trainer.global_rank, logging_step(trainer))
        if self.trace:
            blocks: dict[str, Any] = {} if self.partition is None else {"blocks": self.partition}
            estimate = (
                curvature.hutchpp_trace
                if self.estimator == "hutchpp"
                else curvature.hutchinson_trace
            )(
                loss_of,
                params,
                num_probes=self.num_probes,
                generator=generator,
                route=self._route,  # type: ignore[arg-type]
                memory=memory,
                **blocks,
            )
            self._route = estimate.route or self._route  # skip a failed route next time
            self._check_product_error(estimate.product_error, out)
            out["trace"] = estimate.value
            out["trace_var"] = estimate.stderr**2
            if estimate.frobenius is not None:
                out["frobenius"] = estimate.frobenius
            for block, part in (estimate.blocks or {}).items():
                out[f"trace/{block}"] = part.value
                out[f"trace_var/{block}"] = part.stderr**2
        if self.sharpness:
            cold = self._eigvec is None or self._since_cold + 1 >= self.cold_start_every
            self._since_cold = 0 if cold else self._since_cold + 1
            eig = curvature.top_eigenvalue(
                loss_of,
                params,
                init=None if cold else self._eigvec,
                max_iter=self.max_iter,
                tol=self.tol,
                generator=generator,
                route=self._route,  # type: ignore[arg-type]
                memory=memory,
            )
            self._eigvec, self._route = eig.vector, eig.route or self._route
            self._check_product_error(eig.product_error, out)
            out["lambda_max"] = eig.value
            out["lambda_max_converged"], out["lambda_max_residual"] = eig.converged, eig.residual
            out["cold"], out["iterations"] = float(cold), float(eig.iterations)
            preconditioner = self._adam_preconditioner(trainer, pl_module, params)
            if preconditioner is not None:
                peig = curvature.top_eigenvalue(
                    loss_of,
                    params,
                    init=None if cold or self._precond_eigvec is None else self._precond_eigvec,
                    max_iter=self.max_iter,
                    tol=self.tol,
                    generator=generator,
                    preconditioner=preconditioner,
                    route=self._route,  # type: ignore[arg-type]
                    memory=memory,
                )
                self._precond_eigvec = peig.vector
                self._check_product_error(peig.product_error, out)
                out["precond_lambda_max"] = peig.value
        if self.density:
            # last, so the trace's probes and λ_max's start are those of a run without it
            spectrum = curvature.spectral_density(
                loss_of,
                params,
                num_runs=self.density_runs,
                num_iter=self.density_iter,
                grid=2,  # the smoothed curve is not logged: the histogram shows the masses
                top_k=self.density_top_k,
                generator=generator,
                route=self._route,  # type: ignore[arg-type]
                memory=memory,
            )
            self._route = spectrum.route or self._route
            self._check_product_error(spectrum.product_error, out)
            self._local_spectrum = spectrum
        return out

    @staticmethod
    def _check_product_error(error: float | None, out: dict[str, float]) -> None:
        """Keep the largest estimated error of finite-difference products; refuse values the
        self-check says are not the Hessian's."""
        if error is None:
            return
        out["product_error"] = max(error, out.get("product_error", 0.0))
        if not error <= FD_TOLERANCE:
            raise curvature.CurvatureError(
                f"finite differences of gradients estimate their own relative error at {error:.2g} "
                f"(more than {FD_TOLERANCE}): the loss is not smooth at the scale of their step "
                "(e.g. ReLU or max kinks), so their values are not the Hessian's. Give the exact "
                "products room: a larger `memory`, or a smaller `probe_batch`"
            )

    def _meter_gradient(
        self,
        loss_of: Callable[[dict[str, Tensor]], Tensor],
        params: dict[str, Tensor],
        device: torch.device,
    ) -> float:
        """The loss, and the peak memory of its gradient as a stand-in for a training step's
        (no training step has been metered yet); returns the loss."""
        meter = self._memory(device)
        leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        meter.reset_peak()
        loss = loss_of(leaves)
        if loss.requires_grad:
            torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        self._train_peak = meter.peak()
        return float(loss.detach())

    def _optimizer(self, trainer: Any) -> torch.optim.Optimizer | None:
        optimizers = trainer.optimizers
        return optimizers[self.optimizer_index] if self.optimizer_index < len(optimizers) else None

    def _adam_preconditioner(
        self, trainer: Any, pl_module: Any, params: Mapping[str, Tensor]
    ) -> dict[str, Tensor] | None:
        optimizer = self._optimizer(trainer)
        if not self.preconditioned or self._precond_refused or optimizer is None:
            return None
        named = {k: p for k, p in pl_module.named_parameters() if k in params}
        states = [optimizer.state.get(p, {}) for p in named.values()]
        if not any("exp_avg_sq" in s for s in states):
            return None  # not Adam-like, or before its first step
        try:
            return curvature.adam_preconditioner(optimizer, named)
        except (ValueError, KeyError) as exc:
            # Some measured parameters are outside the optimizer: P is not defined on all of θ.
            self._precond_refused = True
            self.log_event(
                trainer,
                logging_step(trainer),
                HessianReason.NO_PRECONDITIONED_SHARPNESS,
                f"preconditioned sharpness not measured: {exc}",
            )
            return None

    def _spectrum_rows_of(self, trainer: Any, device: torch.device) -> Tensor:
        """This rank's quadrature as its row of a zero ``(ranks, …)`` array, summed across ranks
        to give every rank every row (:meth:`_pooled_spectrum`).

        The row holds the nodes, weights and top eigenvalues, padded with NaN to the fixed
        ``density_runs · density_iter`` nodes and ``density_top_k`` values, and the number of
        parameters; a rank whose measurement failed leaves its row zero.
        """
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        size, k = self.density_runs * self.density_iter, self.density_top_k
        rows = torch.zeros(world, 2 * size + k + 1, dtype=torch.float64, device=device)
        local = self._local_spectrum
        if local is not None:  # None where this rank failed: the measurement is dropped
            row = rows[int(trainer.global_rank)]
            row[: 2 * size + k] = math.nan
            m, t = local.nodes.numel(), local.top_eigenvalues.numel()
            row[:m], row[size : size + m] = local.nodes, local.weights
            row[2 * size : 2 * size + t] = local.top_eigenvalues
            row[-1] = local.num_params
        return rows

    def _pooled_spectrum(self, trainer: Any, host_rows: list[list[float]]) -> PooledSpectrum:
        """The ranks' quadratures pooled into one, identical on every rank, from every rank's row
        (:meth:`_spectrum_rows_of`, summed across ranks).

        The pooled quadrature (weights divided by the number of ranks) is the mean of the ranks'
        spectral densities of their local batches, as the trace is the mean of their traces;
        the top eigenvalues are the ranks' mean, as λ_max is (an upper bound of the global
        batch's λ_1 from the ranks' λ_1, by convexity).
        """
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        size, k = self.density_runs * self.density_iter, self.density_top_k
        rows = torch.tensor(host_rows, dtype=torch.float64)
        nodes, weights = rows[:, :size].reshape(-1), rows[:, size : 2 * size].reshape(-1)
        kept = torch.isfinite(nodes)
        return PooledSpectrum(
            nodes=nodes[kept],
            weights=weights[kept] / world,
            top=rows[:, 2 * size : 2 * size + k].mean(0).tolist(),
            num_params=int(rows[:, -1].max()),
        )

    def _check_measurable(self, trainer: Any, pl_module: Any) -> None:
        """Refuse, at set-up, a run whose loss cannot be replayed and differentiated twice."""
        sharded = sharding_strategy(trainer)
        if sharded is not None:
            raise ConfigurationError(
                f"HessianMonitor needs the full parameters on each rank, but {sharded} shards "
                "them. Measure with strategy='ddp' (or a single device), e.g. on a smaller "
                "replica of the model, or remove HessianMonitor from this run."
            )
        if self.loss_fn is None and not getattr(pl_module, "automatic_optimization", True):
            raise ConfigurationError(
                "With manual optimization, training_step steps the optimizer itself and cannot "
                "be replayed for a measurement: pass HessianMonitor(loss_fn=lambda module, batch: "
                "...) returning the training loss."
            )
        if getattr(trainer, "world_size", 1) > 1 and any(
            isinstance(m, nn.SyncBatchNorm) for m in pl_module.modules()
        ):
            raise ConfigurationError(
                "HessianMonitor cannot replay SyncBatchNorm: its forward is a collective across "
                "ranks and has no second derivative. Train with plain (per-rank) BatchNorm while "
                "measuring, or pass a loss_fn that avoids SyncBatchNorm."
            )
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise ConfigurationError(
                "HessianMonitor found no trainable parameters (requires_grad=True) in the module."
            )

    @staticmethod
    def _check_memory_arguments(memory: Any, memory_meter: Any) -> None:
        if not (
            memory is None
            or memory == "auto"
            or (isinstance(memory, int) and not isinstance(memory, bool) and memory > 0)
        ):
            raise ConfigurationError(
                f"Expected `memory` to be 'auto' (at most {MEMORY_FACTOR:g}x the peak training "
                f"reaches), a positive number of bytes (e.g. 16 * 2**30) or None (no limit), got "
                f"{memory!r}."
            )
        if memory_meter is not None and not isinstance(memory_meter, curvature.MemoryMeter):
            raise ConfigurationError(
                f"Expected `memory_meter` to be a dynlens.curvature.MemoryMeter, got "
                f"{memory_meter!r}."
            )

    def _meter_training_step(self, trainer: Any, pl_module: Any) -> None:
        """Meter the training step that follows (the first few): its peak sets the limit."""
        if (
            self.memory == "auto"
            and self.disabled_reason is None
            and self._metered_steps < METERED_STEPS
            and not trainer.sanity_checking
        ):
            # The training step that follows is metered: its peak sets the limit.
            self._memory(pl_module.device).reset_peak()
            self._metering = True

    def _metered(self, pl_module: Any) -> None:
        """The metered training step ended: its peak counts."""
        if self._metering:
            self._metering = False
            self._metered_steps += 1
            peak = self._memory(pl_module.device).peak()
            self._train_peak = max(self._train_peak or 0, peak)
