"""Memory-bounded passes of Hessian-vector products: samples per chunk and probes per pass.

Under a :class:`~dynlens.curvature.MemoryLimit` the operator's products are planned as the pair
(samples per micro-batch, probes per pass):

* **Samples per chunk** (only for a :class:`~dynlens.curvature.MicroBatchLoss`): before the
  first pass on a route, one product on a trial micro-batch of one sample is metered (graph
  included: the only pass whose memory is not known beforehand, and the smallest there is),
  then on 2, 4, … samples while even the worst case of the next says it fits; the increment is
  modelled as fixed + per-sample · s, worst case all per sample from the largest trial (at
  least the meter's noise, :attr:`MemoryMeter.granularity`), a line once the passes micro-batch
  by micro-batch add sizes, and the operator takes the largest s whose one-probe pass is
  predicted to fit. A batch that cannot be split (``MicroBatchLoss(exact=
  False)``: BatchNorm in training mode, a loss that is not the mean of its samples') is sliced
  only for the trials, of two and four samples: where the whole batch's pass is predicted not to
  fit, :class:`CurvatureMemoryError` says so before its graph is built. The whole batch
  (s = N) keeps one gradient graph for every product. Fewer samples: every pass builds, uses
  and frees the graph of each micro-batch in turn, so memory is one micro-batch's; the
  arithmetic is the batch's, spread over N / s launches. The largest s that fits is the
  fastest: the work per product is the same at every s, the launches fewer.
* **Probes per pass**: as many as the measured peaks say fit (:meth:`MemoryLimit.probes_per_pass`),
  learnt per route and chunk size; out of memory halves them and retries.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import _OOM_ERRORS, CurvatureMemoryError
from .memory import _MEMORY_FIX, _gib
from .microbatch import MicroBatchLoss
from .routes import _Routes

#: Probes in the first batch from which ``route="tuned"`` on CPU times the two double-backward
#: routes against each other (one product builds the graph, two are timed one at a time, the
#: rest, up to eight, in one vectorised pass).
TUNING_PROBES = 5
_DOUBLE_BACKWARD = ("double_backward", "batched_double_backward")


class _Passes(_Routes):
    """The memory plan of :class:`~dynlens.curvature.HessianOperator` (module docstring)."""

    numel: int
    _chunks_planned: bool
    _tuning: bool

    if TYPE_CHECKING:  # defined by HessianOperator

        def _apply(self, route: str, batch: Tensor) -> Tensor: ...

        def _tune(self, batch: Tensor) -> Tensor: ...

    def _planned(self, route: str, batch: Tensor) -> Tensor:
        memory = self.memory
        assert memory is not None
        if not self._chunks_planned:
            self._plan_chunks(route, batch[:1])
            self._chunks_planned = True
        chunked = self._chunked()
        if route in _DOUBLE_BACKWARD and self._graph is None and not chunked:
            # (where the plan sliced the batch for trials, their readings predicted this fits)
            self._metered(f"{route}:graph", 1, lambda: self._build_graph(), retry=False)
        if route == "double_backward" and self._tuning and len(batch) >= TUNING_PROBES:
            return self._tune(batch)
        # A chunked pass builds its graphs itself: its peaks are learnt per chunk size. Before its
        # first pass, a vectorised route is predicted from its one-at-a-time twin (each of its
        # probes costs at most one such pass).
        parts, start = [], 0
        while start < len(batch):
            chunked = self._chunked()
            suffix = f"@{self.samples_per_chunk}" if chunked else ""
            key = route + suffix
            like = {"batched_double_backward": "double_backward" + suffix}.get(route)
            probes = memory.probes_per_pass(key, len(batch) - start, like=like)
            if probes == 0 and chunked and self._smaller_chunks(route):
                continue  # what the last passes measured says smaller micro-batches fit
            if probes == 0:
                self._free(drop_graph=True)
                raise CurvatureMemoryError(self._memory_message(key))
            rows = batch[start : start + probes]
            try:
                out = self._metered(key, probes, functools.partial(self._apply, route, rows))
            except CurvatureMemoryError:
                size = self.samples_per_chunk
                if not chunked or size is None or size == 1:
                    raise
                # out of memory at one probe: half the samples from now on (and in the plan)
                self.samples_per_chunk = memory.failed(f"{route}:samples", size)
                continue
            if out is None:  # out of memory: the plan now caps the route lower; retry
                continue
            if self.samples_per_chunk and probes == 1 and chunked:
                # one product, micro-batch by micro-batch: a second size for the chunks' plan
                memory.record_like(f"{route}:samples", self.samples_per_chunk, key, 1)
            parts.append(out)
            start += probes
        return torch.cat(parts) if parts else batch.clone()

    def _plan_chunks(self, route: str, probe: Tensor) -> None:
        """Samples per micro-batch for this operator's products (module docstring)."""
        memory, loss = self.memory, self.loss_fn
        assert memory is not None and memory.meter is not None
        if (
            self.samples_per_chunk is not None
            or not isinstance(loss, MicroBatchLoss)
            or loss.samples <= 2
            or not memory.meter.available
        ):
            return
        key, samples = f"{route}:samples", loss.samples
        if memory.predict(key, samples) is None:
            self._trials(route, probe, key)
        size = memory.probes_per_pass(key, samples)
        if size == samples:
            return  # the whole batch fits: one graph for every product
        if size == 0 or not loss.exact:
            self._free(drop_graph=True)
            unit = "sample" if loss.exact else "batch"
            need = memory.predict(key, 1 if loss.exact else samples) or 0.0
            raise CurvatureMemoryError(
                f"one Hessian-vector product on one {unit} on the {route!r} route needs about "
                f"{_gib(need)} more memory, but only {_gib(max(memory.headroom(), 0))} is left "
                f"under the limit of {_gib(memory.limit)}"
                + (f" (the batch cannot be split: {loss.why_not})" if not loss.exact else "")
                + ". "
                + _MEMORY_FIX
            )
        self.samples_per_chunk = size

    def _smaller_chunks(self, route: str) -> bool:
        """Re-plan the micro-batches from every pass measured so far; True if they shrank."""
        memory, size = self.memory, self.samples_per_chunk
        assert memory is not None and size is not None
        smaller = memory.probes_per_pass(f"{route}:samples", size - 1) if size > 1 else 0
        if smaller == 0:
            return False
        self.samples_per_chunk = smaller
        return True

    def _trials(self, route: str, probe: Tensor, key: str) -> None:
        """Meter products on the first 1, 2, 4, … samples, doubling while even the worst case of
        the next (all of the last reading per sample) fits, and keep the largest reading.

        The largest is the truest: on the CPU a small pass reuses what the C allocator kept and
        reads less than it needs. Read as all per sample, it over-predicts larger micro-batches
        (what a pass needs whatever its samples, e.g. parameter-sized vectors, is counted once
        per sample); the passes micro-batch by micro-batch then add sizes, and the line through
        them separates the two. A batch that cannot be split is sliced for the trials still
        (two samples at least, as BatchNorm needs), only to meter them.
        """
        memory, loss = self.memory, self.loss_fn
        assert memory is not None and memory.meter is not None
        assert isinstance(loss, MicroBatchLoss)
        noise = memory.meter.granularity
        size = 1 if loss.exact else 2
        # A first pass also allocates what any pass does once (autograd's and the kernels' own
        # buffers): it is metered for the limit, not read as the samples'.
        self._trial(route, probe, size)
        last: tuple[int, int, int] | None = None  # samples, in use before, peak
        while True:
            try:
                last = (size, *self._trial(route, probe, size))
            except CurvatureMemoryError:
                if last is None:
                    raise
                memory.failed(key, size)  # out of memory: micro-batches stay below this size
                break
            if 2 * size > loss.samples or 2 * max(last[2] - last[1], noise) > memory.room():
                break
            size *= 2
        memory.record(key, *last)

    def _trial(self, route: str, probe: Tensor, samples: int) -> tuple[int, int]:
        """One product on the first ``samples`` samples only (its value is not used): the
        memory in use before it and its peak."""
        whole = self.loss_fn
        assert isinstance(whole, MicroBatchLoss)
        self.loss_fn = whole.piece(0, samples)

        def one() -> Tensor:
            out = self._apply(route, probe)
            self._graph = None
            return out

        try:
            metered = self._pass(one, len(probe))
        finally:
            self.loss_fn = whole
        if metered is None:
            self._free(drop_graph=True)
            raise CurvatureMemoryError(
                f"out of memory at one Hessian-vector product on {samples} sample(s) on the "
                f"{route!r} route; what the measurement held is freed. " + _MEMORY_FIX
            )
        return metered[1:]

    def _pass(self, fn: Callable[[], Tensor], probes: int) -> tuple[Tensor, int, int] | None:
        """One pass of ``probes`` under the meter: its result, the memory in use before it and
        its peak; ``None`` where it ran out of memory (handled by the caller, outside this
        except block, so that the traceback's tensors are freed)."""
        memory = self.memory
        assert memory is not None and memory.meter is not None
        before = memory.meter.in_use()
        try:
            out, peak = memory.meter.measure(fn, probes)
        except _OOM_ERRORS:
            return None
        memory.peak_seen = max(memory.peak_seen, peak)
        return out, before, peak

    def _metered(
        self, route: str, probes: int, fn: Callable[[], Tensor], *, retry: bool = True
    ) -> Tensor | None:
        """Run one pass of ``probes`` under the meter and record its increment; ``None`` after
        an out-of-memory error that a smaller pass may avoid."""
        memory = self.memory
        assert memory is not None
        metered = self._pass(fn, probes)
        if metered is not None:
            memory.record(route, probes, *metered[1:])
            return metered[0]
        retry_with = memory.failed(route, probes) if retry else 0
        self._free(drop_graph=retry_with == 0)
        if retry_with == 0:
            raise CurvatureMemoryError(
                f"out of memory at one Hessian-vector product per pass on the {route!r} route "
                f"under a limit of {_gib(memory.limit)}; what the measurement held is freed. "
                + _MEMORY_FIX
            )
        return None

    def _free(self, *, drop_graph: bool) -> None:
        if drop_graph:
            self._graph = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _memory_message(self, route: str) -> str:
        memory = self.memory
        assert memory is not None
        product = memory.predict(route, 1) or 0.0
        graph = memory.predict(f"{route}:graph", 1) or 0.0
        held = f" (its gradient graph {_gib(graph)}, one product {_gib(product)})" if graph else ""
        return (
            f"one Hessian-vector product on the {route!r} route needs about "
            f"{_gib(graph + product)} more memory{held}, but only "
            f"{_gib(max(memory.headroom(), 0))} is left under the limit of "
            f"{_gib(memory.limit)}. " + _MEMORY_FIX
        )

    def rows_that_fit(self, requested: int) -> int:
        """Probe rows to hold at once (probes, products and their concatenation: 3 rows of n
        each) so that they take at most a quarter of the headroom under the memory limit."""
        if self.memory is None or self.memory.meter is None or not self.memory.meter.available:
            return requested
        row = 3 * self.numel * torch.finfo(self.dtype).bits // 8
        room = 0.25 * self.memory.margin * self.memory.headroom()
        return max(1, min(requested, int(room // row)))
