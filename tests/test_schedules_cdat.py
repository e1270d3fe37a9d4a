"""CurvatureDynamicsAwareLR and DirectionalCurvatureMonitor: rule, EMAs, closed forms, state, feeding, Lightning."""

from __future__ import annotations

import copy
import itertools
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
from _reference import dense_hessian, least_squares, least_squares_hessian, mse_loss
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_curvature.callbacks.directional import DirectionalCurvatureMonitor
from lightning_curvature.core.hvp import HessianOperator
from lightning_curvature.core.update_direction import directional_terms, update_direction
from lightning_curvature.schedules import CurvatureDynamicsAwareLR
from lightning_curvature.schedules.cdat import cdat_learning_rate, ema_update

# --------------------------------------------------------------------------------------------------------------
# pure rule and EMAs against independent numpy formulas


@pytest.mark.parametrize("sigma", [1.0, 2.0, 1.5], ids=lambda s: f"sigma={s}")
def test_rule_matches_numpy(sigma: float) -> None:
    rng = np.random.default_rng(0)
    n = rng.uniform(0, 5, 40)
    d = rng.uniform(1e-3, 5, 40)
    got = [cdat_learning_rate(a, b, sigma=sigma, eps=1e-3) for a, b in zip(n, d)]
    np.testing.assert_allclose(got, sigma * n / (d + 1e-3), rtol=1e-14)
    assert cdat_learning_rate(-1.0, 2.0) == 0.0  # ascent direction: no step
    assert cdat_learning_rate(1.0, -2.0, sigma=1.0) == 0.5  # |d|
    assert cdat_learning_rate(1.0, 0.0) == math.inf
    assert ema_update(2.0, 4.0, 0.75) == 2.5


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9], ids=lambda b: f"beta={b}")
def test_ema_schedule_matches_numpy(beta: float) -> None:
    rng = np.random.default_rng(1)
    n = rng.uniform(0.1, 2.0, 30)
    d = rng.uniform(0.5, 3.0, 30)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = CurvatureDynamicsAwareLR(opt, sigma=2.0, ema_beta=beta, eps=1e-2)
    for t in range(30):
        sched.observe_direction(numerator=n[t], denominator=d[t], step=t)
        w = beta ** np.arange(t, -1, -1) * (1 - beta)  # weights of observations 0..t
        n_hat = (w @ n[: t + 1]) / (1 - beta ** (t + 1))
        d_hat = (w @ d[: t + 1]) / (1 - beta ** (t + 1))
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * n_hat / (d_hat + 1e-2), rel=1e-12)
        assert sched.edge_lr() == pytest.approx(2.0 * n_hat / (d_hat + 1e-2), rel=1e-12)
        lr_before = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()  # only advances last_epoch
        assert opt.param_groups[0]["lr"] == lr_before and sched.last_epoch == t + 1


def test_group_scales_and_clamps() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.05}], lr=0.1)
    sched = CurvatureDynamicsAwareLR(opt, sigma=1.0, ema_beta=0.0, lr_min=0.01, lr_max=3.0)
    assert sched.group_scales() == pytest.approx([1.0, 0.5])
    sched.observe_direction(2.0, 1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.0, 1.0])
    sched.observe_direction(100.0, 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(3.0)
    sched.observe_direction(0.0, 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


# --------------------------------------------------------------------------------------------------------------
# feeding: bad values, missing monitor, validation


def test_non_finite_skipped_with_one_warning() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = CurvatureDynamicsAwareLR(opt, ema_beta=0.5)
    sched.observe_direction(1.0, 4.0)
    lr = opt.param_groups[0]["lr"]
    state = (sched.numerator_avg, sched.denominator_avg, sched.num_accepted)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        sched.observe_direction(math.nan, 1.0)
        sched.observe_direction(1.0, math.inf)
        sched.observe_direction(torch.tensor(float("nan")), torch.tensor(1.0))
    assert len(record) == 1
    assert opt.param_groups[0]["lr"] == lr
    assert (sched.numerator_avg, sched.denominator_avg, sched.num_accepted) == state
    assert sched.num_skipped == 3


def test_missing_monitor_raises_at_first_step() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = CurvatureDynamicsAwareLR(opt)
    opt.step()
    with pytest.raises(RuntimeError, match=r"DirectionalCurvatureMonitor\(\)"):
        sched.step()
    quiet = CurvatureDynamicsAwareLR(opt, warn_missing=False)
    opt.step()
    quiet.step()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"ema_beta": 1.0}, "ema_beta"),
        ({"eps": -1.0}, "eps"),
        ({"lr_min": -1.0}, "lr_min"),
        ({"lr_min": 1.0, "lr_max": 0.5}, "lr_max"),
    ],
    ids=["sigma=0", "beta=1", "eps<0", "lr_min<0", "lr_max<lr_min"],
)
def test_validation(kwargs: dict, match: str) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        CurvatureDynamicsAwareLR(opt, **kwargs)
    with pytest.raises(ValueError, match="positive initial lr"):
        CurvatureDynamicsAwareLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0))


def test_monitor_validation() -> None:
    with pytest.raises(MisconfigurationException, match="mode"):
        DirectionalCurvatureMonitor(mode="test")
    with pytest.raises(MisconfigurationException, match="method"):
        DirectionalCurvatureMonitor(method="finite_differences")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="loss_fn"):
        DirectionalCurvatureMonitor(loss_fn=3)  # type: ignore[arg-type]


def test_state_dict_round_trip_mid_run() -> None:
    rng = np.random.default_rng(2)
    feed = list(zip(rng.uniform(0, 1, 20), rng.uniform(0.1, 1, 20)))

    def build() -> tuple[torch.optim.Optimizer, CurvatureDynamicsAwareLR]:
        o = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3, momentum=0.9)
        return o, CurvatureDynamicsAwareLR(o, ema_beta=0.9, lr_max=5.0)

    opt, sched = build()
    for n, d in feed[:10]:
        sched.observe_direction(n, d)
        opt.step()
        sched.step()
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    assert all(not callable(v) and not isinstance(v, torch.optim.Optimizer) for v in state.values())
    opt_state = copy.deepcopy(opt.state_dict())
    uninterrupted = []
    for n, d in feed[10:]:
        sched.observe_direction(n, d)
        uninterrupted.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt2, sched2 = build()
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    resumed = []
    for n, d in feed[10:]:
        sched2.observe_direction(n, d)
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == uninterrupted


# --------------------------------------------------------------------------------------------------------------
# closed form on a quadratic: linear least squares, H = 2 [X 1]^T [X 1] / n, in float64


def _unit_lr_step(opt: torch.optim.Optimizer, clip: Callable[[list[torch.Tensor]], Any] | None = None) -> np.ndarray:
    """θ_new − θ_old of a deep-copied optimizer stepped once at lr = 1 (an independent u), after ``clip`` (e.g.
    ``torch.nn.utils.clip_grad_norm_``) on the copy's parameters if given."""
    twin = copy.deepcopy(opt)
    for g_t, g in zip(twin.param_groups, opt.param_groups):
        g_t["lr"] = 1.0
        for p_t, p in zip(g_t["params"], g["params"]):
            p_t.grad = p.grad.clone()
    if clip is not None:
        clip([p for g in twin.param_groups for p in g["params"]])
    before = [p.detach().clone() for g in twin.param_groups for p in g["params"]]
    twin.step()
    after = [p.detach() for g in twin.param_groups for p in g["params"]]
    return torch.cat([(a - b).reshape(-1) for a, b in zip(after, before)]).numpy()


QUADRATIC_OPTS: list[tuple[str, Callable[[Any], torch.optim.Optimizer]]] = [
    ("gd", lambda p: torch.optim.SGD(p, lr=0.1)),
    ("momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.1)),
]


@pytest.mark.parametrize("sigma", [1.0, 2.0], ids=["greedy", "edge"])
@pytest.mark.parametrize("factory", [o[1] for o in QUADRATIC_OPTS], ids=[o[0] for o in QUADRATIC_OPTS])
def test_plain_loop_equals_quadratic_greedy_and_edge_steps(factory: Any, sigma: float) -> None:
    x, y = least_squares(noise=0.3)
    H = least_squares_hessian(x)
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    opt = factory(model.parameters())
    sched = CurvatureDynamicsAwareLR(opt, sigma=sigma, ema_beta=0.0, eps=0.0, lr_max=None)
    losses = []
    for step in range(15):
        opt.zero_grad()
        loss = mse_loss(model, (x, y))
        loss.backward()
        losses.append(loss.item())
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
        u_ref = _unit_lr_step(opt)
        u = torch.cat([t.reshape(-1) for t in update_direction(opt)])
        with HessianOperator(model, mse_loss, (x, y)) as op:
            hu = op.matvec(u)
        n, d = directional_terms(torch.from_numpy(g), u, hu)
        sched.observe_direction(n, d, step)
        expected = sigma * max(-g @ u_ref, 0.0) / abs(u_ref @ H @ u_ref)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
        if sigma == 1.0 and isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0:
            assert expected == pytest.approx((g @ g) / (g @ H @ g), rel=1e-12)  # GD's exact line minimiser
        opt.step()
        sched.step()
    if sigma == 1.0:
        assert all(b < a for a, b in itertools.pairwise(losses))  # greedy: monotone decrease
    else:
        assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-9)  # edge: back to the same loss


def test_edge_step_returns_to_current_loss_on_quadratic() -> None:
    """σ = 2 is the step at which the quadratic comes back to the current loss (exact for a quadratic)."""
    x, y = least_squares(noise=0.3)
    model = nn.Linear(5, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = CurvatureDynamicsAwareLR(opt, sigma=2.0, ema_beta=0.0, eps=0.0, lr_max=None)
    loss = mse_loss(model, (x, y))
    loss.backward()
    u = torch.cat([t.reshape(-1) for t in update_direction(opt)])
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    with HessianOperator(model, mse_loss, (x, y)) as op:
        n, d = directional_terms(g, u, op.matvec(u))
    sched.observe_direction(n, d)
    opt.step()
    assert mse_loss(model, (x, y)).item() == pytest.approx(loss.item(), rel=1e-10)


# --------------------------------------------------------------------------------------------------------------
# Lightning: the callback feeds the scheduler; closed form, errors, resume


class LeastSquares(pl.LightningModule):
    def __init__(self, opt: str = "sgd", sigma: float = 1.0, hidden: int = 0) -> None:
        super().__init__()
        self.opt, self.sigma = opt, sigma
        torch.manual_seed(0)
        self.net = (
            nn.Linear(5, 1) if hidden == 0 else nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        ).double()
        self.x, self.y = least_squares(noise=0.3)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = mse_loss(self, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        if self.opt == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=0.1)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9 if self.opt == "momentum" else 0.0)
        sched = CurvatureDynamicsAwareLR(opt, sigma=self.sigma, ema_beta=0.0, eps=0.0, lr_max=None)  # the paper's rule
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class QuadraticCheck(pl.Callback):
    """Runs after the monitor: the lr of this step must be σ·n/d computed independently with numpy."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma
        self.errors: list[float] = []
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        H = least_squares_hessian(pl_module.x)
        g = torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).numpy()
        u = _unit_lr_step(optimizer)
        expected = self.sigma * max(-g @ u, 0.0) / abs(u @ H @ u)
        lr = optimizer.param_groups[0]["lr"]
        self.lrs.append(lr)
        self.errors.append(abs(lr - expected) / expected)


@pytest.mark.parametrize(
    ("opt", "sigma"), [("sgd", 1.0), ("momentum", 2.0), ("adam", 2.0)], ids=["gd-greedy", "momentum-edge", "adam-edge"]
)
def test_lightning_monitor_closed_form(tmp_path: Any, opt: str, sigma: float) -> None:
    check = QuadraticCheck(sigma)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=8,
        callbacks=[DirectionalCurvatureMonitor(), check],
        logger=pl.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LeastSquares(opt=opt, sigma=sigma))
    assert len(check.errors) == 8
    assert max(check.errors) < 1e-9
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for key in ("cdat/numerator", "cdat/denominator", "cdat/edge_lr", "cdat/lr"):
        assert key in logged


class ClippedQuadraticCheck(QuadraticCheck):
    """As :class:`QuadraticCheck`, with u the step torch takes after torch's own clipping of the gradients (the
    slope n still from the unclipped gradient)."""

    def __init__(self, sigma: float, clip: Callable[[list[torch.Tensor]], Any]) -> None:
        super().__init__(sigma)
        self.clip = clip
        self.clipped_steps = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        H = least_squares_hessian(pl_module.x)
        g = torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).numpy()
        u = _unit_lr_step(optimizer, self.clip)
        self.clipped_steps += int(not np.allclose(u, _unit_lr_step(optimizer), rtol=1e-6, atol=0))
        expected = self.sigma * max(-g @ u, 0.0) / abs(u @ H @ u)
        lr = optimizer.param_groups[0]["lr"]
        self.lrs.append(lr)
        self.errors.append(abs(lr - expected) / expected)


@pytest.mark.parametrize(
    ("opt", "algorithm"), [("sgd", "norm"), ("momentum", "norm"), ("adam", "norm"), ("momentum", "value")]
)
def test_lightning_monitor_closed_form_with_gradient_clipping(tmp_path: Any, opt: str, algorithm: str) -> None:
    """Lightning clips after ``on_before_optimizer_step``: u_t was the unclipped update, so with clipping CDAT set
    the lr for a step the optimizer does not take (off by the clipping factor for plain SGD)."""
    clip_val = 0.05  # below the gradients of the first steps: every one of them is clipped
    if algorithm == "norm":
        clip: Callable[[list[torch.Tensor]], Any] = lambda ps: torch.nn.utils.clip_grad_norm_(ps, clip_val)  # noqa: E731
    else:
        clip = lambda ps: torch.nn.utils.clip_grad_value_(ps, clip_val)  # noqa: E731
    check = ClippedQuadraticCheck(2.0, clip)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=6, callbacks=[DirectionalCurvatureMonitor(), check], logger=False,
        gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(LeastSquares(opt=opt, sigma=2.0))
    assert len(check.errors) == 6 and check.clipped_steps >= 3
    assert max(check.errors) < 1e-9


class SparseEmbeddingQuadratic(pl.LightningModule):
    """A sparse embedding under a fixed linear read-out, squared error: a constant Hessian, sparse gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 4, sparse=True).double()
        self.register_buffer("readout", torch.randn(4, dtype=torch.float64))
        self.tokens, self.targets = torch.randint(0, 12, (48,)), torch.randn(48, dtype=torch.float64)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.tokens, self.targets), batch_size=48)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.emb(t) @ self.readout

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return ((self(batch[0]) - batch[1]) ** 2).mean()

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = CurvatureDynamicsAwareLR(opt, sigma=2.0, ema_beta=0.0, eps=0.0, lr_max=None)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lightning_monitor_with_sparse_embedding_gradients(tmp_path: Any) -> None:
    """SGD trains ``nn.Embedding(sparse=True)``; every measurement failed (sparse gradients refused, then a
    reshape of the sparse gradient), so CDAT never moved. Closed form against the dense Hessian and SGD's own step."""

    class Check(pl.Callback):
        def __init__(self) -> None:
            self.errors: list[float] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            dense = nn.Embedding(12, 4).double()
            dense.weight.data.copy_(pl_module.emb.weight.detach())
            H = dense_hessian(dense, lambda m, b: ((m(b[0]) @ b[2] - b[1]) ** 2).mean(),
                              (pl_module.tokens, pl_module.targets, pl_module.readout)).numpy()  # fmt: skip
            g = pl_module.emb.weight.grad.to_dense().reshape(-1).numpy()
            u = _unit_lr_step(optimizer)
            expected = 2.0 * max(-g @ u, 0.0) / abs(u @ H @ u)
            self.errors.append(abs(optimizer.param_groups[0]["lr"] - expected) / expected)

    check = Check()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=5, callbacks=[DirectionalCurvatureMonitor(), check], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(SparseEmbeddingQuadratic())
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.num_accepted == 5 and len(check.errors) == 5 and max(check.errors) < 1e-9


def test_lightning_without_monitor_raises(tmp_path: Any) -> None:
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(RuntimeError, match="DirectionalCurvatureMonitor"):
        trainer.fit(LeastSquares())


class LrRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("method", ["auto", "finite_difference"])
def test_lightning_resume_reproduces_uninterrupted_lrs(tmp_path: Any, method: str) -> None:
    """Exact equality; with finite differences the step their search ended at is checkpointed too."""

    def trainer(root: str, callbacks: list, max_steps: int, ckpt: bool) -> pl.Trainer:
        return pl.Trainer(
            default_root_dir=tmp_path / root,
            max_steps=max_steps,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=ckpt,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    full = LrRecorder()
    trainer("full", [DirectionalCurvatureMonitor(method=method), full], 8, False).fit(
        LeastSquares("momentum", 2.0, hidden=8)
    )
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = DirectionalCurvatureMonitor(method=method)
    trainer("first", [first, ckpt], 4, True).fit(LeastSquares("momentum", 2.0, hidden=8))
    assert bool(first.state_dict()["fd_step_ratio"]) == (method == "finite_difference")
    resumed = LrRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer("second", [DirectionalCurvatureMonitor(method=method), resumed], 8, True).fit(
            LeastSquares("momentum", 2.0, hidden=8), ckpt_path=str(tmp_path / "ckpt" / "epoch=3-step=4.ckpt")
        )
    assert resumed.lrs == full.lrs[4:]
    assert len(set(full.lrs)) == 8


def test_monitor_warns_without_cdat_scheduler(tmp_path: Any) -> None:
    class Plain(LeastSquares):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        callbacks=[DirectionalCurvatureMonitor()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="no scheduler fed by the update direction"):
        trainer.fit(Plain())


def test_lightning_non_finite_measurement_keeps_lr_and_warns_once(tmp_path: Any) -> None:
    rec = LrRecorder()
    monitor = DirectionalCurvatureMonitor(loss_fn=lambda m, b: mse_loss(m, b) * float("nan"))
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, callbacks=[monitor, rec], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        trainer.fit(LeastSquares())
    assert sum("non-finite" in str(w.message) for w in record) == 1
    assert rec.lrs == [0.1, 0.1, 0.1]  # the optimizer's lr, untouched
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.num_skipped == 3 and sched.num_accepted == 0


def test_lightning_inaccurate_finite_difference_products_are_not_fed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A product along the update whose finite-difference error estimate is past RELIABLE_PRODUCT_ERROR: d_t would
    be noise, so the measurement is skipped with a warning and the lr keeps its value."""
    import lightning_curvature.core.hvp as hvp_module

    original = HessianOperator._richardson

    def inaccurate(self: HessianOperator, *args: Any) -> tuple[Any, float, float]:
        R, _, f = original(self, *args)
        return R, 0.5 / hvp_module.FD_SAFETY, f  # reported: 50%

    monkeypatch.setattr(HessianOperator, "_richardson", inaccurate)
    rec = LrRecorder()
    monitor = DirectionalCurvatureMonitor(method="finite_difference")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, callbacks=[monitor, rec], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.warns(UserWarning, match="InaccurateProductsError.*50.0% off"):
        trainer.fit(LeastSquares())
    assert rec.lrs == [0.1, 0.1, 0.1] and monitor.num_failures == 3
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.num_skipped == 3 and sched.num_accepted == 0


def test_lightning_float64_products_give_the_exact_learning_rates(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``product_dtype=torch.float64`` on a float32 model: finite differences in float64 give the lrs that exact
    float32 products give (two seeded runs), and the products are made in float64."""

    class LeastSquares32(LeastSquares):
        def __init__(self) -> None:
            super().__init__(hidden=8)
            self.net.float()
            self.x, self.y = self.x.float(), self.y.float()

    with pytest.raises(MisconfigurationException, match="product_dtype"):
        DirectionalCurvatureMonitor(product_dtype="float64")  # type: ignore[arg-type]
    dtypes: list[Any] = []
    original = HessianOperator.__init__

    def spy(self: HessianOperator, *args: Any, **kwargs: Any) -> None:
        dtypes.append(kwargs.get("dtype"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(HessianOperator, "__init__", spy)
    lrs = []
    for kw in ({"method": "double_backward"}, {"method": "finite_difference", "product_dtype": torch.float64}):
        rec = LrRecorder()
        trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=5, callbacks=[DirectionalCurvatureMonitor(**kw), rec],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)  # fmt: skip
        trainer.fit(LeastSquares32())
        lrs.append(rec.lrs)
    assert dtypes[-1] is torch.float64 and dtypes[0] is None
    assert len(set(lrs[0])) > 1  # the lr moved
    assert lrs[1] == pytest.approx(lrs[0], rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# bounded by default, runaway detected (issue 10): the quadratic model's step grows without bound when the
# curvature along the update vanishes (d -> 0) while the loss rises


def test_default_bound_is_ten_times_the_initial_lr() -> None:
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))],
                           "lr": 0.02}], lr=0.1)  # fmt: skip
    sched = CurvatureDynamicsAwareLR(opt, ema_beta=0.0)
    assert sched.lr_max == pytest.approx(1.0)
    sched.observe_direction(1.0, 1e-9)  # 2 n / d = 2e9: bounded by 10 x 0.1 (group 1 keeps its ratio 0.2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.2])
    fresh = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert CurvatureDynamicsAwareLR(fresh, lr_max=None).lr_max is None  # the paper's unbounded rule on request
    assert CurvatureDynamicsAwareLR(fresh, max_lr_factor=3.0).lr_max == pytest.approx(0.3)


def _vanishing_curvature_feed(sched: CurvatureDynamicsAwareLR, steps: int, with_loss: bool) -> list[float]:
    """n stays 1, d halves every 10 steps from 20, the loss falls for 20 steps and then grows 5% per step."""
    lrs = []
    for t in range(steps):
        loss = 2.0 - 0.05 * t if t < 20 else 1.0 * 1.05 ** (t - 20)
        sched.observe_direction(1.0, 20.0 * 0.5 ** (t / 10), t, loss=loss if with_loss else None)
        lrs.append(sched.optimizer.param_groups[0]["lr"])
    return lrs


def test_vanishing_curvature_bounded_and_runaway_detected() -> None:
    unbounded = CurvatureDynamicsAwareLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), lr_max=None)
    lrs = _vanishing_curvature_feed(unbounded, 200, with_loss=False)
    assert lrs[-1] > 1e4  # the runaway of the unbounded rule: 2 n/d = 0.1 * 2^(t/10) (lagged by the EMA)

    bounded = CurvatureDynamicsAwareLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    lrs = _vanishing_curvature_feed(bounded, 200, with_loss=False)
    assert max(lrs) == pytest.approx(1.0) and bounded.num_runaways == 0  # bounded, but nothing to detect with

    watched = CurvatureDynamicsAwareLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.warns(RuntimeWarning, match="runaway detected") as record:
        lrs = _vanishing_curvature_feed(watched, 200, with_loss=True)
    assert len(record) == 1 and watched.num_runaways >= 1
    first = watched.runaway_steps[0]
    # the smoothed loss (EMA 0.9, bias-corrected) of 1.05^(t-20) after its minimum passes twice the minimum
    beta, avg, best, expected = 0.9, 0.0, math.inf, None
    for t in range(200):
        loss = 2.0 - 0.05 * t if t < 20 else 1.05 ** (t - 20)
        avg = beta * avg + (1 - beta) * loss
        smooth = avg / (1 - beta ** (t + 1))
        best = min(best, smooth)
        if t >= 9 and smooth > 2.0 * best:
            expected = t
            break
    assert first == expected
    # from then on the lr is bounded by the lr in force at the best smoothed loss (an early, small one)
    assert max(lrs[first:]) <= lrs[first - 1] and max(lrs[first:]) < 0.5


def test_non_finite_loss_is_a_runaway() -> None:
    sched = CurvatureDynamicsAwareLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), ema_beta=0.0)
    sched.observe_direction(1.0, 40.0, 0, loss=2.0)  # lr 0.05
    sched.observe_direction(1.0, 20.0, 1, loss=1.5)  # lr 0.1; the loss after an update at lr 0.05 is the best
    with pytest.warns(RuntimeWarning, match="runaway"):
        sched.observe_direction(1.0, 1.0, 2, loss=math.inf)  # would be 2.0
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.05) and sched.lr_max == pytest.approx(0.05)


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(16 * 64, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 8, 8))


def _cdat_cnn_on_digits(
    steps: int, feed_loss: bool, **kwargs: Any
) -> tuple[list[float], list[float], CurvatureDynamicsAwareLR]:
    """SGD momentum 0.9, cross-entropy, batches of 32 digits, CDAT fed as the DirectionalCurvatureMonitor does."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from _digits import cross_entropy_loss, load_digits_data

    data = load_digits_data(1000, seed=0)

    def minibatch_loader(seed: int) -> torch.utils.data.DataLoader:
        gen = torch.Generator().manual_seed(seed)
        dataset = torch.utils.data.TensorDataset(data.x_train, data.y_train, data.labels_train)
        return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, generator=gen, drop_last=True)

    model = _SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = CurvatureDynamicsAwareLR(opt, **kwargs)
    params = list(model.parameters())
    losses, lrs = [], []
    while len(losses) < steps:
        for batch in minibatch_loader(seed=len(losses)):
            opt.zero_grad()
            loss = cross_entropy_loss(model, batch)
            loss.backward()
            u = torch.cat([t.reshape(-1) for t in update_direction(opt, params, group_scales=sched.group_scales())])
            g = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
            with HessianOperator(model, cross_entropy_loss, batch, params=params, seed=None) as H:
                n, d = directional_terms(g, u, H.matvec(u))
            sched.observe_direction(n, d, len(losses), loss=loss.detach() if feed_loss else None)
            losses.append(float(loss))
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            if len(losses) == steps or not math.isfinite(losses[-1]):
                break
    return losses, lrs, sched


@pytest.mark.slow
def test_cnn_minibatch_runaway_is_bounded_by_default() -> None:
    """Issue 10: with ``lr_max=None`` (the earlier default) the lr climbs past 1e4 and the loss past 1e3."""
    pytest.importorskip("sklearn")
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses, lrs, _ = _cdat_cnn_on_digits(400, feed_loss=False, lr_max=None)
    assert max(lrs) > 1e4 and max(losses) > 1e3  # the earlier default: no bound, no detection
    losses, lrs, _ = _cdat_cnn_on_digits(400, feed_loss=False)
    assert max(lrs) <= 1.0 + 1e-12  # bounded by default: 10 x the optimizer's lr
    assert all(math.isfinite(v) for v in losses) and max(losses) < 10.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses, lrs, sched = _cdat_cnn_on_digits(400, feed_loss=True, lr_max=None)
    assert sched.num_runaways >= 1  # unbounded but fed the loss: detected and bounded from then on
    assert max(losses) < 10.0
