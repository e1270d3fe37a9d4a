r"""Plain-PyTorch training loops behind the scheduler examples and ``tests/test_cdat_evidence.py``.

Every loop trains ``model`` with ``torch.optim.SGD`` on the digits (full batch, or mini-batches from
``batch_fn``) and returns a :class:`Run` holding, per step, the training loss of the step's batch and the learning
rate used, and every ``eval_every`` steps the full-batch training loss (the quantity to compare runs by when the
step's batch is a mini-batch). A run stops early once its loss is not finite or exceeds ``diverge_at``.

The curvature comes from the public API: ``hessian_eigenvalues`` for :class:`~lightning_curvature.SharpnessAwareLR`,
and for :class:`~lightning_curvature.CurvatureDynamicsAwareLR` one Hessian-vector product along the update
direction, :math:`Hu = \nabla_\theta (g^\top u)` (Pearlmutter's double backward, :func:`hvp`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from _digits import Batch, LossFn, mse_loss
from torch import Tensor, nn

from lightning_curvature import (
    CurvatureDynamicsAwareLR,
    SharpnessAwareLR,
    directional_terms,
    hessian_eigenvalues,
    update_direction,
)


@dataclass
class Run:
    """History of one training run.

    Attributes:
        name: legend text.
        losses: loss of the step's batch, before that step's update.
        lrs: learning rate of each step.
        evals: ``(step, full-batch training loss)`` every ``eval_every`` steps and after the last step.
        sharpness: ``(step, λ_max)`` when measured.
        diverged: the loss became non-finite or exceeded ``diverge_at``.
    """

    name: str
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    sharpness: list[tuple[int, float]] = field(default_factory=list)
    diverged: bool = False

    @property
    def final_loss(self) -> float:
        """Full-batch training loss after the last step (``inf`` if the run diverged)."""
        return math.inf if self.diverged or not self.evals else self.evals[-1][1]

    def late_loss(self, fraction: float = 0.2) -> float:
        """Mean full-batch training loss over the evaluations of the last ``fraction`` of the run (``inf`` if
        diverged): a verdict that does not hinge on one noisy final value."""
        if self.diverged or not self.evals:
            return math.inf
        last = self.evals[-1][0]
        vals = [v for s, v in self.evals if s >= (1.0 - fraction) * last]
        return statistics.fmean(vals)


def hvp(model: nn.Module, loss_fn: LossFn, batch: Batch, vector: Tensor, params: Sequence[Tensor]) -> Tensor:
    r"""The Hessian-vector product :math:`Hv = \nabla_\theta (\nabla_\theta L^\top v)` by double backward (flat)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(model, batch), list(params), create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        hv = torch.autograd.grad(flat @ vector, list(params))
    return torch.cat([h.reshape(-1) for h in hv]).detach()


def _loop(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Batch,
    steps: int,
    *,
    loss_fn: LossFn = mse_loss,
    batch_fn: Callable[[], Batch] | None = None,
    before_step: Callable[[int, Batch], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    eval_every: int = 10,
    diverge_at: float = 1e3,
) -> Run:
    run = Run(name)

    def evaluate(step: int) -> None:
        with torch.no_grad():
            run.evals.append((step, float(loss_fn(model, data))))

    for step in range(steps):
        batch = data if batch_fn is None else batch_fn()
        opt.zero_grad()
        loss = loss_fn(model, batch)
        value = float(loss.detach())
        if not math.isfinite(value) or value > diverge_at:
            run.diverged = True
            run.losses.append(value)
            return run
        if step % eval_every == 0:
            if batch_fn is None:
                run.evals.append((step, value))
            else:
                evaluate(step)
        loss.backward()
        if before_step is not None:
            before_step(step, batch)
        run.losses.append(value)
        run.lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        if after_step is not None:
            after_step(step)
    evaluate(steps)
    if not math.isfinite(run.evals[-1][1]) or run.evals[-1][1] > diverge_at:
        run.diverged = True
    return run


def train_constant(model: nn.Module, data: Batch, lr: float, steps: int, **kw: Any) -> Run:
    """Gradient descent with a constant learning rate."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return _loop(f"constant {lr:g}", model, opt, data, steps, **kw)


def train_warmup(model: nn.Module, data: Batch, lr: float, warmup_steps: int, steps: int, **kw: Any) -> Run:
    """Gradient descent with a linear warm-up from ``lr/warmup_steps`` to ``lr`` over ``warmup_steps`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup_steps))
    return _loop(f"warm-up {warmup_steps}", model, opt, data, steps, after_step=lambda _: sched.step(), **kw)


def train_sharpness_aware(
    model: nn.Module, data: Batch, lr: float, steps: int, *, every: int = 10, safety: float = 0.9, **kw: Any
) -> Run:
    """Gradient descent under :class:`SharpnessAwareLR` (base: constant ``lr``); λ_max of the step's batch is
    measured with ``hessian_eigenvalues`` every ``every`` steps, warm-started from the previous measurement."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = SharpnessAwareLR(opt, safety=safety)
    loss_fn = kw.get("loss_fn", mse_loss)
    state: dict[str, Any] = {"v0": None}
    measured: list[tuple[int, float]] = []

    def before(step: int, batch: Batch) -> None:
        if step % every:
            return
        res = hessian_eigenvalues(
            model, loss_fn, batch, k=1, tol=1e-2, max_iter=30, v0=state["v0"], return_warm_start=True
        )
        state["v0"] = res.warm_start
        sched.observe_sharpness(res.sharpness, step)
        measured.append((step, res.sharpness))

    run = _loop(
        "SharpnessAwareLR", model, opt, data, steps, before_step=before, after_step=lambda _: sched.step(), **kw
    )
    run.sharpness = measured
    return run


def train_cdat(
    model: nn.Module,
    data: Batch,
    steps: int,
    *,
    sigma: float = 2.0,
    ema_beta: float = 0.0,
    lr_max: float | None = None,
    **kw: Any,
) -> Run:
    """Gradient descent tuned by :class:`CurvatureDynamicsAwareLR`: one Hessian-vector product along the update
    direction per step, on the step's batch (``n = max(−gᵀu, 0)``, ``d = |uᵀHu|``)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # the initial lr only fixes the groups' relative lrs
    sched = CurvatureDynamicsAwareLR(opt, sigma=sigma, ema_beta=ema_beta, lr_max=lr_max)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = kw.get("loss_fn", mse_loss)

    def before(step: int, batch: Batch) -> None:
        u = torch.cat([t.reshape(-1) for t in update_direction(opt, params, group_scales=sched.group_scales())])
        g = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        n, d = directional_terms(g, u, hvp(model, loss_fn, batch, u, params))
        sched.observe_direction(n, d, step)

    name = f"CDAT σ={sigma:g}" + (f", EMA {ema_beta:g}" if ema_beta else "")
    return _loop(name, model, opt, data, steps, before_step=before, after_step=lambda _: sched.step(), **kw)
