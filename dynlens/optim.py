"""⊥Grad: optimise with the gradient component orthogonal to the weights.

Prieto, Barsbey, Mediano & Birdal 2025, *Grokking at the Edge of Numerical Stability*
(arXiv:2501.04697), Section 5. Once a positively homogeneous network classifies its training set,
the cheapest way to lower cross-entropy is to scale the weights up (*naive loss minimisation*,
NLM): the gradient aligns with ``-w``, logits grow, and softmax eventually collapses numerically.
⊥Grad removes that direction from every parameter tensor's gradient before the optimiser sees it::

    g_perp = g - (<w, g> / <w, w>) w          # project out the radial component
    g_perp <- g_perp * ||g|| / ||g_perp||      # keep the gradient's norm

``OrthoGrad(params, torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.98))`` wraps any optimiser; the
pure projection :func:`project_out_weights_` serves plain loops and the ``PerpGrad`` callback.
Nothing here imports Lightning.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["OrthoGrad", "project_out_weights_"]


@torch.no_grad()
def project_out_weights_(params: Iterable[Tensor], rtol: float | None = None) -> None:
    """Replace each ``p.grad`` in place by its component orthogonal to ``p``, rescaled to ``‖g‖``.

    Per parameter tensor ``w`` with gradient ``g`` (both flattened; Prieto et al. 2025, eq. 9)::

        g_perp = g - (<w, g> / <w, w>) w
        p.grad = g_perp * ||g|| / ||g_perp||

    Afterwards ``<w, p.grad> = 0`` and ``||p.grad|| = ||g||``. Degenerate cases never produce NaN:

    * ``w = 0``: nothing to project out, ``g`` is kept as is;
    * ``g = 0`` or ``g`` parallel to ``w`` (``||g_perp|| <= rtol * ||g||``): the gradient becomes
      0. Its orthogonal part is then rounding noise, and rescaling noise to ``||g||`` (as a plain
      ``||g|| / (||g_perp|| + 1e-30)`` would) steps in a random direction.

    The projection is applied twice, which keeps the result orthogonal to working precision
    even for nearly parallel ``g``. Dot products and norms are accumulated in at least float32
    so that float16/bfloat16 parameters do not overflow; no host synchronisation happens (no
    ``.item()``).

    Args:
        params: tensors whose ``.grad`` to project; those without a gradient are skipped.
        rtol: relative size of ``g_perp`` below which ``g`` counts as parallel to ``w``; default
            ``16 * eps`` of the accumulation dtype (about 2e-6 in float32).

    Example:
        >>> w = torch.tensor([1.0, 0.0], requires_grad=True)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> project_out_weights_([w])
        >>> w.grad  # the radial part (3, 0) removed, the rest rescaled to norm 5
        tensor([0., 5.])
    """
    for p in params:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse or p.is_complex():
            raise TypeError("project_out_weights_ supports dense real tensors only")
        acc = torch.promote_types(p.dtype, torch.float32)
        tol = 16 * torch.finfo(acc).eps if rtol is None else rtol
        tiny = torch.finfo(acc).tiny
        w = p.detach().reshape(-1).to(acc)
        gf = g.reshape(-1).to(acc)
        # w = 0 gives <w, g> = 0, so the clamp only avoids 0/0 and the coefficient is 0.
        ww = torch.dot(w, w).clamp_min(tiny)
        g_perp = gf - (torch.dot(w, gf) / ww) * w
        # Project a second time ("twice is enough", Kahan/Parlett): when g is nearly parallel to w
        # the first pass leaves a radial residue of order eps * ||g||, which the rescaling to
        # ||g|| would blow up.
        g_perp = g_perp - (torch.dot(w, g_perp) / ww) * w
        g_norm = torch.linalg.vector_norm(gf)
        perp_norm = torch.linalg.vector_norm(g_perp)
        scale = torch.where(
            perp_norm > tol * g_norm, g_norm / perp_norm.clamp_min(tiny), torch.zeros_like(g_norm)
        )
        g.copy_((g_perp * scale).view_as(g))


class OrthoGrad(torch.optim.Optimizer):
    """Wrap an optimiser so that it steps with ⊥Grad-projected gradients.

    Prieto et al. 2025 (Section 5): before every step each parameter's gradient is replaced by
    its part orthogonal to the parameter, rescaled to the original norm
    (:func:`project_out_weights_`); the base optimiser then steps as usual. The paper pairs it
    with AdamW and weight decay 0 on modular arithmetic, where it removes the grokking delay.

    Every keyword argument reaches the base optimiser (the reference wrapper forwarded only ``lr``
    and ``weight_decay``, so ``betas`` and ``eps`` were silently ignored). ``param_groups``,
    ``defaults`` and ``state`` *are* the base optimiser's, so learning-rate and momentum
    schedulers, gradient clipping and code that reads optimiser state (e.g. Adam's second moments)
    work unchanged; ``state_dict`` and ``load_state_dict`` are the base optimiser's.

    Args:
        params: parameters or parameter groups, as for any optimiser.
        base_optimizer_cls: an optimiser *class*, e.g. ``torch.optim.AdamW``.
        **base_kwargs: arguments for ``base_optimizer_cls``.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        >>> opt = OrthoGrad([w], torch.optim.SGD, lr=0.1)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> opt.step()
        >>> w.detach()  # moved along -(0, 5), not along -(3, 4)
        tensor([ 1.0000, -0.5000])
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[torch.optim.Optimizer],
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer_cls, torch.optim.Optimizer):
            raise TypeError(
                "Expected base_optimizer_cls to be an optimizer class, got an instance of "
                f"{type(base_optimizer_cls).__name__}; pass the class and its arguments, e.g. "
                "OrthoGrad(model.parameters(), torch.optim.AdamW, lr=1e-3)"
            )
        if not (
            inspect.isclass(base_optimizer_cls)
            and issubclass(base_optimizer_cls, torch.optim.Optimizer)
        ):
            raise TypeError(
                "Expected base_optimizer_cls to be a subclass of torch.optim.Optimizer "
                f"(e.g. torch.optim.AdamW), got {base_optimizer_cls!r}"
            )
        if issubclass(base_optimizer_cls, OrthoGrad):
            raise TypeError(
                "base_optimizer_cls is already OrthoGrad; wrap the underlying optimizer once, "
                "e.g. OrthoGrad(params, torch.optim.AdamW, ...)"
            )
        self.base_optimizer = base_optimizer_cls(params, **base_kwargs)
        # Registering the base optimizer's group dicts validates them again and sets up the hooks
        # machinery; afterwards the group list and the state are aliased, not copied, so that
        # schedulers writing `lr`/`betas` and readers of `state` see what the base optimizer uses.
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self._share_base_containers()

    def _share_base_containers(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.state = self.base_optimizer.state

    def _project(self) -> None:
        project_out_weights_(p for group in self.param_groups for p in group["params"])

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Project every gradient, then step the base optimiser.

        With a ``closure``, the base optimiser evaluates a wrapped closure that recomputes the
        gradients and projects them, so closure-driven optimisers (``LBFGS``) see projected
        gradients at every evaluation. Returns what the base optimiser's ``step`` returns.
        """
        if closure is None:
            self._project()
            return self.base_optimizer.step()

        def projected_closure() -> Any:
            with torch.enable_grad():
                loss = closure()
            self._project()
            return loss

        return self.base_optimizer.step(projected_closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # Optimizer.load_state_dict replaces the base's `param_groups` and `state` objects.
        self._share_base_containers()

    def __repr__(self) -> str:
        return f"OrthoGrad({self.base_optimizer!r})"
