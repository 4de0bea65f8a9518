"""The settings of the general early-warning suite and their split into halves
(``benchmarks/early_warning_general.py`` documents the suite; this module defines it).

Each setting builds, for a seed, an unstable run and a control that differs from it in one
thing. The comment on each builder is its calibration: the event step of the unstable run with
seed 0 by the monitor's own rule (``monitor.happened``), and that the control had none within
the setting's steps. Calibrations ran on 2 CPU cores, torch 2.13, float32 unless said.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import _general_runs as R
import pytorch_lightning as pl
import torch

Bucket = Literal["early", "mid", "late"]
Built = tuple[pl.LightningModule, torch.utils.data.DataLoader]


@dataclass(frozen=True)
class Setting:
    """One setting: what it is, and how to build its unstable run and its control for a seed."""

    name: str
    instability: str
    bucket: Bucket
    architecture: str
    optimizer: str
    schedule: str
    precision: str
    max_steps: int
    half: Literal["dev", "record"]
    #: ``build(seed, unstable)``: the model (with its optimizer and schedule) and the batches.
    build: Callable[[int, bool], Built]
    #: The one thing the control changes.
    control: str
    #: The control's precision when that is what it changes.
    control_precision: str | None = None
    #: Monitor options beside the defaults (where the collapse signal's logits come from).
    options: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        """``SGD`` (with or without momentum) or ``Adam`` (Adam, AdamW)."""
        return "Adam" if self.optimizer.startswith("Adam") else "SGD"

    def precision_of(self, unstable: bool) -> str:
        return self.precision if unstable else (self.control_precision or self.precision)

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("build",) and v is not None} | {
            "family": self.family
        }


def opt(name: str, lr: float, schedule: R.Schedule | None = None, **options) -> Callable:
    """``configure_optimizers`` (:func:`_general_runs.optimizers`) that keeps its base rate and
    schedule for the run's record."""
    schedule = schedule or R.Schedule()
    configure = R.optimizers(name, lr, schedule, **options)
    configure.lr, configure.schedule = lr, schedule
    return configure


def ramp(growth: float, cap: float | None = None) -> R.Schedule:
    return R.Schedule("geometric", growth=growth, cap=float("inf") if cap is None else cap)


COPY = {"vocab": 16, "positions": 32}  # the copy task's sequences: 8 random tokens, twice
LOGITS = {"logits_module": None}  # the collapse signal reads training_step's "logits"

# ------------------------------------------------------------------------------ dev half


def collapse_mlp_adamw(seed: int, unstable: bool) -> Built:
    # seeds 0 and 1: collapse at 40 (Adam's first steps blow the logits up); control (float64
    # loss): none in 1,500 steps
    loss = R.loss("float32" if unstable else "float64")
    model = R.Classifier(R.mlp(), opt("adamw", 0.03, weight_decay=0.0), loss)
    return model, R.loader(R.digit_batches(seed, samples=80), seed)


def divergence_cnn_sgdm_ramp(seed: int, unstable: bool) -> Built:
    # seed 0: divergence at 366 (seed 1: 373); control (the ramp held at ×20, 0.2): none in
    # 1,500 steps
    schedule = ramp(1.015) if unstable else ramp(1.015, cap=20)
    model = R.Classifier(R.CNN(), opt("sgd", 0.01, schedule, momentum=0.9), R.loss())
    return model, R.loader(R.digit_batches(seed, batch=128), seed)


def attention_block_adam(seed: int, unstable: bool) -> Built:
    # seed 0, bf16-mixed: attention blow-up at 110; control (qk-layernorm): none in 1,500 steps
    model = R.AttentionLM(**COPY, configure=opt("adam", 0.1), loss=R.loss(), qk_norm=not unstable)
    return model, R.loader(R.copy_batches(16, 8, 64), seed)


def spike_mlp_gd(seed: int, unstable: bool) -> Built:
    # seed 0: spike at 1,237 (lr 0.25); control (lr 0.05): none in 3,000
    lr = 0.25 if unstable else 0.05
    model = R.Classifier(R.mlp(), opt("sgd", lr), R.loss())
    return model, R.loader(R.digit_batches(seed, samples=512, noisy=0.3), seed)


def attention_gpt2_adam(seed: int, unstable: bool) -> Built:
    # seed 0: attention blow-up at 530 (seed 1: 510); control (lr 0.01): none in 3,000 steps
    lr = 0.05 if unstable else 0.01
    model = R.GPT(**COPY, configure=opt("adam", lr), loss=R.loss())
    return model, R.loader(R.copy_batches(16, 8, 64), seed)


def collapse_cnn_adam_cosine(seed: int, unstable: bool) -> Built:
    # seed 0: collapse at 9,920; control (StableMax): none in 12,000 steps
    schedule = R.Schedule("cosine", steps=100, total=30000)
    loss = R.loss("float32" if unstable else "stablemax")
    model = R.Classifier(R.CNN(), opt("adam", 0.004, schedule), loss)
    return model, R.loader(R.digit_batches(seed, samples=256), seed)


def divergence_mlp_sgd_ramp(seed: int, unstable: bool) -> Built:
    # seed 0: divergence at 5,960; control (the ramp held at ×30, 0.3): none in 12,000 steps
    schedule = ramp(1.0008) if unstable else ramp(1.0008, cap=30)
    model = R.Classifier(R.mlp(), opt("sgd", 0.01, schedule), R.loss())
    return model, R.loader(R.digit_batches(seed, batch=128, noisy=0.3), seed)


def spike_mlp_gd_ramp(seed: int, unstable: bool) -> Built:
    # seed 0: spike at 7,069 (seed 1: 6,825); control (the ramp held at ×3, 0.03): none in
    # 12,000 steps. (At constant rates the spike's step jumps with the seed: 0.05 gave 4,894,
    # 0.048 none in 12,000 with seed 0 and 4,925 with seed 1.)
    schedule = ramp(1.0003) if unstable else ramp(1.0003, cap=3)
    model = R.Classifier(R.mlp(), opt("sgd", 0.01, schedule), R.loss())
    return model, R.loader(R.digit_batches(seed, samples=512, noisy=0.3), seed)


# ------------------------------------------------------------------------------ record half


def attention_block_adamw(seed: int, unstable: bool) -> Built:
    # seed 0: attention blow-up at 130 (seed 1: 110); control (qk-layernorm): none in 1,500 steps
    configure = opt("adamw", 0.1, weight_decay=0.0)
    model = R.AttentionLM(**COPY, configure=configure, loss=R.loss(), qk_norm=not unstable)
    return model, R.loader(R.copy_batches(16, 8, 64), seed)


def spike_cnn_sgd_ramp(seed: int, unstable: bool) -> Built:
    # seed 0: spike at 398 (seed 1: 332); control (the ramp held at ×3, 0.03): none in 1,500
    schedule = ramp(1.012) if unstable else ramp(1.012, cap=3)
    model = R.Classifier(R.CNN(), opt("sgd", 0.01, schedule), R.loss())
    return model, R.loader(R.digit_batches(seed, samples=512, noisy=0.3), seed)


def divergence_mlp_gd_warmup(seed: int, unstable: bool) -> Built:
    # seed 0: divergence at 121 (seed 1: 125); control (peak 0.5): none in 1,500 steps
    lr = 5.0 if unstable else 0.5
    model = R.Classifier(R.mlp(), opt("sgd", lr, R.Schedule("warmup", steps=400)), R.loss())
    return model, R.loader(R.digit_batches(seed, samples=512), seed)


def collapse_cnn_adam_bf16(seed: int, unstable: bool) -> Built:
    # seed 0, bf16-mixed: collapse at 1,590 (seed 1: 1,790); control (StableMax): none in 5,000
    # steps. (In float32 at rates 1e-3 to 1e-2 it did not collapse within 5,000 steps.)
    loss = R.loss("float32" if unstable else "stablemax")
    model = R.Classifier(R.CNN(), opt("adam", 1e-4), loss)
    return model, R.loader(R.digit_batches(seed, samples=256), seed)


def attention_gpt2_adam_warmup(seed: int, unstable: bool) -> Built:
    # seed 0: attention blow-up at 520 (seed 1: none within 3,000 steps); control (peak 0.01):
    # none in 3,000. (A warm-up over 1,000 steps gave 320 and 300; over 4,000, none.)
    schedule = R.Schedule("warmup", steps=2000)
    lr = 0.3 if unstable else 0.01
    model = R.GPT(**COPY, configure=opt("adam", lr, schedule), loss=R.loss())
    return model, R.loader(R.copy_batches(16, 8, 64), seed)


def spike_gpt2_adam_ramp(seed: int, unstable: bool) -> Built:
    # seed 0: spike at 1,282 (seed 1: 1,389); control (the ramp held at ×10, 0.01): none in
    # 3,000. (At a constant 0.03 the spike came at 266 with seed 0 and not at all with seed 1.)
    schedule = ramp(1.01) if unstable else ramp(1.01, cap=10)
    model = R.GPT(**COPY, configure=opt("adam", 1e-3, schedule), loss=R.loss())
    return model, R.loader(R.copy_batches(16, 8, 64), seed)


def divergence_tanh_mse_gd_ramp(seed: int, unstable: bool) -> Built:
    # seed 0: divergence at 1,409 (seed 1: 1,411); control (the ramp held at ×10, 0.1): none in
    # 5,000 steps
    schedule = ramp(1.003) if unstable else ramp(1.003, cap=10)
    model = R.Regressor(R.tanh_mlp(), opt("sgd", 0.01, schedule))
    return model, R.loader(R.regression_batches(seed), seed)


def divergence_gpt2_adamw_ramp(seed: int, unstable: bool) -> Built:
    # seed 0: divergence at 7,963 (seed 1: 8,042); control (the ramp held at ×5, 5e-3): none
    # in 10,000 steps
    schedule = ramp(1.0004) if unstable else ramp(1.0004, cap=5)
    model = R.GPT(16, 16, configure=opt("adamw", 1e-3, schedule), loss=R.loss())
    return model, R.loader(R.markov_batches(seed, 16, 16, 32), seed)


def collapse_mlp_sgdm_bf16(seed: int, unstable: bool) -> Built:
    # seed 0, bf16-mixed: collapse at 5,720 (seed 1: 6,590); control (32-true): none in 12,000
    model = R.Classifier(R.mlp(), opt("sgd", 0.0015, momentum=0.9), R.loss())
    return model, R.loader(R.digit_batches(seed, samples=256), seed)


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # dev: early
    S("collapse-mlp-adamw", "collapse", "early", "MLP", "AdamW", "constant", "32-true", 1500,
      "dev", collapse_mlp_adamw, "the loss in float64", options=LOGITS),
    S("divergence-cnn-sgdm-ramp", "divergence", "early", "CNN-BN", "SGD+momentum",
      "geometric ramp", "32-true", 1500, "dev", divergence_cnn_sgdm_ramp,
      "the ramp held at a stable peak"),
    S("attention-block-adam-bf16", "attention", "early", "attention block", "Adam", "constant",
      "bf16-mixed", 1500, "dev", attention_block_adam, "qk-layernorm"),
    # dev: mid
    S("spike-mlp-gd", "spike", "mid", "MLP", "SGD (full batch)", "constant", "32-true", 3000,
      "dev", spike_mlp_gd, "a lower rate"),
    S("attention-gpt2-adam", "attention", "mid", "GPT-2", "Adam", "constant", "32-true", 3000,
      "dev", attention_gpt2_adam, "a lower rate"),
    # dev: late
    S("collapse-cnn-adam-cosine", "collapse", "late", "CNN-BN", "Adam", "cosine", "32-true",
      12000, "dev", collapse_cnn_adam_cosine, "StableMax", options=LOGITS),
    S("divergence-mlp-sgd-ramp", "divergence", "late", "MLP", "SGD", "geometric ramp",
      "32-true", 12000, "dev", divergence_mlp_sgd_ramp, "the ramp held at a stable peak"),
    S("spike-mlp-gd-ramp", "spike", "late", "MLP", "SGD (full batch)", "geometric ramp",
      "32-true", 12000, "dev", spike_mlp_gd_ramp, "the ramp held at a stable peak"),
    # record: early
    S("attention-block-adamw", "attention", "early", "attention block", "AdamW", "constant",
      "32-true", 1500, "record", attention_block_adamw, "qk-layernorm"),
    S("spike-cnn-sgd-ramp", "spike", "early", "CNN-BN", "SGD (full batch)", "geometric ramp",
      "32-true", 1500, "record", spike_cnn_sgd_ramp, "the ramp held at a stable peak"),
    S("divergence-mlp-gd-warmup", "divergence", "early", "MLP", "SGD (full batch)",
      "linear warm-up", "32-true", 1500, "record", divergence_mlp_gd_warmup, "a stable peak"),
    # record: mid
    S("collapse-cnn-adam-bf16", "collapse", "mid", "CNN-BN", "Adam", "constant", "bf16-mixed",
      5000, "record", collapse_cnn_adam_bf16, "StableMax", options=LOGITS),
    S("attention-gpt2-adam-warmup", "attention", "mid", "GPT-2", "Adam", "linear warm-up",
      "32-true", 3000, "record", attention_gpt2_adam_warmup, "a lower peak"),
    S("spike-gpt2-adam-ramp", "spike", "mid", "GPT-2", "Adam", "geometric ramp", "32-true",
      3000, "record", spike_gpt2_adam_ramp, "the ramp held at a stable peak"),
    S("divergence-tanh-mse-gd-ramp", "divergence", "mid", "tanh MLP (MSE)",
      "SGD (full batch)", "geometric ramp", "32-true", 5000, "record",
      divergence_tanh_mse_gd_ramp, "the ramp held at a stable peak"),
    # record: late
    S("divergence-gpt2-adamw-ramp", "divergence", "late", "GPT-2", "AdamW", "geometric ramp",
      "32-true", 10000, "record", divergence_gpt2_adamw_ramp, "the ramp held at a stable peak"),
    S("collapse-mlp-sgdm-bf16", "collapse", "late", "MLP", "SGD+momentum", "constant",
      "bf16-mixed", 12000, "record", collapse_mlp_sgdm_bf16, "float32 (32-true)",
      control_precision="32-true", options=LOGITS),
)  # fmt: skip
