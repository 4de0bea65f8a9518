"""A batch-mean loss as the weighted sum of its micro-batches' losses.

The Hessian of L(θ) = (1/N) Σ_{j<N} ℓ_j(θ) is the weighted sum of the Hessians of its
micro-batches: with B_1, …, B_m a partition of the N samples and L_i the mean loss over B_i,

    L = Σ_i (|B_i| / N) · L_i,   so   H·v = Σ_i (|B_i| / N) · H_i·v

exactly, for every route. A product computed micro-batch by micro-batch holds the graph of one
micro-batch, not the batch's: m micro-batches cost about m× the launches, not m× the memory.
:class:`~dynlens.curvature.HessianOperator` chunks a :class:`MicroBatchLoss` where a memory
limit says the whole batch's products do not fit (or where ``samples_per_chunk`` says so).

The identity needs a loss that is the mean of per-sample losses with weights that do not depend
on θ. It fails for BatchNorm in training mode (its statistics couple the samples) and for a loss
normalised by a count that differs between micro-batches (e.g. the non-padding tokens of each);
the caller decides whether it holds (``HessianMonitor`` checks the value of the sum against the
batch's loss and refuses BatchNorm in training mode).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

#: The loss of the samples ``start:stop`` of the batch at the parameters given (their mean).
RowsLossFn = Callable[[dict[str, Tensor], int, int], Tensor]


class MicroBatchLoss:
    """The batch-mean loss of ``samples`` samples, evaluable on any contiguous run of them.

    Called with parameters it is the whole batch's loss (a ``loss_fn`` like any other);
    :meth:`chunks` gives the micro-batches and their weights |B_i| / N.

    Args:
        loss_of_rows: ``(params, start, stop) -> `` the mean loss over samples ``start:stop``.
        samples: N, the batch's samples.
        exact: False where the identity does not hold (:attr:`why_not` says why): the batch is
            then sliced only to meter the memory of its products (``HessianOperator`` plans the
            whole batch's from them), never to compute them.
        why_not: why the identity does not hold (with ``exact=False``).

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> loss = MicroBatchLoss(lambda p, a, b: (p["w"] * x[a:b]).square().mean() / 2, 3)
        >>> w = {"w": torch.tensor(1.0, dtype=torch.float64)}
        >>> [(weight, float(fn(w))) for weight, fn in loss.chunks(2)]
        [(0.6666666666666666, 1.25), (0.3333333333333333, 4.5)]
        >>> float(loss(w))  # = 2/3 · 1.25 + 1/3 · 4.5
        2.3333333333333335
    """

    def __init__(
        self, loss_of_rows: RowsLossFn, samples: int, *, exact: bool = True, why_not: str = ""
    ) -> None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"Expected `samples` to be a positive int, got {samples!r}")
        self.loss_of_rows = loss_of_rows
        self.samples = samples
        self.exact = exact
        self.why_not = why_not

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        return self.loss_of_rows(params, 0, self.samples)

    def piece(self, start: int, stop: int) -> Callable[[dict[str, Tensor]], Tensor]:
        """The mean loss over samples ``start:stop``, as a function of the parameters."""
        return lambda params: self.loss_of_rows(params, start, stop)

    def chunks(self, size: int) -> list[tuple[float, Callable[[dict[str, Tensor]], Tensor]]]:
        """The micro-batches of ``size`` samples (the last may be smaller) with their weights
        |B_i| / N, which sum to 1."""
        if size < 1:
            raise ValueError(f"Expected a positive number of samples per chunk, got {size}")
        n = self.samples
        return [
            ((min(start + size, n) - start) / n, self.piece(start, min(start + size, n)))
            for start in range(0, n, size)
        ]
