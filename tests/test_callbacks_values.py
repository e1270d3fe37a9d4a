"""The logged numbers are right: against the engine, a dense float64 Hessian, closed-form thresholds and a
per-example loop; also under bf16-mixed, at epoch end and from hooks under ``no_grad``/``inference_mode``."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _product_targets import record_product_targets
from _reference import (
    Float64Head,
    ce_loss,
    dense_eigvalsh,
    dense_hessian,
    dense_preconditioned_eigvalsh,
    optimizer_preconditioner,
)
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors
from torch import Tensor

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor
from lightning_curvature.callbacks._common import step_axis

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _loss(model: Any, batch: Any) -> Tensor:
    return model.loss(batch)


def test_step0_sharpness_matches_the_dense_hessian_of_the_fixed_batch() -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    initial = copy.deepcopy(model)
    x, y = random_tensors(n=64)
    monitor = HessianEigenvalueMonitor(every_n_steps=3, k=3, tol=1e-6, num_examples=40)
    trainer = make_trainer("unused", max_steps=4, callbacks=[monitor])
    trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False))
    # fixed batch from a sequential loader: the first 40 examples (batches of 16, 16 and 8, averaged by size)
    ref = dense_eigvalsh(initial.net, (x[:40], y[:40]))
    step0 = monitor.history[0]
    assert step0[0] == 0
    assert step0[1] == pytest.approx(float(ref[0]), rel=1e-5)
    assert [s for s, _ in monitor.history] == [0, 3]


def _dense_hessian_eigvals(model: torch.nn.Module, batch: Any) -> Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta: Tensor) -> Tensor:
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    H = torch.func.hessian(f)(flat)
    return torch.linalg.eigvalsh(H).flip(0)


def monitor_value(monitor: HessianEigenvalueMonitor, step: int, i: int) -> float:
    return monitor.series[step][f"curvature/eig_{i}"]


class _SeriesHessian(HessianEigenvalueMonitor):
    """Keeps every logged dict by step (for tests)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.series: dict[int, dict[str, float]] = {}

    def measure(self, trainer: Any, pl_module: Any, current_batch: Any, step: int, prog_bar: bool) -> Any:
        out = super().measure(trainer, pl_module, current_batch, step, prog_bar)
        self.series[step] = out
        return out


def test_eigenvalues_match_dense_float64_hessian() -> None:
    """A 26-parameter float64 model (``precision="64-true"``): top-4 against ``eigvalsh`` of the dense Hessian."""

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.refs: dict[int, Tensor] = {}

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            step = step_axis(trainer)
            if step % 2 == 0:  # the monitor measures the current batch at these steps
                self.refs[step] = _dense_hessian_eigvals(pl_module.net, batch)

    torch.manual_seed(0)
    model = TinyClassifier(in_dim=3, hidden=4, num_classes=2, lr=0.5)
    x, y = random_tensors(n=32, dim=3, num_classes=2)
    monitor = _SeriesHessian(every_n_steps=2, k=4, tol=1e-9, max_iter=26, batch="current")
    recorder = Recorder()
    trainer = make_trainer("unused", max_steps=5, precision="64-true", callbacks=[recorder, monitor])
    trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False))
    assert sorted(recorder.refs) == [0, 2, 4]
    for step, ref in recorder.refs.items():
        logged = torch.tensor([monitor_value(monitor, step, i) for i in range(1, 5)], dtype=torch.float64)
        torch.testing.assert_close(logged, ref[:4], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    ("optimizer", "momentum", "nesterov", "lr", "expected"),
    [
        ("sgd", 0.0, False, 0.1, 2 / 0.1),
        ("sgd", 0.9, False, 0.1, (2 + 2 * 0.9) / 0.1),
        ("sgd", 0.9, True, 0.1, (2 + 2 * 0.9) / ((1 + 2 * 0.9) * 0.1)),
        ("adam", 0.0, False, 0.01, 38 / 0.01),
        ("rmsprop", 0.0, False, 0.01, 2 / 0.01),
    ],
    ids=["sgd", "momentum", "nesterov", "adam", "rmsprop"],
)
def test_threshold_and_preconditioned_sharpness(
    optimizer: str, momentum: float, nesterov: bool, lr: float, expected: float
) -> None:
    class Reference(pl.Callback):
        """At step 2, λ_max of the dense float64 Hessian of the same fixed batch, preconditioned for adaptive
        optimizers by ``P`` read from the optimizer's own state (Cohen et al. 2022)."""

        def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
            self.monitor, self.ref = monitor, math.nan

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            if step_axis(trainer) == 2:
                fixed = self.monitor._source.get(None)
                opt = trainer.optimizers[0]
                if optimizer in ("adam", "rmsprop"):
                    P = optimizer_preconditioner(opt, list(pl_module.parameters()))
                    self.ref = float(dense_preconditioned_eigvalsh(pl_module.net, fixed, P)[0])
                else:
                    self.ref = float(dense_eigvalsh(pl_module.net, fixed)[0])

    torch.manual_seed(0)
    model = TinyClassifier(optimizer=optimizer, momentum=momentum, nesterov=nesterov, lr=lr)
    x, y = random_tensors(n=64)
    monitor = _SeriesHessian(every_n_steps=2, k=1, tol=1e-7, num_examples=32)
    ref = Reference(monitor)
    trainer = make_trainer("unused", max_steps=3, callbacks=[monitor, ref])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    for step in (0, 2):
        assert monitor.series[step]["curvature/stability_threshold"] == pytest.approx(expected, rel=1e-12)
    assert monitor.series[2]["curvature/sharpness"] == pytest.approx(ref.ref, rel=1e-5)
    assert monitor.series[2]["curvature/edge_ratio"] == pytest.approx(ref.ref / expected, rel=1e-5)
    # before the first step an adaptive optimizer has no state: the preconditioner it will use is predicted from the
    # gradient (test_predicted_first_step_preconditioner_is_the_one_adam_uses), so the edge ratio is logged at step 0
    assert "curvature/edge_ratio" in monitor.series[0]


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop"])
def test_predicted_first_step_preconditioner_is_the_one_adam_uses(optimizer: str) -> None:
    """Full batch: the curvature batch is the first training batch, so the preconditioner predicted at step 0 must
    equal the one the optimizer holds after its first step (read from its state at step 1)."""
    from lightning_curvature.core.preconditioner import adaptive_preconditioner, predicted_first_step_preconditioner

    torch.manual_seed(0)
    model = TinyClassifier(optimizer=optimizer, lr=0.01)
    x, y = random_tensors(n=32)
    seen: dict[str, torch.Tensor] = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            params = list(pl_module.parameters())
            opt = trainer.optimizers[0]
            if step_axis(trainer) == 0:
                loss = _loss(pl_module, batch)
                grads = torch.autograd.grad(loss, params)
                pred = predicted_first_step_preconditioner(opt, params, grads)
                assert pred is not None
                seen["predicted"] = torch.cat([t.reshape(-1) for t in pred])
            elif step_axis(trainer) == 1:
                actual = adaptive_preconditioner(opt, params)
                assert actual is not None
                seen["actual"] = actual

    trainer = make_trainer("unused", max_steps=2, callbacks=[Spy()])
    trainer.fit(model, classification_loader(x, y, batch_size=32, shuffle=False))
    torch.testing.assert_close(seen["predicted"], seen["actual"], rtol=1e-5, atol=1e-12)


def test_block_warm_start_saves_products_and_matches_the_dense_hessian() -> None:
    """Re-measurements start from the previous top k + 1 Ritz vectors: fewer Hessian-vector products than a cold
    Lanczos, and the eigenvalues still agree with ``eigvalsh`` of the dense float64 Hessian within ``tol``."""

    class Reference(pl.Callback):
        def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
            self.monitor, self.refs = monitor, {}

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            step = step_axis(trainer)
            if step in (2, 4):
                self.refs[step] = dense_eigvalsh(pl_module.net, self.monitor._source.get(None))[:2]

    def run(warm_start: bool) -> tuple[_SeriesHessian, Reference]:
        torch.manual_seed(0)
        model = TinyClassifier()
        x, y = random_tensors(n=64)
        monitor = _SeriesHessian(every_n_steps=2, k=2, tol=1e-3, num_examples=32, warm_start=warm_start)
        ref = Reference(monitor)
        trainer = make_trainer("unused", max_steps=5, callbacks=[ref, monitor])
        trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False))
        return monitor, ref

    (warm, ref), (cold, _) = run(True), run(False)
    block = warm._warm_start[0]  # optimizer 0's k + 1 Ritz vectors, shaped like the parameters
    assert len(block) == 3 and all(sum(t.numel() for t in v) == 195 for v in block)
    assert cold._warm_start == {}
    hvp = "curvature/num_hvp"
    assert warm.series[0][hvp] == cold.series[0][hvp]  # the first measurement is cold in both
    for step in (2, 4):
        assert warm.series[step][hvp] < cold.series[step][hvp], step
        for i in (1, 2):
            expected = float(ref.refs[step][i - 1])
            assert monitor_value(warm, step, i) == pytest.approx(expected, rel=1e-3), (step, i)
            assert monitor_value(cold, step, i) == pytest.approx(expected, rel=1e-3), (step, i)


def _per_example_reference(model: torch.nn.Module, x: Tensor, y: Tensor, k: int) -> dict[str, float]:
    model = copy.deepcopy(model).eval()
    rows = []
    for i in range(x.shape[0]):
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    G = torch.stack(rows)
    n = G.shape[0]
    gbar = G.mean(0)
    K = (G - gbar).T @ (G - gbar) / n
    evals = torch.linalg.eigvalsh(K).flip(0)
    # unbiased |G|² and tr Σ (McCandlish et al. 2018, A.1) from per-example norms against the mean
    small, big = float((G * G).sum(1).mean()), float(gbar.dot(gbar))
    g2, tr_sigma = (n * big - small) / (n - 1), n * (small - big) / (n - 1)
    return {
        **{f"grad_cov/eig_{i + 1}": float(evals[i]) for i in range(k)},
        "grad_cov/trace": float(torch.trace(K)),
        "grad_cov/noise_scale": tr_sigma / g2 if g2 > 0 else float("inf"),
        "grad_cov/condition_number": float(evals[0] / evals[k - 1]),
        "grad_cov/frobenius_norm": float(torch.linalg.matrix_norm(K)),
    }


def test_covariance_matches_per_example_loop() -> None:
    """BatchNorm + dropout model: ``mode="auto"`` measures in eval mode; the reference loops in eval mode."""
    torch.manual_seed(0)
    model = TinyClassifier(batch_norm=True, dropout=0.2)
    x, y = random_tensors(n=64)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(x)
    initial = copy.deepcopy(model)
    monitor = GradientCovarianceMonitor(every_n_steps=10, k=3, num_examples=24)
    trainer = make_trainer("unused", max_steps=2, callbacks=[monitor])
    trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False))
    assert monitor.history[0][0] == 0
    ref = _per_example_reference(initial, x[:24], y[:24], k=3)
    # the logged dict of step 0 is the latest (one measurement only)
    assert monitor.num_measurements == 1
    for key, value in ref.items():
        assert monitor.last_metrics[key] == pytest.approx(value, rel=1e-4), key


def test_bf16_mixed_is_measured_in_float32() -> None:
    def run(precision: str) -> HessianEigenvalueMonitor:
        torch.manual_seed(0)
        model = TinyClassifier()
        x, y = random_tensors(n=64)
        monitor = HessianEigenvalueMonitor(every_n_steps=2, k=2, tol=1e-6, num_examples=32)
        cov = GradientCovarianceMonitor(every_n_steps=2, k=2, num_examples=16)
        trainer = make_trainer("unused", max_steps=3, precision=precision, callbacks=[monitor, cov])
        trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False))
        assert all(math.isfinite(v) for v in cov.last_metrics.values())
        return monitor

    fp32, bf16, bf16_true = run("32-true"), run("bf16-mixed"), run("bf16-true")
    assert all(math.isfinite(v) for _, v in bf16.history + bf16_true.history)
    # same parameters at step 0 and curvature in float32: the same value
    assert bf16.history[0][1] == pytest.approx(fp32.history[0][1], rel=1e-5)
    assert bf16.history[1][1] == pytest.approx(fp32.history[1][1], rel=5e-2)
    # bf16 parameters (rounded to ~3 digits), curvature upcast to float32
    assert bf16_true.history[0][1] == pytest.approx(fp32.history[0][1], rel=3e-2)


class _Float64HeadModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Float64Head(8, 12, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_parameters_of_different_dtypes_in_the_monitors() -> None:
    """A float64 head over a float32 body: every measurement failed ("mat1 and mat2 must have the same dtype")."""
    x, y = random_tensors(n=64)
    model = _Float64HeadModule()
    ref_model = copy.deepcopy(model).double()
    monitor = HessianEigenvalueMonitor(every_n_steps=2, k=1, tol=1e-6, num_examples=64)
    cov = GradientCovarianceMonitor(every_n_steps=2, k=2, num_examples=64)
    trainer = make_trainer("unused", max_steps=1, callbacks=[monitor, cov])
    trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False))
    assert monitor.num_failures == 0 and cov.num_failures == 0
    H = dense_hessian(ref_model.net, ce_loss, (x.double(), y))  # step 0: the initial weights
    assert monitor.history[0][1] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-4)


def test_epoch_end_measurements() -> None:
    """Step 0 at the first batch, then at each epoch end: the Hessian of the fixed batch and the covariance of the
    last training batch (``batch="current"`` at epoch end), against a dense Hessian and a per-example loop."""

    class Reference(pl.Callback):  # before the monitors: the parameters and batches they measure
        def __init__(self, hess: HessianEigenvalueMonitor) -> None:
            self.hess = hess
            self.last: Any = None
            self.refs: dict[int, tuple[float, float]] = {}

        def _record(self, trainer: pl.Trainer, pl_module: Any) -> None:
            sharpness = float(dense_eigvalsh(pl_module.net, self.hess._source.get(None))[0])
            cov = _per_example_reference(pl_module, self.last[0], self.last[1], k=2)["grad_cov/eig_1"]
            self.refs[step_axis(trainer)] = (sharpness, cov)

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            self.last = batch
            if step_axis(trainer) == 0:
                self._record(trainer, pl_module)

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self._record(trainer, pl_module)

    torch.manual_seed(0)
    model = TinyClassifier()
    x, y = random_tensors(n=48)
    hess = HessianEigenvalueMonitor(every_n_steps=100, k=1, tol=1e-6, num_examples=16, on_epoch_end=True)
    cov = GradientCovarianceMonitor(every_n_steps=100, k=2, batch="current", on_epoch_end=True)
    ref = Reference(hess)
    trainer = make_trainer("unused", max_epochs=2, callbacks=[ref, hess, cov])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    assert [s for s, _ in hess.history] == [0, 3, 6]
    assert [s for s, _ in cov.history] == [0, 3, 6]
    assert sorted(ref.refs) == [0, 3, 6]
    for (step, sharpness), (_, eig1) in zip(hess.history, cov.history):
        assert sharpness == pytest.approx(ref.refs[step][0], rel=1e-5), step
        assert eig1 == pytest.approx(ref.refs[step][1], rel=1e-4), step


class _ValidationMonitor(HessianEigenvalueMonitor):
    """Measures on the validation batch in ``on_validation_epoch_end`` (no_grad in fit, inference_mode alone)."""

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int, dl_idx: int = 0) -> None:
        self._val_batch = batch
        self._grad_mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.measure(trainer, pl_module, self._val_batch, step_axis(trainer), prog_bar=False)


def test_measuring_under_no_grad_and_inference_mode() -> None:
    torch.manual_seed(0)
    model = TinyClassifier(batch_norm=True)
    x, y = random_tensors(n=32)
    monitor = _ValidationMonitor(every_n_steps=100, k=1, batch="current")
    trainer = make_trainer("unused", max_steps=2, limit_val_batches=1, val_check_interval=2, callbacks=[monitor])
    loader = classification_loader(x, y, batch_size=16, shuffle=False)
    trainer.fit(model, loader, loader)
    assert monitor._grad_mode == (False, False)
    assert len(monitor.history) == 2 and all(math.isfinite(v) for _, v in monitor.history)
    trainer.validate(model, loader, verbose=False)
    assert monitor._grad_mode == (False, True)
    assert len(monitor.history) == 3 and math.isfinite(monitor.history[-1][1])
    # validation runs the model in eval mode and mode="train" keeps the flags it finds: running statistics
    expected = float(dense_eigvalsh(copy.deepcopy(model.net).eval(), (x[:16], y[:16]))[0])
    assert monitor.history[-1][1] == pytest.approx(expected, rel=1e-3)


def test_periodic_cold_start(tmp_path, monkeypatch) -> None:
    """With cold_start_every=2, every third measurement starts cold (one start vector) instead of from the block."""
    from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors

    import lightning_curvature.callbacks.hessian_monitor as hm

    seen: list[bool] = []
    original = hm.lanczos

    def spy(*args, **kwargs):
        v0 = kwargs.get("v0")
        # a warm-start block (a list of k + 1 parameter-shaped vectors), not a cold start (None: a Gaussian for k > 1)
        seen.append(isinstance(v0, list) and len(v0) > 1 and isinstance(v0[0], list))
        return original(*args, **kwargs)

    monkeypatch.setattr(hm, "lanczos", spy)
    x, y = random_tensors(64)
    monitor = hm.HessianEigenvalueMonitor(every_n_steps=1, k=2, num_examples=32, cold_start_every=2)
    make_trainer(tmp_path, max_steps=6, callbacks=[monitor]).fit(TinyClassifier(), classification_loader(x, y, seed=0))
    assert len(seen) >= 6
    assert seen[:6] == [False, True, True, False, True, True]


def test_tracking_mode_follows_the_certified_sharpness_with_two_products_per_step() -> None:
    """every_n_steps=1 with tracking_products=2: warm measurements take 2 products (Lanczos from the last top
    vector), every 5th is a cold certified solve; the tracked values stay close to λ_max of the dense Hessian."""

    class Reference(pl.Callback):
        def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
            self.monitor, self.refs, self.spectra = monitor, {}, {}

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            fixed = self.monitor._source.get(None)
            self.spectra[step_axis(trainer)] = spectrum = dense_eigvalsh(pl_module.net, fixed)
            self.refs[step_axis(trainer)] = float(spectrum[0])

    torch.manual_seed(0)
    model = TinyClassifier(lr=0.05)
    x, y = random_tensors(n=64)
    monitor = _SeriesHessian(every_n_steps=1, k=1, num_examples=32, tracking_products=2, cold_start_every=5)
    ref = Reference(monitor)
    trainer = make_trainer("unused", max_steps=12, callbacks=[ref, monitor])
    trainer.fit(model, classification_loader(x, y, batch_size=16, seed=0))
    cold_steps = [s for s in monitor.series if s == 0 or s % 6 == 0]  # the first, then after 5 warm ones
    for step, logged in monitor.series.items():
        if step in cold_steps:
            continue
        assert logged["curvature/num_hvp"] == 2.0, step
        theta = logged["curvature/sharpness"]
        assert abs(theta - ref.refs[step]) <= 0.02 * ref.refs[step], step
        # a Ritz value: below the top eigenvalue (up to float32 products), and an eigenvalue within the logged residual
        assert theta <= ref.refs[step] * (1 + 1e-5), step
        assert float((ref.spectra[step] - theta).abs().min()) <= logged["curvature/error_bound"], step
    for step in cold_steps:
        assert monitor.series[step]["curvature/sharpness"] == pytest.approx(ref.refs[step], rel=1e-3)


def test_tracking_asks_less_of_finite_difference_products_than_a_certified_solve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tracked measurements raise the products' ``fd_target`` for their solve (their residual bounds are far above
    the products' errors); the cold certified ones keep the default, the trace on the same operator keeps it too,
    and every logged value stays within its logged bound of an eigenvalue of the dense Hessian."""
    from lightning_curvature.callbacks import hessian_monitor as hm
    from lightning_curvature.core import hvp as hvp_module

    class Reference(pl.Callback):
        def __init__(self) -> None:
            self.spectra: dict[int, Tensor] = {}

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            self.spectra[step_axis(trainer)] = dense_eigvalsh(pl_module.net, monitor._source.get(None))

    per_measurement = record_product_targets(monkeypatch)
    torch.manual_seed(0)
    x, y = random_tensors(n=64)
    monitor = _SeriesHessian(
        every_n_steps=1, k=1, num_examples=32, tracking_products=2, cold_start_every=3, method="finite_difference",
        compute_trace=True, trace_samples=6,
    )  # fmt: skip
    ref = Reference()
    make_trainer("unused", max_steps=8, callbacks=[ref, monitor]).fit(
        TinyClassifier(lr=0.05), classification_loader(x, y, batch_size=16, seed=0)
    )
    default = ("trace", hvp_module.FD_TARGET)
    cold, warm = {("solve", hvp_module.FD_TARGET), default}, {("solve", hm.TRACKING_FD_TARGET), default}
    assert per_measurement == [cold, warm, warm, warm, cold, warm, warm, warm]  # cold, 3 warm, cold, 3 warm
    assert len(monitor.series) == 8
    for step, logged in monitor.series.items():
        theta = logged["curvature/sharpness"]
        assert float((ref.spectra[step] - theta).abs().min()) <= logged["curvature/error_bound"], step
