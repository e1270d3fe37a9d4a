r"""DirectionalCurvatureMonitor: measure the curvature along the optimizer's update direction and feed CDAT.

At every optimizer step, in ``on_before_optimizer_step`` (gradients present and unscaled, parameters not yet
updated), the callback computes the base optimizer's update direction :math:`u_t` at unit learning rate from its
state (:func:`~lightning_curvature.core.update_direction.update_direction`), then

.. math::

    n_t = \max(-\tilde g_t^\top u_t, 0), \qquad d_t = |u_t^\top \tilde H_t u_t|

with one Hessian-vector product on the current batch (float32, model state preserved), where
:math:`\tilde g, \tilde H` include the optimizer's weight decay (the objective it minimises). It calls
``observe_direction`` (with the step's loss on the batch, which arms CDAT's runaway detection) on every
scheduler of the Trainer built on that optimizer that subscribes to the update direction
(:class:`~lightning_curvature.schedules.protocols.DirectionSubscriber`, such as
:class:`~lightning_curvature.schedules.CurvatureDynamicsAwareLR`), which sets the learning rate of *this* step: the
rule needs the current update direction, so unlike the sharpness-fed schedulers it cannot wait for ``step()``.

It follows the conventions of the other monitors (:class:`~lightning_curvature.callbacks._common.CurvatureCallback`):
the same loss resolution and batch layout, sharded strategies refused at setup, a checkpointed state, tags from
:mod:`lightning_curvature.tags` at ``LearningRateMonitor``'s step axis, values published in
``trainer.callback_metrics``, the same seeded dropout mask, and a failed measurement skipped with one warning.

Reference: V. Roulet et al., "Stepping on the Edge: Curvature Aware Learning Rate Tuners", arXiv 2407.06183.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_curvature.callbacks._batch_source import LayoutCache, expected_batch_size
from lightning_curvature.callbacks._clipping import clipped_gradients
from lightning_curvature.callbacks._common import (
    CurvatureCallback,
    check_bool,
    check_choice,
    check_optional_int,
    log_scalars,
    step_axis,
)
from lightning_curvature.callbacks._compiled import lightning_compiled, lightning_eager
from lightning_curvature.callbacks._loss import LossFn, forked_host_rng
from lightning_curvature.callbacks._subscriptions import attach
from lightning_curvature.callbacks._validation import check_floating_dtype
from lightning_curvature.core._batch import BatchDim
from lightning_curvature.core.errors import InaccurateProductsError
from lightning_curvature.core.hvp import HessianOperator, HVPMethod, strided
from lightning_curvature.core.operators import RELIABLE_PRODUCT_ERROR
from lightning_curvature.core.update_direction import (
    directional_terms,
    supports_update_direction,
    update_direction,
    weight_decay_terms,
)
from lightning_curvature.schedules.protocols import DirectionSubscriber
from lightning_curvature.tags import CDAT_DENOMINATOR, CDAT_EDGE_LR, CDAT_LR, CDAT_NUMERATOR

__all__ = ["DirectionalCurvatureMonitor"]

_METHODS: tuple[str, ...] = get_args(HVPMethod)


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer) if not isinstance(optimizer, torch.optim.Optimizer) else optimizer


class DirectionalCurvatureMonitor(CurvatureCallback):
    r"""Feed :class:`~lightning_curvature.schedules.CurvatureDynamicsAwareLR` (CDAT) at every optimizer step.

    Add it to the Trainer and return the scheduler from ``configure_optimizers``; that is all the wiring::

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt,
                    "lr_scheduler": {"scheduler": CurvatureDynamicsAwareLR(opt), "interval": "step"}}

        trainer = Trainer(callbacks=[DirectionalCurvatureMonitor()])

    Cost: one Hessian-vector product (about two to four gradients) per step on the current batch. The batch is
    the one of the stepping batch; with gradient accumulation the gradient is the accumulated one while the
    curvature is measured on the last micro-batch. Gradient clipping, which Lightning applies after this hook, is
    applied to the gradients :math:`u_t` is computed from (by norm or by value, as ``gradient_clip_val`` and
    ``gradient_clip_algorithm`` say; a module's own ``configure_gradient_clipping`` cannot be anticipated and is
    not), while :math:`n_t` takes the unclipped gradient (the slope of the loss along the update). Under DDP,
    :math:`n_t` and :math:`d_t` are averaged over ranks, so every rank sets the same learning rate.

    Logged (at the ``LearningRateMonitor`` step axis, through the loggers when the Trainer logs, i.e. every
    ``log_every_n_steps``): ``cdat/numerator`` (:math:`n_t`), ``cdat/denominator`` (:math:`d_t`), ``cdat/edge_lr``
    (:math:`2\bar n_t/\bar d_t`) and ``cdat/lr`` (the lr of the first parameter group); with several CDAT
    schedulers the keys get a ``/{index}`` suffix. Every step's values are also in ``trainer.callback_metrics``.
    ``cdat/lr`` at step ``t`` is the lr used by update ``t``; ``LearningRateMonitor`` logs in
    ``on_train_batch_start``, before CDAT sets that lr, so its ``lr-*`` curve shows the previous step's value at
    ``t``.

    **Failures.** A measurement that cannot be made (a loss that is not a finite differentiable scalar, a product
    that raises, e.g. compiled code without a double backward) gives NaN for :math:`n_t, d_t` with one warning
    per kind of failure; the scheduler ignores it (the lr of the previous step is kept) and training goes on.

    Args:
        loss_fn: ``loss_fn(pl_module, batch) -> scalar`` mean loss; default: the module's
            ``curvature_loss(batch)`` method, else ``training_step`` re-run with logging suppressed
            (see :func:`~lightning_curvature.callbacks._loss.resolve_loss_fn`).
        mode: ``"train"`` (the model's own flags: BatchNorm batch statistics, one fixed dropout mask) or
            ``"eval"``.
        method: Hessian-vector product method, as in the other monitors: ``"auto"`` (default: double backward where
            it exists and is valid, finite differences otherwise, e.g. through compiled code), ``"double_backward"``,
            ``"finite_difference"`` or ``"forward_over_reverse"`` (see
            :class:`~lightning_curvature.core.HessianOperator`).
        log: send the measurements to the Trainer's loggers.
        seed: seed of the measurement's dropout mask (the RNG is forked, so training draws are untouched), as in the
            other monitors; ``None`` draws it from a fork of the global RNG, like a fresh training mask (and saves
            re-seeding every device generator, about a millisecond per step).
        batch_dim: the batch dimension (see :class:`~lightning_curvature.callbacks.GradientCovarianceMonitor`).
        product_dtype: compute the product in this dtype (``torch.float64``: finite differences of a large float32
            model whose float32 product is too inaccurate and skipped); default: the parameters' dtype.

    Raises:
        MisconfigurationException: for a bad ``mode``/``method``/``loss_fn``/``log``/``seed``/``batch_dim``/
            ``product_dtype``, at
            setup for a sharded strategy, or (at fit start) a CDAT scheduler on an optimizer whose update
            direction is unknown.

    Example::

        >>> monitor = DirectionalCurvatureMonitor(mode="train")
        >>> monitor.seed, monitor.method
        (0, 'auto')
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[monitor], logger=False)  # doctest: +SKIP
    """

    _feeds = DirectionSubscriber

    def __init__(
        self,
        loss_fn: LossFn | None = None,
        mode: str = "train",
        method: HVPMethod = "auto",
        log: bool = True,
        seed: int | None = 0,
        batch_dim: BatchDim = None,
        product_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(loss_fn=loss_fn, batch_dim=batch_dim)
        self.product_dtype: torch.dtype | None = check_floating_dtype("product_dtype", product_dtype)
        self.mode = check_choice("mode", mode, ("train", "eval"))
        self.method: HVPMethod = check_choice("method", method, _METHODS)  # type: ignore[assignment]
        self.log = check_bool("log", log)
        self.seed = check_optional_int("seed", seed)
        self._batch: Any = None
        self._layouts = LayoutCache(self.batch_dim)
        self._expected: int | None = None
        self._schedulers: list[DirectionSubscriber] = []
        # per subscribed scheduler (in order): where the last finite-difference search ended; checkpointed
        self._fd_step_ratio: dict[int, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, method=self.method)

    # -- wiring ---------------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = attach(trainer, DirectionSubscriber, self, lr_set_in_step=False)
        self._schedulers = [sched for index in sorted(found) for sched in found[index]]
        if not self._schedulers:
            rank_zero_warn(
                "DirectionalCurvatureMonitor found no scheduler fed by the update direction (such as "
                "CurvatureDynamicsAwareLR) among the Trainer's schedulers and "
                "will do nothing. Return one from `configure_optimizers`: "
                '{"optimizer": opt, "lr_scheduler": {"scheduler": CurvatureDynamicsAwareLR(opt), '
                '"interval": "step"}}.'
            )
            return
        for sched in self._schedulers:
            if not supports_update_direction(sched.optimizer):
                raise MisconfigurationException(
                    f"{type(sched).__name__} needs the update direction of {type(sched.optimizer).__name__}, "
                    "which is unknown; supported: SGD, Adam, AdamW, RMSprop."
                )
        if self._resolved_loss is None:
            self._resolve_loss(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._expected = expected_batch_size(trainer.train_dataloader)

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
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        sched: DirectionSubscriber,
        index: int,
    ) -> tuple[float, float, float]:
        """:math:`(n_t, d_t)` and the loss on this process's batch for subscriber ``index`` (raises on failure; no
        collective call inside)."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and p.grad is not None]
        if not params:
            raise ValueError("no parameter of the optimizer has a gradient at this step")
        batch = self._layouts.to_engine(self._batch, self._expected)
        loss_fn = self._loss_for_engine(pl_module)
        self._preflight(trainer, pl_module, loss_fn, batch, collective=False)
        dtype = torch.float32 if params[0].dtype in (torch.float16, torch.bfloat16) else params[0].dtype
        group_scales = getattr(sched, "group_scales", None)  # optional: the relative lrs of the groups
        scales = group_scales() if callable(group_scales) else None
        grads = [strided(p.grad).detach() for p in params]  # type: ignore[arg-type]  # dense (sparse embeddings)
        # the update the optimizer will make: from the gradients as Lightning's clipping will leave them
        clipped = clipped_gradients(trainer, pl_module, grads)
        u = update_direction(optimizer, params, grads=grads if clipped is None else clipped, group_scales=scales,
                             dtype=dtype)  # fmt: skip
        u_flat = torch.cat([t.reshape(-1) for t in u])
        g_flat = torch.cat([g.to(dtype).reshape(-1) for g in grads])
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
        # a module compiled by Lightning: "auto" measures through its compiled methods (finite differences), the
        # exact methods run its eager ones (as the Hessian monitor does)
        compiled = lightning_compiled(pl_module)
        eager = lightning_eager(pl_module) if compiled and self.method != "auto" else nullcontext()
        with eager, HessianOperator(
            pl_module, loss_fn, batch, params=params, method=self.method, mode=self.mode,  # type: ignore[arg-type]
            seed=self.seed, compiled=True if compiled and self.method == "auto" else None, dtype=self.product_dtype,
        ) as H:  # fmt: skip
            H.fd_step_ratio = self._fd_step_ratio.get(index, 1.0)  # the last step's search ended there
            hu = H.matvec(u_flat)
            if H.method == "finite_difference":
                self._fd_step_ratio[index] = H.fd_step_ratio
            if H.product_error > RELIABLE_PRODUCT_ERROR:  # d_t would be noise: skipped, never fed to the lr
                raise InaccurateProductsError(
                    f"the finite-difference product along the update is {H.product_error:.1%} off by its own "
                    "estimate; measure with method='double_backward' (eager code) if it runs, or with "
                    "product_dtype=torch.float64."
                )
            loss = H.loss()  # at the parameters of the update (double backward: from the product's own graph)
        n, d = directional_terms(g_flat, u_flat.to(hu.dtype), hu, params=theta, weight_decay=wd_flat, maximize=mask)
        return n, d, loss

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "fd_step_ratio": dict(self._fd_step_ratio)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict)
        self._fd_step_ratio = {int(i): float(r) for i, r in state_dict.get("fd_step_ratio", {}).items()}

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._schedulers or self._batch is None:
            return
        opt = _unwrap(optimizer)
        step = step_axis(trainer)
        for index, sched in enumerate(self._schedulers):
            if sched.optimizer is not opt:
                continue
            error: BaseException | str | None = None
            try:
                with forked_host_rng():  # whatever the loss draws from Python's or NumPy's RNG does not reach training
                    n, d, loss = self._measure(trainer, pl_module, opt, sched, index)
            except Exception as exc:  # contained: a measurement never stops training
                n, d, loss, error = math.nan, math.nan, math.nan, exc
            if trainer.world_size > 1:  # a NaN on any process reaches every process: they all skip together
                both = trainer.strategy.reduce(
                    torch.tensor([n, d, loss], dtype=torch.float64, device=pl_module.device), reduce_op="mean"
                )
                assert isinstance(both, Tensor)
                n, d, loss = (float(x) for x in both.tolist())
            ok = math.isfinite(n) and math.isfinite(d)
            if not ok:
                self._report_failure(step, error if error is not None else "n_t or d_t is NaN or infinite")
            # the scheduler ignores NaN terms; a loss only from a measurement that was made (a non-finite one then
            # says the run diverged)
            sched.observe_direction(numerator=n, denominator=d, step=step, loss=loss if ok else None)
            metrics = self._metrics(sched, n, d, "" if len(self._schedulers) == 1 else f"/{index}")
            self.num_measurements += 1
            self.last_metrics = metrics
            if ok:
                self._publish(trainer, metrics)
            if self.log and (trainer._logger_connector.should_update_logs or getattr(trainer, "fast_dev_run", False)):
                log_scalars(trainer, metrics, step)

    def _metrics(self, sched: DirectionSubscriber, n: float, d: float, suffix: str) -> dict[str, float]:
        metrics = {
            f"{CDAT_NUMERATOR}{suffix}": n,
            f"{CDAT_DENOMINATOR}{suffix}": d,
            f"{CDAT_LR}{suffix}": float(sched.optimizer.param_groups[0]["lr"]),
        }
        edge_lr = getattr(sched, "edge_lr", None)  # optional: the edge step 2n/d
        edge = edge_lr() if callable(edge_lr) else None
        if edge is not None:
            metrics[f"{CDAT_EDGE_LR}{suffix}"] = edge
        return metrics
