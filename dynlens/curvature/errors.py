"""What goes wrong when curvature is measured: the errors and the fallback warning."""

from __future__ import annotations

import torch

_OOM_ERRORS: tuple[type[BaseException], ...] = (
    (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ()
)


class CurvatureError(RuntimeError):
    """No Hessian-vector-product route can differentiate this loss (the message says why)."""


class CurvatureMemoryError(CurvatureError):
    """Not even one product per pass fits under the :class:`MemoryLimit` (or the device ran out
    of memory at one probe per pass); what the measurement held has been freed."""


class CurvatureFallbackWarning(UserWarning):
    """A route failed (an op lacks a double-backward or forward-AD rule); another one was used."""
