"""The gradients Lightning's gradient clipping hands the optimizer, computed ahead of it.

``on_before_optimizer_step`` runs before Lightning clips (``Trainer(gradient_clip_val=...)``), so a callback that
needs the update the optimizer is about to make (CDAT's :math:`u_t`) must apply the same clipping itself. This is
the default ``LightningModule.configure_gradient_clipping``: by norm (the default algorithm), every gradient of the
optimizer scaled by :math:`\\min(1, c/(\\|g\\|_2 + 10^{-6}))` with the 2-norm over all of them, as
``torch.nn.utils.clip_grad_norm_`` does; by value, every entry clamped to :math:`[-c, c]`.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

__all__ = ["clipped_gradients"]


def clipped_gradients(trainer: pl.Trainer, pl_module: pl.LightningModule, grads: list[Tensor]) -> list[Tensor] | None:
    """``grads`` (every gradient of one optimizer) as Lightning's clipping will leave them, or ``None`` when the
    Trainer does not clip, the module optimizes manually, or it overrides ``configure_gradient_clipping`` (then the
    clipping is its own and cannot be anticipated)."""
    clip = trainer.gradient_clip_val
    if not clip or not pl_module.automatic_optimization:
        return None
    if is_overridden("configure_gradient_clipping", pl_module, pl.LightningModule):
        return None
    clip = float(clip)
    algorithm = trainer.gradient_clip_algorithm
    if algorithm is not None and str(getattr(algorithm, "value", algorithm)) == "value":
        return [g.clamp(-clip, clip) for g in grads]
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    total = torch.linalg.vector_norm(norms)
    coef = torch.clamp(clip / (total + 1e-6), max=1.0)
    return [g * coef.to(g.dtype) for g in grads]
