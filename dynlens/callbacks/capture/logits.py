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

from ..context import in_own_forward, loss_of
from ..validate import ConfigurationError
from .agreement import Alignment, Reading, choose, integer_tensors, readings, tolerance


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


def _candidates(output: Any) -> list[tuple[str, list[torch.Tensor]]]:
    """The ways a module's output can hold logits, as ``(how, chunks)``: the output itself
    (``""``), its ``.logits`` or ``"logits"`` (``".logits"``), an element of a tuple or list
    (``"[i]"``, e.g. nanoGPT's ``(logits, loss)``), or all of a list of chunks along the token
    axis (``"chunks"``, e.g. LitGPT's chunked head)."""
    if _is_logits(output):
        return [("", [output])]
    if _is_model_output(output):
        return [(".logits", [_logits_of(output)])]  # type: ignore[list-item]
    if not isinstance(output, (tuple, list)):
        return []
    found = [(f"[{i}]", [x]) for i, x in enumerate(output) if _is_logits(x)]
    first = output[0] if output else None
    if (
        len(output) >= 2
        and len(found) == len(output)
        and isinstance(first, torch.Tensor)
        and all(x.dim() >= 3 and x.shape[:-2] == first.shape[:-2] for x in output)
        and all(x.shape[-1] == first.shape[-1] for x in output)
    ):
        found.append(("chunks", list(output)))
    return found


def _extract(output: Any, how: str) -> list[torch.Tensor]:
    """The logits that ``how`` (see :func:`_candidates`) names in a module's output."""
    if how == "":
        return [output] if isinstance(output, torch.Tensor) else []
    if how == ".logits":
        logits = _logits_of(output) if _is_model_output(output) else None
        return [logits] if logits is not None else []
    if not isinstance(output, (tuple, list)):
        return []
    if how == "chunks":
        return [x for x in output if isinstance(x, torch.Tensor)]
    index = int(how[1:-1])
    item = output[index] if index < len(output) else None
    return [item] if isinstance(item, torch.Tensor) else []


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
            ``training_step`` returns it; otherwise the logits are found by what they do: the
            tensor whose mean cross-entropy against the batch's targets (as given or shifted by
            one position) reproduces the loss ``training_step`` returned (:mod:`.agreement`),
            whether a module returns it, returns it in a tuple (nanoGPT's ``(logits, loss)``),
            names it (``.logits``, ``"logits"``) or returns it in chunks along the token axis
            (LitGPT's chunked head); the outermost such module. Where nothing reproduces the
            loss (a loss with other terms: z-loss, label smoothing, auxiliary losses), the
            outermost module whose output names its logits; otherwise the LightningModule's own
            ``forward`` when it returns a floating tensor of at least two dimensions; otherwise
            the one direct submodule that ``training_step`` called and that returned such a
            tensor. That choice is then kept (:attr:`found`), and a step whose logits cannot be
            told apart raises a :class:`ConfigurationError` that names what was tried.
        output_key: key of the logits in the dict ``training_step`` returns.

    Whatever the source, the first measured step also decides how the batch's targets align
    with the logits, by the same agreement (:attr:`alignment`). Hooks never run inside a
    ``torch.compile``'d region (Dynamo does not see them): a compiled model is read at its
    outermost module, which runs eagerly.
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
        #: How the logits sit in the source module's output (see :func:`_candidates`).
        self.how = ""
        #: The model's class says causal LM (a hint where both alignments fit the loss).
        self.causal_lm = False
        #: The first measured step decided the targets' alignment (or that none can be).
        self.aligned = False
        #: The alignment whose cross-entropy reproduced the step's loss (``None``: none did, or
        #: the step returned no loss or its batch has no integer tensor).
        self.alignment: Alignment | None = None
        #: Where a loss was returned and nothing reproduced it: the closest reading (and then
        #: :attr:`alignment` is set only where the targets' shape allows one alignment).
        self.disagreement: Reading | None = None
        self._model: nn.Module | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._armed = False
        self._captured: list[torch.Tensor] = []
        # until the alignment is decided: the measured step's batch, and Lightning's division
        # of the returned loss (accumulated gradients)
        self._batch: Any = None
        self._loss_scale = 1.0
        # "auto" before the logits are found: candidates by (module, how), and every floating
        # output's shape (for the error message); only candidates are held, so no other
        # activation outlives its time
        self._searching: dict[tuple[nn.Module, str], list[torch.Tensor]] | None = None
        self._shapes: dict[nn.Module, tuple[int, ...]] = {}
        self._largest_target: int | None = None
        self._search_handle: torch.utils.hooks.RemovableHandle | None = None
        self._children: set[nn.Module] = set()
        # an error met inside a hook, kept for take() (a hook never raises into the forward)
        self._error: Exception | None = None

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
        self.found, self.causal_lm, self.how = None, False, ""
        self.aligned, self.alignment, self.disagreement = False, None, None
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

    def _resolve(self, source: str | None, description: str, how: str = "") -> None:
        model = self._model
        assert model is not None
        if source is not None:
            self._handle = model.get_submodule(source).register_forward_hook(self._record)
        at = "" if source is None else source
        self.causal_lm = any(
            (_contains(at, name) or _contains(name, at)) and is_causal_lm(module)
            for name, module in model.named_modules()
        )
        self.found, self.how = (source, description), how

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.disarm()
        self._captured = []
        self._batch = None

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return  # invisible to Dynamo: the compiled graph is the one without monitors
        if self._armed and not in_own_forward():  # not another monitor's replay or evaluation
            try:
                self._captured.extend(x.detach() for x in _extract(output, self.how))
            except Exception as exc:  # never into the model's forward: re-raised by take()
                self._error = self._error or exc

    def _search(self, module: nn.Module, args: Any, output: Any) -> None:
        # every module's output during the first measured step of "auto" (the gradient-recording
        # ones: not a frozen teacher under no_grad, not another monitor's replay)
        if torch.compiler.is_compiling():
            return
        if not torch.is_grad_enabled() or in_own_forward() or self._searching is None:
            return
        try:
            direct = module is self._model or module in self._children
            for how, chunks in _candidates(output):
                if direct or how == ".logits" or self._may_be_logits(chunks[0]):
                    kept = self._searching.setdefault((module, how), [])
                    kept.extend(x.detach() for x in chunks)
                self._shapes.setdefault(module, tuple(chunks[0].shape))
        except Exception as exc:  # never into the model's forward: re-raised by take()
            self._error = self._error or exc

    def _may_be_logits(self, chunk: torch.Tensor) -> bool:
        """Enough classes for every target of the batch (so its cross-entropy can be read)."""
        largest = self._largest_target
        return largest is not None and chunk.shape[-1] > max(largest, 1)

    def arm(self, batch: Any = None, loss_scale: float = 1.0) -> None:
        """Start recording the hooked module's outputs (a measured training step begins).
        ``batch`` and ``loss_scale`` (what Lightning divides the returned loss by, the
        accumulated micro-batches) serve the first measured step's decisions only."""
        self._armed = True
        self._captured = []
        if not self.aligned:
            self._batch, self._loss_scale = batch, float(loss_scale)
        if self.found is None and self._search_handle is None:
            self._searching, self._shapes = {}, {}
            targets = [t for _, t in integer_tensors(batch)]
            self._largest_target = max((int(t.max()) for t in targets), default=None)
            self._children = set(self._model.children()) if self._model is not None else set()
            self._search_handle = register_module_forward_hook(self._search)

    def disarm(self) -> None:
        """Stop recording (what was recorded stays for :meth:`take`)."""
        self._armed = False
        if self._search_handle is not None:
            self._search_handle.remove()
            self._search_handle, self._searching = None, None

    def take(self, outputs: Any, owner: str = "the monitor") -> list[torch.Tensor]:
        """The logits of the step that just ran (several when the hooked module ran repeatedly
        or returned chunks), then stop recording. Empty when none were found. The first call
        decides where the logits come from (:attr:`found`, with ``"auto"``) and how the targets
        align (:attr:`alignment`), or raises :class:`ConfigurationError` naming the candidates
        when the logits cannot be told apart."""
        try:
            error, self._error = self._error, None
            if error is not None:
                raise error
            if self.found is None and self._searching is not None:
                logits = self._discover(outputs, self._searching, owner)
            elif self.found is not None and self.found[0] is not None:
                logits, self._captured = self._captured, []
            else:
                value = outputs.get(self.output_key) if isinstance(outputs, Mapping) else None
                logits = [value.detach()] if isinstance(value, torch.Tensor) else []
            if logits and not self.aligned:
                self._align(logits, outputs)
                self._agree()
            return logits
        finally:
            self.disarm()

    def _agree(self) -> None:
        """Rank 0's decisions on every rank: ranks see different batches, and a decision by
        agreement with the loss could differ between them (a rank whose targets are all
        ignored); the monitors then reduce the same quantities everywhere."""
        trainer = getattr(self._model, "_trainer", None)
        if trainer is None or getattr(trainer, "world_size", 1) <= 1:
            return
        mine = (self.found, self.how, self.alignment, self.disagreement)
        found, how, self.alignment, self.disagreement = trainer.strategy.broadcast(mine, src=0)
        if (found, how) != (self.found, self.how):
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            self._resolve(found[0], found[1], how)

    def _step_loss(self, outputs: Any) -> torch.Tensor | None:
        loss = loss_of(outputs)
        return loss.detach().reshape(()) if loss is not None and loss.is_floating_point() else None

    def _align(self, logits: list[torch.Tensor], outputs: Any) -> None:
        """Decide the targets' alignment by agreement with the step's loss (see the class)."""
        self.aligned = True
        batch, self._batch = self._batch, None
        loss = self._step_loss(outputs)
        if loss is None or batch is None:
            return
        found = readings(logits, batch, float(loss) * self._loss_scale)
        best = choose(found, tolerance(loss.dtype, logits[0].dtype), self.causal_lm)
        if best is not None or not found:
            self.alignment = best.alignment if best is not None else None
            return
        # Nothing reproduced the loss (it has other terms). The first targets that fit: read
        # only where their shape allows one alignment (a label per sample), never a guessed shift.
        self.disagreement = found[0]
        key = next(k for k, _ in integer_tensors(batch) if any(r.alignment.key == k for r in found))
        fits = [r.alignment for r in found if r.alignment.key == key]
        if len(fits) == 1 and not fits[0].shift:
            self.alignment = fits[0]
            self.disagreement = next(r for r in found if r.alignment == fits[0])

    def _discover(
        self, outputs: Any, seen: dict[tuple[nn.Module, str], list[torch.Tensor]], owner: str
    ) -> list[torch.Tensor]:
        """Decide where the logits come from, from the first measured step (see the class)."""
        value = outputs.get(self.output_key) if isinstance(outputs, Mapping) else None
        if isinstance(value, torch.Tensor):
            self._resolve(None, f"training_step's {self.output_key!r}")
            return [value.detach()]
        model = self._model
        assert model is not None
        names = {module: name for name, module in model.named_modules()}
        seen = {k: v for k, v in seen.items() if k[0] in names}
        tried = self._by_agreement(outputs, seen, names, owner)
        if isinstance(tried, list):
            return tried
        structured = {names[m]: chunks for (m, how), chunks in seen.items() if how == ".logits"}
        outermost = [
            n for n in structured if not any(o != n and _contains(o, n) for o in structured)
        ]
        if len(outermost) == 1:
            (name,) = outermost
            kind = type(model.get_submodule(name)).__name__
            label = f"`{name}`" if name else "the LightningModule's forward"
            self._resolve(name, f"the output of {label} ({kind}, its logits by name)", ".logits")
            return structured[name]
        own = seen.get((model, ""))
        if not outermost and own is not None:
            self._resolve("", "the output of the LightningModule's forward")
            return own
        # training_step called one submodule itself, which returned one such tensor (or a
        # tuple holding one, as nanoGPT's (logits, loss))
        children = [
            (m, how)
            for (m, how) in seen
            if m is not model and m in self._children and how != "chunks"
        ]
        if not outermost and len(children) == 1:
            ((child, how),) = children
            name = names[child]
            part = f"{how} " if how else ""
            self._resolve(name, f"the output {part}of `{name}` ({type(child).__name__})", how)
            return seen[(child, how)]
        shapes = [
            f"{names[m] or '(the LightningModule)'} {shape}"
            for m, shape in self._shapes.items()
            if m in names
        ]
        if len(outermost) > 1:
            found = ", ".join(f"`{n or '(the LightningModule)'}`" for n in outermost)
            detail = f"Several modules return logits ({found}): name the one to read"
        elif shapes:
            shown = ", ".join(shapes[::-1][:8])
            detail = (
                f"No module's output reproduced the loss by its cross-entropy{tried} or named "
                f"its logits; the candidates, last run first: {shown}"
            )
        else:
            detail = "No module returned a floating tensor in the training step"
        raise ConfigurationError(f"{self.advice(owner)} {detail}.")

    def _by_agreement(
        self,
        outputs: Any,
        seen: dict[tuple[nn.Module, str], list[torch.Tensor]],
        names: dict[nn.Module, str],
        owner: str,
    ) -> list[torch.Tensor] | str:
        """The logits of the outermost candidate whose cross-entropy reproduces the step's loss
        (:attr:`found` set); else what was tried, for the error message."""
        loss, batch = self._step_loss(outputs), self._batch
        if loss is None or batch is None:
            return " (the step returned no loss to compare with)"
        if not integer_tensors(batch):
            return " (the batch holds no integer targets)"
        scaled = float(loss) * self._loss_scale
        agreeing: dict[tuple[str, str], list[torch.Tensor]] = {}
        for (module, how), chunks in seen.items():
            found = readings(chunks, batch, scaled)
            if found and found[0].discrepancy <= tolerance(loss.dtype, chunks[0].dtype):
                agreeing[(names[module], how)] = chunks
        outer = [
            k for k in agreeing if not any(o[0] != k[0] and _contains(o[0], k[0]) for o in agreeing)
        ]
        distinct = {tuple(x.data_ptr() for x in agreeing[k]) for k in outer}
        if len(distinct) > 1:
            shown = ", ".join(f"`{n or '(the LightningModule)'}`{h}" for n, h in outer)
            raise ConfigurationError(
                f"{self.advice(owner)} Several outputs reproduce the loss by their "
                f"cross-entropy ({shown}): name the one to read."
            )
        if not outer:
            return f" ({scaled:.6g}; {len(seen)} candidate(s) tried)"
        name, how = outer[0]
        assert self._model is not None
        kind = type(self._model.get_submodule(name)).__name__
        label = f"`{name}`" if name else "the LightningModule's forward"
        part = {"": "", ".logits": " .logits", "chunks": " (chunks)"}.get(how, f"{how}")
        self._resolve(
            name,
            f"the output{part} of {label} ({kind}): its cross-entropy reproduces the loss",
            how,
        )
        return agreeing[(name, how)]


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
