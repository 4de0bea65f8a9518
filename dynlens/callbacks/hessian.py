"""HessianMonitor: Hessian trace, sharpness and their ratios to the stability thresholds, live.

The callback only schedules, measures through :mod:`dynlens.curvature`, syncs and logs; every
number it shows is computed by a function of that pure layer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import Tensor
from typing_extensions import override

from .. import curvature
from ..events import HessianReason
from .base import fail_soft
from .context import logging_step
from .hessian_measure import Memory
from .hessian_publish import HessianPublishing
from .layout import Chart
from .replay import UserLossFn
from .validate import (
    ConfigurationError,
    check_callable,
    check_choice,
    check_non_negative_int,
    check_positive_int,
    check_positive_number,
)

Estimator = Literal["hutchinson", "hutchpp"]

ESTIMATORS: tuple[str, ...] = ("hutchinson", "hutchpp")

# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


class HessianMonitor(HessianPublishing):
    """Hessian trace, sharpness λ_max and their ratios to the optimizer's stability thresholds.

    At measurement steps, *before* the training step runs (so at the parameters θ_t and the
    learning rate η_t that step uses), the monitor recomputes the training loss on the current
    batch — or on a fixed ``probe_batch`` (Cohen et al. 2021 use a fixed 5k-example subset) —
    through the LightningModule's own ``training_step`` with ``self.log`` silenced, or through
    ``loss_fn(pl_module, batch)``, and measures with :mod:`dynlens.curvature`:

    * ``trace`` tr(H) by Hutchinson (default; ``frobenius`` ‖H‖_F comes free with it) or Hutch++
      with ``num_probes`` products, with its standard error;
    * ``lambda_max`` λ_max(H) by Lanczos, warm-started from the previous eigenvector (cold every
      ``cold_start_every`` measurements: a warm start can miss an eigenvalue that overtakes it),
      ``lambda_max_converged`` (1 where the residual fell to ``tol``·|λ|; across ranks, the share)
      and ``lambda_max_residual`` ‖Hx − λx‖ (an eigenvalue of H lies that close to λ);
    * for Adam-family optimizers (those with ``exp_avg_sq`` state, i.e. from their first step on)
      ``precond_lambda_max`` λ_max(P^{-1/2} H P^{-1/2}) with P = diag(√v̂ + ε) (Cohen et al. 2022).

    and compares them with thresholds read live from the optimizer (η may follow a scheduler):

    * ``eos_ratio`` = λ_max / ``eos_threshold``; 1 is the edge of stability. The threshold is
      2/η for SGD without momentum (with full batches: gradient descent, Cohen et al. 2021), so
      ``eos_ratio`` = η·λ_max/2; 2(1+β)/(η(1−dampening)) for heavy-ball momentum β;
      (2+2β)/((1+2β)η) for Nesterov. For Adam-family and other optimizers it stays η·λ_max/2,
      a gradient-descent reference only: Adam's own edge is ``precond_ratio``.
    * ``trace_ratio`` = η·tr(H)/2: tr(H) against 2/η, the bound that linearly stable minima of
      SGD satisfy (Wu & Su 2023), whatever the momentum.
    * ``precond_ratio`` = λ_max(P⁻¹H)·(1−β₁)η/(2+2β₁): preconditioned sharpness against Adam's
      threshold, 38/η at β₁ = 0.9 (Cohen et al. 2022).

    η is the largest ``lr`` among the parameter groups of optimizer ``optimizer_index`` that
    hold measured parameters, β (or β₁) that group's. With ``lr`` 0 the ratios and thresholds
    are not logged.

    Logged under ``<prefix>/hessian/``: ``loss``, ``trace``, ``trace_stderr``, ``trace_lower``
    and ``trace_upper`` (trace ∓ one standard error), ``frobenius`` (Hutchinson only),
    ``lambda_max``, ``lambda_max_converged``, ``lambda_max_residual``, ``lr``, ``eos_threshold``,
    ``eos_ratio``, ``trace_threshold``, ``trace_ratio``, ``precond_lambda_max``,
    ``precond_threshold``, ``precond_ratio`` (Adam family), ``one`` (the constant 1, the
    reference line of the ratio chart) and ``overhead`` (measurement time ÷ training time).
    The first time ``eos_ratio`` (not for Adam) or ``precond_ratio`` reaches 1 is a text event.
    With ``blocks``, per block ``b`` also
    ``trace/<b>`` (the trace of the block's diagonal block tr(H_bb), from the same products as
    the total: no extra cost), ``trace_stderr/<b>`` and ``trace_share/<b>`` (its share of the
    total), each with a chart of a line per block. With ``density``, ``spectrum_top/1`` …
    ``spectrum_top/<k>`` (the top eigenvalues λ_1 ≥ … ≥ λ_k, one chart) and a TensorBoard
    histogram ``spectrum`` (TensorBoard loggers only): the eigenvalue density of H.

    Spectral density (``density``): stochastic Lanczos quadrature (Lin, Saad & Yang 2016,
    *Approximating spectral densities of large matrices*; Ghorbani, Krishnan & Xiao 2019, *An
    Investigation into Neural Net Optimization via Hessian Eigenvalue Density*) through
    :func:`dynlens.curvature.spectral_density` on the same loss: ``density_runs`` runs of
    ``density_iter`` Lanczos steps from Rademacher starts give Ritz values λ_j with weights w_j
    (Σ w_j = 1) whose moments Σ w_j λ_j^k are unbiased for tr(H^k)/n up to k = 2·``density_iter``
    − 1. The histogram holds each Ritz value with the count n·w_j (n parameters), so its counts
    sum to n, as a histogram of H's exact eigenvalues would, and its Histograms and
    Distributions tabs show the spectrum evolve: a bulk near 0 and outliers that move away from
    it as the network sharpens (Ghorbani et al.). The extreme Ritz values converge first, so the
    top ones estimate λ_1 … λ_k from below. Cost: ``density_runs`` × ``density_iter``
    Hessian-vector products per measurement (fewer where a Krylov space becomes invariant), on
    top of the trace's and λ_max's, all within the same ``budget`` (a dearer measurement is made
    less often); memory for ``density_iter`` vectors of n entries. Per-block traces cost
    nothing: they come from the trace's own products. Under DDP each rank runs its quadrature
    on its local batch; the ranks' quadratures are pooled (the mean of their densities) and the
    top eigenvalues averaged, in one collective, identical on every rank.

    Cadence: ``every_n_steps``, or a compute ``budget`` (default 0.05): the monitor times itself
    and the training between measurements with ``clock`` and measures again once the training
    time can pay for the measurements so far and the next one, so that after every measurement
    but the first (step 0, before any training) measuring has taken at most ``budget`` ×
    training time, as long as measurements cost about what they have cost so far (see
    :func:`~dynlens.callbacks.schedule.budget_schedule`; the first gap is decided one step after
    the first measurement, once a training step has been timed). Between measurements a step
    costs one integer comparison: no host sync, no collective.

    No observer effect: parameters, gradients (``.grad`` is never written), buffers, module
    modes, optimizer state and the global RNG streams are untouched, so the trained weights are
    bit-identical to a run without the monitor. Dropout draws the same masks in every evaluation
    of one measurement, so all its products are of one function. ``training_step`` must have no
    side effects other than ``self.log``; otherwise pass ``loss_fn``.

    Precision: under ``"bf16-mixed"``/``"16-mixed"`` the loss is recomputed outside autocast, so
    curvature is measured in float32; modules held in 16-bit (``"bf16-true"``) are measured on
    float32 copies.

    DDP: each rank measures its local batch on the unwrapped module (``pl_module``; the DDP
    wrapper cannot be differentiated twice), and the results are averaged with
    ``trainer.strategy.reduce``. The trace is linear in H, so the averaged estimate is one of the
    global batch's trace (for a mean loss over equal local batches, whose Hessian is the mean of
    the local ones), with the ranks' independent errors combined; λ_max and ‖H‖_F are convex in
    H, so their mean over ranks bounds the global batch's from above. SyncBatchNorm (a
    collective inside the forward) is refused at ``setup`` under DDP.
    Rank 0 decides the budget schedule and broadcasts it; every collective runs on every rank
    at measurement steps only. FSDP and DeepSpeed shard the parameters and are refused at
    ``setup``.

    Memory (``memory``): every pass of Hessian-vector products is metered and planned under a
    :class:`dynlens.curvature.MemoryLimit`: with ``"auto"`` (default) 2× the peak that training
    reaches (on the CPU over the RSS just before ``fit``), an int is a limit in bytes counted the
    same way, ``None`` plans nothing. Where the batch's loss is the mean of its samples', the
    products run micro-batch by micro-batch as small as the limit needs. Out of memory inside a
    measurement, the pass is retried with half the probes; where even one sample's does not fit,
    the monitor falls back to finite differences, and where that does not fit either it warns
    once and switches itself off; training goes on (details: :mod:`.hessian_measure`).

    Finite differences: where the exact routes fail (an op without a second derivative, fused
    attention kernels, ``torch.compile``) or do not fit, and ``route`` is ``"auto"`` or
    ``"tuned"``, the monitor switches to ``route="finite_difference"`` with one
    :class:`~dynlens.curvature.CurvatureFallbackWarning` and an event ``finite_difference``
    naming the reason. Each measurement then logs the products' estimated relative error as
    ``product_error``; above ``FD_TOLERANCE`` (0.05: a loss not smooth at the step's scale,
    e.g. a ReLU network in float32) the monitor switches itself off.

    Failing soft: a non-finite loss, or an explicit exact ``route`` that fails, gives one warning
    and the monitor switches itself off on every rank; training goes on.

    State (``state_dict``): the schedule, timing totals, the last values, a history of every
    measurement and the Lanczos eigenvectors used for warm starts (one vector the size of the
    measured parameters, two for Adam), so a resumed run measures exactly as an uninterrupted
    one would.

    Args:
        every_n_steps: measure every this many training steps (exclusive with ``budget``),
            counted as :class:`~dynlens.Monitor` counts them.
        budget: fraction of training time to spend measuring, in (0, 1); 0.05 when neither
            ``every_n_steps`` nor ``budget`` is given.
        probe_batch: a fixed batch to measure on (moved to the module's device with its
            ``transfer_batch_to_device``), passed to ``training_step`` with ``batch_idx`` 0;
            ``None`` uses each measured step's own batch.
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` instead of ``training_step`` (required
            with manual optimization).
        estimator: ``"hutchinson"`` (also gives ‖H‖_F) or ``"hutchpp"`` (Meyer et al. 2021).
            Hutchinson is the default, the more precise of the two at equal budget on every
            network Hessian benchmarked (``benchmarks/hessian.py``, ``benchmarks/RESULTS.md``):
            Rademacher probes are exact on the diagonal, which carries much of a network
            Hessian's trace. Hutch++ wins when a few eigenvalues dominate the trace itself.
        num_probes: Hessian-vector products for the trace (≥ 3 for Hutch++).
        blocks: also the trace of each block of parameters (Hutchinson only): ``"module"`` (one
            block per top-level module), ``"layer"`` (one per layer of a ``ModuleList``, e.g.
            ``blocks.0``), ``"tensor"`` (one per parameter tensor), or a mapping block name →
            parameter names, whose left-out parameters form a block ``"other"``
            (:func:`dynlens.curvature.parameter_blocks`); checked at set-up.
        trace: measure the trace.
        sharpness: measure λ_max (and, for Adam, the preconditioned λ_max).
        preconditioned: measure the preconditioned sharpness under Adam-family optimizers.
        density: measure the spectral density and its top eigenvalues (see above).
        density_iter: Lanczos steps (Hessian-vector products) per quadrature run; with at least
            as many as H has distinct eigenvalues, the Ritz values are H's eigenvalues.
        density_runs: independent quadrature runs, pooled (one is the usual choice: the error of
            a density over n eigenvalues shrinks like 1/√(runs·n)).
        density_top_k: how many top eigenvalues to log.
        max_iter: Lanczos steps (products) at most per eigenvalue.
        tol: Lanczos relative residual at which to stop.
        cold_start_every: start Lanczos from a random vector every this many measurements
            (1: always cold).
        optimizer_index: which of ``trainer.optimizers`` η and the Adam state come from.
        memory: ``"auto"`` (2× training's peak), a limit in bytes, or ``None``; see Memory above.
        memory_meter: what reads memory (a :class:`dynlens.curvature.MemoryMeter`); default the
            device's (:func:`dynlens.curvature.memory_meter`). Inject a fake one in tests.
        route: Hessian-vector-product route, see :class:`dynlens.curvature.HessianOperator`.
            The default ``"tuned"`` lets the first measurement time the two double-backward
            routes on CPU and keep the faster for the rest of the run (kept in checkpoints);
            ``"auto"`` skips the trial, for results identical to the last bit across runs.
        seed: seed of the probes, drawn per (seed, rank, step) from an own generator (see
            :func:`~dynlens.callbacks.replay.probe_generator`); the global RNG is never used.
        clock: a ``() -> seconds`` function; inject a fake one for deterministic tests.
        prefix: first part of the metric keys.
        verbose: print event lines to the console (rank 0).

    Example::

        monitor = HessianMonitor(every_n_steps=50)
        trainer = Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs"))
        trainer.fit(model, datamodule)
        print(monitor.latest["eos_ratio"])   # η·λ_max/2 at the latest measurement
    """

    name = "hessian"
    reasons = HessianReason
    timed = True  # the overhead is logged whatever the cadence

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        budget: float | None = None,
        probe_batch: Any = None,
        loss_fn: UserLossFn | None = None,
        estimator: Estimator = "hutchinson",
        num_probes: int = 30,
        blocks: curvature.Blocks | None = None,
        trace: bool = True,
        sharpness: bool = True,
        preconditioned: bool = True,
        density: bool = False,
        density_iter: int = 50,
        density_runs: int = 1,
        density_top_k: int = 5,
        max_iter: int = 20,
        tol: float = 1e-3,
        cold_start_every: int = 10,
        optimizer_index: int = 0,
        route: curvature.Route = "tuned",
        memory: Memory = "auto",
        memory_meter: curvature.MemoryMeter | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.perf_counter,
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        if every_n_steps is None and budget is None:
            budget = 0.05
        super().__init__(
            every_n_steps=every_n_steps, budget=budget, clock=clock, prefix=prefix, verbose=verbose
        )
        check_choice("estimator", estimator, ESTIMATORS)
        check_positive_int("num_probes", num_probes)
        if estimator == "hutchpp" and num_probes < 3:
            raise ConfigurationError(
                f"Hutch++ needs `num_probes` >= 3 (a third each for its sketch, the sketch's exact "
                f"trace and the deflated rest), got {num_probes}: raise it or pass "
                "estimator='hutchinson'."
            )
        if blocks is not None:
            if isinstance(blocks, str):
                check_choice("blocks", blocks, curvature.BLOCK_RULES)
            elif not isinstance(blocks, Mapping):
                raise ConfigurationError(
                    f"Expected `blocks` one of {curvature.BLOCK_RULES} or a mapping block name → "
                    f"parameter names, got {blocks!r}."
                )
            if estimator != "hutchinson" or not trace:
                raise ConfigurationError(
                    "Per-block traces come from Hutchinson's products: pass "
                    "estimator='hutchinson' and trace=True with `blocks`, or drop `blocks`."
                )
        if not isinstance(density, bool):
            raise ConfigurationError(f"Expected `density` to be True or False, got {density!r}.")
        check_positive_int("density_iter", density_iter)
        check_positive_int("density_runs", density_runs)
        check_positive_int("density_top_k", density_top_k)
        if not (trace or sharpness or density):
            raise ConfigurationError(
                "Nothing to measure: `trace`, `sharpness` and `density` are all False; enable at "
                "least one."
            )
        check_positive_int("max_iter", max_iter)
        check_positive_number("tol", tol)
        check_positive_int("cold_start_every", cold_start_every)
        check_non_negative_int("optimizer_index", optimizer_index)
        check_choice("route", route, ("auto", "tuned", *curvature.EXPLICIT_ROUTES))
        check_callable("loss_fn", loss_fn, signature="(pl_module, batch) -> loss")
        self._check_memory_arguments(memory, memory_meter)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"Expected `seed` to be an int, got {seed!r}.")

        self.probe_batch = probe_batch
        self.loss_fn = loss_fn
        self.estimator = estimator
        self.num_probes = num_probes
        self.trace = trace
        self.blocks = blocks
        #: The blocks' parameter names, once set up (``None`` without ``blocks``).
        self.partition: dict[str, list[str]] | None = None
        self.sharpness = sharpness
        self.preconditioned = preconditioned
        self.density = density
        self.density_iter = density_iter
        self.density_runs = density_runs
        self.density_top_k = density_top_k
        #: The last measurement's spectrum (with ``density``): ``step``, the pooled ``nodes`` and
        #: ``weights`` (lists, ascending nodes) and the histogram ``edges`` and ``counts`` written.
        self.last_spectrum: dict[str, Any] | None = None
        self._local_spectrum: curvature.SpectralDensity | None = None
        self.max_iter = max_iter
        self.tol = float(tol)
        self.cold_start_every = cold_start_every
        self.optimizer_index = optimizer_index
        self.route = route
        self.memory = memory
        self.memory_meter = memory_meter
        self.seed = seed
        # memory: the limit (learns the products' peaks), training's metered peak
        self._limit: curvature.MemoryLimit | None
        self.add_state(
            "_limit",
            None,
            key="memory_plan",
            save=lambda limit: None if limit is None else limit.state_dict(),
            load=lambda plan: None if plan is None else curvature.MemoryLimit.from_state(plan),
        )
        self._train_peak: int | None
        self.add_state("_train_peak", None, load=_int_or_none)
        self._metered_steps: int
        self.add_state("_metered_steps", 0, load=int)
        self._metering = False
        #: The values logged at the latest measurement, by quantity (without the prefix), as
        #: every monitor's ``latest`` (kept in checkpoints under ``last``).
        self.latest: dict[str, float]
        self.add_state(
            "latest", dict, key="last", load=lambda last: {k: float(v) for k, v in last.items()}
        )
        #: One dict per measurement: ``step``, the logged values, ``cold`` (Lanczos cold start)
        #: and ``iterations`` (Lanczos products spent on λ_max).
        self.history: list[dict[str, float]]
        self.add_state("history", list)
        self.num_measurements: int
        self.add_state("num_measurements", 0, load=int)
        self._last_step: int | None  # the last measured step
        self.add_state("_last_step", None, load=_int_or_none)
        self._since_cold: int
        self.add_state("_since_cold", 0, load=int)
        self._route: str
        self.add_state("_route", lambda: self.route, load=str)
        # the warm starts, so a resumed run measures exactly as an uninterrupted one would (older
        # checkpoints have none: the next measurement then starts cold)
        self._eigvec: dict[str, Tensor] | None
        self.add_state("_eigvec", None, key="eigvec", save=_detached, load=_detached)
        self._precond_eigvec: dict[str, Tensor] | None
        self.add_state("_precond_eigvec", None, save=_detached, load=_detached)
        self._declare_reduced()
        # in memory only
        self._probe_on_device: Any = None
        self._precond_refused = False

    # ----------------------------------------------------------------------------- identity
    def state_key_fields(self) -> dict[str, Any]:
        return {
            **super().state_key_fields(),
            "every_n_steps": self.every_n_steps,
            "budget": self.budget,
            "estimator": self.estimator,
            "num_probes": self.num_probes,
            "probe_batch": self.probe_batch is not None,
            "loss_fn": getattr(self.loss_fn, "__qualname__", None),
        }

    def panel(self) -> dict[str, Chart]:
        charts: dict[str, Chart] = {}
        if self.sharpness:
            charts["sharpness λ_max and its stability threshold"] = self.multiline(
                "lambda_max", "eos_threshold"
            )
            charts["Lanczos: residual ‖Hx − λx‖ and converged (1)"] = self.multiline(
                "lambda_max_residual", "lambda_max_converged"
            )
            if self.preconditioned:
                charts["Adam: preconditioned sharpness λ_max(P⁻¹H) and (2+2β₁)/((1−β₁)η)"] = (
                    self.multiline("precond_lambda_max", "precond_threshold")
                )
        if self.trace:
            charts["trace tr(H) ± standard error"] = self.margin(
                "trace", "trace_lower", "trace_upper"
            )
            charts["standard error of the trace estimate"] = self.multiline("trace_stderr")
            charts["trace tr(H) and the SGD linear-stability bound 2/η"] = self.multiline(
                "trace", "trace_threshold"
            )
        ratios = [
            *(["eos_ratio"] if self.sharpness else []),
            *(["trace_ratio"] if self.trace else []),
            *(["precond_ratio"] if self.sharpness and self.preconditioned else []),
        ]
        charts["stability ratios (1 = at the threshold)"] = self.multiline(*ratios, "one")
        if self.trace and self.estimator == "hutchinson":
            charts["Frobenius norm ‖H‖_F"] = self.multiline("frobenius")
        stems: list[tuple[str, str]] = []
        if self.blocks is not None:
            stems += [("trace of each block tr(H_bb)", "trace")]
            stems += [("share of the trace per block", "trace_share")]
        if self.density:
            stems += [("top eigenvalues λ_1 … λ_k (Lanczos quadrature)", "spectrum_top")]
        for title, stem in stems:  # one pattern for every block's (every eigenvalue's) tag
            charts[title] = ["Multiline", ["^" + re.escape(self.key(stem)) + "/"]]
        charts["loss at the measured batch"] = self.multiline("loss")
        charts["learning rate η the thresholds use"] = self.multiline("lr")
        charts["measurement time ÷ training time"] = self.multiline("overhead")
        return charts

    # ----------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._check_measurable(trainer, pl_module)
        # the limit counts what training adds to the process from here on (on CUDA: tensors)
        self._memory(trainer.strategy.root_device).rebase()
        if self.blocks is not None:
            names = [k for k, p in pl_module.named_parameters() if p.requires_grad]
            try:
                self.partition = curvature.parameter_blocks(names, self.blocks)
            except ValueError as err:
                raise ConfigurationError(f"HessianMonitor(blocks=...): {err}") from err

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if self.optimizer_index >= max(len(trainer.optimizers), 1):
            raise ConfigurationError(
                f"HessianMonitor(optimizer_index={self.optimizer_index}) but the run has "
                f"{len(trainer.optimizers)} optimizer(s): pass an index below that."
            )
        step = logging_step(trainer)
        if self._last_step is not None and step <= self._last_step:
            # A new Trainer restarted the step counter (a resume never lands at or before the last
            # measured step): start a fresh schedule and budget.
            self._last_step = None
            assert self.schedule is not None
            self.schedule.reset(step)

    # ----------------------------------------------------------------------------- cadence
    def _due(self, trainer: Any) -> bool:
        if logging_step(trainer) == self._last_step:  # a later micro-batch of a measured step
            return False
        return self.is_due(trainer)

    # ----------------------------------------------------------------------------- measuring
    @override
    @fail_soft
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._due(trainer):
            self._measure_step(trainer, pl_module, batch, batch_idx)
        self._meter_training_step(trainer, pl_module)

    @override
    @fail_soft
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._metered(pl_module)

    def _measure_step(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = logging_step(trainer)
        self._last_step = step
        with self.measuring(trainer, pl_module.device):
            values, spectrum, failure = self._measure_everywhere(
                trainer, pl_module, batch, batch_idx
            )
        if values["failed"] > 0:
            self.disable(failure or "the measurement failed on another rank")
            return
        self._publish(trainer, pl_module, step, values, spectrum)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _detached(vector: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if vector is None else {k: v.detach() for k, v in vector.items()}
