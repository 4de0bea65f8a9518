"""ContinualEvaluation over a user's DataLoader leaves the global RNG streams alone."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import dynlens
from tests.helpers import trainer


def test_evaluating_a_dataloader_draws_nothing_from_the_global_rng():
    import pytorch_lightning as pl

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.layer(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    samples = list(zip(x, y, strict=True))  # a list: evaluated through a DataLoader, not tensors

    def rng_after(callbacks):
        torch.manual_seed(0)
        trainer(max_steps=3, logger=False, callbacks=callbacks).fit(
            Model(), DataLoader(TensorDataset(x, y), batch_size=4)
        )
        return torch.random.get_rng_state()

    monitor = dynlens.ContinualEvaluation(
        {0: DataLoader(samples, batch_size=4)}, subset_size=None, verbose=False
    )
    assert torch.equal(rng_after([monitor]), rng_after([]))
    assert monitor.metrics.summary()["acc"] is not None  # it did evaluate
