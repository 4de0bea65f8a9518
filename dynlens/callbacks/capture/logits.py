"""Getting a training step's output logits without changing the model.

Shared by every monitor that looks at output logits (softmax collapse, logit growth), so they all
find logits the same way and fail with the same advice.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from ..context import in_own_forward
from ..validate import ConfigurationError


def _logits_of(output: Any) -> torch.Tensor | None:
    """The logits in a module's output: a tensor, the first of a tuple, or a ``logits`` field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        value = output.get("logits")
        return value if isinstance(value, torch.Tensor) else None
    value = getattr(output, "logits", None)  # e.g. Hugging Face ModelOutput
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


#: ``logits_module`` default: find the logits (see :class:`LogitsCapture`).
AUTO = "auto"


def _is_model_output(output: Any) -> bool:
    """A structured output that names its logits (a Hugging Face ``ModelOutput``, a dict)."""
    if isinstance(output, Mapping):
        return isinstance(output.get("logits"), torch.Tensor)
    return not isinstance(output, (torch.Tensor, tuple, list)) and isinstance(
        getattr(output, "logits", None), torch.Tensor
    )


def _is_logits(output: Any) -> bool:
    """A plain tensor that can be logits: floating, at least ``(N, C)``."""
    return isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() >= 2


def _contains(outer: str, inner: str) -> bool:
    """Module ``outer`` is ``inner`` or one of its ancestors (by dotted names; ``""`` is the
    LightningModule itself)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def is_causal_lm(module: nn.Module) -> bool:
    """``module`` is a Hugging Face causal-LM task model (``GPT2LMHeadModel``,
    ``LlamaForCausalLM``, ...), whose loss scores the logits at position t against
    ``labels[t + 1]``: its class is one of ``transformers``' registered causal-LM heads, or its
    own ``loss_type`` says so."""
    if getattr(module, "loss_type", None) == "ForCausalLM":
        return True
    registry = sys.modules.get("transformers.models.auto.modeling_auto")
    if registry is None:  # no Hugging Face model was ever built in this process
        return False
    names = getattr(registry, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {})
    heads = {n for v in names.values() for n in ((v,) if isinstance(v, str) else v)}
    return any(cls.__name__ in heads for cls in type(module).__mro__)


class LogitsCapture:
    """Finds a training step's logits: a forward hook on a module, or the step's outputs.

    Args:
        logits_module: dotted name of the submodule whose output is the logits (``"head"``,
            ``"model.lm_head"``); a forward hook records its output during measured steps only.
            ``None``: read ``outputs[output_key]`` of ``training_step`` instead. ``"auto"``
            (default): at the first measured step, ``outputs[output_key]`` when
            ``training_step`` returns it; otherwise the outermost module whose output names its
            logits (a Hugging Face ``ModelOutput`` with ``.logits``, a dict with ``"logits"``);
            otherwise the LightningModule's own ``forward`` when it returns a floating tensor of
            at least two dimensions; otherwise the one direct submodule that ``training_step``
            called and that returned such a tensor. That choice is then kept (:attr:`found`),
            and a step whose logits cannot be told apart raises a :class:`ConfigurationError`
            that names the candidates.
        output_key: key of the logits in the dict ``training_step`` returns.
    """

    def __init__(self, logits_module: str | None = AUTO, output_key: str = "logits") -> None:
        if logits_module is not None and (not isinstance(logits_module, str) or not logits_module):
            raise ConfigurationError(
                f"Expected `logits_module` to be 'auto', None or a submodule name such as "
                f"'head', got {logits_module!r}."
            )
        self.logits_module = logits_module
        self.output_key = output_key
        #: Where the logits come from once known: ``(source, description)``, ``source`` a module
        #: name (``""`` for the LightningModule), or ``None`` for ``training_step``'s outputs.
        self.found: tuple[str | None, str] | None = None
        #: The logits come from a Hugging Face causal LM (targets need shifting).
        self.causal_lm = False
        self._model: nn.Module | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._armed = False
        self._captured: list[torch.Tensor] = []
        # "auto" before the logits are found: the step's module outputs, by module
        self._searching: dict[nn.Module, Any] | None = None
        self._search_handle: torch.utils.hooks.RemovableHandle | None = None
        self._children: set[nn.Module] = set()

    @property
    def hooked(self) -> bool:
        """The logits are recorded by a forward hook (so they can be taken before backward)."""
        return self._handle is not None

    def advice(self, owner: str) -> str:
        """The two ways to give ``owner`` the logits, for error messages."""
        return (
            f"{owner} needs the output logits. Either return them from training_step, "
            f"`return {{'loss': loss, '{self.output_key}': logits.detach()}}`, or name the module "
            f"that produces them: `{owner}(logits_module='head')`."
        )

    def attach(self, pl_module: nn.Module, owner: str) -> None:
        """Register the forward hook (when a module is named). Call from ``setup``."""
        self.detach()
        self._model = pl_module
        self.found, self.causal_lm = None, False
        if self.logits_module is None:
            self._resolve(None, f"training_step's {self.output_key!r}")
        elif self.logits_module != AUTO:
            try:
                pl_module.get_submodule(self.logits_module)
            except AttributeError:
                names = [name for name, _ in pl_module.named_modules() if name]
                shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
                raise ConfigurationError(
                    f"{owner}(logits_module={self.logits_module!r}): no such submodule. "
                    f"The model has: {shown}."
                ) from None
            self._resolve(self.logits_module, f"the output of `{self.logits_module}`")

    def _resolve(self, source: str | None, description: str) -> None:
        model = self._model
        assert model is not None
        if source is not None:
            self._handle = model.get_submodule(source).register_forward_hook(self._record)
        at = "" if source is None else source
        self.causal_lm = any(
            (_contains(at, name) or _contains(name, at)) and is_causal_lm(module)
            for name, module in model.named_modules()
        )
        self.found = (source, description)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.disarm()
        self._captured = []

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._armed and not in_own_forward():  # not another monitor's replay or evaluation
            logits = _logits_of(output)
            if logits is not None:
                self._captured.append(logits.detach())

    def _search(self, module: nn.Module, args: Any, output: Any) -> None:
        # every module's output during the first measured step of "auto" (the gradient-recording
        # ones: not a frozen teacher under no_grad, not another monitor's replay); only outputs
        # that name their logits and the LightningModule's own are held, of the others only the
        # shape is kept (for the error message), so no activation outlives its time
        if not torch.is_grad_enabled() or in_own_forward() or self._searching is None:
            return
        direct = module is self._model or module in self._children
        if _is_model_output(output) or (direct and _is_logits(output)):
            self._searching.setdefault(module, output)
        elif _is_logits(output):
            self._searching.setdefault(module, tuple(output.shape))

    def arm(self) -> None:
        """Start recording the hooked module's outputs (a measured training step begins)."""
        self._armed = True
        self._captured = []
        if self.found is None and self._search_handle is None:
            self._searching = {}
            self._children = set(self._model.children()) if self._model is not None else set()
            self._search_handle = register_module_forward_hook(self._search)

    def disarm(self) -> None:
        """Stop recording (what was recorded stays for :meth:`take`)."""
        self._armed = False
        if self._search_handle is not None:
            self._search_handle.remove()
            self._search_handle, self._searching = None, None

    def take(self, outputs: Any, owner: str = "the monitor") -> list[torch.Tensor]:
        """The logits of the step that just ran (several when the hooked module ran repeatedly),
        then stop recording. Empty when none were found. With ``"auto"``, the first call decides
        where the logits come from (:attr:`found`), or raises :class:`ConfigurationError` naming
        the candidates when that cannot be decided."""
        try:
            if self.found is None and self._searching is not None:
                return self._discover(outputs, self._searching, owner)
            if self.found is not None and self.found[0] is not None:
                captured, self._captured = self._captured, []
                return captured
            logits = outputs.get(self.output_key) if isinstance(outputs, Mapping) else None
            return [logits.detach()] if isinstance(logits, torch.Tensor) else []
        finally:
            self.disarm()

    def _discover(self, outputs: Any, seen: dict[nn.Module, Any], owner: str) -> list[torch.Tensor]:
        """Decide where the logits come from, from the first measured step (see the class)."""
        logits = outputs.get(self.output_key) if isinstance(outputs, Mapping) else None
        if isinstance(logits, torch.Tensor):
            self._resolve(None, f"training_step's {self.output_key!r}")
            return [logits.detach()]
        model = self._model
        assert model is not None
        names = {module: name for name, module in model.named_modules()}
        structured = {
            names[m]: out for m, out in seen.items() if m in names and _is_model_output(out)
        }
        outermost = [
            n for n in structured if not any(o != n and _contains(o, n) for o in structured)
        ]
        if len(outermost) == 1:
            (name,) = outermost
            kind = type(model.get_submodule(name)).__name__
            named = getattr(structured[name], "logits", None) is not None  # ModelOutput
            what = "its .logits" if named else "its 'logits'"
            label = f"`{name}`" if name else "the LightningModule's forward"
            self._resolve(name, f"the output of {label} ({kind}, {what})")
            logits = _logits_of(structured[name])
            assert logits is not None  # a structured output names its logits
            return [logits.detach()]
        own = seen.get(model)
        if not outermost and isinstance(own, torch.Tensor):
            self._resolve("", "the output of the LightningModule's forward")
            return [own.detach()]
        children = [
            m for m, out in seen.items() if m is not model and isinstance(out, torch.Tensor)
        ]
        if not outermost and len(children) == 1:  # training_step called one submodule itself
            (child,) = children
            name = names[child]
            self._resolve(name, f"the output of `{name}` ({type(child).__name__})")
            return [seen[child].detach()]
        tensors = [
            f"{names[m] or '(the LightningModule)'} {tuple(getattr(out, 'shape', out))}"
            for m, out in seen.items()
            if m in names and isinstance(out, (tuple, torch.Tensor))
        ]
        if len(outermost) > 1:
            found = ", ".join(f"`{n or '(the LightningModule)'}`" for n in outermost)
            detail = f"Several modules return logits ({found}): name the one to read"
        elif tensors:
            shown = ", ".join(tensors[::-1][:8])
            detail = f"No module returned logits by name; the candidates, last run first: {shown}"
        else:
            detail = "No module returned a floating tensor in the training step"
        raise ConfigurationError(f"{self.advice(owner)} {detail}.")


def take_logits(capture: LogitsCapture, outputs: Any, owner: str) -> list[torch.Tensor]:
    """The micro-batch's logits from ``capture``; a :class:`ConfigurationError` with the two ways
    to provide them when there are none."""
    logits = capture.take(outputs, owner)
    if not logits:
        raise ConfigurationError(capture.advice(owner))
    return logits


def logits_found(capture: LogitsCapture, *, targets: str = "") -> str | None:
    """What to say once per run (the monitor's ``logits_found`` event): which module
    ``logits_module="auto"`` found the logits in, ``None`` when there is nothing to say (a module
    named by hand, logits that ``training_step`` returns itself); ``targets`` adds how the
    targets are read."""
    if capture.logits_module != AUTO or capture.found is None or capture.found[0] is None:
        return None
    message = f"reading the output logits from {capture.found[1]}"
    return message + (f"; {targets}" if targets else "")
