r"""DirectionalCurvatureMonitor: measure the curvature along the optimizer's update direction and feed CDAT.

At every optimizer step, in ``on_before_optimizer_step`` (gradients present and unscaled, parameters not yet
updated), the callback computes the base optimizer's update direction :math:`u_t` at unit learning rate from its
state (:func:`~lightning_curvature.core.update_direction.update_direction`), then

.. math::

    n_t = \max(-\tilde g_t^\top u_t, 0), \qquad d_t = |u_t^\top \tilde H_t u_t|

with one Hessian-vector product on the current batch (float32, model state preserved), where
:math:`\tilde g, \tilde H` include the optimizer's weight decay (the objective it minimises). It calls
``observe_direction`` on every :class:`~lightning_curvature.schedules.CurvatureDynamicsAwareLR` of the Trainer
built on that optimizer, which sets the learning rate of *this* step.

Reference: V. Roulet et al., "Stepping on the Edge: Curvature Aware Learning Rate Tuners", arXiv 2407.06183.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_curvature.callbacks._loss import LossFn, resolve_loss_fn
from lightning_curvature.core._state import check_mode
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.hvp import HessianOperator, HVPMethod
from lightning_curvature.core.update_direction import (
    directional_terms,
    supports_update_direction,
    update_direction,
    weight_decay_terms,
)
from lightning_curvature.schedules.cdat import CurvatureDynamicsAwareLR

__all__ = ["DirectionalCurvatureMonitor"]

_METHODS = ("double_backward", "forward_over_reverse")


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer) if not isinstance(optimizer, torch.optim.Optimizer) else optimizer


class DirectionalCurvatureMonitor(Callback):
    r"""Feed :class:`~lightning_curvature.schedules.CurvatureDynamicsAwareLR` (CDAT) at every optimizer step.

    Add it to the Trainer and return the scheduler from ``configure_optimizers``; that is all the wiring::

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": CurvatureDynamicsAwareLR(opt), "interval": "step"}}

        trainer = Trainer(callbacks=[DirectionalCurvatureMonitor()])

    Cost: one Hessian-vector product (about two to four gradients) per step on the current batch. The batch is
    the one of the stepping batch; with gradient accumulation the gradient is the accumulated one while the
    curvature is measured on the last micro-batch. Gradient clipping, which Lightning applies after this hook,
    is not part of :math:`u_t`. Under DDP, :math:`n_t` and :math:`d_t` are averaged over ranks, so every rank
    sets the same learning rate.

    Logged (at the ``LearningRateMonitor`` step axis, when the Trainer logs): ``cdat/numerator`` (:math:`n_t`),
    ``cdat/denominator`` (:math:`d_t`), ``cdat/edge_lr`` (:math:`2\bar n_t/\bar d_t`) and ``cdat/lr`` (the lr of
    the first parameter group); with several CDAT schedulers the keys get a ``/{index}`` suffix. ``cdat/lr`` at
    step ``t`` is the lr used by update ``t``; ``LearningRateMonitor`` logs in ``on_train_batch_start``, before
    CDAT sets that lr, so its ``lr-*`` curve shows the previous step's value at ``t``.

    Args:
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` mean loss; default: the module's
            ``curvature_loss(batch)`` method, else ``training_step`` re-run with logging suppressed
            (see :func:`~lightning_curvature.callbacks._loss.resolve_loss_fn`).
        mode: ``"train"`` (the model's own flags: BatchNorm batch statistics, one fixed dropout mask) or
            ``"eval"``.
        method: Hessian-vector product method, ``"double_backward"`` or ``"forward_over_reverse"``.
        log: send the measurements to the Trainer's loggers.
        seed: seed of the measurement's dropout mask. ``None`` (default) draws it from a fork of the global RNG,
            like a fresh training mask, without consuming the training stream, and saves re-seeding every device
            generator (about a millisecond per step); an integer reuses one fixed mask at every step.

    Raises:
        MisconfigurationException: for a bad ``mode``/``method``/``loss_fn``, or (at fit start) a CDAT
            scheduler on an optimizer whose update direction is unknown.

    Example::

        >>> monitor = DirectionalCurvatureMonitor(mode="train")
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[monitor], logger=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        loss_fn: LossFn | None = None,
        mode: str = "train",
        method: HVPMethod = "double_backward",
        log: bool = True,
        seed: int | None = None,
    ) -> None:
        try:
            self.mode = check_mode(mode)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        if method not in _METHODS:
            raise MisconfigurationException(f"`method` must be one of {_METHODS}, got {method!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException(
                f"`loss_fn` must be callable as loss_fn(pl_module, batch), got {loss_fn!r}."
            )
        self.loss_fn = loss_fn
        self.method: HVPMethod = method
        self.log = bool(log)
        self.seed = seed
        self._batch: Any = None
        self._resolved: LossFn | None = None
        self._schedulers: list[CurvatureDynamicsAwareLR] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, method=self.method)

    # -- wiring ---------------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedulers = [
            cfg.scheduler for cfg in trainer.lr_scheduler_configs if isinstance(cfg.scheduler, CurvatureDynamicsAwareLR)
        ]
        if not self._schedulers:
            rank_zero_warn(
                "DirectionalCurvatureMonitor found no CurvatureDynamicsAwareLR among the Trainer's schedulers and "
                "will do nothing. Return one from `configure_optimizers`: "
                '{"optimizer": opt, "lr_scheduler": {"scheduler": CurvatureDynamicsAwareLR(opt), '
                '"interval": "step"}}.'
            )
            return
        for sched in self._schedulers:
            if not supports_update_direction(sched.optimizer):
                raise MisconfigurationException(
                    f"CurvatureDynamicsAwareLR needs the update direction of {type(sched.optimizer).__name__}, "
                    "which is unknown; supported: SGD, Adam, AdamW, RMSprop."
                )
            sched.attach_monitor(self)
        self._resolved = resolve_loss_fn(pl_module, self.loss_fn)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = None

    # -- measurement ----------------------------------------------------------------------------------------------
    def _measure(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, sched: CurvatureDynamicsAwareLR
    ) -> tuple[float, float]:
        assert self._resolved is not None
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and p.grad is not None]
        if not params:
            return float("nan"), float("nan")
        dtype = torch.float32 if params[0].dtype in (torch.float16, torch.bfloat16) else params[0].dtype
        u = update_direction(optimizer, params, group_scales=sched.group_scales(), dtype=dtype)
        u_flat = torch.cat([t.reshape(-1) for t in u])
        assert all(p.grad is not None for p in params)
        g_flat = torch.cat([p.grad.detach().to(dtype).reshape(-1) for p in params])  # type: ignore[union-attr]
        theta = torch.cat([p.detach().to(dtype).reshape(-1) for p in params])
        wds = weight_decay_terms(optimizer, params)
        wd_flat = (
            torch.cat([torch.full((p.numel(),), w, dtype=dtype, device=p.device) for p, w in zip(params, wds)])
            if any(w != 0 for w in wds)
            else None
        )
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        maxi = [bool(group_of[id(p)].get("maximize", False)) for p in params]
        mask = (
            torch.cat([torch.full((p.numel(),), m, dtype=torch.bool, device=p.device) for p, m in zip(params, maxi)])
            if any(maxi)
            else None
        )
        try:
            with HessianOperator(
                pl_module,
                self._resolved,
                self._batch,
                params=params,
                method=self.method,
                mode=self.mode,
                seed=self.seed,
            ) as H:
                hu = H.matvec(u_flat)
        except NonFiniteCurvatureError:
            return float("nan"), float("nan")
        return directional_terms(g_flat, u_flat.to(hu.dtype), hu, params=theta, weight_decay=wd_flat, maximize=mask)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._schedulers or self._batch is None:
            return
        opt = _unwrap(optimizer)
        for index, sched in enumerate(self._schedulers):
            if sched.optimizer is not opt:
                continue
            n, d = self._measure(pl_module, opt, sched)
            if trainer.world_size > 1:
                both = trainer.strategy.reduce(
                    torch.tensor([n, d], dtype=torch.float64, device=pl_module.device), reduce_op="mean"
                )
                assert isinstance(both, Tensor)
                n, d = float(both[0].item()), float(both[1].item())
            sched.observe_direction(numerator=n, denominator=d, step=trainer.global_step)
            if self.log:
                self._log(trainer, sched, n, d, "" if len(self._schedulers) == 1 else f"/{index}")

    def _log(self, trainer: pl.Trainer, sched: CurvatureDynamicsAwareLR, n: float, d: float, suffix: str) -> None:
        if not trainer.loggers or not (
            trainer._logger_connector.should_update_logs or getattr(trainer, "fast_dev_run", False)
        ):
            return
        edge = sched.edge_lr()
        metrics = {
            f"cdat/numerator{suffix}": n,
            f"cdat/denominator{suffix}": d,
            f"cdat/lr{suffix}": float(sched.optimizer.param_groups[0]["lr"]),
        }
        if edge is not None:
            metrics[f"cdat/edge_lr{suffix}"] = edge
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
