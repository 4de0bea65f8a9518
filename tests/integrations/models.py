"""Real architectures built from tiny configs (no weights, no downloads), wrapped the way users
wrap them in a LightningModule, with brute-force attention logits from each layer's own q and k.

Each :class:`Case` says how to build the model, one batch of its kind, how to run it for
``ContinualEvaluation``, and how to record the attention logits of its layers from their q and k
(forward hooks on the projections, which change nothing) so the monitor's values can be checked
against a dense computation in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, BATCH, SEQ = 64, 4, 8


class Wrapped(pl.LightningModule):
    """A Hugging Face model in a LightningModule, as users write it: ``training_step`` returns
    ``out.loss`` only, nothing is named for the monitors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _tokens(seed: int, n: int = 2 * BATCH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def lm_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    ids = _tokens(seed)
    return [{"input_ids": i, "labels": i} for i in ids]


def mlm_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """BERT-style: padded sequences (the attention mask drops the last keys of some samples),
    labels -100 everywhere but a few masked positions."""
    ids = _tokens(seed)
    samples = []
    for k, row in enumerate(ids):
        length = SEQ - (k % 3) * 2  # 8, 6, 4 real tokens
        mask = (torch.arange(SEQ) < length).long()
        labels = torch.full((SEQ,), -100)
        labels[1] = row[1]
        samples.append({"input_ids": row * mask, "attention_mask": mask, "labels": labels})
    return samples


def image_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * BATCH, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (2 * BATCH,), generator=g)
    return [{"pixel_values": x, "labels": y} for x, y in zip(images, labels, strict=True)]


def lm_forward(module, batch, task):
    """ContinualEvaluation on a causal LM: next-token accuracy."""
    logits = module.model(input_ids=batch["input_ids"]).logits
    return logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()


def mlm_forward(module, batch, task):
    out = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    keep = batch["labels"] != -100
    return out.logits[keep], batch["labels"][keep]


def image_forward(module, batch, task):
    return module.model(pixel_values=batch["pixel_values"]).logits, batch["labels"]


# ---------------------------------------------------------------------------------- builders
def gpt2(impl: str, dropout: float = 0.1) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    config._attn_implementation = impl
    return GPT2LMHeadModel(config)


def llama(impl: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
        attention_dropout=0.1,
    )  # fmt: skip
    config._attn_implementation = impl
    return LlamaForCausalLM(config)


def bert(impl: str) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=32,
    )  # fmt: skip
    config._attn_implementation = impl
    return BertForMaskedLM(config)


def resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=3,
    )  # fmt: skip
    return ResNetForImageClassification(config)


class DemoTransformer(pl.LightningModule):
    """Lightning's own demo Transformer (nn.Transformer, so nn.MultiheadAttention), small, on
    generated tokens instead of its WikiText-2 download."""

    def __init__(self) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=16, nlayers=1)

    def forward(self, inputs, target):
        return self.model(inputs, target)

    def training_step(self, batch, batch_idx):  # as LightningTransformer's
        inputs, target = batch
        output = self(inputs, target)
        return F.nll_loss(output, target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


def demo_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = _tokens(seed)
    return [(row[:-1], row[1:]) for row in ids]


def demo_forward(module, batch, task):
    inputs, target = batch
    return module(inputs, target), target.flatten()


# ------------------------------------------------------------------- brute-force attention
def dense_statistics(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    """Max and RMS of q·kᵀ/√d over the kept positions, in float64: (B, H, L, d), (B, H, S, d),
    keep broadcastable to (B, H, L, S)."""
    z = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = keep.expand_as(z)
    kept = z[keep]
    return kept.max().item(), kept.square().mean().sqrt().item()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def _causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


class Recorder:
    """Records, in the first gradient-recording forward, each attention layer's q and k through
    forward hooks on its projections; :meth:`statistics` gives ``{layer name: (max, rms)}``."""

    def __init__(self, module: pl.LightningModule, kind: str, batch: Any) -> None:
        self.kind, self.batch = kind, batch
        self.seen: dict[str, dict[str, Any]] = {}
        self.handles = []
        model = module.model
        layers = {
            "gpt2": ("transformer.h.{}.attn", ("c_attn",)),
            "llama": ("model.layers.{}.self_attn", ("q_proj", "k_proj")),
            "bert": ("bert.encoder.layer.{}.attention.self", ("query", "key")),
        }[kind]
        pattern, projections = layers
        for i in range(2):
            name = pattern.format(i)
            attn = model.get_submodule(name)
            record = self.seen.setdefault(f"model.{name}", {})
            for proj in projections:
                self.handles.append(
                    attn.get_submodule(proj).register_forward_hook(self._keep(record, proj))
                )
            if kind == "llama":  # RoPE: the cos/sin the layer is given
                self.handles.append(
                    attn.register_forward_pre_hook(self._keep_kwargs(record), with_kwargs=True)
                )

    @staticmethod
    def _keep(record: dict, key: str) -> Callable:
        def hook(module, args, output):
            if torch.is_grad_enabled() and key not in record:
                record[key] = output.detach().clone()

        return hook

    @staticmethod
    def _keep_kwargs(record: dict) -> Callable:
        def hook(module, args, kwargs):
            if torch.is_grad_enabled() and "rope" not in record:
                record["rope"] = tuple(t.detach().clone() for t in kwargs["position_embeddings"])

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def statistics(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name, record in self.seen.items():
            if self.kind == "gpt2":
                qkv = record["c_attn"]
                q, k, _ = qkv.split(qkv.shape[-1] // 3, dim=-1)
                q, k = _heads(q, 4), _heads(k, 4)
                keep = _causal(q.shape[-2])
            elif self.kind == "llama":
                from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

                q, k = _heads(record["q_proj"], 4), _heads(record["k_proj"], 2)
                q, k = apply_rotary_pos_emb(q, k, *record["rope"])
                k = k.repeat_interleave(2, dim=1)  # grouped-query attention: 2 query heads a key
                keep = _causal(q.shape[-2])
            else:
                q, k = _heads(record["query"], 4), _heads(record["key"], 4)
                keep = self.batch["attention_mask"].bool()[:, None, None, :]
            out[name] = dense_statistics(q, k, keep)
        return out


@dataclass
class Case:
    """One architecture as a user would train it."""

    name: str
    make: Callable[[], pl.LightningModule]
    batches: Callable[[int], list]
    forward_fn: Callable
    attention: str | None = None  # Recorder kind, or None (no brute force: no attention or MHA)
    causal_lm: bool = False
    found: str = "model"  # the module logits_module='auto' finds
    layers: list[str] = field(default_factory=list)


CASES = [
    Case("gpt2-sdpa", lambda: Wrapped(gpt2("sdpa")), lm_batches, lm_forward, "gpt2", True),
    Case("gpt2-eager", lambda: Wrapped(gpt2("eager")), lm_batches, lm_forward, "gpt2", True),
    Case("llama-sdpa", lambda: Wrapped(llama("sdpa")), lm_batches, lm_forward, "llama", True),
    Case("llama-eager", lambda: Wrapped(llama("eager")), lm_batches, lm_forward, "llama", True),
    Case("bert-sdpa", lambda: Wrapped(bert("sdpa")), mlm_batches, mlm_forward, "bert"),
    Case("bert-eager", lambda: Wrapped(bert("eager")), mlm_batches, mlm_forward, "bert"),
    Case("resnet", lambda: Wrapped(resnet()), image_batches, image_forward),
    Case("lightning-demo", DemoTransformer, demo_batches, demo_forward, found=""),
]
