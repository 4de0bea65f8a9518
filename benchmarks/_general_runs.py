"""Models, data and learning-rate schedules of the general early-warning suite
(``benchmarks/early_warning_general.py``).

Three architectures of different kinds, each a LightningModule whose ``training_step`` returns
``{"loss", "logits"}`` (the logits of the scored positions only, rows × classes):

* :func:`mlp` and :class:`CNN` (two convolutions with BatchNorm) in a :class:`Classifier`, on
  scikit-learn's 8×8 digits (flat, or as 1×8×8 images) or a memorised subset of them;
* :class:`GPT` — a two-layer GPT-2 built from a ``transformers`` config (no download), on
  generated token sequences;
* :class:`AttentionLM` — a causal Transformer block written here, with or without LayerNorm
  on queries and keys (qk-layernorm), on the same sequences.

The data are endless streams of batches (:class:`Batches`), so that a run is one long epoch.
The learning rate follows a :class:`Schedule` (a multiplier of the base rate by global step,
through ``LambdaLR`` stepped every step, which the monitor reads ahead).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import dynlens

# ------------------------------------------------------------------------------ schedules


@dataclass(frozen=True)
class Schedule:
    """The learning rate's multiplier at each global step ``t`` (the rate after ``t`` steps).

    * ``constant``: 1;
    * ``warmup``: a linear warm-up over ``steps`` steps, then 1;
    * ``geometric``: a ramp ``growth**t`` (η(t) = η0·g^t), held at ``cap`` once it gets there;
    * ``cosine``: a linear warm-up over ``steps`` steps, then a cosine from 1 down to 0 at step
      ``total``.
    """

    kind: Literal["constant", "warmup", "geometric", "cosine"] = "constant"
    steps: int = 0
    growth: float = 1.0
    cap: float = math.inf
    total: int = 0

    def factor(self, t: int) -> float:
        if self.kind == "warmup":
            return min(1.0, (t + 1) / self.steps)
        if self.kind == "geometric":
            return min(self.cap, math.exp(t * math.log(self.growth)))
        if self.kind == "cosine":
            if t < self.steps:
                return (t + 1) / self.steps
            done = min(1.0, (t - self.steps) / max(self.total - self.steps, 1))
            return 0.5 * (1.0 + math.cos(math.pi * done))
        return 1.0

    def describe(self) -> str:
        if self.kind == "warmup":
            return f"linear warm-up over {self.steps}"
        if self.kind == "geometric":
            cap = "" if math.isinf(self.cap) else f", capped at ×{self.cap:g}"
            return f"geometric ramp ×{self.growth:g}/step{cap}"
        if self.kind == "cosine":
            return f"warm-up {self.steps}, cosine to 0 at {self.total}"
        return "constant"


def optimizers(
    name: str, lr: float, schedule: Schedule, **options: float
) -> Callable[[nn.Module], dict]:
    """``configure_optimizers`` for ``name`` (``sgd``, ``adam``, ``adamw``) at base rate ``lr``
    under ``schedule``: the optimizer and its step-interval ``LambdaLR``."""
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]

    def configure(module: nn.Module) -> dict:
        optimizer = cls(module.parameters(), lr=lr, **options)
        lam = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lam, "interval": "step"}}

    return configure


# ------------------------------------------------------------------------------ data


class Batches(IterableDataset):
    """An endless stream of batches from ``make(generator)``, seeded (one long epoch)."""

    def __init__(self, make: Callable[[torch.Generator], tuple], seed: int) -> None:
        super().__init__()
        self.make, self.seed = make, seed

    def __iter__(self) -> Iterator[tuple]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.make(generator)


def loader(make: Callable[[torch.Generator], tuple], seed: int) -> DataLoader:
    return DataLoader(Batches(make, seed), batch_size=None)


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def digit_batches(
    seed: int, *, samples: int | None = None, batch: int | None = None, noisy: float = 0.0
) -> Callable[[torch.Generator], tuple]:
    """Batches of the digits: the first ``samples`` of a seeded permutation (all by default),
    a share ``noisy`` of their labels drawn at random; the whole set every step (``batch``
    None) or random batches of ``batch``."""
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x), generator=g)[: samples or len(x)]
    x, y = x[index], y[index]
    if noisy:
        shuffled = torch.rand(len(y), generator=g) < noisy
        y = torch.where(shuffled, torch.randint(0, 10, y.shape, generator=g), y)
    if batch is None:
        return lambda generator: (x, y)
    return lambda generator: _pick(x, y, batch, generator)


def _pick(x: torch.Tensor, y: torch.Tensor, batch: int, g: torch.Generator) -> tuple:
    index = torch.randint(0, len(x), (batch,), generator=g)
    return x[index], y[index]


def copy_batches(vocab: int, half: int, batch: int) -> Callable[[torch.Generator], tuple]:
    """Sequences of ``half`` random tokens followed by the same tokens again: only the second
    half can be predicted (an induction task: attend to the token one period back and copy its
    successor); the first half's targets are ignored (-100)."""

    def make(g: torch.Generator) -> tuple:
        first = torch.randint(0, vocab, (batch, half), generator=g)
        x = torch.cat([first, first], dim=1)
        y = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], dim=1)
        y[:, : half - 1] = -100
        return x, y

    return make


def memorised_sequences(
    seed: int, count: int, vocab: int, length: int
) -> Callable[[torch.Generator], tuple]:
    """``count`` fixed random sequences (distinct first tokens, so that every next token is
    determined by what came before), the whole set every step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (count, length), generator=g)
    x[:, 0] = torch.randperm(vocab, generator=g)[:count]
    y = torch.cat([x[:, 1:], torch.full((count, 1), -100)], dim=1)
    return lambda generator: (x, y)


def markov_batches(
    seed: int, vocab: int, length: int, batch: int, temperature: float = 0.5
) -> Callable[[torch.Generator], tuple]:
    """Sequences from a seeded random first-order Markov chain (transition logits N(0, 1) over
    ``temperature``): a loss that cannot fall below the chain's entropy."""
    g = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(torch.randn(vocab, vocab, generator=g) / temperature, dim=-1)

    def make(gen: torch.Generator) -> tuple:
        x = torch.empty(batch, length, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, length):
            x[:, t] = torch.multinomial(transitions[x[:, t - 1]], 1, generator=gen).squeeze(1)
        y = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], dim=1)
        return x, y

    return make


# ------------------------------------------------------------------------------ models


def mlp(width: int = 64, depth: int = 2, inputs: int = 64, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


class CNN(nn.Module):
    """Two 3×3 convolutions with BatchNorm on 1×8×8 images, then a linear head."""

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1, stride=2),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * channels * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class Classifier(pl.LightningModule):
    """A network on (inputs, class) batches with a :class:`dynlens.CrossEntropyLoss`."""

    def __init__(
        self, net: nn.Module, configure: Callable[[nn.Module], dict], loss: nn.Module
    ) -> None:
        super().__init__()
        self.net, self.configure, self.loss_fn = net, configure, loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        return {"loss": self.loss_fn(logits, y), "logits": logits.detach()}

    def configure_optimizers(self):
        return self.configure(self)


class Regressor(pl.LightningModule):
    """A network on (inputs, target) batches with the mean squared error (no logits: its
    signals are the loss and the update ratio)."""

    def __init__(self, net: nn.Module, configure: Callable[[nn.Module], dict]) -> None:
        super().__init__()
        self.net, self.configure = net, configure

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self):
        return self.configure(self)


def tanh_mlp(width: int = 64, inputs: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, 1))


def regression_batches(seed: int, samples: int = 512) -> Callable[[torch.Generator], tuple]:
    """The first ``samples`` digits (a seeded permutation) with a seeded target: a random tanh
    unit of the pixels plus noise (standard deviation 0.1); the whole set every step."""
    x, _ = digits()
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=g)[:samples]]
    w = torch.randn(x.shape[1], generator=g) / 4
    y = torch.tanh(x @ w) + 0.1 * torch.randn(len(x), generator=g)
    return lambda generator: (x, y)


class _SequenceModel(pl.LightningModule):
    """Next-token prediction on (tokens, targets) batches, targets -100 where not scored."""

    loss_fn: nn.Module
    configure: Callable[[nn.Module], dict]

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        x, y = batch
        scored = y != -100
        logits = self.logits_of(x)[scored]
        return {"loss": self.loss_fn(logits, y[scored]), "logits": logits.detach()}

    def configure_optimizers(self):
        return self.configure(self)


class GPT(_SequenceModel):
    """``GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, ...))``, dropout off, the
    loss computed here (so that its precision and activation can be chosen)."""

    def __init__(
        self, vocab: int, positions: int, configure: Callable[[nn.Module], dict], loss: nn.Module
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=vocab,
            n_positions=positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.model = GPT2LMHeadModel(config)
        self.configure, self.loss_fn = configure, loss

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


class AttentionLM(_SequenceModel):
    """A causal Transformer block: the embeddings straight into attention (no LayerNorm before
    it, so nothing bounds the attention logits but the weights; by
    ``scaled_dot_product_attention``), then a pre-LayerNorm MLP; with LayerNorm on queries and
    keys per head if ``qk_norm``."""

    def __init__(
        self,
        vocab: int,
        positions: int,
        configure: Callable[[nn.Module], dict],
        loss: nn.Module,
        qk_norm: bool = False,
        d: int = 32,
        heads: int = 2,
    ) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(positions, d)
        self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab)
        norm = (lambda: nn.LayerNorm(d // heads)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.heads = heads
        self.configure, self.loss_fn = configure, loss

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).flatten(-2))
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln_f(h))


def loss(kind: Literal["float32", "float64", "stablemax"] = "float32") -> nn.Module:
    """The loss of a run: ``dynlens.CrossEntropyLoss`` in the logits' precision, in float64, or
    with StableMax."""
    if kind == "float64":
        return dynlens.CrossEntropyLoss(dtype=torch.float64)
    if kind == "stablemax":
        return dynlens.CrossEntropyLoss(activation="stablemax")
    return dynlens.CrossEntropyLoss()


def modular_batches(
    seed: int, p: int = 23, share: float = 0.4
) -> Callable[[torch.Generator], tuple]:
    """Modular addition: the pairs (a, b) of residues mod ``p`` as two concatenated one-hot
    vectors, labelled (a + b) mod ``p``; a seeded ``share`` of the p² pairs, the whole set
    every step."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    index = torch.randperm(p * p, generator=g)[: int(share * p * p)]
    a, b = a[index], b[index]
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
    y = (a + b) % p
    return lambda generator: (x, y)
