"""Training code in the shapes people write it, which names nothing for the monitors: a nanoGPT-
style GPT (``forward(idx, targets) -> (logits, loss)``, flash or hand-written attention), a model
that follows the Hugging Face convention without being a ``transformers`` class (returns a
``CausalLMOutput``, shifts its labels inside its loss), and LitGPT's ``GPT`` from a ``Config``
(pretraining on a ``(B, T + 1)`` batch; fine-tuning on ``labels == input_ids`` with its chunked
head and chunked cross-entropy), each in the ``LightningModule`` its users would write.

Every attention layer keeps the ``q``, ``k`` of its last call in float64 (``brute_force``): the
reference for the monitors' attention maxima.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, BATCH = 64, 8, 4


class SelfAttention(nn.Module):
    """nanoGPT's ``CausalSelfAttention``: one ``c_attn`` for q, k, v; SDPA (``flash``) or the
    hand-written ``softmax(q·kᵀ/√d + mask)``."""

    def __init__(self, n_embd: int, n_head: int, flash: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.flash = n_head, flash
        self.register_buffer("bias", torch.tril(torch.ones(SEQ, SEQ)).view(1, 1, SEQ, SEQ))
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if torch.is_grad_enabled():
            self.seen = (q.detach().double(), k.detach().double())
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, flash: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, flash)
        wide = 4 * n_embd
        self.mlp = nn.Sequential(nn.Linear(n_embd, wide), nn.GELU(), nn.Linear(wide, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's ``GPT``: ``forward(idx, targets=None) -> (logits, loss)``, weights tied, the
    loss ``cross_entropy(..., ignore_index=-1)`` on targets the data loader already shifted."""

    def __init__(self, flash: bool = True, n_layer: int = 2, n_embd: int = 32) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, n_embd), nn.Embedding(SEQ, n_embd)
        self.h = nn.ModuleList([Block(n_embd, 2, flash) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.lm_head(self.hidden(idx))
        loss = None
        if targets is not None:
            flat = logits.view(-1, logits.size(-1))
            loss = F.cross_entropy(flat, targets.view(-1), ignore_index=-1)
        return logits, loss


class NanoModule(pl.LightningModule):
    """As a nanoGPT user wraps it: ``(x, y)`` batches, ``y`` is ``x`` moved by one token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@dataclass
class CausalLMOutput:
    """The convention's output class, defined here: not a ``transformers`` class."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class ConventionLM(NanoGPT):
    """A causal LM that follows the Hugging Face convention: ``forward(input_ids, labels)``,
    labels equal to the inputs, shifted inside its loss; its own output class."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):  # type: ignore[override]
        logits = self.lm_head(self.hidden(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


class ConventionModule(NanoModule):
    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


def litgpt_config(name: str, **overrides: Any):
    """A tiny LitGPT ``Config`` of a family's shape (no download)."""
    from litgpt import Config

    llama: dict[str, Any] = dict(
        n_layer=2,
        n_head=4,
        n_query_groups=2,
        n_embd=32,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=64,
        bias=False,
        parallel_residual=False,
        rotary_percentage=1.0,
    )
    shapes: dict[str, dict[str, Any]] = {
        "pythia": dict(n_layer=2, n_head=4, n_embd=32, parallel_residual=True, bias=True),
        "llama-gqa": llama,
        "llama-mqa": {**llama, "n_query_groups": 1},
        # Gemma 2's soft caps, tanh(s / c) · c, on attention scores (c 0.5 here, so that raw
        # and capped scores differ at initialisation) and on the output logits
        "gemma-2": {
            **llama,
            "mlp_class_name": "GemmaMLP",
            "post_attention_norm": True,
            "post_mlp_norm": True,
            "attention_logit_softcapping": 0.5,
            "final_logit_softcapping": 30.0,
        },
    }
    return Config(
        block_size=SEQ + 1,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        **{**shapes[name], **overrides},
    )


class LitGPTPretrain(pl.LightningModule):
    """LitGPT's pretraining step: a ``(B, T + 1)`` batch, inputs its first T tokens, targets its
    last T, ``chunked_cross_entropy``."""

    def __init__(self, config) -> None:
        super().__init__()
        from litgpt import GPT

        self.model = GPT(config)

    def training_step(self, batch, batch_idx):
        from litgpt.utils import chunked_cross_entropy

        logits = self.model(batch[:, :-1])
        return chunked_cross_entropy(logits, batch[:, 1:])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class LitGPTFinetune(LitGPTPretrain):
    """LitGPT's fine-tuning step: a dict batch with ``labels`` equal to ``input_ids``, the head
    in chunks of 3 positions (a list of logits), the last position dropped, the labels shifted."""

    def training_step(self, batch, batch_idx):
        from litgpt.utils import chunked_cross_entropy

        logits = self.model(batch["input_ids"], lm_head_chunk_size=3)
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, batch["labels"][..., 1:])


def tokens(seed: int, n: int = 2 * BATCH, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@dataclass
class Client:
    """One client: its LightningModule, its batches, how the targets align with its logits
    (``key`` in the batch, shifted or not) and where the logits are read."""

    name: str
    make: Callable[[], pl.LightningModule]
    batches: Callable[[int], list]
    key: str | int | None
    shift: bool
    found: str  # the module the monitors should read the logits from


def _nano_batches(seed: int) -> list:
    ids = tokens(seed, length=SEQ + 1)
    return [(row[:-1], row[1:]) for row in ids]


def _convention_batches(seed: int) -> list:
    return [{"input_ids": row, "labels": row} for row in tokens(seed)]


def _pretrain_batches(seed: int) -> list:
    return list(tokens(seed, length=SEQ + 1))


CLIENTS = [
    Client("nanogpt-flash", lambda: NanoModule(NanoGPT()), _nano_batches, 1, False, "model"),
    Client(
        "nanogpt-manual", lambda: NanoModule(NanoGPT(flash=False)), _nano_batches, 1, False, "model"
    ),
    Client(
        "hf-convention",
        lambda: ConventionModule(ConventionLM()),
        _convention_batches,
        "labels",
        True,
        "model",
    ),
    Client(
        "litgpt-pythia",
        lambda: LitGPTPretrain(litgpt_config("pythia")),
        _pretrain_batches,
        None,
        True,
        "model",
    ),
    Client(
        "litgpt-llama-gqa-chunked",
        lambda: LitGPTFinetune(litgpt_config("llama-gqa")),
        _convention_batches,
        "labels",
        True,
        "model",
    ),
    Client(
        "litgpt-llama-mqa",
        lambda: LitGPTPretrain(litgpt_config("llama-mqa")),
        _pretrain_batches,
        None,
        True,
        "model",
    ),
]
