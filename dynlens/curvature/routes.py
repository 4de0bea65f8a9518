"""How each route computes Hessian-vector products at one point θ.

Double backward (one probe at a time or vectorised), forward-over-reverse (plain or vmapped)
and central finite differences, as the methods :class:`~dynlens.curvature.HessianOperator`
inherits; which route runs, its fallback and its memory plan are the operator's.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .errors import _OOM_ERRORS, CurvatureError
from .memory import MemoryLimit
from .microbatch import MicroBatchLoss

#: What the curvature functions measure: dict name -> tensor of parameters to a scalar loss.
LossFn = Callable[[dict[str, Tensor]], Tensor]

# `once_differentiable` wraps every backward in the same closure; its code object identifies it.
_ONCE_DIFFERENTIABLE_CODE = once_differentiable(lambda ctx, *grads: grads).__code__


def finite_difference_step(theta_norm: float, probe_norm: float, dtype: torch.dtype) -> float:
    """ε of the central difference Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε.

    ε = ¼ · u^{1/3} · (1 + ‖θ‖) / ‖v‖ with u the unit roundoff of ``dtype``. The central
    difference's truncation error is (ε²/6)·∇³L[v, v, ·] = O(ε²‖v‖²) and the rounding error of
    the two gradients, each accurate to about u·‖∇L‖, divided by 2ε, is O(u/ε): their sum is
    smallest at ε ∝ u^{1/3} (the forward difference's √u does not apply to the central one). The
    factor (1 + ‖θ‖)/‖v‖ makes the perturbation's norm ε‖v‖ a fixed fraction of the parameters'
    scale (0.12% in float32, 1.5e-6 in float64) whatever the probe's norm, so that for a probe
    with entries ±1 each parameter moves by the same fraction of their root-mean-square. The
    constant ¼ is measured, not derived: it lies where the error against exact products was
    smallest on a tanh MLP, a LayerNorm-GELU MLP and a GPT-2-shaped model (``benchmarks/
    scale.py``; the error at each constant: ``benchmarks/RESULTS.md``).

        >>> round(finite_difference_step(99.0, 10.0, torch.float32), 6)
        0.012304
    """
    if not probe_norm > 0:
        raise ValueError("Expected a non-zero probe")
    return 0.25 * float(torch.finfo(dtype).eps) ** (1.0 / 3.0) * (1.0 + theta_norm) / probe_norm


class _Routes:
    """The products of each route; the attributes are :class:`HessianOperator`'s."""

    # Set by HessianOperator.__init__ (declared here, without values, for the type checker).
    loss_fn: LossFn
    names: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device
    chunk_size: int | None
    samples_per_chunk: int | None
    memory: MemoryLimit | None
    finite_difference_error: float | None
    _primals: dict[str, Tensor]
    _graph: tuple[list[Tensor], Tensor] | None
    _vectorisable: bool
    _checked: bool
    _theta_norm: float | None

    if TYPE_CHECKING:  # defined by HessianOperator

        def flatten(self, tensors: Mapping[str, Tensor], *, batched: bool = False) -> Tensor: ...

        def unflatten(self, flat: Tensor) -> dict[str, Tensor]: ...

    def _chunked(self) -> bool:
        """Whether the products run micro-batch by micro-batch."""
        loss, size = self.loss_fn, self.samples_per_chunk
        return isinstance(loss, MicroBatchLoss) and loss.exact and 0 < (size or 0) < loss.samples

    def _pieces(self) -> list[tuple[float, LossFn]]:
        """The loss as weighted micro-batches (one piece, weight 1, unless chunked)."""
        if self._chunked():
            assert isinstance(self.loss_fn, MicroBatchLoss) and self.samples_per_chunk
            return self.loss_fn.chunks(self.samples_per_chunk)
        return [(1.0, self.loss_fn)]

    def _summed(self, term: Callable[[LossFn], Tensor]) -> Tensor:
        """Σ_i w_i · term(L_i) over the pieces (``term(L)`` itself, unchunked). Between
        micro-batches the meter settles (:meth:`~dynlens.curvature.MemoryMeter.settle`): what
        the last one freed is given back, so the next starts from what is held."""
        pieces = self._pieces()
        meter = self.memory.meter if self.memory is not None and len(pieces) > 1 else None
        total: Tensor | None = None
        for weight, fn in pieces:
            total = _weighted_sum(total, term(fn), weight)
            if meter is not None:
                meter.settle()
        assert total is not None
        return total

    def _scalar_loss(self, p: dict[str, Tensor], fn: LossFn | None = None) -> Tensor:
        loss = (fn or self.loss_fn)(p)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                "Expected `loss_fn` to return a scalar floating-point tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}: "
                "reduce the loss (e.g. .mean()) inside loss_fn"
            )
        return loss.reshape(())

    @contextlib.contextmanager
    def _evaluation(self) -> Iterator[None]:
        # fork_rng restores the global RNG and makes every evaluation draw the same dropout masks;
        # the math SDPA backend is the only one with second-order and forward-AD rules.
        with contextlib.ExitStack() as stack:
            if self.device.type == "cpu":
                stack.enter_context(torch.random.fork_rng(devices=[]))
            else:
                index = self.device.index
                if index is None:
                    index = torch.cuda.current_device() if self.device.type == "cuda" else 0
                stack.enter_context(
                    torch.random.fork_rng(devices=[index], device_type=self.device.type)
                )
            stack.enter_context(_math_sdpa())
            stack.enter_context(torch.enable_grad())
            yield

    def _leaves(self) -> list[Tensor]:
        return [p.detach().requires_grad_(True) for p in self._primals.values()]

    def _build_graph(self) -> Tensor:
        self._graph = self._graph_of(self.loss_fn)
        return self._graph[1]

    def _graph_of(self, fn: LossFn) -> tuple[list[Tensor], Tensor]:
        """The leaves θ and the flat gradient ∇L(θ) of ``fn`` with its graph (create_graph)."""
        leaves = self._leaves()
        with self._evaluation():
            loss = self._scalar_loss(dict(zip(self.names, leaves, strict=True)), fn)
            if not self._checked:  # once per operator: its micro-batches share their ops
                _refuse_once_differentiable(loss)
                self._checked = True
            grads: tuple[Tensor | None, ...] = (None,) * len(leaves)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # A gradient that does not require grad is constant in θ: its Hessian block is zero.
        return leaves, _flat(grads, leaves)

    def _double_backward(self, batch: Tensor, batched: bool = False) -> Tensor:
        if not self._chunked():  # the whole batch: its graph is kept for every later product
            if self._graph is None:
                self._build_graph()
            assert self._graph is not None
            return self._through(self._graph, batch, batched)
        # micro-batch by micro-batch: each graph is built, used by every probe, and freed
        return self._summed(lambda fn: self._through(self._graph_of(fn), batch, batched))

    def _through(self, graph: tuple[list[Tensor], Tensor], batch: Tensor, batched: bool) -> Tensor:
        """The products of ``batch`` through one gradient graph."""
        leaves, flat_grad = graph
        if not flat_grad.requires_grad:
            return torch.zeros_like(batch)
        if batched and len(batch) > 1 and self._vectorisable:
            try:
                return self._batched_backward(leaves, flat_grad, batch)
            except RuntimeError as err:  # an op in the gradient's graph cannot be vectorised
                if self.memory is not None and isinstance(err, _OOM_ERRORS):
                    raise  # under a limit, the plan retries with fewer probes per pass
                self._vectorisable = False
        rows = []
        for v in batch:
            hv = torch.autograd.grad(flat_grad @ v, leaves, retain_graph=True, allow_unused=True)
            rows.append(_flat(hv, leaves))
        return torch.stack(rows)

    @staticmethod
    def _batched_backward(leaves: list[Tensor], flat_grad: Tensor, batch: Tensor) -> Tensor:
        # every probe of the batch in one backward pass vectorised with vmap
        with warnings.catch_warnings():  # ops without a batching rule run op by op: still right
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            hv = torch.autograd.grad(
                flat_grad,
                leaves,
                grad_outputs=batch,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        return _flat(hv, leaves, rows=len(batch))

    def _jvp_of_grad(self, tangents: dict[str, Tensor]) -> Tensor:
        def term(fn: LossFn) -> Tensor:
            with self._evaluation():
                # jvp returns (output, jvp_out); its stub's union with the has_aux triple rules
                # out unpacking, so the second item is indexed, as in _vmap_jvp_of_grad below.
                out: dict[str, Tensor] = torch.func.jvp(
                    torch.func.grad(functools.partial(self._scalar_loss, fn=fn)),
                    (self._primals,),
                    (tangents,),
                )[1]
            return self.flatten(out)

        return self._summed(term)

    def _vmap_jvp_of_grad(self, batch: Tensor) -> Tensor:
        def one(fn: LossFn, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
            grad_fn = torch.func.grad(functools.partial(self._scalar_loss, fn=fn))
            return torch.func.jvp(grad_fn, (self._primals,), (tangents,))[1]

        def term(fn: LossFn) -> Tensor:
            # randomness="same": dropout inside loss_fn draws one mask shared by all probes.
            with self._evaluation():
                out = torch.func.vmap(
                    functools.partial(one, fn), randomness="same", chunk_size=self.chunk_size
                )(self.unflatten(batch))
            return self.flatten(out, batched=True)

        return self._summed(term)

    def _finite_difference(self, batch: Tensor) -> Tensor:
        if self._theta_norm is None:
            self._theta_norm = math.sqrt(
                sum(float(p.double().square().sum()) for p in self._primals.values())
            )
        rows = []
        for v in batch:
            norm = float(v.double().norm())
            if norm == 0.0:
                rows.append(torch.zeros_like(v))
                continue
            eps = finite_difference_step(self._theta_norm, norm, self.dtype)
            hv = self._central_difference(v, eps)
            if self.finite_difference_error is None:
                self.finite_difference_error = self._self_check(v, eps, hv)
            rows.append(hv)
        return torch.stack(rows)

    def _central_difference(self, v: Tensor, eps: float) -> Tensor:
        plus = self._gradient_at(v, eps)
        return (plus - self._gradient_at(v, -eps)) * (0.5 / eps)

    def _self_check(self, v: Tensor, eps: float, hv: Tensor) -> float:
        """Estimated relative error of the products at step ε, from the first probe's product
        repeated at ε/2 (two more gradients per operator).

        With truncation error C·ε², h_ε − h_{ε/2} = ¾·C·ε², so the error of h_ε is about
        (4/3)·‖h_ε − h_{ε/2}‖; rounding noise, larger at ε/2, makes the estimate err on the high
        side. Where the loss is not smooth at the step's scale (ReLU or max kinks crossed by the
        perturbation) the two disagree by the order of the products themselves.
        """
        half = self._central_difference(v, eps / 2)
        scale = float(half.double().norm())
        if scale == 0.0:
            return 0.0 if float(hv.double().norm()) == 0.0 else math.inf
        return 4.0 / 3.0 * float((hv.double() - half.double()).norm()) / scale

    def _gradient_at(self, v: Tensor, step: float) -> Tensor:
        """∇L at a perturbed copy θ + step·v (the primals are never written), micro-batch by
        micro-batch where the loss is chunked."""
        direction = self.unflatten(v)

        def term(fn: LossFn) -> Tensor:
            leaves = [
                torch.add(p, direction[name], alpha=step).requires_grad_(True)
                for name, p in self._primals.items()
            ]
            with self._evaluation():
                loss = self._scalar_loss(dict(zip(self.names, leaves, strict=True)), fn)
                if not loss.requires_grad:
                    return torch.zeros_like(v)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            return _flat(grads, leaves)

        return self._summed(term)

    def _check_once_differentiable(self) -> None:
        # torch.func routes run the backward under functorch transforms, where a once-differentiable
        # backward silently drops the tangent; a plain forward reveals such Functions in the graph.
        # (One micro-batch's forward shows the same Functions as the batch's, in less memory.)
        leaves = self._leaves()
        with self._evaluation():
            loss = self._scalar_loss(
                dict(zip(self.names, leaves, strict=True)), self._pieces()[0][1]
            )
        _refuse_once_differentiable(loss)
        self._checked = True


def _weighted_sum(total: Tensor | None, term: Tensor, weight: float) -> Tensor:
    """``total + weight · term`` (``weight · term`` when ``total`` is None); weight 1 is exact."""
    if total is None:
        return term if weight == 1.0 else term.mul_(weight)
    return total.add_(term, alpha=weight)


def _flat(
    grads: tuple[Tensor | None, ...], leaves: list[Tensor], rows: int | None = None
) -> Tensor:
    """Gradients w.r.t. ``leaves`` as one flat vector (``(rows, n)`` for a batch of ``rows``);
    a ``None`` gradient (the loss does not depend on that leaf) is zeros."""
    lead = () if rows is None else (rows,)
    return torch.cat(
        [
            g.reshape(*lead, -1) if g is not None else leaf.new_zeros(*lead, leaf.numel())
            for g, leaf in zip(grads, leaves, strict=True)
        ],
        dim=-1,
    )


def _math_sdpa() -> contextlib.AbstractContextManager[None]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no per-backend selector; its default is then used
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _refuse_once_differentiable(loss: Tensor) -> None:
    """Raise if ``loss``'s graph holds a custom Function with a once-differentiable backward."""
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        fn_cls = getattr(node, "_forward_cls", None)
        backward = getattr(fn_cls, "backward", None)
        # (fn_cls is not None whenever the code matches: None has no backward)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE and fn_cls is not None:
            raise CurvatureError(
                f"the loss passes through the custom autograd.Function {fn_cls.__qualname__}, "
                "whose backward is @once_differentiable: no route can take second derivatives "
                "through it (double backward refuses, torch.func would silently return zeros). "
                "Give it a differentiable backward for the measurement"
            )
        stack.extend(next_fn for next_fn, _ in node.next_functions)
