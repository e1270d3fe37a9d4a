"""The Trainer as the monitors see it: the step axis, reductions, optimizers, parameters, logging, publishing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["first_optimizer", "log_scalars", "make_reduce_fn", "measured_parameters", "publish_metrics", "step_axis"]


# --- trainer helpers ------------------------------------------------------------------------------------------
def step_axis(trainer: pl.Trainer) -> int:
    """The step every curvature value is logged at: optimizer steps taken so far (``LearningRateMonitor``'s)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def make_reduce_fn(trainer: pl.Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A SUM all-reduce through the strategy when there are several processes, else ``None``."""
    if trainer.world_size <= 1:
        return None
    strategy = trainer.strategy

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:
        return strategy.reduce(t.clone(), reduce_op="sum")  # the DDP reduce works in place

    return reduce_fn


def first_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer | None:
    """``trainer.optimizers[0]``, whose parameters and hyperparameters the monitors measure, or ``None``."""
    return trainer.optimizers[0] if trainer.optimizers else None


def measured_parameters(pl_module: torch.nn.Module, optimizer: Any | None) -> list[torch.Tensor]:
    """Trainable parameters curvature is taken over: those managed by ``optimizer`` (all if ``None``)."""
    trainable: list[torch.Tensor] = [p for p in pl_module.parameters() if p.requires_grad]
    if optimizer is None:
        return trainable
    managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    chosen = [p for p in trainable if id(p) in managed]
    return chosen or trainable


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` through every logger (rank zero only; nothing without loggers)."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def publish_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Put ``metrics`` in ``trainer.callback_metrics`` (tensors on the root device, as ``LearningRateMonitor`` does).

    ``EarlyStopping`` and ``ModelCheckpoint`` read their ``monitor`` key there.
    """
    if not metrics:
        return
    device = trainer.strategy.root_device
    trainer.callback_metrics.update({k: torch.tensor(float(v), device=device) for k, v in metrics.items()})
