"""SharpnessAwareLR: the pure rule, closed forms on a quadratic, base schedules, state, feeding and Lightning."""

from __future__ import annotations

import math
import pickle
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _reference import least_squares, least_squares_sharpness, mse_loss
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LinearLR, ReduceLROnPlateau, StepLR

from lightning_curvature.core.eigen import hessian_eigenvalues
from lightning_curvature.schedules import SharpnessAwareLR
from lightning_curvature.schedules.sharpness_aware import default_growth, edge_following_lr, sharpness_aware_lr

# --------------------------------------------------------------------------------------------------------------
# pure rule against an independent numpy formula


@pytest.mark.parametrize("safety", [0.5, 0.9, 1.0], ids=lambda s: f"safety={s}")
@pytest.mark.parametrize("const", [2.0, 3.8, 38.0], ids=lambda c: f"c={c}")
def test_pure_rule_matches_numpy(safety: float, const: float) -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(1e-3, 2.0, size=50)
    sharp = rng.uniform(1e-2, 1e3, size=50)
    floor = rng.uniform(0.0, 0.05, size=50)
    expected = np.maximum(floor, np.minimum(base, safety * const / sharp))
    got = [sharpness_aware_lr(b, s, const, safety=safety, min_lr=f) for b, s, f in zip(base, sharp, floor)]
    np.testing.assert_allclose(got, expected, rtol=1e-15)


def test_pure_rule_edge_cases() -> None:
    assert sharpness_aware_lr(0.3, None, 2.0) == 0.3
    assert sharpness_aware_lr(0.3, None, 2.0, min_lr=0.5) == 0.5
    assert sharpness_aware_lr(1.0, 1e12, 2.0, min_lr=1e-4) == 1e-4  # huge sharpness: the floor wins
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="sharpness"):
            sharpness_aware_lr(0.1, bad, 2.0)


@pytest.mark.parametrize("ratio", [0.9, 2.0, 4.0], ids=lambda r: f"rho_g={r}")
def test_pure_edge_rule_matches_numpy(ratio: float) -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(1e-3, 2.0, 60)
    prev = rng.uniform(1e-4, 2.0, 60)
    sharp = rng.uniform(1e-2, 1e3, 60)
    growth = rng.uniform(1.01, 3.0, 60)
    floor = rng.uniform(0.0, 0.01, 60)
    reset = rng.uniform(size=60) < 0.3
    edge = 38.0 / sharp
    held_or_grown = np.maximum(prev, np.minimum(growth * prev, ratio * edge))
    expected = np.where(reset, np.minimum(base, 0.8 * edge), np.minimum(base, held_or_grown))
    expected = np.maximum(floor, expected)
    got = [
        edge_following_lr(
            b, p, s_, 38.0, reset=bool(r), growth_edge_ratio=ratio, reset_edge_ratio=0.8, max_growth=g, min_lr=f
        )
        for b, p, s_, g, f, r in zip(base, prev, sharp, growth, floor, reset)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    assert edge_following_lr(0.3, 0.1, None, 2.0, min_lr=0.5) == 0.5  # before any measurement: base, floored
    assert edge_following_lr(0.3, None, 10.0, 2.0, reset_edge_ratio=1.0) == 0.2  # no previous lr: a start
    assert edge_following_lr(0.3, 0.25, 10.0, 2.0, growth_edge_ratio=1.0) == 0.25  # above the edge: held
    with pytest.raises(ValueError, match="sharpness"):
        edge_following_lr(0.1, 0.1, math.nan, 2.0)


@pytest.mark.parametrize(
    ("factory", "beta"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 0.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 0.9),
        (lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.8, 0.95)), 0.8),
        (lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.5), 0.5),
    ],
    ids=["gd", "momentum", "adamw", "rmsprop"],
)
def test_default_growth_is_e_per_momentum_memory(factory: Any, beta: float) -> None:
    opt = factory([nn.Parameter(torch.zeros(2))])
    assert default_growth(opt.param_groups[0]) == pytest.approx(math.e ** (1.0 - beta), rel=1e-15)
    sched = SharpnessAwareLR(opt)
    assert sched.growths == pytest.approx([math.e ** (1.0 - beta)])
    assert SharpnessAwareLR(opt, max_growth=1.5).growths == [1.5]


def _adam(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def test_edge_rule_starts_on_the_edge_and_rises_geometrically_to_twice_it() -> None:
    """Closed form under a constant sharpness (Adam): lr_t = min(base, (c/λ)·min(0.9·γ^t, 2))."""
    opt = _adam(lr=1.0)
    sched = SharpnessAwareLR(opt, max_growth=1.25)
    assert (sched.max_edge_ratio, sched.growth_edge_ratio, sched.safety) == (2.0, 2.0, 0.9)
    sched.observe_sharpness(3800.0, step=0)  # Adam, β₁ = 0.9: c = 38, edge 0.01
    lrs = []
    for t in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        if t in (2, 5):
            sched.observe_sharpness(3800.0, step=t)  # unchanged curvature: no effect
        opt.step()
        sched.step()
    expected = [0.01 * min(0.9 * 1.25**t, 2.0) for t in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert sched.num_resets == 0 and sched.wants_measurement()  # held at 2x the edge: only a measurement helps
    assert not sched.wants_measurement(step=8)  # ... but not before 1/(1 - β₁) = 10 steps after the last one
    assert sched.wants_measurement(step=15) and sched.hold_interval == 10
    sched.observe_sharpness(38.0, step=8)  # much flatter (edge 1.0): the lr rises to the base schedule
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(min(1.0, 0.02 * 1.25**4), rel=1e-12)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1.0 and not sched.wants_measurement()


def test_edge_rule_resets_below_the_edge_after_a_runaway_only() -> None:
    opt = _adam(lr=1.0)
    sched = SharpnessAwareLR(opt, max_growth=2.0)
    sched.observe_sharpness(38.0, step=0)  # edge 1.0 = base: start at 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(0.9)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 1.0
    sched.observe_sharpness(38.0 * 1.9, step=1)  # 1.9x past the edge: benign, nothing changes
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 1.0 and sched.num_resets == 0
    sched.observe_sharpness(38.0 * 2.5, step=2)  # 2.5x past the edge: a runaway
    assert opt.param_groups[0]["lr"] == 1.0  # recorded; learning rates change in step() only
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.9 / 2.5) and sched.num_resets == 1
    assert sched.reset_steps == [2]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_defaults_hold_below_the_edge_and_reset_past_it(momentum: float) -> None:
    """SGD: rise to 0.9x the edge, hold in (0.9, 1] (not lowered), reset to 0.9x the edge past 1."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0, momentum=momentum)
    c = 2.0 + 2.0 * momentum
    sched = SharpnessAwareLR(opt)
    assert (sched.max_edge_ratio, sched.growth_edge_ratio) == (1.0, 0.9)
    sched.observe_sharpness(c / 0.1, step=0)  # edge 0.1
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09)
    sched.observe_sharpness(c / 0.095, step=50)  # the sharpness rose: ratio 0.95, within the edge: held
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.09) and sched.num_resets == 0
    sched.observe_sharpness(c / 0.08, step=51)  # ratio 1.125: past the edge, reset to 0.9 x 0.08
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.072) and sched.num_resets == 1


def test_no_ratchet_at_the_edge_of_stability() -> None:
    """Adaptive optimizers equilibrate at the edge: the sharpness rises to meet c/lr whatever the lr. Fed such a
    sharpness (1.1-1.3x the edge of the lr in use), the cap rule lowers the lr at every measurement while the edge
    rule keeps the base lr."""
    finals = {}
    for rule in ("edge", "cap"):
        opt = _adam(lr=0.1)
        sched = SharpnessAwareLR(opt, rule=rule)
        rng = np.random.default_rng(0)
        for t in range(200):
            if t % 10 == 0:
                lr = opt.param_groups[0]["lr"]
                sched.observe_sharpness(38.0 / lr * rng.uniform(1.1, 1.3), step=t)
            opt.step()
            sched.step()
        finals[rule] = opt.param_groups[0]["lr"]
    assert finals["edge"] == 0.1
    assert finals["cap"] < 0.1 * (0.9 / 1.1) ** 19  # every measurement after the first lowers it by >= 0.9/1.3


def test_edge_ratios_and_wants_measurement() -> None:
    opt = _adam(lr=0.5)
    sched = SharpnessAwareLR(opt)
    assert sched.edge_ratios() is None and sched.max_stable_lrs() is None and sched.wants_measurement(0)
    sched.observe_sharpness(380.0, step=0)  # edge 0.1
    assert sched.edge_ratios() == pytest.approx([0.9]) and sched.max_stable_lrs() == pytest.approx([0.1])
    assert not sched.wants_measurement(1)  # free to rise by the growth limit e^0.1 per step
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # 0.09 e^(t/10) reaches 2x the edge at t = 8
    assert not sched.wants_measurement(9) and sched.wants_measurement(10)


# --------------------------------------------------------------------------------------------------------------
# quadratic with a known Hessian: linear least squares, H = 2 [X 1]^T [X 1] / n


OPTIMIZERS: list[tuple[str, Callable[[Any], torch.optim.Optimizer], Callable[[float], float]]] = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=10.0), lambda lam: 2.0 / lam),
    ("momentum", lambda p: torch.optim.SGD(p, lr=10.0, momentum=0.9), lambda lam: 3.8 / lam),
    ("nesterov", lambda p: torch.optim.SGD(p, lr=10.0, momentum=0.5, nesterov=True), lambda lam: 3.0 / (2.0 * lam)),
]


@pytest.mark.parametrize(("factory", "stable"), [o[1:] for o in OPTIMIZERS], ids=[o[0] for o in OPTIMIZERS])
def test_settles_at_safety_times_threshold_on_quadratic(factory: Any, stable: Callable[[float], float]) -> None:
    x, y = least_squares()
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    opt = factory(model.parameters())
    sched = SharpnessAwareLR(opt, rule="cap", safety=0.9)
    lam = least_squares_sharpness(x)
    losses = []
    for step in range(15):
        res = hessian_eigenvalues(model, mse_loss, (x, y), k=1, tol=1e-10, max_iter=50)
        sched.observe_sharpness(res.eigenvalues[0], step=step)  # before the first step(): at once
        assert opt.param_groups[0]["lr"] == pytest.approx(0.9 * stable(lam), rel=1e-8)
        opt.zero_grad()
        loss = mse_loss(model, (x, y))
        loss.backward()
        losses.append(loss.item())
        opt.step()
        sched.step()
    assert losses[-1] < 0.5 * losses[0]  # the capped run trains; lr=10 alone diverges at once


def test_adam_uses_preconditioned_threshold() -> None:
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([w], lr=1.0, betas=(0.9, 0.999))
    sched = SharpnessAwareLR(opt, rule="cap", safety=0.5)
    sched.observe_sharpness(1000.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 38.0 / 1000.0)
    edge = SharpnessAwareLR(torch.optim.Adam([w], lr=1.0, betas=(0.5, 0.999)))
    edge.observe_sharpness(1000.0)
    assert edge.optimizer.param_groups[0]["lr"] == pytest.approx(0.9 * 3.0 / 0.5 / 1000.0)  # (2 + 2β₁)/((1 − β₁)λ)


def test_per_group_thresholds_and_floors() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "momentum": 0.9}, {"params": [b], "lr": 0.01}], lr=1.0)
    sched = SharpnessAwareLR(opt, safety=1.0, min_lr=[0.0, 0.02])  # edge rule: start on each group's edge
    sched.observe_sharpness(10.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.38, 0.02])
    ratio = SharpnessAwareLR(torch.optim.SGD([a], lr=1.0), min_lr_ratio=0.5)
    ratio.observe_sharpness(1e6)
    assert ratio.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------------------
# base schedules: stepping the clamped scheduler equals min(base closed form, cap), no compounding


def _sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


BASES: list[tuple[str, Callable[[torch.optim.Optimizer], Any]]] = [
    ("cosine", lambda o: CosineAnnealingLR(o, T_max=15)),
    ("exponential-chainable", lambda o: ExponentialLR(o, gamma=0.8)),
    ("linear-warmup-chainable", lambda o: LinearLR(o, start_factor=0.1, total_iters=10)),
    ("step", lambda o: StepLR(o, step_size=4, gamma=0.5)),
]
SHARPNESS = [None, 4.0, 4.0, 2.0, None, 8.0, 1.0, 1.0, 3.0, 0.5] * 2


@pytest.mark.parametrize("make_base", [b[1] for b in BASES], ids=[b[0] for b in BASES])
def test_wrapped_scheduler_against_unclamped_twin(make_base: Callable[[torch.optim.Optimizer], Any]) -> None:
    twin_opt = _sgd()
    twin = make_base(twin_opt)
    opt = _sgd()
    sched = SharpnessAwareLR(opt, base=make_base(opt), rule="cap", safety=0.9, warn_missing=False)
    observed: float | None = None  # the latest measurement ...
    applied: float | None = None  # ... and the one in force (measurements take effect at the next step())
    for s in SHARPNESS:
        if s is not None:
            sched.observe_sharpness(s)
            observed = s
        base_lr = twin_opt.param_groups[0]["lr"]
        expected = base_lr if applied is None else min(base_lr, 0.9 * 2.0 / applied)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert sched.base_values == pytest.approx([base_lr], rel=1e-12)
        opt.step()
        sched.step()
        twin_opt.step()
        twin.step()
        applied = observed


@pytest.mark.parametrize(
    ("base", "expected_base"),
    [
        (None, lambda t: 1.0),
        (0.3, lambda t: 0.3),
        (lambda t: 1.0 / (t + 1), lambda t: 1.0 / (t + 1)),
    ],
    ids=["initial-lr", "constant", "callable"],
)
def test_simple_bases(base: Any, expected_base: Callable[[int], float]) -> None:
    opt = _sgd(1.0)
    sched = SharpnessAwareLR(opt, base=base, rule="cap", safety=1.0)
    sched.observe_sharpness(8.0)  # cap 0.25, at once: nothing stepped yet
    for t in range(6):
        assert opt.param_groups[0]["lr"] == pytest.approx(min(expected_base(t), 0.25))
        opt.step()
        sched.step()


# --------------------------------------------------------------------------------------------------------------
# state


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@pytest.mark.parametrize("rule", ["edge", "cap"])
def test_state_dict_round_trip_mid_schedule(rule: str) -> None:
    feed = [3.0, None, 5.0, 0.7, None, 2.5, 9.0, None, 1.2, 4.4]

    def build() -> tuple[torch.optim.Optimizer, SharpnessAwareLR]:
        o = _sgd(1.0)
        sched = SharpnessAwareLR(o, base=CosineAnnealingLR(o, T_max=12), rule=rule, safety=0.8, min_lr=0.01)  # type: ignore[arg-type]
        return o, sched

    opt, sched = build()
    for s in feed[:5]:
        if s is not None:
            sched.observe_sharpness(s)
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert _plain(state), state
    state = pickle.loads(pickle.dumps(state))
    opt_state = opt.state_dict()
    uninterrupted = []
    for s in feed[5:]:
        if s is not None:
            sched.observe_sharpness(s)
        uninterrupted.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    opt2, sched2 = build()
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    resumed = []
    for s in feed[5:]:
        if s is not None:
            sched2.observe_sharpness(s)
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == uninterrupted
    assert len(set(uninterrupted)) > 3  # the schedule really moves


# --------------------------------------------------------------------------------------------------------------
# feeding: bad values, missing monitor, validation


def test_bad_measurements_ignored_with_one_warning() -> None:
    opt = _sgd(1.0)
    sched = SharpnessAwareLR(opt, safety=1.0)
    sched.observe_sharpness(4.0)
    with pytest.warns(RuntimeWarning, match="ignored a sharpness") as record:
        for bad in (math.nan, 0.0, -3.0, math.inf, torch.tensor(float("nan"))):
            sched.observe_sharpness(bad)
    assert len(record) == 1
    assert sched.sharpness == 4.0 and sched.num_rejected == 5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_missing_monitor_raises_at_first_step() -> None:
    opt = _sgd()
    sched = SharpnessAwareLR(opt)
    opt.step()
    with pytest.raises(RuntimeError, match=r"HessianEigenvalueMonitor\(.*\).*observe_sharpness"):
        sched.step()
    quiet = SharpnessAwareLR(opt, warn_missing=False)
    quiet.step()
    attached = SharpnessAwareLR(opt)
    attached.attach_monitor(object())
    attached.step()
    assert attached.monitor_attached and "_monitor_attached" not in attached.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rule": "warmup"}, ValueError, "rule"),
        ({"max_edge_ratio": 0.5}, ValueError, "max_edge_ratio"),
        ({"growth_edge_ratio": 1.5}, ValueError, "growth_edge_ratio"),
        ({"max_edge_ratio": math.inf}, ValueError, "max_edge_ratio"),
        ({"max_growth": 1.0}, ValueError, "max_growth"),
        ({"max_growth": True}, ValueError, "max_growth"),
        ({"safety": 0.0}, ValueError, "safety"),
        ({"safety": 1.5}, ValueError, "safety"),
        ({"min_lr": -1.0}, ValueError, "min_lr"),
        ({"min_lr": [0.0, 0.0]}, ValueError, "one per parameter group"),
        ({"min_lr_ratio": 2.0}, ValueError, "min_lr_ratio"),
        ({"base": 0.0}, ValueError, "constant"),
        ({"base": "cosine"}, TypeError, "base"),
    ],
    ids=[
        "rule",
        "edge_ratio<1",
        "growth>max",
        "edge_ratio=inf",
        "growth=1",
        "growth=bool",
        "safety=0",
        "safety=1.5",
        "min_lr<0",
        "min_lr-len",
        "ratio>1",
        "base=0",
        "base=str",
    ],
)
def test_validation(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SharpnessAwareLR(_sgd(), **kwargs)


def test_validation_of_base_scheduler_and_optimizer() -> None:
    opt = _sgd()
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        SharpnessAwareLR(opt, base=ReduceLROnPlateau(opt))
    with pytest.raises(ValueError, match="same optimizer"):
        SharpnessAwareLR(opt, base=StepLR(_sgd(), step_size=1))
    with pytest.raises(TypeError, match="Adagrad"):
        SharpnessAwareLR(torch.optim.Adagrad([nn.Parameter(torch.zeros(1))]))


# --------------------------------------------------------------------------------------------------------------
# Lightning


class LeastSquares(pl.LightningModule):
    def __init__(self, base: str | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.lin = nn.Linear(5, 1).double()
        self.x, self.y = least_squares(scale=scale)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=64)

    def curvature_loss(self, batch: Any) -> torch.Tensor:
        return mse_loss(self, batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = mse_loss(self, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=1.0, momentum=0.5)
        base = ExponentialLR(opt, gamma=0.7) if self.base == "exponential" else None
        sched = SharpnessAwareLR(opt, base=base, rule="cap")  # a quadratic: no self-stabilisation above the edge
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FakeSharpnessMonitor(pl.Callback):
    """Stands in for HessianEigenvalueMonitor: attach at fit start, measure before every update, feed."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for cfg in trainer.lr_scheduler_configs:
            if isinstance(cfg.scheduler, SharpnessAwareLR):
                cfg.scheduler.attach_monitor(self)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        res = hessian_eigenvalues(pl_module, lambda m, b: m.curvature_loss(b), batch, k=1, tol=1e-10)
        for cfg in trainer.lr_scheduler_configs:
            cfg.scheduler.observe_sharpness(res.eigenvalues[0], step=trainer.global_step)


class LrRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _trainer(tmp_path: Any, callbacks: list, max_steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )


def test_lightning_settles_and_fails_without_monitor(tmp_path: Any) -> None:
    rec = LrRecorder()
    trainer = _trainer(tmp_path, [FakeSharpnessMonitor(), rec], max_steps=6, enable_checkpointing=False)
    model = LeastSquares()
    trainer.fit(model)
    lam = least_squares_sharpness(model.x)
    # the measurement before the first update sets the first lr at once; momentum 0.5: (2 + 2β)/λ
    assert rec.lrs == pytest.approx([0.9 * 3.0 / lam] * 6, rel=1e-8)

    bare = _trainer(tmp_path, [], max_steps=3, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="HessianEigenvalueMonitor"):
        bare.fit(LeastSquares())


def test_lightning_resume_reproduces_uninterrupted_lrs(tmp_path: Any) -> None:
    full = LrRecorder()
    torch.manual_seed(0)
    _trainer(tmp_path / "full", [FakeSharpnessMonitor(), full], max_steps=8, enable_checkpointing=False).fit(
        LeastSquares(base="exponential", scale=2.0)
    )
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    torch.manual_seed(0)
    _trainer(tmp_path / "first", [FakeSharpnessMonitor(), ckpt], max_steps=4).fit(
        LeastSquares(base="exponential", scale=2.0)
    )
    resumed = LrRecorder()
    torch.manual_seed(1)  # the resumed run must not depend on the fresh init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path / "second", [FakeSharpnessMonitor(), resumed], max_steps=8).fit(
            LeastSquares(base="exponential", scale=2.0), ckpt_path=str(tmp_path / "ckpt" / "epoch=3-step=4.ckpt")
        )
    assert len(resumed.lrs) == 4
    assert resumed.lrs == full.lrs[4:]
    assert len(set(full.lrs)) > 3  # the schedule really moves (base decay and cap alternate)


def test_lightning_with_real_hessian_monitor(tmp_path: Any) -> None:
    from lightning_curvature.callbacks import HessianEigenvalueMonitor

    rec = LrRecorder()
    monitor = HessianEigenvalueMonitor(
        every_n_steps=1, k=1, tol=1e-8, num_examples=64, log_histogram=False, prog_bar=False
    )
    trainer = _trainer(tmp_path, [monitor, rec], max_steps=5, enable_checkpointing=False)
    model = LeastSquares()
    trainer.fit(model)
    cap = 0.9 * 3.0 / least_squares_sharpness(model.x)  # SGD momentum 0.5: (2 + 2β)/λ
    assert rec.lrs == pytest.approx([cap] * 5, rel=1e-5)  # the step-0 measurement sets the first lr at once


# --------------------------------------------------------------------------------------------------------------
# evidence at small scale: SGD momentum 0.9, mini-batches, a sharp start (digits, tanh MLP, read-out 10x)


def _digits_helpers() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import _digits

    return _digits


def _momentum_run(rule: str | None, lr: float, steps: int = 300) -> tuple[list[float], float]:
    d = _digits_helpers()
    data = d.load_digits_data(600, seed=0, standardise=False)
    fixed = (data.x_train[:256], data.y_train[:256], data.labels_train[:256])
    model = d.make_mlp(depth=2, width=32, output_scale=10.0, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = None if rule is None else SharpnessAwareLR(opt, rule=rule)  # type: ignore[arg-type]
    next_batch = d.minibatches(data, 64, seed=0)
    losses: list[float] = []
    warm = None
    for t in range(steps):
        if sched is not None and (t % 10 == 0 or sched.wants_measurement(t)):
            res = hessian_eigenvalues(model, d.mse_loss, fixed, k=1, tol=0.05, max_iter=10, v0=warm,
                                      return_warm_start=True)  # fmt: skip
            warm = res.warm_start
            sched.observe_sharpness(res.sharpness, t)
        opt.zero_grad()
        loss = d.mse_loss(model, next_batch())
        loss.backward()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or losses[-1] > 1e4:
            break
        opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad():
        final = d.mse_loss(model, data.train_batch()).item()
    return losses, final


@pytest.mark.slow
def test_sgd_momentum_minibatch_high_lr_trains_without_a_spike() -> None:
    """Base lr 5x the initial edge 3.8/λ: constant lr spikes the loss >20x; the edge rule does not spike and ends
    lower than both the constant lr and the cap rule (which lowers the lr whenever the sharpness rises)."""
    pytest.importorskip("sklearn")
    torch.set_num_threads(1)
    d = _digits_helpers()
    data = d.load_digits_data(600, seed=0, standardise=False)
    fixed = (data.x_train[:256], data.y_train[:256], data.labels_train[:256])
    lam0 = hessian_eigenvalues(d.make_mlp(depth=2, width=32, output_scale=10.0, seed=0), d.mse_loss, fixed,
                               k=1).sharpness  # fmt: skip
    lr = 5 * 3.8 / lam0
    const, const_final = _momentum_run(None, lr)
    edge, edge_final = _momentum_run("edge", lr)
    _, cap_final = _momentum_run("cap", lr)
    assert max(const) > 20 * const[0]
    assert max(edge) < 1.5 * edge[0]
    assert edge_final < const_final and edge_final < cap_final
