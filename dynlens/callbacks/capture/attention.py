"""Seeing a model's attention logits without changing the model.

:class:`AttentionCapture` intercepts, while it is armed, every call of
:func:`torch.nn.functional.scaled_dot_product_attention` (SDPA), of
:func:`torch.nn.functional.multi_head_attention_forward` (what :class:`torch.nn.MultiheadAttention`
runs; it may or may not call SDPA inside), and of a softmax over the last dimension of a
``(batch, heads, queries, keys)`` tensor — attention written by hand, ``softmax(q·kᵀ·scale + mask)``
(Hugging Face's ``"eager"`` attention, nanoGPT's non-flash path) — through a
:class:`torch.overrides.TorchFunctionMode`, and measures each call's logits with the pure
functions of :mod:`dynlens.attention` (for a softmax: the scores it receives, masked positions left
out, :func:`dynlens.attention.softmax_logit_sums`). It sees attention
however the model imported SDPA (``F.scaled_dot_product_attention``, ``from torch.nn.functional
import scaled_dot_product_attention``), without hooks on the attention modules.

* **Each call once.** Inside a mode's handler the mode is off, so the SDPA call that
  ``multi_head_attention_forward`` makes internally is not seen a second time.
* **No observer effect.** The attention runs first, exactly as it would without the capture;
  the measurement then reads detached ``q`` and ``k`` under ``no_grad`` with autocast off, uses no
  randomness, and never raises into the model: an error is kept and re-raised by :meth:`take`,
  where the monitor's ``fail_soft`` turns it into one warning.
* **Only gradient-recording calls.** Calls under ``no_grad`` or inference mode (evaluation, a
  frozen teacher, validation) are not measured.
* **Named by module.** While armed, global module forward pre-hooks/hooks keep the stack of
  running modules; a call is named after the innermost module of the model that is running
  (``"blocks.0.attn"``, ``"encoder.layers.1.self_attn"``), else ``"call_<i>"`` by its index among
  the step's attention calls. Repeated calls under one name pool (max of maxima, sums of squares).

The mode and the global hooks exist only between :meth:`arm` and :meth:`disarm`, so steps that
are not measured pay nothing.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode

from ...attention import (
    DEFAULT_CHUNK_ELEMENTS,
    AttentionLogitSums,
    attention_logit_sums,
    masked_below,
    multi_head_attention_logit_sums,
    softmax_logit_sums,
)
from ..context import in_own_forward

_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
# the three spellings of a softmax a hand-written attention may call
_SOFTMAX = (F.softmax, torch.Tensor.softmax, torch.softmax)
# a soft cap, tanh(s / c) · c (Gemma 2), as written by hand
_TANH = (torch.tanh, torch.Tensor.tanh)
_MUL = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
_MHA_SIGNATURE = inspect.signature(_MHA)
# the arguments of multi_head_attention_forward that shape q·k (value, dropout, out_proj do not)
_MHA_QK_ARGS = (
    "query",
    "key",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "add_zero_attn",
    "key_padding_mask",
    "attn_mask",
    "use_separate_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "static_k",
)


def _sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> dict[str, Any]:
    # binds SDPA's arguments the way SDPA does (scale and enable_gqa are keyword-only there)
    return {
        "query": query,
        "key": key,
        "attn_mask": attn_mask,
        "is_causal": is_causal,
        "scale": scale,
        "enable_gqa": enable_gqa,
    }


def _eager_name(name: str) -> str:
    """A module's name as in the eager model: ``torch.compile``'s wrapper adds ``_orig_mod``."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


class _Interceptor(TorchFunctionMode):
    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__()
        self.capture = capture

    # Never traced by Dynamo: inside a torch.compile'd model, Dynamo would otherwise compile this
    # handler anew for each kind of call it sees (tens of graphs, up to its recompile limit);
    # disabled, the measured forward adds one graph, once
    @torch.compiler.disable
    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        attention = func is _SDPA or func is _MHA
        if attention or (func in _SOFTMAX and _attention_scores(args, kwargs) is not None):
            self.capture._record(func, args, kwargs)
        elif func in _TANH and args and _attention_scores((args[0], -1), {}) is not None:
            self.capture._tanh = (result, args[0])
        elif func in _MUL and self.capture._tanh is not None and len(args) == 2:
            self.capture._capping(args, result)
        return result


def _attention_scores(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The scores of a softmax call that is attention written by hand: over the last dimension
    of a ``(batch, heads, queries, keys)`` tensor that records gradients. An output softmax
    (``(N, C)``, ``(B, T, V)``) or a mixture-of-experts router (``(tokens, experts)``) is not."""
    scores = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or dim not in (-1, 3):
        return None
    return scores if scores.requires_grad and scores.is_floating_point() else None


class AttentionCapture:
    """Measures attention logits of a model's training steps; see the module docstring.

    Args:
        chunk_elements: most attention logits one chunk of a measurement holds.
    """

    def __init__(self, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        self.chunk_elements = chunk_elements
        self._mode = _Interceptor(self)
        self._names: dict[nn.Module, str] = {}
        self._stack: list[nn.Module] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._sums: dict[str, AttentionLogitSums] = {}
        self._calls = 0
        self._error: Exception | None = None
        #: Attention calls seen (measured or not) since the last :meth:`take`.
        self.calls_seen = 0
        #: Layers whose scores are soft-capped before their softmax, with the cap c of
        #: tanh(s / c) · c: their raw scores s are measured.
        self.capped: dict[str, float] = {}
        # a tanh of a (batch, heads, queries, keys) tensor, and a cap of one, awaiting the
        # softmax that would consume them: (tanh's result, its input[, the cap])
        self._tanh: tuple[torch.Tensor, torch.Tensor] | None = None
        self._capped: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self._tag: Any = None  # what the owner armed the statistics being gathered under
        self._taken: tuple[Any, dict[str, AttentionLogitSums]] | None = None  # the last take

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module, owner: str = "") -> None:
        """Learn the names of ``model``'s submodules (the model itself names nothing)."""
        self.detach()
        self._names = {module: _eager_name(name) for name, module in model.named_modules() if name}

    def detach(self) -> None:
        self.disarm()
        self._names = {}
        self._reset()
        self._tag, self._taken = None, None

    def _reset(self) -> None:
        self._sums, self._error, self.calls_seen = {}, None, 0
        self._tanh = self._capped = None

    def arm(self, tag: Any = None) -> None:
        """Start intercepting (a measured micro-batch begins); statistics of earlier micro-batches
        of the same optimizer step are kept until :meth:`take`. ``tag`` names what is measured
        (the optimizer step), so that another reader can ask for it (:meth:`statistics_of`)."""
        self._tag = tag
        if self.armed:
            return
        self._stack, self._calls = [], 0
        self._handles = [
            register_module_forward_pre_hook(self._enter_module),
            register_module_forward_hook(self._leave_module, always_call=True),
        ]
        self._mode.__enter__()

    def disarm(self) -> None:
        """Stop intercepting (before the backward pass, and at the end of the micro-batch); what
        was measured stays for :meth:`take`."""
        if not self.armed:
            return
        self._mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles, self._stack = [], []

    def take(self) -> dict[str, AttentionLogitSums]:
        """The statistics since the last ``take``, per name in call order; stops intercepting.

        Raises the first error a measurement met (so that the caller can fail soft)."""
        self.disarm()
        sums, error = self._sums, self._error
        self._reset()
        self._taken = None if error is not None else (self._tag, sums)
        if error is not None:
            raise error
        return sums

    def statistics_of(self, tag: Any) -> dict[str, AttentionLogitSums] | None:
        """The statistics gathered under ``tag`` (see :meth:`arm`), whether or not the owner has
        taken them yet; ``None`` when nothing was armed under it, or a measurement failed. For a
        second reader of the same measurement: it does not take anything from the owner."""
        if tag is None:
            return None
        if self._taken is not None and self._taken[0] == tag:
            return dict(self._taken[1])
        if self._tag == tag and self._error is None:
            return dict(self._sums)
        return None

    # -------------------------------------------------------------------------- interception
    def _enter_module(self, module: nn.Module, args: Any) -> None:
        self._stack.append(module)

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack and self._stack[-1] is module:
            self._stack.pop()
        elif module in self._stack:  # a forward left by an exception elsewhere
            del self._stack[len(self._stack) - 1 - self._stack[::-1].index(module) :]

    def _name(self) -> str:
        for module in reversed(self._stack):
            name = self._names.get(module)
            if name is not None and not isinstance(module, nn.Softmax):
                return name
        return f"call_{self._calls}"

    def _record(self, func: Any, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled() or in_own_forward():
            return  # evaluation, or another monitor's replay of the step
        self.calls_seen += 1
        name = self._name()
        self._calls += 1
        if self._error is not None:
            return
        try:
            if func is _SDPA:
                sums = attention_logit_sums(
                    **_sdpa_arguments(*args, **kwargs), chunk_elements=self.chunk_elements
                )
            elif func in _SOFTMAX:
                scores = _attention_scores(args, kwargs)
                assert scores is not None  # checked before the call was taken as attention
                scores = self._raw(scores, name)
                sums = softmax_logit_sums(scores, chunk_elements=self.chunk_elements)
            else:
                bound = _MHA_SIGNATURE.bind(*args, **kwargs)
                bound.apply_defaults()
                qk = {k: bound.arguments[k] for k in _MHA_QK_ARGS}
                sums = multi_head_attention_logit_sums(**qk, chunk_elements=self.chunk_elements)
        except Exception as exc:  # never into the model's forward: re-raised by take()
            self._error = exc
            return
        previous = self._sums.get(name)
        self._sums[name] = sums if previous is None else previous.merge(sums)

    def _capping(self, args: tuple, result: torch.Tensor) -> None:
        """A product of the pending tanh's result and a number c: the scores are capped at c."""
        assert self._tanh is not None
        capped, inner = self._tanh
        a, b = args
        cap = b if a is capped else a if b is capped else None
        if isinstance(cap, (int, float)) and not isinstance(cap, bool):
            self._tanh, self._capped = None, (result, inner, float(cap))

    def _raw(self, scores: torch.Tensor, name: str) -> torch.Tensor:
        """The scores a softmax receives with a soft cap undone: where the step capped scores
        of this shape just before, the raw s = c · (s / c) at every position the mask keeps."""
        pending, self._capped, self._tanh = self._capped, None, None
        if pending is None or pending[1].shape != scores.shape:
            return scores
        _, inner, cap = pending
        with torch.no_grad():
            raw = inner.detach().to(scores.dtype) * cap
            kept = scores.detach() > masked_below(scores.dtype)
            scores = torch.where(kept, raw, scores.detach())
        self.capped[name] = cap
        return scores
