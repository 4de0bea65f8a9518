"""Micro-batched products on the models people train: a GPT-2 and a Llama (grouped-query
attention) from ``transformers`` configs, in the LightningModule a user writes, through the
monitor's replay. Micro-batch by micro-batch, the products equal the whole batch's to float32
rounding."""

from __future__ import annotations

import pytest
import torch

from dynlens.callbacks.microbatch import micro_batched
from dynlens.callbacks.replay import replay
from dynlens.curvature import HessianOperator

from .models import Wrapped, gpt2, llama

pytest.importorskip("transformers")


def _batch(samples: int = 6, seq: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (samples, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}  # the model shifts the labels inside its loss


@pytest.mark.parametrize("build", [lambda: gpt2("sdpa"), lambda: llama("eager")])
def test_micro_batched_products_equal_the_whole_batch_on_transformers(build):
    torch.manual_seed(0)
    # float32 (Hugging Face computes its loss in float32 whatever the model's dtype); no dropout
    module = Wrapped(build()).eval()
    params, loss_on, prepare = replay(module, 0)
    batch = prepare(_batch())
    split, why = micro_batched(module, batch, params, loss_on)
    assert why is None and split is not None and split.exact and split.samples == 6
    n = sum(p.numel() for p in params.values())
    v = torch.randn(2, n, generator=torch.Generator().manual_seed(1))
    whole = HessianOperator(lambda p: loss_on(p, batch), params) @ v
    for size in (1, 4):
        chunked = HessianOperator(split, params, samples_per_chunk=size) @ v
        # float32 sums in another order: 3e-7 measured, as far as two routes differ (2e-7)
        error = (chunked - whole).norm(dim=1) / whole.norm(dim=1)
        assert error.max() < 2e-6, error
