"""LogitGrowthMonitor: output-logit growth, log Z drift and attention logits per layer."""

from __future__ import annotations

import functools
import math
import warnings
from collections import deque
from typing import Any

import torch
from typing_extensions import override

from ..attention import DEFAULT_CHUNK_ELEMENTS, AttentionLogitSums
from ..events import LogitsReason
from ..logits import OutputLogitSums, log_growth_rate, output_logit_sums
from .base import fail_soft
from .capture import AttentionCapture, LogitsCapture, logits_found, take_logits
from .context import logging_step
from .layout import Chart
from .pooling import PooledMonitor
from .schedule import StepWindow
from .state import floats_of, tensors_of
from .validate import ConfigurationError, check_positive_int, check_positive_number


def _save_outputs(outputs: list[OutputLogitSums]) -> dict[str, Any] | None:
    return floats_of(OutputLogitSums.pool(outputs)) if outputs else None


def _load_outputs(saved: dict[str, Any] | None) -> list[OutputLogitSums]:
    if saved is None:
        return []
    return [tensors_of(OutputLogitSums, saved, host=("samples", "entries"))]


NO_ATTENTION_WARNING = (
    "LogitGrowthMonitor saw no attention call in a measured training step: the model calls "
    "neither torch.nn.functional.scaled_dot_product_attention nor nn.MultiheadAttention, nor a "
    "softmax over (batch, heads, queries, keys) scores (or only under no_grad). Attention logits "
    "are not measured; pass attention=False to silence this."
)


class LogitGrowthMonitor(PooledMonitor):
    """Watch the logit growth behind Transformer training instabilities (Wortsman et al. 2023).

    Wortsman et al. 2023, *Small-scale proxies for large-scale Transformer training instabilities*
    (arXiv:2309.14322): at high learning rates attention logits ``z_ij = q_i·k_j/sqrt(d_h)`` grow
    until attention is one-hot (their runs whose max attention logit passed ~1e4 diverged;
    qk-layernorm prevents it), and output logits drift until ``log Z = logsumexp(z)`` is far from
    0 (z-loss ``1e-4·(log Z)²``, :func:`dynlens.z_loss`, prevents it). Every number comes from a
    pure function of :mod:`dynlens.logits`.

    Measured on the steps of ``every_n_steps`` (output logits) and ``attention_every_n_steps``
    (attention), pooled on the device, and logged under ``<prefix>/logits/`` as often as Lightning
    logs ``self.log`` values: at the last measured step of each ``log_every_n_steps`` interval
    (so at every measured step when the cadences are at least ``log_every_n_steps``) and at the
    end of training. Each logged value covers every step measured since the previous log (sums
    add, maxima take the maximum); statistics not yet logged are kept in checkpoints.

    Output logits (shape ``(..., C)``, every leading position a sample):

    * ``rms``: root mean square of all logits; ``max_abs``: the largest ``|z|``;
    * ``logz_mean``, ``logz_max``: mean and max over samples of ``log Z = logsumexp_c z_c``;
    * ``spread``: mean over samples of the (population) std over classes — the part of the logits'
      size the loss sees, where ``logz_mean`` is the shift it does not see;
    * ``growth_rate``: least-squares slope of ``ln(max_abs)`` over the last ``window`` logged
      points, in e-folds per 1000 steps (:func:`dynlens.logits.log_growth_rate`; 0.69 doubles
      every 1000 steps); from the second measurement on.

    Attention logits, from every call of
    ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``, and every hand-written
    ``softmax(q·kᵀ·scale + mask)`` over a ``(batch, heads, queries, keys)`` tensor (Hugging
    Face's ``"eager"`` attention), during the training step's forward (not under ``no_grad``, not
    in validation; masks — ``-inf`` or the dtype's minimum —, ``is_causal`` and grouped-query
    heads honoured; see :mod:`dynlens.callbacks.capture.attention`). The attention charts of the
    panel appear once a measured step has seen attention:

    * ``attn_max``, ``attn_rms``: max and RMS of ``q·kᵀ·scale`` over every call;
    * ``attn_max/<layer>``, ``attn_rms/<layer>``: the same per layer, named by the module that
      called attention (``blocks.0.attn``), else ``call_<i>`` in call order.

    Events (each once per run, kept in the checkpoint, at the logged step whose values first
    pass): ``attention_warning`` when ``attn_max`` first passes ``attention_warning`` (default
    1e3, a tenth of the divergence level: a softmax row with a logit 1e3 above the rest is
    exactly one-hot in any precision),
    ``attention_divergence`` past ``attention_divergence`` (default 1e4: divergence likely), and
    ``logz_drift`` when ``|logz_mean|`` first exceeds ``logz_threshold``. The default 20 is
    above ``log C`` of any vocabulary up to e²⁰ ≈ 5·10⁸ classes (``log Z ≈ log C`` at
    initialisation: 10.8 for GPT-2's 50,257, so 10 would fire at step 0) yet flags the drift early:
    the loss ``log Z − z_y`` is then a difference of numbers of size 20, whose bfloat16 rounding
    (8 significant bits: spacing 0.125 between 16 and 32) is already ±0.06 nats.

    Args:
        logits_module: ``"auto"`` (default) finds the output logits at the first measured step
            as :class:`SoftmaxCollapseMonitor` does (``training_step``'s ``"logits"``, else the
            outermost module returning ``.logits``, else the LightningModule's ``forward``) and
            says once what it found (event ``logits_found``); or the name of the submodule
            producing them (a forward hook records them during measured steps); ``None`` reads
            ``outputs["logits"]`` of ``training_step``.
        output_logits: measure output logits (``False``: attention only).
        attention: measure attention logits (``False``: output logits only).
        attention_every_n_steps: attention cadence, in optimizer steps. Capturing attention
            costs about as much as the attention forward itself plus a little per torch call of
            the forward (the interception), so every step is too often for a default (measured
            costs: ``benchmarks/logits.py --paired``, in ``benchmarks/RESULTS.md``).
        window: measurements in the growth-rate fit (≥ 2).
        attention_warning, attention_divergence: max-attention-logit event thresholds (``None``
            for no event).
        logz_threshold: ``|logz_mean|`` event threshold (``None`` for no event).
        attention_chunk_elements: most attention logits one piece of a measurement holds
            (default 2²² = 16 MiB in float32): memory stays bounded for any attention size.
        every_n_steps: output-logit cadence (default 10).
        prefix, verbose: as for every monitor.

    Under DDP maxima reduce with ``"max"`` and sums (of squares, of ``log Z``, counts) with
    ``"sum"``, so the logged means are exact over all ranks' samples; every rank must see the same
    attention layers at a measured step (true unless the forward's control flow depends on the
    data). Attention is measured in the forward passes of a micro-batch before its backward
    (``on_before_backward`` ends the capture, so activation checkpointing's recomputation is not
    counted twice).
    """

    name = "logits"
    reasons = LogitsReason

    def __init__(
        self,
        *,
        logits_module: str | None = "auto",
        output_logits: bool = True,
        attention: bool = True,
        attention_every_n_steps: int = 10,
        window: int = 10,
        attention_warning: float | None = 1e3,
        attention_divergence: float | None = 1e4,
        logz_threshold: float | None = 20.0,
        attention_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        every_n_steps: int = 10,
        prefix: str = "dynlens",
        verbose: bool = True,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, prefix=prefix, verbose=verbose)
        if not isinstance(output_logits, bool) or not isinstance(attention, bool):
            raise ConfigurationError(
                f"Expected `output_logits` and `attention` to be bools, got {output_logits!r} and "
                f"{attention!r}."
            )
        if not (output_logits or attention):
            raise ConfigurationError(
                "LogitGrowthMonitor(output_logits=False, attention=False) measures nothing: "
                "set at least one of them to True."
            )
        if logits_module not in (None, "auto") and not output_logits:
            raise ConfigurationError(
                f"`logits_module={logits_module!r}` names the output-logit module, but "
                "output_logits=False: drop `logits_module` or set output_logits=True."
            )
        self.attention_every_n_steps = check_positive_int(
            "attention_every_n_steps", attention_every_n_steps
        )
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ConfigurationError(
                f"Expected `window` an int >= 2 (a slope needs two points), got {window!r}."
            )
        self.attention_warning = check_positive_number(
            "attention_warning", attention_warning, allow_none=True
        )
        self.attention_divergence = check_positive_number(
            "attention_divergence", attention_divergence, allow_none=True
        )
        if (
            self.attention_warning is not None
            and self.attention_divergence is not None
            and self.attention_warning >= self.attention_divergence
        ):
            raise ConfigurationError(
                f"Expected `attention_warning` < `attention_divergence`, got {attention_warning!r}"
                f" and {attention_divergence!r}; e.g. 1e3 and 1e4."
            )
        self.logz_threshold = check_positive_number(
            "logz_threshold", logz_threshold, allow_none=True
        )
        check_positive_int("attention_chunk_elements", attention_chunk_elements)
        self.capture = LogitsCapture(logits_module)
        self.output_logits = output_logits
        self.attention = attention
        self.window = window
        self.attention_capture = AttentionCapture(attention_chunk_elements)
        #: The latest logged value of each quantity (``"max_abs"``, ``"attn_max/blocks.0.attn"``).
        self.latest: dict[str, float] = {}
        #: Layers whose attention was measured at the latest attention step, in call order.
        self.layers: list[str] = []
        #: Whether a measured step saw attention calls (``None`` before the first attention step).
        self.attention_seen: bool | None
        self.add_state("attention_seen", None)
        #: Largest ``attn_max`` logged so far (``None`` before the first attention measurement).
        self.peak_attention_logit: float | None
        self.add_state("peak_attention_logit", None)
        # (step, max |z|) of the last `window` output-logit measurements: the growth-rate fit
        self._history: deque[tuple[int, float]]
        self.add_state(
            "_history",
            lambda: deque(maxlen=window),
            save=lambda history: [list(p) for p in history],
            load=lambda saved: deque(((int(s), float(v)) for s, v in saved), maxlen=window),
        )
        self._window = StepWindow()
        # measured since the last log, pooled: output-logit and per-layer attention statistics
        self._outputs: list[OutputLogitSums]  # one per micro-batch: pooled at the log
        self.add_state(
            "_outputs",
            list,
            key="pending.output",
            pooled=True,
            device=True,
            save=_save_outputs,
            load=_load_outputs,
        )
        self._layers: dict[str, AttentionLogitSums]
        self.add_state(
            "_layers",
            dict,
            key="pending.layers",
            pooled=True,
            device=True,
            save=lambda layers: {name: floats_of(s) for name, s in layers.items()},
            load=lambda saved: {
                n: tensors_of(AttentionLogitSums, s, host=("chunks",)) for n, s in saved.items()
            },
        )
        self._attention_steps: int  # attention steps pooled (none seen: a warning)
        self.add_state("_attention_steps", 0, key="pending.attention_steps", pooled=True)
        # what a log reduces across ranks, field by field as the statistics' classes say
        self._output_sums: OutputLogitSums | None = self.add_state(
            "_output_sums", None, persistent=False, reduce="by_field"
        )
        self._layer_sums: dict[str, AttentionLogitSums] | None = self.add_state(
            "_layer_sums", None, persistent=False, reduce="by_field"
        )
        self._logging = False  # whether the step being measured is logged
        self._output_armed = False
        self._attention_armed = False
        self._warned_no_attention = False

    def state_key_fields(self) -> dict[str, Any]:
        return {
            **super().state_key_fields(),
            "logits_module": self.capture.logits_module,
            "every_n_steps": self.every_n_steps,
            "attention_every_n_steps": self.attention_every_n_steps,
        }

    def panel(self) -> dict[str, Chart]:
        charts: dict[str, Chart] = {}
        if self.attention_seen:
            for quantity, title in (
                ("attn_max", "max attention logit per layer"),
                ("attn_rms", "attention logit RMS per layer"),
            ):
                key = self.key(quantity)
                charts[title] = ["Multiline", [f"^{key}$", f"^{key}/.*$"]]
        if self.output_logits:
            charts["output logits"] = self.multiline("max_abs", "rms", "spread")
            charts["log Z = logsumexp(output logits)"] = self.multiline("logz_mean", "logz_max")
            charts["output-logit growth (e-folds per 1000 steps)"] = self.multiline("growth_rate")
        return charts

    @property
    def panel_ready(self) -> bool:
        # the attention charts exist once an attention step showed whether there is attention
        return not self.attention or self.attention_seen is not None

    # ------------------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.output_logits:
            self.capture.attach(pl_module, type(self).__name__)
        if self.attention:
            self.attention_capture.attach(pl_module, type(self).__name__)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # a run that never got to (or past) its first attention step
            self.write_layout(trainer, final=True)
        self.capture.detach()
        self.attention_capture.detach()
        self._window.close()
        self._output_armed, self._attention_armed = False, False
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # never leave the interception mode or the global module hooks behind
        self.attention_capture.detach()
        self._attention_armed = False

    @override
    def disable(self, reason: str) -> None:
        self.attention_capture.disarm()
        self.capture.disarm()
        self._output_armed = self._attention_armed = False
        super().disable(reason)

    # ------------------------------------------------------------------------------ measuring
    def _cadences(self) -> tuple[int, ...]:
        return (
            *((self.every_n_steps,) if self.output_logits else ()),
            *((self.attention_every_n_steps,) if self.attention else ()),
        )

    @override
    @fail_soft
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        output_due = self.output_logits and self.is_due(trainer)
        attention_due = self.attention and self.is_due(trainer, self.attention_every_n_steps)
        if output_due:
            self.capture.arm(batch, trainer.accumulate_grad_batches)
            self._output_armed = True
        if attention_due:
            self.attention_capture.arm(tag=trainer.global_step)
            self._attention_armed = True
        if output_due or attention_due:
            self._window.open(trainer)
            self._logging = self.logs_now(trainer, *self._cadences())

    @override
    @fail_soft
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        # the forward is done: no interception during backward (where activation checkpointing
        # would run the attention a second time) or the optimizer step
        self.attention_capture.disarm()
        if self._output_armed and self.capture.hooked:
            # hooked logits are measured now, while they are still in the CPU's caches: after
            # the backward and the optimizer step the same work takes twice as long
            self._take_output(trainer, None)

    @override
    @fail_soft
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._window.is_open:
            return
        self.attention_capture.disarm()
        if self._output_armed:
            self._take_output(trainer, outputs)
        if not self._window.close_if_stepped(trainer):
            return
        if self._attention_armed:  # the step is whole: pool its attention statistics
            self._attention_armed = False
            layers = self.attention_capture.take()
            capped = self.attention_capture.capped
            if capped:
                caps = ", ".join(sorted({f"{c:g}" for c in capped.values()}))
                said = (
                    f"the attention scores of {len(capped)} layer(s) are soft-capped before "
                    f"the softmax (tanh(s/c)·c, c = {caps}): attn_max and attn_rms are the raw "
                    f"scores s (the softmax sees at most c)"
                )
                step = logging_step(trainer)
                self.log_event(trainer, step, LogitsReason.SOFT_CAP, said, once=True)
            if not self.attention_seen:
                self.attention_seen = bool(layers)
                self.write_layout(trainer)  # the panel now knows whether to chart attention
            self._attention_steps += 1
            for name, sums in layers.items():
                previous = self._layers.get(name)
                self._layers[name] = sums if previous is None else previous.merge(sums)
        self.mark_measured(logging_step(trainer))
        if self._logging:
            last = self.run_ends_inside_interval(trainer, *self._cadences())
            self.flush(trainer, logging_step(trainer), last=last)

    def _take_output(self, trainer: Any, outputs: Any) -> None:
        self._output_armed = False
        taken = take_logits(self.capture, outputs, type(self).__name__)
        found = logits_found(self.capture)
        if found is not None:
            step = logging_step(trainer)
            self.log_event(trainer, step, LogitsReason.LOGITS_FOUND, found, once=True)
        for logits in taken:
            self._outputs.append(output_logit_sums(logits))  # pooled at the log, in one go
        self.mark_measured(logging_step(trainer))

    def flush(self, trainer: Any, step: int, last: bool = False) -> None:
        """Log what was measured since the last log (pooled over the measured steps). When a run
        ends inside a logging interval (``last``) the pooled statistics are also kept, so that a
        checkpoint saved now carries them into a resumed run's interval, and the growth-rate
        history is not extended (the resumed run adds the interval's point)."""
        output = OutputLogitSums.pool(self._outputs) if self._outputs else None
        layers, attention_steps = self._layers, self._attention_steps
        if last:
            self._outputs = [] if output is None else [output]
        else:
            self._outputs, self._layers, self._attention_steps = [], {}, 0
        self._pending_since_log = False
        if attention_steps and not layers and not self._warned_no_attention:
            self._warned_no_attention = True
            if trainer.is_global_zero:
                warnings.warn(NO_ATTENTION_WARNING, UserWarning, stacklevel=2)
        if output is None and not layers:
            return
        # Reduce across ranks (every rank, same steps): sums with "sum", maxima with "max", one
        # collective each; then one host copy for everything, at log time.
        self._output_sums = output
        self._layer_sums = layers or None
        host = self.sync(trainer)
        metrics: dict[str, float] = {}
        if output is not None:
            metrics.update(host["_output_sums"].compute())
            self._grow(metrics, step, keep=not last)
        per_layer = {
            name: pooled
            for name, pooled in host.get("_layer_sums", {}).items()
            if pooled.count > 0  # a layer whose every position was masked reports nothing
        }
        if per_layer:
            metrics.update(self._attention_metrics(per_layer))
        self.log_metrics(trainer, metrics, step=step)
        self.latest.update(metrics)
        self._check_events(trainer, step, metrics)

    def _grow(self, metrics: dict[str, float], step: int, keep: bool = True) -> None:
        """Add the growth rate of max |z| over the window (from the second measurement on)."""
        value = metrics["max_abs"]
        history = list(self._history)
        if math.isfinite(value) and value > 0:
            history = [*history, (step, value)][-self.window :]
            if keep:
                self._history.append((step, value))
        if len(history) >= 2:
            steps, values = zip(*history, strict=True)
            metrics["growth_rate"] = log_growth_rate(steps, values)

    def _attention_metrics(self, per_layer: dict[str, AttentionLogitSums]) -> dict[str, float]:
        """Overall and per-layer attention statistics from host floats."""
        total = functools.reduce(AttentionLogitSums.merge, per_layer.values())
        metrics = {f"attn_{k}": float(v) for k, v in total.compute().items()}
        for name, sums in per_layer.items():
            metrics.update({f"attn_{k}/{name}": float(v) for k, v in sums.compute().items()})
        self.layers = list(per_layer)
        peak = self.peak_attention_logit
        self.peak_attention_logit = max(metrics["attn_max"], -math.inf if peak is None else peak)
        return metrics

    # ------------------------------------------------------------------------------ events
    def _check_events(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        attn = metrics.get("attn_max")
        if attn is not None:
            worst = max(self.layers, key=lambda n: metrics[f"attn_max/{n}"], default=None)
            where = f" (layer {worst})" if worst is not None else ""
            checks = (
                (
                    LogitsReason.ATTENTION_WARNING,
                    self.attention_warning,
                    "attention is turning one-hot; qk-layernorm or a lower learning rate keeps "
                    "it bounded (Wortsman et al. 2023)",
                ),
                (
                    LogitsReason.ATTENTION_DIVERGENCE,
                    self.attention_divergence,
                    "divergence likely (Wortsman et al. 2023: runs past 1e4 diverged)",
                ),
            )
            for reason, threshold, advice in checks:
                if threshold is not None and attn > threshold:
                    self.log_event(
                        trainer,
                        step,
                        reason,
                        f"max attention logit {attn:.4g}{where} passed {threshold:g}: {advice}",
                        once=True,
                    )
        logz = metrics.get("logz_mean")
        threshold = self.logz_threshold
        if logz is not None and threshold is not None and abs(logz) > threshold:
            self.log_event(
                trainer,
                step,
                LogitsReason.LOGZ_DRIFT,
                f"mean log Z {logz:.4g} drifted past ±{threshold:g}: the output logits are "
                "diverging; z-loss 1e-4·(log Z)² (dynlens.z_loss) keeps log Z near 0",
                once=True,
            )
