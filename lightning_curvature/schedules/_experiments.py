r"""Plain-PyTorch training runs behind the scheduler examples and their reduced-scale tests (private).

The problem is the one of the edge-of-stability papers at small scale: the 8×8 digits that scikit-learn ships
(pixels scaled to [0, 1], no download), the half squared error on one-hot targets
:math:`L = \frac{1}{2N}\sum_i \|f(x_i) - y_i\|^2`, a tanh MLP, full-batch gradient descent. ``output_scale``
multiplies the read-out layer's initial weights: a large value gives a sharp initial loss surface (the "bad
initialisation" of Gilmer et al. 2021, arXiv 2110.04369), where a learning-rate warm-up matters.

Every runner returns a :class:`Run` with the per-step training loss and learning rate (and the sharpness
measurements, when made). Runs stop early once the loss is not finite or exceeds ``diverge_at``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvature._digits import make_mlp
from lightning_curvature.core.eigen import hessian_eigenvalues
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.hvp import HessianOperator
from lightning_curvature.core.update_direction import directional_terms, update_direction
from lightning_curvature.schedules.cdat import CurvatureDynamicsAwareLR
from lightning_curvature.schedules.sharpness_aware import SharpnessAwareLR

__all__ = [
    "Run",
    "digits_problem",
    "make_tanh_mlp",
    "minibatches",
    "mse_onehot",
    "train_cdat",
    "train_constant",
    "train_sharpness_aware",
    "train_warmup",
]

Batch = tuple[Tensor, Tensor]


@dataclass
class Run:
    """History of one training run (one entry per step, before that step's update)."""

    name: str
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    sharpness: list[tuple[int, float]] = field(default_factory=list)
    diverged: bool = False
    final_loss: float = math.inf

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return {
            "name": self.name,
            "final_loss": self.final_loss,
            "diverged": self.diverged,
            "losses": self.losses,
            "lrs": self.lrs,
            "sharpness": self.sharpness,
        }


def digits_problem(num_examples: int | None = None, seed: int = 0) -> Batch:
    """``(x, y_onehot)``: the first ``num_examples`` of a seeded shuffle of scikit-learn's digits (all 1797).

    Raises:
        ImportError: without scikit-learn (``pip install lightning-curvature[demo]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is a dev/demo dependency
        raise ImportError("The digits data needs scikit-learn: `pip install lightning-curvature[demo]`.") from err
    raw = load_digits()
    x = torch.as_tensor(raw.data, dtype=torch.float32) / 16.0
    y = nn.functional.one_hot(torch.as_tensor(raw.target), 10).float()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    idx = perm if num_examples is None else perm[:num_examples]
    return x[idx], y[idx]


def make_tanh_mlp(width: int = 64, depth: int = 2, output_scale: float = 1.0, seed: int = 0) -> nn.Module:
    """``depth`` tanh hidden layers of ``width`` units (PyTorch's default init), read-out scaled by ``output_scale``."""
    return make_mlp(depth, width, output_scale=output_scale, seed=seed)


def mse_onehot(model: nn.Module, batch: Batch) -> Tensor:
    r""":math:`\frac{1}{2N}\sum_i \|f(x_i) - y_i\|^2` (the engine's ``loss_fn(model, batch)`` signature)."""
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(1).mean()


def minibatches(batch: Batch, batch_size: int, seed: int = 0) -> Callable[[], Batch]:
    """A callable returning the next mini-batch of a seeded reshuffle-every-epoch sampler (``drop_last``)."""
    x, y = batch
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {"perm": torch.randperm(x.shape[0], generator=gen), "pos": 0}

    def next_batch() -> Batch:
        if state["pos"] + batch_size > x.shape[0]:
            state["perm"], state["pos"] = torch.randperm(x.shape[0], generator=gen), 0
        idx = state["perm"][state["pos"] : state["pos"] + batch_size]
        state["pos"] += batch_size
        return x[idx], y[idx]

    return next_batch


def _loop(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Batch,
    steps: int,
    before_step: Callable[[int, Batch], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    batch_fn: Callable[[], Batch] | None = None,
    diverge_at: float = 1e3,
) -> Run:
    run = Run(name)
    for step in range(steps):
        batch = data if batch_fn is None else batch_fn()
        opt.zero_grad()
        loss = mse_onehot(model, batch)
        loss.backward()
        value = float(loss.item())
        if not math.isfinite(value) or value > diverge_at:
            run.diverged = True
            run.losses.append(value)
            break
        if before_step is not None:
            before_step(step, batch)
        run.losses.append(value)
        run.lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        if after_step is not None:
            after_step(step)
    with torch.no_grad():
        final = float(mse_onehot(model, data).item())
    run.final_loss = final if (math.isfinite(final) and not run.diverged) else math.inf
    return run


def train_constant(model: nn.Module, data: Batch, lr: float, steps: int, **kw: Any) -> Run:
    """Gradient descent with a constant learning rate."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return _loop(f"constant lr={lr:g}", model, opt, data, steps, **kw)


def train_warmup(model: nn.Module, data: Batch, lr: float, warmup_steps: int, steps: int, **kw: Any) -> Run:
    """Gradient descent with a linear warm-up from ``lr/warmup_steps`` to ``lr`` over ``warmup_steps``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup_steps))
    return _loop(
        f"linear warm-up to {lr:g} over {warmup_steps}",
        model,
        opt,
        data,
        steps,
        after_step=lambda _: sched.step(),
        **kw,
    )


def train_sharpness_aware(
    model: nn.Module,
    data: Batch,
    lr: float,
    steps: int,
    *,
    every: int = 10,
    safety: float = 0.9,
    **kw: Any,
) -> Run:
    """Gradient descent under :class:`SharpnessAwareLR` (base: constant ``lr``), sharpness measured by Lanczos
    on the full batch every ``every`` steps (warm-started from the previous Ritz vectors)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = SharpnessAwareLR(opt, safety=safety)
    state: dict[str, Any] = {"v0": None}
    run_ref: dict[str, Run] = {}

    def before(step: int, batch: Batch) -> None:
        if step % every == 0:
            try:
                res = hessian_eigenvalues(
                    model, mse_onehot, batch, k=1, tol=1e-2, max_iter=30, v0=state["v0"], return_warm_start=True
                )
            except NonFiniteCurvatureError:
                return
            state["v0"] = res.warm_start
            sched.observe_sharpness(res.sharpness, step)
            run_ref["run"].sharpness.append((step, res.sharpness))

    run = Run("")
    run_ref["run"] = run
    out = _loop(
        f"SharpnessAwareLR(base={lr:g})",
        model,
        opt,
        data,
        steps,
        before_step=before,
        after_step=lambda _: sched.step(),
        **kw,
    )
    out.sharpness = run.sharpness
    return out


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
    direction per step, on the step's batch."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sched = CurvatureDynamicsAwareLR(opt, sigma=sigma, ema_beta=ema_beta, lr_max=lr_max)
    params = [p for p in model.parameters() if p.requires_grad]

    def before(step: int, batch: Batch) -> None:
        u = torch.cat([t.reshape(-1) for t in update_direction(opt, params, group_scales=sched.group_scales())])
        g = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        try:
            with HessianOperator(model, mse_onehot, batch, params=params, seed=None) as H:
                hu = H.matvec(u)
        except NonFiniteCurvatureError:
            hu = torch.full_like(u, math.nan)
        n, d = directional_terms(g, u, hu)
        sched.observe_direction(n, d, step)

    name = f"CDAT sigma={sigma:g}" + (f" ema={ema_beta:g}" if ema_beta else "")
    return _loop(name, model, opt, data, steps, before_step=before, after_step=lambda _: sched.step(), **kw)
