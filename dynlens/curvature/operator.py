"""The Hessian of a loss as a linear operator: routes, their fallback, memory-bounded passes.

:class:`HessianOperator` picks a route (the products themselves are in :mod:`.routes`), falls
back through :data:`ROUTES` when one fails, and splits a batch of probes into passes that fit
under a :class:`~dynlens.curvature.MemoryLimit`; :func:`hvp` is its dict front end.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from .errors import _OOM_ERRORS, CurvatureError, CurvatureFallbackWarning
from .memory import MemoryLimit
from .microbatch import MicroBatchLoss
from .passes import TUNING_PROBES, _Passes
from .routes import LossFn

Route = Literal[
    "auto",
    "tuned",
    "double_backward",
    "batched_double_backward",
    "forward_over_reverse",
    "vmap_forward_over_reverse",
    "finite_difference",
]

#: The concrete Hessian-vector-product routes, in the order "auto" falls back through on CPU.
ROUTES: tuple[str, ...] = ("double_backward", "vmap_forward_over_reverse", "forward_over_reverse")
#: Every route ``route=`` accepts besides "auto": ROUTES and the ones outside the fallback order
#: (``"finite_difference"`` approximates; it is never chosen by "auto" but by name, or by
#: ``HessianMonitor`` where the exact routes fail or do not fit in memory).
EXPLICIT_ROUTES: tuple[str, ...] = (*ROUTES, "batched_double_backward", "finite_difference")

_TRIAL_SEQUENTIAL, _TRIAL_BATCHED, _BATCHED_MARGIN = 2, 8, 0.9

# Reasons already warned about, so a fallback that repeats every measurement warns once per process.
_WARNED: set[tuple[str, ...]] = set()


class HessianOperator(_Passes):
    """The Hessian H = ∇²L(θ) of ``loss_fn`` at ``params`` as a linear operator on ℝⁿ.

    ``op @ V`` (or ``op.matmul(V)``) returns H·v for a flat vector ``V`` of shape ``(n,)`` or for
    every row of a probe batch of shape ``(k, n)``. One operator is one point θ: the double-backward
    route builds the gradient graph ∇L(θ) (with ``create_graph=True``) on first use and keeps it, so
    any number of products, over any number of calls, pay for one forward and one backward pass
    once and for one extra backward pass each. This is what makes the estimators below cheap:
    they build one operator per estimate.

    Routes (``route=``):

    * ``"double_backward"``: Hv = ∇_θ(∇L(θ)·v), one ``torch.autograd.grad`` per probe through the
      shared graph.
    * ``"batched_double_backward"``: the same products, all probes of a batch (``chunk_size``
      of the estimators) in one backward pass vectorised with ``vmap`` (``is_grads_batched``).
      It pays off where per-pass overhead dominates (small MLPs, a small Transformer) and costs
      where memory traffic does (the grokking MLP, 5,107 × 200 activations), and activation
      memory grows with the batch. Chosen by name, or on CPU by ``"tuned"``'s timed trial; when an
      op cannot be vectorised it runs one probe at a time, with the same results.
    * ``"forward_over_reverse"``: Hv = ``torch.func.jvp(torch.func.grad(L), θ, v)``, one probe at a
      time; nothing is shared between probes.
    * ``"vmap_forward_over_reverse"``: the same, vectorised over the probes with ``torch.func.vmap``
      (``"auto"``'s choice on CUDA).
    * ``"finite_difference"``: central differences of gradients at perturbed *copies* of θ,
      Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε with ε from :func:`finite_difference_step`, one probe
      at a time: two gradients and the memory of one gradient, with no second-derivative rule
      needed, so it works through ``@once_differentiable`` Functions, fused attention kernels
      and compiled graphs where the exact routes fail. An approximation: on tanh and
      LayerNorm-GELU MLPs ``tests/curvature/test_memory.py`` holds its products to 1e-3 of
      ‖Hv‖ in float32 and 1e-8 in float64. θ is never perturbed in place (``θ + εv − εv`` need
      not round back to θ). Chosen by name only; ``"auto"`` never approximates.
    * ``"auto"`` (default): double backward on CPU, vmapped forward-over-reverse on CUDA. When the
      chosen route fails (an op without a double-backward or forward-mode AD rule), the next one
      is tried, in the order of :data:`ROUTES`, with one :class:`CurvatureFallbackWarning` per
      distinct reason; :class:`CurvatureError` lists every failure when none works. An explicit
      route never falls back.
    * ``"tuned"``: ``"auto"``, except that on CPU, where which of the two double-backward routes
      is faster depends on the model (see above), the first batch of at least
      :data:`TUNING_PROBES` probes is a timed trial: two of its products one at a time, up to
      eight more in one vectorised pass; the operator keeps the route that was faster per probe
      (the vectorised one only when at least 10% faster; where the two are close, as on a small
      Transformer, runs may keep either). The trial's products are part of the result; it costs
      the difference on the slower route's share of them. :attr:`route` then names the route kept,
      which callers building many operators for one model pass on to skip the trial
      (``HessianMonitor`` does). Opt-in like ``torch.backends.cudnn.benchmark``: a choice made
      by the clock can differ between calls and runs, and so can the results' last bits, where
      ``"auto"`` gives bit-identical results for identical calls.

    Measured cost, memory and error of each route against a gradient and a training step, on CPU
    and CUDA: ``benchmarks/RESULTS.md``.

    A custom ``torch.autograd.Function`` whose backward is ``@once_differentiable`` is refused with
    :class:`CurvatureError` before any product: double backward cannot pass through it, and
    ``torch.func`` transforms would return wrong (zero) second derivatives through it silently.
    To find such Functions the ``torch.func`` routes spend one extra forward pass per operator.

    Args:
        loss_fn: dict ``name -> tensor`` → scalar loss.
        params: the point θ; floating tensors of one dtype on one device.
        route: see above.
        chunk_size: probes per ``vmap`` call (bounds its memory); ``None`` vectorises all at once.
        memory: a :class:`MemoryLimit`: every pass of products is metered and planned so that the
            memory in use stays within it (a batch is split into passes of as many probes as fit,
            one at first), and out-of-memory is retried with half the probes per pass. With a
            :class:`MicroBatchLoss`, the data are split too: into micro-batches of as many
            samples as fit (see :mod:`dynlens.curvature.passes`). ``None`` (default): no
            metering, a batch in one pass as described above.
        samples_per_chunk: with a :class:`MicroBatchLoss`, products micro-batch by micro-batch
            of this many samples, H·v = Σ_i (|B_i|/N)·H_i·v (exact; each micro-batch's graph is
            built and freed in turn). ``None`` (default): planned under ``memory``, else the
            whole batch.

    Example:
        >>> import torch
        >>> from dynlens.curvature import HessianOperator
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> op = HessianOperator(lambda p: 0.5 * p["w"] @ a @ p["w"],
        ...                      {"w": torch.zeros(2, dtype=torch.float64)})
        >>> (op @ torch.eye(2, dtype=torch.float64)).tolist()   # H = a
        [[2.0, 1.0], [1.0, 3.0]]
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Mapping[str, Tensor],
        *,
        route: Route = "auto",
        chunk_size: int | None = None,
        memory: MemoryLimit | None = None,
        samples_per_chunk: int | None = None,
    ) -> None:
        if torch.is_inference_mode_enabled():
            raise CurvatureError(
                "curvature cannot be measured under torch.inference_mode(): call it outside the "
                "inference-mode block (e.g. from on_train_batch_end, not from validation)"
            )
        if not isinstance(params, Mapping) or not params:
            raise ValueError(
                "Expected `params` to be a non-empty dict name -> tensor, e.g. "
                "dict(model.named_parameters())"
            )
        if samples_per_chunk is not None and (
            not isinstance(loss_fn, MicroBatchLoss) or not loss_fn.exact or samples_per_chunk < 1
        ):
            raise ValueError(
                "Expected `samples_per_chunk` to be None or a positive int with a loss_fn that is "
                f"a dynlens.curvature.MicroBatchLoss, got {samples_per_chunk!r} with "
                f"{type(loss_fn).__name__}"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(
                f"Expected `chunk_size` to be a positive int or None, got {chunk_size}"
            )
        first = next(iter(params.values()))
        for name, p in params.items():
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise TypeError(f"Expected params[{name!r}] to be a floating-point tensor")
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"Expected every parameter to share one dtype and device; params[{name!r}] is "
                    f"{p.dtype} on {p.device}, the first is {first.dtype} on {first.device}. Pass "
                    "one group at a time"
                )
        self.loss_fn = loss_fn
        self.names: tuple[str, ...] = tuple(params)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in params.values())
        self.numels: tuple[int, ...] = tuple(p.numel() for p in params.values())
        self.numel: int = sum(self.numels)
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.chunk_size = chunk_size
        #: Samples per micro-batch of a :class:`MicroBatchLoss` (``None``: the whole batch at
        #: once); planned under ``memory`` by the first product unless given.
        self.samples_per_chunk = samples_per_chunk
        self._chunks_planned = samples_per_chunk is not None
        # Detached views (no copy); inference tensors must be cloned to become differentiable.
        self._primals = {
            k: (p.detach().clone() if p.is_inference() else p.detach()) for k, p in params.items()
        }
        self._candidates = _candidate_routes(route, self.device)
        self._tuning = route == "tuned" and self.device.type == "cpu"
        self._index = 0
        self._failures: list[tuple[str, BaseException]] = []
        self._graph: tuple[list[Tensor], Tensor] | None = None
        self._vectorisable = True
        self._checked = False
        self._theta_norm: float | None = None
        #: ``route="finite_difference"``: the estimated relative error of its products (see
        #: :meth:`_self_check`), set by the first product; ``None`` on the exact routes.
        self.finite_difference_error: float | None = None
        self.memory = memory
        if memory is not None:
            memory.bind(self.device)

    @property
    def route(self) -> str:
        """The route the next product will use (after any fallback so far)."""
        return self._candidates[self._index]

    # flat <-> dict ----------------------------------------------------------------------------

    def flatten(self, tensors: Mapping[str, Tensor], *, batched: bool = False) -> Tensor:
        """Concatenate a dict shaped like ``params`` (with a leading probe dim if ``batched``)."""
        if set(tensors) != set(self.names):
            raise ValueError(
                f"Expected the keys of `params` {sorted(self.names)}, got {sorted(tensors)}"
            )
        lead = 1 if batched else 0
        pieces = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = tensors[name]
            if tuple(t.shape[lead:]) != tuple(shape):
                raise ValueError(
                    f"Expected {name!r} of shape {'(k, ' if batched else '('}"
                    f"{', '.join(map(str, shape))}), got {tuple(t.shape)}"
                )
            pieces.append(t.reshape(*t.shape[:lead], -1))
        return torch.cat(pieces, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(..., n)`` tensor into a dict shaped like ``params`` (views)."""
        lead = flat.shape[:-1]
        return {
            name: piece.reshape(*lead, *shape)
            for name, shape, piece in zip(
                self.names, self.shapes, flat.split(self.numels, dim=-1), strict=True
            )
        }

    # products ---------------------------------------------------------------------------------

    def __matmul__(self, vectors: Tensor) -> Tensor:
        return self.matmul(vectors)

    def matmul(self, vectors: Tensor) -> Tensor:
        """H·v for a flat ``(n,)`` vector, or for each row of a ``(k, n)`` probe batch."""
        if vectors.ndim not in (1, 2) or vectors.shape[-1] != self.numel:
            raise ValueError(
                f"Expected a flat vector of shape ({self.numel},) or a probe batch of shape "
                f"(k, {self.numel}), got {tuple(vectors.shape)}"
            )
        batch = vectors.reshape(-1, self.numel).to(device=self.device, dtype=self.dtype)
        while True:
            route = self.route
            try:
                out = (
                    self._apply(route, batch)
                    if self.memory is None
                    else self._planned(route, batch)
                )
            except _OOM_ERRORS:
                raise
            except CurvatureError:
                raise
            except (RuntimeError, NotImplementedError) as err:
                self._failures.append((route, err))
                self._graph = None
                if self._index + 1 == len(self._candidates):
                    raise CurvatureError(self._failure_message()) from err
                self._index += 1
                continue
            if self._failures:
                self._warn_fallback()
            return out[0] if vectors.ndim == 1 else out

    def _apply(self, route: str, batch: Tensor) -> Tensor:
        if route == "double_backward" and self._tuning and len(batch) >= TUNING_PROBES:
            return self._tune(batch)
        if route in ("double_backward", "batched_double_backward"):
            return self._double_backward(batch, batched=route == "batched_double_backward")
        if route == "finite_difference":
            return self._finite_difference(batch)
        if not self._checked:
            self._check_once_differentiable()
        if route == "forward_over_reverse":
            return torch.stack([self._jvp_of_grad(self.unflatten(v)) for v in batch])
        return self._vmap_jvp_of_grad(batch)

    def _tune(self, batch: Tensor) -> Tensor:
        # The first product builds the shared gradient graph, so the timed ones compare the
        # products alone. Wall-clock time is the right clock: this runs on the CPU only.
        first = self._run("double_backward", batch[:1])
        split = 1 + _TRIAL_SEQUENTIAL
        start = time.perf_counter()
        sequential = self._run("double_backward", batch[1:split])
        per_probe = (time.perf_counter() - start) / _TRIAL_SEQUENTIAL
        size = _TRIAL_BATCHED
        if self.memory is not None:
            # The trial obeys the limit too: as many probes as the one-at-a-time passes say fit
            # in one vectorised pass (each probe of it costs at most one such pass).
            size = self.memory.probes_per_pass(
                "batched_double_backward", _TRIAL_BATCHED, like="double_backward"
            )
        self._tuning = False
        parts = [first, sequential]
        trial = batch[split : split + size] if size >= 2 else batch[:0]
        if len(trial):
            start = time.perf_counter()
            # (a vectorised pass that fails, e.g. a CPU allocation for every probe at once, runs
            # probe by probe inside and is not kept)
            parts.append(self._run("batched_double_backward", trial))
            per_probe_batched = (time.perf_counter() - start) / len(trial)
            if self._vectorisable and per_probe_batched < _BATCHED_MARGIN * per_probe:
                self._candidates[self._index] = "batched_double_backward"
        rest = batch[split + len(trial) :]
        if len(rest):
            parts.append(self._run(self.route, rest))
        return torch.cat(parts)

    def _run(self, route: str, batch: Tensor) -> Tensor:
        """``batch`` on ``route``: planned under the memory limit when there is one."""
        if self.memory is None:
            return self._apply(route, batch)
        return self._planned(route, batch)

    def _failure_message(self) -> str:
        lines = "; ".join(f"{route}: {_first_line(err)}" for route, err in self._failures)
        if len(self._candidates) == 1:
            return (
                f"the Hessian-vector-product route failed ({lines}); route='auto' falls back to "
                "the other routes"
            )
        return (
            f"no Hessian-vector-product route works for this loss_fn ({lines}). Usually an op in "
            "the loss has neither a double-backward rule nor a forward-mode AD rule (torch.func): "
            "replace it for the measurement (e.g. by a differentiable reference implementation), "
            "or measure a sub-module without it"
        )

    def _warn_fallback(self) -> None:
        key = tuple(f"{route}: {_first_line(err)}" for route, err in self._failures)
        if key in _WARNED:
            return
        _WARNED.add(key)
        reasons = "; ".join(key)
        warnings.warn(
            f"dynlens.curvature: Hessian-vector products fell back to the {self.route!r} route "
            f"({reasons}). Results are unaffected, only the speed differs. Pass "
            f"route={self.route!r} to skip the failing route",
            CurvatureFallbackWarning,
            stacklevel=3,
        )


def hvp(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    vectors: Mapping[str, Tensor] | Tensor,
    *,
    route: Route = "auto",
    memory: MemoryLimit | None = None,
) -> dict[str, Tensor] | Tensor:
    """Hessian-vector products H·v of ``loss_fn`` at ``params``.

    ``vectors`` is one of (the output has the same layout):

    * a dict shaped like ``params``: one probe;
    * a dict whose tensors have a leading probe dimension ``(k, *param.shape)``: k probes;
    * a flat tensor ``(n,)`` or ``(k, n)`` in the order of ``params``.

    All probes share one gradient graph (see :class:`HessianOperator` for the routes and the
    fallback). Example:

        >>> import torch
        >>> from dynlens.curvature import hvp
        >>> loss_fn = lambda p: (p["w"] ** 3).sum() / 6          # H = diag(w)
        >>> w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> hvp(loss_fn, {"w": w}, {"w": torch.ones(3, dtype=torch.float64)})["w"].tolist()
        [1.0, 2.0, 3.0]
    """
    op = HessianOperator(loss_fn, params, route=route, memory=memory)
    if isinstance(vectors, Tensor):
        return op.matmul(vectors)
    if set(vectors) != set(op.names):
        raise ValueError(f"Expected the keys of `params` {sorted(op.names)}, got {sorted(vectors)}")
    batched = all(
        vectors[name].ndim == len(s) + 1 for name, s in zip(op.names, op.shapes, strict=True)
    )
    flat = op.flatten(vectors, batched=batched)
    return op.unflatten(op.matmul(flat))


def _candidate_routes(route: str, device: torch.device) -> list[str]:
    if route in ("auto", "tuned"):
        first = "vmap_forward_over_reverse" if device.type == "cuda" else "double_backward"
        return [first, *(r for r in ROUTES if r != first)]
    if route not in EXPLICIT_ROUTES:
        raise ValueError(
            f"Expected `route` to be 'auto', 'tuned' or one of {EXPLICIT_ROUTES}, got {route!r}"
        )
    return [route]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
