"""Every dynlens monitor on a Hugging Face GPT-2, with nothing named by hand.

A small GPT-2 (``GPT2LMHeadModel`` from a config: 2 layers, d_model 64, 4 heads, vocabulary 64;
no weights are downloaded) learns generated sequences — arithmetic progressions
``a, a + s, a + 2s, ... (mod 64)`` with a random start ``a`` and stride ``s`` in 1..4 — with
AdamW. The LightningModule is the one a user writes: ``training_step`` returns ``out.loss``.

* ``SoftmaxCollapseMonitor`` and ``LogitGrowthMonitor`` find the logits themselves (the
  ``ModelOutput`` of ``model``, said once at the first measured step), and the collapse monitor
  scores them against the labels shifted by one position, as GPT-2's own loss does;
* ``LogitGrowthMonitor`` measures the attention logits of every layer, whether the model calls
  ``F.scaled_dot_product_attention`` (``--attention sdpa``) or computes
  ``softmax(q·kᵀ/√d + mask)`` by hand (``--attention eager``);
* ``HessianMonitor`` measures the trace and top eigenvalue within its default 5% budget;
* ``ContinualEvaluation`` and ``GrokkingMonitor`` need what the run does not expose by itself:
  an evaluation set and how to score it, and the accuracies ``training_step`` logs.

    python examples/hf_causal_lm.py                      # about a minute on a CPU
    python examples/hf_causal_lm.py --attention eager --max-steps 100
    tensorboard --logdir runs/examples                   # Custom Scalars: one panel a monitor
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import dynlens

VOCAB, LENGTH = 64, 16


def progressions(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences ``a + s·t (mod VOCAB)``, t = 0..LENGTH-1, as Hugging Face batches: the
    labels are the input ids (the model shifts them itself)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    ids = (start + stride * torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy of the predictions at positions 1.. (the first token cannot be predicted)."""
    return (logits[:, 1:-1].argmax(-1) == labels[:, 2:]).float().mean()


class CausalLM(pl.LightningModule):
    def __init__(self, attention: str = "sdpa", lr: float = 3e-3) -> None:
        super().__init__()
        config = GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=LENGTH,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        config._attn_implementation = attention
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.log("train_acc", next_token_accuracy(out.logits, batch["labels"]))
        return out.loss

    def validation_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"]).logits
        self.log("val_acc", next_token_accuracy(logits, batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95))


def score(module: CausalLM, batch: dict, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How ContinualEvaluation runs the model on one batch: next-token logits and targets."""
    logits = module.model(input_ids=batch["input_ids"]).logits
    return logits[:, 1:-1].flatten(0, 1), batch["labels"][:, 2:].flatten()


def main(
    max_steps: int = 300, attention: str = "sdpa", logdir: str = "runs/examples"
) -> list[dynlens.Monitor]:
    pl.seed_everything(0)
    train, val = progressions(2048, seed=0), progressions(256, seed=1)
    monitors = [
        dynlens.SoftmaxCollapseMonitor(),
        dynlens.LogitGrowthMonitor(),
        dynlens.HessianMonitor(),
        dynlens.ContinualEvaluation(
            {0: DataLoader(val, batch_size=128)},
            forward_fn=score,
            every_n_steps=10,
            subset_size=128,
        ),
        dynlens.GrokkingMonitor(),
    ]
    logger = TensorBoardLogger(logdir, name=f"hf_causal_lm_{attention}")
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=logger,
        callbacks=monitors,
        val_check_interval=50,
        check_val_every_n_epoch=None,
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    trainer.fit(
        CausalLM(attention),
        DataLoader(train, batch_size=32, shuffle=True),
        DataLoader(val, batch_size=256),
    )
    logits = monitors[1]
    print(f"attention layers measured: {', '.join(logits.layers)}")
    print(f"TensorBoard logs in {logger.log_dir}: tensorboard --logdir {logdir}")
    return monitors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--logdir", default="runs/examples")
    args = parser.parse_args()
    main(args.max_steps, args.attention, args.logdir)
