"""OptimizerMonitor: the first-order panel — gradient, weight and update norms per block, Adam's
second moment, clipping and spikes, correct under sharding."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from typing_extensions import override

from ..curvature.trace import Blocks, parameter_blocks
from ..events import OptimizerReason
from ..optimizer_stats import (
    HISTOGRAM_BINS,
    adam_moments,
    adam_sums,
    block_index,
    block_sums,
    histogram_quantile,
    is_spike,
    squared_norms,
    step_quantities,
    sum_of_products,
)
from .base import Monitor, fail_soft
from .context import logging_step, loss_of, sharding_strategy
from .layout import Chart
from .schedule import StepWindow
from .validate import ConfigurationError, check_positive_int, check_positive_number


class OptimizerMonitor(Monitor):
    """Gradient, weight and update norms (in total and per block), Adam's second moment,
    gradient clipping and spikes of the loss and the gradient norm.

    On a measured step it reads the gradients in ``on_before_optimizer_step`` (after gradient
    accumulation, AMP's unscaling and DDP's averaging; before clipping), with Adam's second
    moment as it stands before the step, and the parameters before and after the step, so the
    update is the step the optimizer really took, whatever the optimizer (weight decay,
    clipping and all). Sums of squares are reduced across ranks before any square root, so
    under a parameter-sharding strategy the norms are those of the whole θ
    (:mod:`dynlens.optimizer_stats`).

    Logged under ``<prefix>/optimizer/``:

    * ``grad_norm`` ‖g‖ (before clipping), ``param_norm`` ‖θ‖ (before the step);
    * with ``update=True``: ``update_norm`` ‖Δθ‖, ``update_to_weight`` ‖Δθ‖/‖θ‖ and
      ``cos_update_grad`` cos(Δθ, −g) (with the gradient the optimizer used: after clipping,
      which scales it and keeps its direction);
    * when the Trainer clips (``gradient_clip_val``): ``grad_norm_clipped`` and
      ``clipped_share``, the share of measured steps whose gradient was clipped;
    * per block (``blocks``): ``grad_norm/<block>`` and ``update_to_weight/<block>``, charted
      together in one chart each;
    * for the Adam family, from its second step: ``adam/eps_share``, the share of coordinates
      where √v̂ < ε (updates no longer follow their gradients there: Wortsman et al. 2023), and
      ``adam/g2_over_v_median`` and ``adam/g2_over_v_p99``, quantiles over coordinates of g²/v̂
      read to a tenth of a decade, over an evenly strided sample in a large model
      (:func:`dynlens.optimizer_stats.adam_sums`) (≫ 1: v̂ lags the gradient, which precedes
      spikes: Bai et al. 2025);
    * ``spike/count`` and ``spike/rate`` (per measured step): the loss or the gradient norm above
      the mean of the previous ``spike_window`` measured values by ``spike_sigma`` standard
      deviations (OLMo-core's rule); each spike is an event, ``loss_spike`` or
      ``gradient_spike`` (an attached ``EarlyWarningMonitor`` reads the latter).

    Args:
        every_n_steps: measure every this many optimizer steps (default 10; a measured step
            costs a few passes over θ and its gradient, and with ``update=True`` a copy of θ).
        blocks: per-block norms: ``"layer"`` (default), ``"module"``, ``"tensor"``, a mapping
            block → parameter names (as :func:`dynlens.curvature.parameter_blocks`), or
            ``None`` for totals only.
        update: keep a float32 copy of θ before each measured step (on measured steps only;
            its size is said once, event ``memory``) to log the update; ``False`` logs no
            update keys and copies nothing.
        spike_window, spike_sigma: the spike rule (default 128 values, 6 σ).
        prefix, verbose: as for every monitor.
    """

    name = "optimizer"
    reasons = OptimizerReason

    def __init__(
        self,
        *,
        every_n_steps: int = 10,
        blocks: Blocks | None = "layer",
        update: bool = True,
        spike_window: int = 128,
        spike_sigma: float = 6.0,
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix, verbose=verbose)
        if not isinstance(update, bool):
            raise ConfigurationError(f"Expected `update` True or False, got {update!r}.")
        if isinstance(blocks, str) and blocks not in ("layer", "module", "tensor"):
            raise ConfigurationError(
                f"Expected `blocks` 'layer', 'module', 'tensor', a mapping block -> parameter "
                f"names, or None, got {blocks!r}."
            )
        self.blocks = blocks
        self.update = update
        self.spike_window = check_positive_int("spike_window", spike_window)
        check_positive_number("spike_sigma", spike_sigma)
        self.spike_sigma = float(spike_sigma)
        #: The latest logged value of each quantity (``"grad_norm"``, ``"grad_norm/layers.0"``).
        self.latest: dict[str, float] = {}
        # measured values so far: the spike rule's history, the counts behind the rates
        self._losses: deque[float]
        self._grad_norms: deque[float]
        for field in ("_losses", "_grad_norms"):
            self.add_state(
                field,
                lambda: deque(maxlen=spike_window),
                save=list,
                load=lambda saved: deque((float(v) for v in saved), maxlen=spike_window),
            )
        self._measured: int = self.add_state("_measured", 0)
        self._spikes: int = self.add_state("_spikes", 0)
        self._clipped: int = self.add_state("_clipped", 0)
        # a measured step's sums (see _vector), whole on every rank (DDP) or a shard's (summed)
        self._local: torch.Tensor | None = self.add_state(
            "_local", None, persistent=False, reduce="local"
        )
        self._shard: torch.Tensor | None = self.add_state(
            "_shard", None, persistent=False, reduce="sum"
        )
        self._loss: torch.Tensor | None = self.add_state(
            "_loss", None, persistent=False, reduce="mean"
        )
        self._window = StepWindow()
        self._names: list[str] = []
        self._partition: dict[str, list[str]] = {}
        self._index = torch.zeros(0, dtype=torch.long)  # each parameter's block
        self._sharded = False
        self._clips = False
        # read before the step: the gradients' sums, Adam's, and θ
        self._before: dict[str, Any] | None = None

    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "every_n_steps": self.every_n_steps}

    def panel(self) -> dict[str, Chart]:
        charts: dict[str, Chart] = {
            "gradient norm (before / after clipping)": self.multiline(
                "grad_norm", "grad_norm_clipped"
            ),
            "parameter and update norms": self.multiline("param_norm", "update_norm"),
            "update-to-weight ‖Δθ‖/‖θ‖": self.multiline("update_to_weight"),
            "cos(update, −gradient)": self.multiline("cos_update_grad"),
            "Adam: share of coordinates with √v̂ < ε": self.multiline("adam/eps_share"),
            "Adam: g²/v̂ over coordinates (median, 99th percentile)": self.multiline(
                "adam/g2_over_v_median", "adam/g2_over_v_p99"
            ),
            "spikes of the loss or the gradient norm": self.multiline("spike/count", "spike/rate"),
        }
        if self.blocks is not None:
            for quantity, title in (
                ("grad_norm", "gradient norm per block"),
                ("update_to_weight", "update-to-weight per block"),
            ):
                charts[title] = ["Multiline", [f"^{self.key(quantity)}/.*$"]]
        return charts

    # ------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        if not self._names:
            raise ConfigurationError("OptimizerMonitor: the model has no trainable parameter.")
        if self.blocks is not None:
            try:
                self._partition = parameter_blocks(self._names, self.blocks)
            except ValueError as exc:
                raise ConfigurationError(f"OptimizerMonitor(blocks=...): {exc}") from None
        self._index = (
            block_index(self._names, self._partition)
            if self._partition
            else torch.zeros(len(self._names), dtype=torch.long)  # one block: the totals
        )
        self._sharded = sharding_strategy(trainer) is not None
        self._clips = bool(getattr(trainer, "gradient_clip_val", None))

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._window.close()
        self._before = None
        super().teardown(trainer, pl_module, stage)

    @override
    def disable(self, reason: str) -> None:
        self._window.close()
        self._before = None
        super().disable(reason)

    # ------------------------------------------------------------------------------ measuring
    @override
    @fail_soft
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if self.is_due(trainer):
            self._window.open(trainer)

    @override
    @fail_soft
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self._window.is_open or self._before is not None:
            return  # a second optimizer of the same step: the first call read everything
        params = self._params(pl_module)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        device = params[0].device
        moments: dict[torch.Tensor, tuple[torch.Tensor, float, float]] = {}
        for opt in trainer.optimizers:
            moments.update(adam_moments(opt))
        adam = [(g, *moments[p]) for p, g in zip(params, grads, strict=True) if p in moments]
        self._before = {
            "g2": squared_norms(grads),
            "w2": squared_norms(params),
            "adam": adam_sums(adam, device) if adam else None,
            # a copy in float32 (fused), to take the update from
            "theta": torch._foreach_mul([p.detach().float() for p in params], 1.0)
            if self.update
            else None,
        }

    def _params(self, pl_module: Any) -> list[torch.Tensor]:
        named = dict(pl_module.named_parameters())
        return [named[n] for n in self._names]

    @override
    @fail_soft
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._window.close_if_stepped(trainer):
            return
        before, self._before = self._before, None
        if before is None:  # the optimizer did not step through Lightning (nothing read)
            return
        params = self._params(pl_module)
        used = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if before["theta"] is not None and not self.fired(OptimizerReason.MEMORY):
            copy = sum(t.numel() for t in before["theta"]) * 4
            held = sum(p.numel() * p.element_size() for p in params)
            self.log_event(
                trainer,
                logging_step(trainer),
                OptimizerReason.MEMORY,
                f"the update needs a float32 copy of θ on measured steps: {copy / 2**20:.4g} MiB "
                f"(θ itself: {held / 2**20:.4g} MiB; update=False takes none)",
                once=True,
            )
        self._publish(trainer, params, used, before, _loss(outputs, trainer))

    def _vector(self, params: list[torch.Tensor], used: list[torch.Tensor], before: dict) -> Any:
        """The step's sums, in one float64 vector: per block Σ g², Σ θ², (Σ Δθ²), then
        (Σ Δθ·g), Σ g² after clipping, and Adam's counts and histogram."""
        index, blocks = self._index, max(len(self._partition), 1)
        parts = [block_sums(before["g2"], index, blocks), block_sums(before["w2"], index, blocks)]
        used2 = squared_norms(used).sum()
        if before["theta"] is not None:
            after = [p.detach().float() for p in params]
            deltas = torch._foreach_sub(after, before["theta"])
            d2 = squared_norms(deltas)
            parts.append(block_sums(d2, index, blocks))
            dot = sum_of_products(deltas, [g.float() for g in used], d2.sum(), used2)
            parts.append(dot.reshape(1))
        parts.append(used2.reshape(1))
        adam = before["adam"]
        if adam is not None:
            parts.append(adam.to(parts[0].device))
        return torch.cat(parts), blocks

    def _publish(
        self,
        trainer: Any,
        params: list[torch.Tensor],
        used: list[torch.Tensor],
        before: dict,
        loss: torch.Tensor | None,
    ) -> None:
        vector, blocks = self._vector(params, used, before)
        if self._sharded:
            self._shard = vector
        else:
            self._local = vector
        self._loss = None if loss is None else loss.double().to(vector.device)
        host = self.sync(trainer)
        values = [float(v) for v in host["_shard" if self._sharded else "_local"]]
        step = logging_step(trainer)
        metrics = self._metrics(values, blocks, before)
        self._spike_check(trainer, step, metrics, host.get("_loss"))
        self.log_metrics(trainer, metrics, step=step)
        self.latest.update(metrics)

    def _metrics(self, values: list[float], blocks: int, before: dict) -> dict[str, float]:
        it = iter(values)
        g2 = [next(it) for _ in range(blocks)]
        w2 = [next(it) for _ in range(blocks)]
        d2 = [next(it) for _ in range(blocks)] if before["theta"] is not None else None
        dot = next(it) if d2 is not None else None
        clipped2 = next(it)
        metrics = step_quantities(sum(g2), sum(w2), sum(d2) if d2 else None, dot, clipped2)
        if self._clips:
            metrics["grad_norm_clipped"] = math.sqrt(clipped2)
            self._clipped += int(clipped2 < sum(g2) * (1 - 1e-6))
            metrics["clipped_share"] = self._clipped / (self._measured + 1)
        if before["adam"] is not None:
            counts = [next(it) for _ in range(2 + HISTOGRAM_BINS)]
            coords, below, histogram = counts[0], counts[1], counts[2:]
            metrics["adam/eps_share"] = below / coords if coords else math.nan
            metrics["adam/g2_over_v_median"] = histogram_quantile(histogram, 0.5)
            metrics["adam/g2_over_v_p99"] = histogram_quantile(histogram, 0.99)
        if self._partition:
            for i, block in enumerate(self._partition):
                metrics[f"grad_norm/{block}"] = math.sqrt(g2[i])
                if d2 is not None:
                    ratio = math.sqrt(d2[i] / w2[i]) if w2[i] > 0 else math.nan
                    metrics[f"update_to_weight/{block}"] = ratio
        return metrics

    def _spike_check(
        self, trainer: Any, step: int, metrics: dict[str, float], loss: float | None
    ) -> None:
        self._measured += 1
        signals = [
            (
                "gradient norm",
                metrics["grad_norm"],
                self._grad_norms,
                OptimizerReason.GRADIENT_SPIKE,
            )
        ]
        if loss is not None:
            signals.append(("loss", loss, self._losses, OptimizerReason.LOSS_SPIKE))
        for what, value, history, reason in signals:
            if is_spike(history, value, self.spike_sigma):
                self._spikes += 1
                mean = sum(history) / len(history)
                self.log_event(
                    trainer,
                    step,
                    reason,
                    f"the {what} {value:.4g} is more than {self.spike_sigma:g} standard "
                    f"deviations above the mean of the last {len(history)} measured steps "
                    f"({mean:.4g})",
                )
            history.append(value)
        metrics["spike/count"] = float(self._spikes)
        metrics["spike/rate"] = self._spikes / self._measured


def _loss(outputs: Any, trainer: Any) -> torch.Tensor | None:
    """The step's training loss, with Lightning's division by the accumulated micro-batches
    undone."""
    loss = loss_of(outputs)
    if loss is None:
        return None
    return loss.detach().reshape(()) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
