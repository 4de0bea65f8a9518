"""Alignment of the descent direction with naive loss minimisation (NLM): ``cos(-∇L, θ)``.

Prieto, Barsbey, Mediano & Birdal 2025, *Grokking at the Edge of Numerical Stability*
(arXiv:2501.04697), Section 5. For a positively homogeneous network, ``f(cθ) = c^L f(θ)``, once
the training set is classified the loss falls fastest by scaling the weights up: the *naive loss
minimisation* direction is ``θ`` itself. Following it only inflates the logits until softmax
collapses (:mod:`dynlens.collapse`); ⊥Grad (:class:`dynlens.OrthoGrad`) removes it. The alignment
is the cosine between the gradient-descent direction ``-g = -∇L`` and ``θ``, over all parameter
tensors flattened together::

    cos = -<g, θ> / (||g|| ||θ||)

+1 when a gradient step only scales the weights up, 0 for an orthogonal gradient and, by
convention, 0 when ``g`` or ``θ`` is 0.

* :func:`nlm_cosine` returns that cosine as a 0-dim tensor; :func:`nlm_cosine_per_tensor` one
  cosine per parameter tensor (the paper's per-layer view), shape ``(len(params),)``.
* :func:`nlm_sums` returns the sufficient statistics ``[<g, θ>, ||g||², ||θ||²]``, which add over
  disjoint shards of the parameters (sum them across ranks, FSDP) before
  :func:`nlm_cosine_from_sums` turns the total into the cosine.

Plain torch: sums are accumulated in float32 (float64 when any tensor is) and nothing
synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "nlm_cosine",
    "nlm_cosine_from_sums",
    "nlm_cosine_per_tensor",
    "nlm_cosines",
    "nlm_sums",
]


def _checked(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """The gradients, once each is known to be set and shaped like its parameter."""
    if len(grads) != len(params) or len(grads) == 0:
        raise ValueError(
            f"Expected equally many gradients and parameters (at least one), got {len(grads)} "
            f"and {len(params)}; pass [p.grad for p in ps] and ps for the same ps"
        )
    checked = []
    for i, (g, w) in enumerate(zip(grads, params, strict=True)):
        if g is None:
            raise ValueError(f"Gradient {i} is None; pass only parameters that received a gradient")
        if g.shape != w.shape:
            raise ValueError(
                f"Gradient {i} has shape {tuple(g.shape)}, its parameter {tuple(w.shape)}"
            )
        checked.append(g)
    return checked


def _dot_and_squares(g: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    acc = torch.promote_types(w.dtype, torch.float32)
    gf = g.detach().reshape(-1).to(acc)
    wf = w.detach().reshape(-1).to(acc)
    return torch.dot(gf, wf), torch.dot(gf, gf), torch.dot(wf, wf)


def _common_dtype(terms: list[tuple[Tensor, Tensor, Tensor]]) -> torch.dtype:
    return torch.float64 if any(t[0].dtype == torch.float64 for t in terms) else torch.float32


def _descent_cosine(dot: Tensor, gg: Tensor, ww: Tensor) -> Tensor:
    # Cosine of -g with w; defined as 0 when either vector is 0 (no direction to compare).
    denom = (gg * ww).sqrt()
    cosine = -dot / denom.clamp_min(torch.finfo(denom.dtype).tiny) + 0.0  # + 0.0: no "-0."
    return torch.where(denom > 0, cosine.clamp(-1.0, 1.0), 0.0)


def nlm_cosine(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """Alignment of the descent direction with naive loss minimisation: ``cos(-∇L, θ)``.

    Prieto et al. 2025, Section 5: for a positively homogeneous network ``f(cθ) = c^L f(θ)``,
    once the training set is classified the loss falls fastest by scaling the weights up, the
    *naive loss minimisation* direction ``θ``. This is the cosine between the gradient-descent
    direction ``-∇L`` and ``θ``, over all tensors flattened together::

        cos = -<g, θ> / (||g|| ||θ||)

    It is +1 when a gradient step only scales the weights up (``∇L = -cθ``, ``c > 0``), 0 for an
    orthogonal gradient (e.g. after ⊥Grad) and 0 by convention when ``g`` or ``θ`` is 0. Note the
    sign: ``cos(∇L, θ)`` itself tends to -1 under NLM. A 0-dim tensor, no host sync.

    Args:
        grads: gradients, one per parameter tensor (e.g. ``[p.grad for p in ps]``; a ``None``
            among them is a ``ValueError``).
        params: the parameter tensors, same order and shapes.

    Example:
        >>> w = [torch.tensor([3.0, 4.0])]
        >>> nlm_cosine([torch.tensor([-6.0, -8.0])], w), nlm_cosine([torch.tensor([4.0, -3.0])], w)
        (tensor(1.), tensor(0.))
    """
    return nlm_cosine_from_sums(nlm_sums(grads, params))


def nlm_sums(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """The sums behind :func:`nlm_cosine`: ``[<g, θ>, ||g||², ||θ||²]`` over all tensors.

    They add over disjoint sets of parameters, so ranks that each hold a shard of θ (FSDP) sum
    theirs across ranks and take :func:`nlm_cosine_from_sums` of the total. Shape ``(3,)``, in
    float32 (float64 when any tensor is), no host sync.

    Example:
        >>> nlm_sums([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])])
        tensor([11.,  5., 25.])
    """
    terms = [_dot_and_squares(g, w) for g, w in zip(_checked(grads, params), params, strict=True)]
    acc = _common_dtype(terms)
    return torch.stack([torch.stack([t[k].to(acc) for t in terms]).sum() for k in range(3)])


def nlm_cosine_from_sums(sums: Tensor) -> Tensor:
    """``cos(-∇L, θ)`` from :func:`nlm_sums` (summed over shards where θ is sharded)."""
    dot, gg, ww = sums.unbind(-1)
    return _descent_cosine(dot, gg, ww)


def nlm_cosine_per_tensor(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """:func:`nlm_cosine` of each parameter tensor separately, shape ``(len(params),)``.

    The paper reports this per layer: the output layer aligns first (cosine around 0.9 after
    overfitting).

    Example:
        >>> ws = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
        >>> nlm_cosine_per_tensor([torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0])], ws)
        tensor([1., 0.])
    """
    terms = [_dot_and_squares(g, w) for g, w in zip(_checked(grads, params), params, strict=True)]
    acc = _common_dtype(terms)
    return torch.stack([_descent_cosine(*(x.to(acc) for x in t)) for t in terms])


def nlm_cosines(
    named: Sequence[tuple[str, torch.nn.Parameter | Tensor]], *, per_layer: bool = False
) -> dict[str, Tensor]:
    """The logged cosines of named parameters with gradients: ``{"nlm_cosine": ...}`` over all of
    them (:func:`nlm_cosine`) and, with ``per_layer``, ``"nlm_cosine/<name>"`` of each tensor
    (:func:`nlm_cosine_per_tensor`). ``named`` pairs each name with a parameter whose ``.grad``
    is set; empty gives ``{}``.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        >>> w.grad = torch.tensor([-2.0, 0.0])
        >>> nlm_cosines([("w", w)], per_layer=True)
        {'nlm_cosine': tensor(1.), 'nlm_cosine/w': tensor(1.)}
    """
    if not named:
        return {}
    grads, params = [p.grad for _, p in named], [p for _, p in named]
    cosines = {"nlm_cosine": nlm_cosine(grads, params)}
    if per_layer:
        per_tensor = nlm_cosine_per_tensor(grads, params)
        cosines.update({f"nlm_cosine/{n}": c for (n, _), c in zip(named, per_tensor, strict=True)})
    return cosines
