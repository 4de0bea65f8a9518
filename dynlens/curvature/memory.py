"""Memory: meters and the limit that Hessian-vector products are planned under."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import Tensor


class MemoryMeter:
    """Reads the memory in use and the peak since the last reset, in bytes.

    Subclasses implement :meth:`in_use`, :meth:`reset_peak` and :meth:`peak`; :meth:`measure`
    runs one pass of products between a reset and a reading. Inject a fake one (overriding
    :meth:`measure`) to test what happens when memory binds, e.g. an out-of-memory error.
    """

    #: False where the platform offers nothing to read: products then run one probe per pass.
    available: bool = True

    def in_use(self) -> int:
        raise NotImplementedError

    def reset_peak(self) -> None:
        raise NotImplementedError

    def peak(self) -> int:
        raise NotImplementedError

    def measure(self, fn: Callable[[], Tensor], probes: int) -> tuple[Tensor, int]:
        """Run ``fn`` (a pass of ``probes`` products) and return its result and the peak of the
        memory in use while it ran."""
        self.reset_peak()
        out = fn()
        return out, self.peak()


class CudaMemoryMeter(MemoryMeter):
    """The CUDA caching allocator's counters: ``memory_allocated`` and ``max_memory_allocated``.

    :meth:`reset_peak` calls ``torch.cuda.reset_peak_memory_stats``: a run that reads
    ``max_memory_allocated`` itself sees the peak since the last measurement, not since start.
    """

    def __init__(self, device: torch.device | int | None = None) -> None:
        self.device = device

    def in_use(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


class RssMemoryMeter(MemoryMeter):
    """The process's resident set size (Linux ``/proc/self/status``: ``VmRSS``, ``VmHWM``).

    A measured peak, not an estimate: writing ``5`` to ``/proc/self/clear_refs`` resets the
    high-water mark ``VmHWM`` (Linux ≥ 4.0). It counts everything the process holds (the
    interpreter and libraries too, and memory the C allocator keeps after a free), so limits
    relative to training's peak are relative to the whole process. Unavailable elsewhere.
    """

    _FIELD = re.compile(rb"(VmRSS|VmHWM):\s+(\d+) kB")

    def __init__(self) -> None:
        try:
            self._read()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.available = False

    def _read(self) -> dict[bytes, int]:
        with open("/proc/self/status", "rb") as f:
            return {k: int(v) * 1024 for k, v in self._FIELD.findall(f.read())}

    def in_use(self) -> int:
        return self._read().get(b"VmRSS", 0) if self.available else 0

    def reset_peak(self) -> None:
        if self.available:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        return self._read().get(b"VmHWM", 0) if self.available else 0


def memory_meter(device: torch.device | str) -> MemoryMeter:
    """The meter for ``device``: :class:`CudaMemoryMeter` on CUDA, else :class:`RssMemoryMeter`."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaMemoryMeter(device)
    return RssMemoryMeter()


class MemoryLimit:
    """A ceiling on the memory in use while curvature is measured, and the plan that keeps to it.

    ``limit`` is absolute: the peak of the memory in use as ``meter`` counts it (on CUDA the
    allocator's bytes, on CPU the process's RSS) must stay at or below it during every pass of
    products. Before a pass the headroom is ``limit − in_use()`` (what the caller and the
    measurement already hold, e.g. a Lanczos basis, counts against it). Each pass of k probes on a
    route is metered and its increment (peak − in use before) recorded; the plan models

        increment(k) = fixed + k · per_probe

    from the recorded passes (one pass: per_probe = increment / k, fixed 0, the worst case; two
    pass sizes or more: the line through the smallest and the largest, slope ≥ 0), and a pass
    takes the largest k whose prediction is within ``margin`` × headroom. Nothing known about a
    route: one probe per pass (or the prediction of a route named ``like``, e.g. the batched
    double backward from the one-at-a-time one). One probe predicted not to fit raises
    :class:`CurvatureMemoryError` before the pass runs.

    Out of memory (``torch.OutOfMemoryError``) inside a pass: the operator frees what it held,
    the plan caps the route at half the probes and the pass is retried; at one probe per pass it
    raises :class:`CurvatureMemoryError`. The shared gradient graph of the double-backward routes
    is metered on its own when it is built (it is held, so later passes see it as in use).

    A limit learns across operators: pass one object to every call for a model (``HessianMonitor``
    keeps one per run).

    Args:
        limit: bytes, the peak not to exceed.
        meter: what reads memory; default :func:`memory_meter` of the first operator's device.
        margin: the fraction of the headroom a predicted pass may take (measured peaks vary).
    """

    def __init__(self, limit: int, *, meter: MemoryMeter | None = None, margin: float = 0.9):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(
                f"Expected `limit` to be a positive number of bytes, e.g. 8 * 2**30, got {limit!r}"
            )
        if not 0 < margin <= 1:
            raise ValueError(f"Expected `margin` in (0, 1], got {margin!r}")
        self.limit = limit
        self.meter = meter
        self.margin = float(margin)
        #: Highest peak metered under this limit so far (bytes; 0 before any pass).
        self.peak_seen = 0
        #: Passes that ran out of memory, as (route, probes).
        self.out_of_memory: list[tuple[str, int]] = []
        self._passes: dict[str, dict[int, int]] = {}
        self._cap: dict[str, int] = {}

    def bind(self, device: torch.device) -> MemoryMeter:
        if self.meter is None:
            self.meter = memory_meter(device)
        return self.meter

    def headroom(self) -> int:
        assert self.meter is not None
        return self.limit - self.meter.in_use()

    def predict(self, route: str, probes: int, like: str | None = None) -> float | None:
        """Predicted increment of a pass of ``probes`` on ``route`` (``None``: nothing known)."""
        seen = self._passes.get(route) or (self._passes.get(like) if like else None)
        if not seen:
            return None
        small, large = min(seen), max(seen)
        if small == large:
            per, fixed = seen[small] / small, 0.0
        else:
            per = max((seen[large] - seen[small]) / (large - small), 0.0)
            fixed = max(seen[small] - per * small, 0.0)
        return fixed + per * probes

    def probes_per_pass(self, route: str, requested: int, like: str | None = None) -> int:
        """How many of ``requested`` probes the next pass on ``route`` takes: ≥ 1, or 0 when
        not even one is predicted to fit."""
        assert self.meter is not None
        cap = max(1, min(requested, self._cap.get(route, requested)))
        one = self.predict(route, 1, like)
        if one is None or not self.meter.available:
            return 1  # nothing known (or nothing to read): one probe at a time
        room = self.margin * self.headroom()
        if one > room:
            return 0
        per = self.predict(route, 2, like) - one  # type: ignore[operator]
        if per <= 0:
            return cap
        return max(1, min(cap, int((room - one) // per) + 1))

    def record(self, route: str, probes: int, before: int, peak: int) -> None:
        self.peak_seen = max(self.peak_seen, peak)
        seen = self._passes.setdefault(route, {})
        seen[probes] = max(seen.get(probes, 0), max(peak - before, 0))

    def failed(self, route: str, probes: int) -> int:
        """Record an out-of-memory pass; the probes per pass to retry with (0: none left)."""
        self.out_of_memory.append((route, probes))
        retry = probes // 2
        self._cap[route] = max(retry, 1)
        return retry

    def state_dict(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "passes": {r: dict(v) for r, v in self._passes.items()},
            "cap": dict(self._cap),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.limit = int(state.get("limit", self.limit))  # type: ignore[call-overload]
        # The layouts state_dict writes (a serialiser may have re-typed keys and counts, which
        # str() and int() below undo).
        passes = cast("Mapping[str, Mapping[int, int]]", state.get("passes", {}))
        cap = cast("Mapping[str, int]", state.get("cap", {}))
        self._passes = {str(r): {int(k): int(b) for k, b in v.items()} for r, v in passes.items()}
        self._cap = {str(r): int(k) for r, k in cap.items()}


_MEMORY_FIX = (
    "Raise the limit (HessianMonitor(memory=...)), measure on a smaller probe_batch, or use "
    "route='finite_difference', whose memory is one gradient's"
)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"
