"""PerpGrad: ⊥Grad for any Trainer's optimizer, as a callback."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from ..compat import Callback
from ..optim import project_out_weights_


class PerpGrad(Callback):
    """Apply ⊥Grad (Prieto et al. 2025) to every optimizer step of a Trainer.

    In ``on_before_optimizer_step`` — after gradient accumulation, AMP unscaling and DDP gradient
    averaging, before gradient clipping — each parameter's gradient is replaced by its component
    orthogonal to the parameter, rescaled to the original norm
    (:func:`dynlens.optim.project_out_weights_`, the same projection :class:`dynlens.OrthoGrad`
    uses). It lets you try ⊥Grad without editing ``configure_optimizers``.

    Unlike the monitors, PerpGrad changes training on purpose.

    Example::

        trainer = Trainer(callbacks=[dynlens.PerpGrad()])
    """

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        project_out_weights_(p for group in optimizer.param_groups for p in group["params"])

    @override
    def state_dict(self) -> dict[str, Any]:
        # Nothing to save; defined so both Lightning packages agree the callback is stateless
        # in the same way (see dynlens.compat).
        return {}
