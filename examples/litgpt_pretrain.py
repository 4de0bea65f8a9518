"""Every dynlens monitor on a LitGPT model pretrained from a config, with nothing named by hand.

A small LitGPT ``GPT`` (a Llama-shaped ``Config``: 2 layers, d_model 64, 4 query heads sharing 2
key/value heads, RMSNorm, vocabulary 64; no weights are downloaded) learns generated sequences —
arithmetic progressions ``a, a + s, a + 2s, ... (mod 64)`` with a random start ``a`` and stride
``s`` in 1..4 — with AdamW. The step is LitGPT's pretraining step: a ``(B, T + 1)`` batch of
tokens, the model reads its first T, ``chunked_cross_entropy`` scores them against its last T.

* ``SoftmaxCollapseMonitor``, ``LogitGrowthMonitor`` and ``EarlyWarningMonitor`` find the logits
  by what they do (the model's output is the tensor whose cross-entropy reproduces the returned
  loss) and the targets' alignment the same way (the batch shifted by one position), each said
  once at the first measured step; ``--chunk 4`` has the head return its logits in chunks of 4
  positions (LitGPT's ``lm_head_chunk_size``), and every chunk is measured;
* ``LogitGrowthMonitor`` measures the attention logits of every layer (grouped-query SDPA);
* ``HessianMonitor`` measures the trace and top eigenvalue within its default 5% budget;
* ``ContinualEvaluation`` and ``GrokkingMonitor`` need an evaluation set and how to score it, and
  the accuracies ``training_step`` logs.

Needs ``litgpt`` (``pip install litgpt``; the ``dev`` extra has it).

    python examples/litgpt_pretrain.py                   # about a minute on a CPU
    python examples/litgpt_pretrain.py --chunk 4 --max-steps 100
    tensorboard --logdir runs/examples                   # Custom Scalars: one panel a monitor
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from litgpt import GPT, Config
from litgpt.utils import chunked_cross_entropy
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

import dynlens

VOCAB, LENGTH = 64, 16


def progressions(n: int, seed: int) -> torch.Tensor:
    """``n`` sequences ``a + s·t (mod VOCAB)``, t = 0..LENGTH, one more token than the model
    reads (the last is only a target)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    return (start + stride * torch.arange(LENGTH + 1)) % VOCAB


def config() -> Config:
    return Config(
        block_size=LENGTH, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=2, n_head=4,
        n_query_groups=2, n_embd=64, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
        intermediate_size=128, bias=False, parallel_residual=False, rotary_percentage=1.0,
    )  # fmt: skip


def logits_of(model: GPT, tokens: torch.Tensor, chunk: int = 0) -> list[torch.Tensor]:
    out = model(tokens, lm_head_chunk_size=chunk)
    return out if isinstance(out, list) else [out]


def next_token_accuracy(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Accuracy from position 1 on (the first token's successor cannot be told from it)."""
    predicted = torch.cat([x.argmax(-1) for x in logits], dim=1)
    return (predicted[:, 1:] == targets[:, 1:]).float().mean()


class Pretrain(pl.LightningModule):
    def __init__(self, chunk: int = 0, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = GPT(config())
        self.chunk, self.lr = chunk, lr

    def training_step(self, batch, batch_idx):
        logits = self.model(batch[:, :-1], lm_head_chunk_size=self.chunk)
        loss = chunked_cross_entropy(logits, batch[:, 1:])
        chunks = logits if isinstance(logits, list) else [logits]
        self.log("train_acc", next_token_accuracy(chunks, batch[:, 1:]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", next_token_accuracy(logits_of(self.model, batch[:, :-1]), batch[:, 1:]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95))


def score(module: Pretrain, batch: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How ContinualEvaluation runs the model on one batch: next-token logits and targets."""
    (logits,) = logits_of(module.model, batch[:, :-1])
    return logits[:, 1:].flatten(0, 1), batch[:, 2:].flatten()


def main(
    max_steps: int = 300, chunk: int = 0, logdir: str = "runs/examples"
) -> list[dynlens.Monitor]:
    pl.seed_everything(0)
    train, val = progressions(2048, seed=0), progressions(256, seed=1)
    monitors = [
        dynlens.SoftmaxCollapseMonitor(),
        dynlens.LogitGrowthMonitor(),
        dynlens.HessianMonitor(),
        dynlens.EarlyWarningMonitor(),
        dynlens.ContinualEvaluation(
            {0: DataLoader(val, batch_size=128)},
            forward_fn=score,
            every_n_steps=10,
            subset_size=128,
        ),
        dynlens.GrokkingMonitor(),
    ]
    logger = TensorBoardLogger(logdir, name=f"litgpt_pretrain_chunk{chunk}")
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
        Pretrain(chunk),
        DataLoader(list(train), batch_size=32, shuffle=True),
        DataLoader(list(val), batch_size=256),
    )
    print(f"attention layers measured: {', '.join(monitors[1].layers)}")
    print(f"TensorBoard logs in {logger.log_dir}: tensorboard --logdir {logdir}")
    return monitors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=0, help="LitGPT's lm_head_chunk_size")
    parser.add_argument("--logdir", default="runs/examples")
    args = parser.parse_args()
    main(args.max_steps, args.chunk, args.logdir)
