"""Memory: meters and the limit that Hessian-vector products are planned under."""

from __future__ import annotations

import ctypes
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
    #: What the readings count, in words (logged and said in messages beside the limit).
    counts: str = "memory in use"
    #: The smallest limit (bytes over what is counted from) that the readings can hold a
    #: measurement to: below it they are noise, not the measurement's memory.
    resolution: int = 0
    #: Increments (bytes) below which a reading is noise rather than what a pass needed: a pass
    #: is planned as needing at least this much, and a trial that reads less does not count.
    granularity: int = 0
    #: How much more than its reading the same pass may take another time (a fraction): plans
    #: keep that much room beside every prediction.
    spread: float = 0.0

    def rebase(self) -> None:
        """Count from the memory in use now: what the process held before (the interpreter,
        libraries, data, the model built before training) is no longer counted. Called by
        ``HessianMonitor`` just before training, so that limits relative to training's peak
        mean what training itself uses. A meter that counts only training's memory already
        (CUDA's allocator) does nothing."""

    def in_use(self) -> int:
        raise NotImplementedError

    def settle(self) -> None:
        """Give back what was freed but is still held for reuse (between micro-batches of a
        pass, so that each starts from what is allocated). Nothing to do by default."""

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

    counts = "CUDA allocator bytes (max_memory_allocated)"

    def __init__(self, device: torch.device | int | None = None) -> None:
        self.device = device

    def in_use(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


class RssMemoryMeter(MemoryMeter):
    """The process's resident set size (Linux ``/proc/self/status``: ``VmRSS``, ``VmHWM``) over a
    baseline: by default the RSS when the meter was made, moved by :meth:`rebase`.

    A measured peak, not an estimate: writing ``5`` to ``/proc/self/clear_refs`` resets the
    high-water mark ``VmHWM`` (Linux ≥ 4.0). RSS counts everything the process holds (the
    interpreter and libraries, about 0.4 GB with torch, and memory the C allocator keeps after a
    free), so the readings are over :attr:`baseline`: ``HessianMonitor`` rebases just before
    training, and the meter then counts what training (and the measurement) added to the
    process, the CPU's counterpart of CUDA's allocator. Unavailable outside Linux.
    """

    #: The interpreter's own growth while a measurement runs (modules imported on first use,
    #: the C allocator's arenas) reaches a few MiB; a limit of a tiny model's 2× would be
    #: broken by it, not by the measurement.
    resolution = 64 * 2**20
    #: RSS moves by pages and by the C allocator's arenas, whatever was allocated.
    granularity = 4 * 2**20
    #: The same product read 82 and 74 MiB, 131 and 145 MiB, and 10-20% more in micro-batches
    #: than alone; a planned micro-batch read up to 1.5× what the trials before it predicted
    #: (the trials reuse memory the C allocator kept, which their readings cannot see; the
    #: 1,024-sample trial of ``tests/curvature/test_microbatch.py`` read 66-82 MiB).
    spread = 0.5

    _FIELD = re.compile(rb"(VmRSS|VmHWM):\s+(\d+) kB")

    def __init__(self) -> None:
        #: Bytes of RSS not counted (the process's RSS when the meter was made or rebased).
        self.baseline = 0
        self._trim = _malloc_trim()
        try:
            self.baseline = self._read().get(b"VmRSS", 0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.available = False
        self.counts = "the process's resident memory over its state when the meter was made"

    def _read(self) -> dict[bytes, int]:
        # Memory that was freed but that the C allocator keeps would count as in use (and hide
        # the next pass's need, which reuses it): give it back to the system first.
        self._trim()
        with open("/proc/self/status", "rb") as f:
            return {k: int(v) * 1024 for k, v in self._FIELD.findall(f.read())}

    def settle(self) -> None:
        self._trim()

    def rebase(self) -> None:
        if self.available:
            self.baseline = self._read().get(b"VmRSS", 0)
            self.counts = "the process's resident memory over its state before training"

    def in_use(self) -> int:
        return self._read().get(b"VmRSS", 0) - self.baseline if self.available else 0

    def reset_peak(self) -> None:
        if self.available:
            self._trim()  # the high-water mark starts from what is allocated
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        return self._read().get(b"VmHWM", 0) - self.baseline if self.available else 0


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``: returns the heap's free pages to the system, so that RSS is
    what is allocated (a no-op where the C library has none)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


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

    def room(self) -> float:
        """What a predicted pass may take: ``margin`` × the headroom, less the meter's spread."""
        assert self.meter is not None
        return self.margin * self.headroom() / (1.0 + self.meter.spread)

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
        room = self.room()
        if one > room:
            return 0
        per = self.predict(route, 2, like) - one  # type: ignore[operator]
        if per <= 0:
            return cap
        return max(1, min(cap, int((room - one) // per) + 1))

    def record(self, route: str, probes: int, before: int, peak: int) -> None:
        self.peak_seen = max(self.peak_seen, peak)
        seen = self._passes.setdefault(route, {})
        seen[probes] = max(seen.get(probes, 0), peak - before, self._noise())

    def _noise(self) -> int:
        """The meter's granularity: increments below it are noise (0 without a meter)."""
        return self.meter.granularity if self.meter is not None else 0

    def record_like(self, route: str, units: int, like: str, probes: int) -> None:
        """Record for ``units`` on ``route`` the increment recorded for ``probes`` on ``like``
        (one product of a micro-batch of ``units`` samples sizes later micro-batches)."""
        increment = self._passes.get(like, {}).get(probes)
        if increment is not None and increment > self._noise():  # (a floored one bends the line)
            seen = self._passes.setdefault(route, {})
            seen[units] = max(seen.get(units, 0), increment)

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

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> MemoryLimit:
        """A limit restored from :meth:`state_dict` (its meter is set when it is used)."""
        limit = cls(max(int(state.get("limit", 1)), 1))  # type: ignore[call-overload]
        limit.load_state_dict(state)
        return limit

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
