"""Modular arithmetic, the standard grokking task (Power et al. 2022).

Every pair (a, b) with a, b in {0, …, p−1} is one example labelled (a ∘ b) mod p. A seeded random
split keeps ``train_fraction`` of the pairs for training and the rest for validation. The data is
generated, so nothing is downloaded.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from ..compat import LightningDataModule

Operation = Literal["+", "-", "*", "/"]
Encoding = Literal["onehot", "tokens"]


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(n**0.5) + 1))


def modular_table(p: int, op: Operation) -> tuple[torch.Tensor, torch.Tensor]:
    """All operand pairs ``(N, 2)`` (int64) and their labels ``(a op b) mod p`` (int64).

    Division is a · b⁻¹ mod p (b⁻¹ by Fermat's little theorem, so p must be prime) over b ≠ 0.

    >>> pairs, labels = modular_table(5, "/")
    >>> pairs.shape, int(labels[(pairs[:, 0] == 3) & (pairs[:, 1] == 2)])  # 3 / 2 = 3·3 = 4 mod 5
    (torch.Size([20, 2]), 4)
    """
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"Expected the modulus `p` to be an int ≥ 2, got {p!r}.")
    if op == "/" and not _is_prime(p):
        raise ValueError(f"Division mod p needs a prime `p` (every b ≠ 0 invertible); got p = {p}.")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    if op == "+":
        labels = (a + b) % p
    elif op == "-":
        labels = (a - b) % p
    elif op == "*":
        labels = (a * b) % p
    elif op == "/":
        keep = b != 0
        a, b = a[keep], b[keep]
        inverse = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])
        labels = (a * inverse[b]) % p
    else:
        raise ValueError(f"Expected `op` to be one of '+', '-', '*', '/', got {op!r}.")
    return torch.stack([a, b], dim=1), labels


def _loader(
    dataset: TensorDataset, batch_size: int, generator: torch.Generator | None
) -> DataLoader:
    # A batch sampler with batch_size=None makes the loader index the tensors once per batch
    # instead of collating single examples: a full batch of 5,000 rows costs one gather.
    base = RandomSampler(dataset, generator=generator) if generator else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(base, batch_size, False))


class ModularArithmetic(LightningDataModule):
    """LightningDataModule of ``(a op b) mod p``, full batch by default.

    Args:
        p: the modulus (113 in Nanda et al. 2023 and Prieto et al. 2025).
        op: one of ``"+"``, ``"-"``, ``"*"``, ``"/"`` (division needs a prime ``p``).
        train_fraction: share of all pairs used for training (0.4 → 5,107 of 12,769 for p = 113).
        encoding: ``"onehot"`` gives float inputs ``(N, 2p)``, the concatenated one-hot codes of
            a and b (the MLP input of Prieto et al. 2025); ``"tokens"`` gives int64 ``(N, 2)``.
        batch_size: training batch size; ``None`` (default) trains full batch. Mini-batches are
            shuffled with a generator seeded from ``seed``; full batches are not shuffled.
        val_batch_size: validation batch size; ``None`` evaluates the validation set in one batch.
        seed: seeds the train/validation split (and the mini-batch order).

    Example:

    >>> dm = ModularArithmetic(p=113, train_fraction=0.4)
    >>> dm.setup("fit")
    >>> len(dm.train_set), len(dm.val_set), dm.input_dim, dm.num_classes
    (5107, 7662, 226, 113)
    """

    def __init__(
        self,
        p: int = 113,
        op: Operation = "+",
        train_fraction: float = 0.4,
        encoding: Encoding = "onehot",
        batch_size: int | None = None,
        val_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"Expected `train_fraction` in (0, 1), got {train_fraction}.")
        if encoding not in ("onehot", "tokens"):
            raise ValueError(f"Expected `encoding` 'onehot' or 'tokens', got {encoding!r}.")
        for name, size in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(f"Expected `{name}` to be a positive int or None, got {size!r}.")
        pairs, labels = modular_table(p, op)  # validates p and op
        n_train = int(train_fraction * len(labels))
        if not 0 < n_train < len(labels):
            raise ValueError(
                f"`train_fraction`={train_fraction} leaves an empty split of {len(labels)} pairs."
            )
        self.p, self.op, self.train_fraction, self.encoding = p, op, train_fraction, encoding
        self.batch_size, self.val_batch_size, self.seed = batch_size, val_batch_size, seed
        self._pairs, self._labels, self._n_train = pairs, labels, n_train
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def num_classes(self) -> int:
        return self.p

    @property
    def input_dim(self) -> int:
        """Features per example: 2p for one-hot inputs, 2 tokens otherwise."""
        return 2 * self.p if self.encoding == "onehot" else 2

    def _features(self, pairs: torch.Tensor) -> torch.Tensor:
        if self.encoding == "tokens":
            return pairs
        onehot = torch.zeros(len(pairs), 2 * self.p)
        rows = torch.arange(len(pairs))
        onehot[rows, pairs[:, 0]] = 1.0
        onehot[rows, self.p + pairs[:, 1]] = 1.0
        return onehot

    def setup(self, stage: str | None = None) -> None:
        self._splits()

    def _splits(self) -> tuple[TensorDataset, TensorDataset]:
        """The training and validation sets, split on first use."""
        if self.train_set is None or self.val_set is None:
            order = torch.randperm(
                len(self._labels), generator=torch.Generator().manual_seed(self.seed)
            )
            train_idx, val_idx = order[: self._n_train], order[self._n_train :]
            self.train_set = TensorDataset(
                self._features(self._pairs[train_idx]), self._labels[train_idx]
            )
            self.val_set = TensorDataset(
                self._features(self._pairs[val_idx]), self._labels[val_idx]
            )
        return self.train_set, self.val_set

    def train_dataloader(self) -> DataLoader:
        train_set, _ = self._splits()
        if self.batch_size is None:
            return _loader(train_set, len(train_set), None)
        generator = torch.Generator().manual_seed(self.seed + 1)
        return _loader(train_set, self.batch_size, generator)

    def val_dataloader(self) -> DataLoader:
        _, val_set = self._splits()
        return _loader(val_set, self.val_batch_size or len(val_set), None)
