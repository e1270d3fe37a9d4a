"""What reaches the loggers: tags, one step axis with LearningRateMonitor and the loss, layout, progress bar,
CSV and no logger; schedulers fed through ``observe_sharpness``/``attach_monitor``."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _reference import (
    ce_loss,
    dense_preconditioned_eigvalsh,
    first_step_preconditioner,
    optimizer_preconditioner,
    pooled_batch,
)
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from torch import Tensor

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor
from lightning_curvature.tensorboard import LAYOUT_TAG

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class _DecayingLR(TinyClassifier):
    """SGD whose lr halves every step, so the threshold 2/lr differs at every step."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _LossSpy:
    """A ``loss_fn`` remembering the first loss value of every measurement."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.fresh = True

    def __call__(self, model: Any, batch: Any) -> Tensor:
        loss = model.loss(batch)
        if self.fresh:
            self.values.append(float(loss))
            self.fresh = False
        return loss


def test_tensorboard_tags_steps_and_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _DecayingLR(lr=0.2)
    x, y = random_tensors(n=64)
    spy = _LossSpy()

    class Hessian(HessianEigenvalueMonitor):
        def measure(self, *args: Any, **kwargs: Any) -> Any:
            spy.fresh = True
            return super().measure(*args, **kwargs)

    hess = Hessian(every_n_steps=2, k=2, batch="current", loss_fn=spy, compute_trace=True, trace_samples=6,
                   compute_overlap=True, compute_density=True, density_num_iters=8)  # fmt: skip
    cov = GradientCovarianceMonitor(every_n_steps=3, k=2, num_examples=16)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1,
                           callbacks=[LearningRateMonitor(), hess, cov])  # fmt: skip
    trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False))
    acc = event_accumulator.EventAccumulator(
        logger.log_dir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    hessian_tags = {"curvature/sharpness", "curvature/eig_1", "curvature/eig_2", "curvature/stability_threshold",
                    "curvature/edge_ratio", "curvature/num_hvp", "curvature/trace", "curvature/trace_std_error",
                    "curvature/subspace_overlap"}  # fmt: skip
    cov_tags = {"grad_cov/eig_1", "grad_cov/eig_2", "grad_cov/condition_number", "grad_cov/trace",
                "grad_cov/noise_scale", "grad_cov/frobenius_norm"}  # fmt: skip
    assert hessian_tags | cov_tags <= scalars
    assert "curvature/spectrum" in acc.Tags()["histograms"]
    assert "curvature/density" in acc.Tags()["images"]
    assert LAYOUT_TAG in acc.Tags()["tensors"] and len(acc.Tensors(LAYOUT_TAG)) == 1

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)}

    sharp, thr, lr = series("curvature/sharpness"), series("curvature/stability_threshold"), series("lr-SGD")
    assert sorted(sharp) == [0, 2, 4] and sorted(series("grad_cov/eig_1")) == [0, 3]
    # the threshold written at step s is 2 / (the lr LearningRateMonitor wrote at step s): one step axis
    assert sorted(thr) == [0, 2, 4] and len({round(v, 6) for v in thr.values()}) == 3
    for step, value in thr.items():
        assert value == pytest.approx(2 / lr[step], rel=1e-6)
    # the loss the monitor saw at step s (current batch, current params) is the training loss logged at s
    loss = series("train_loss_step")
    assert [loss[s] for s in (0, 2, 4)] == pytest.approx(spy.values, rel=1e-6)
    assert [sharp[s] for s in (0, 2, 4)] == pytest.approx([v for _, v in hess.history], rel=1e-6)
    # and the progress bar / callback_metrics carry the latest sharpness
    assert trainer.progress_bar_metrics["curvature/sharpness"] == pytest.approx(sharp[4], rel=1e-6)
    assert float(trainer.callback_metrics["curvature/sharpness"]) == pytest.approx(sharp[4], rel=1e-6)


def test_csv_logger_and_no_logger(tmp_path: Path) -> None:
    """Written at every measurement although ``log_every_n_steps`` (50) is never reached."""
    x, y = random_tensors(n=48)
    for logger in (CSVLogger(tmp_path, name="csv"), False):
        torch.manual_seed(0)
        hess = HessianEigenvalueMonitor(every_n_steps=2, k=1, num_examples=16)
        cov = GradientCovarianceMonitor(every_n_steps=2, k=2, num_examples=16)
        trainer = make_trainer(tmp_path, max_steps=4, logger=logger, callbacks=[hess, cov])
        trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=16))
        assert [s for s, _ in hess.history] == [0, 2] and [s for s, _ in cov.history] == [0, 2]
        if logger:
            with open(Path(logger.log_dir) / "metrics.csv") as fh:
                rows = list(csv.DictReader(fh))
            sharp = {int(r["step"]): float(r["curvature/sharpness"]) for r in rows if r["curvature/sharpness"]}
            assert sharp == pytest.approx(dict(hess.history))
            assert {int(r["step"]) for r in rows if r["grad_cov/trace"]} == {0, 2}
    assert hess.last_sharpness == hess.history[-1][1] and hess.last_threshold == pytest.approx(2 / 0.1)


class _ObservingSGD(torch.optim.lr_scheduler.LambdaLR):
    """A scheduler with the duck-typed hooks the monitor feeds."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.observed: list[tuple[float, int]] = []
        self.attached: list[Any] = []
        super().__init__(optimizer, lambda step: 1.0)

    def observe_sharpness(self, sharpness: float, step: int) -> None:
        self.observed.append((sharpness, step))

    def attach_monitor(self, monitor: Any) -> None:
        self.attached.append(monitor)


class _WithObservingScheduler(TinyClassifier):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        self.sched = _ObservingSGD(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}


def test_schedulers_are_attached_and_fed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _WithObservingScheduler()
    x, y = random_tensors(n=48)
    hess = HessianEigenvalueMonitor(every_n_steps=2, k=1, num_examples=16)
    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[hess])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    assert model.sched.attached == [hess]
    assert model.sched.observed == [(v, s) for s, v in hess.history]
    assert [s for _, s in model.sched.observed] == [0, 2, 4]
    assert all(math.isfinite(v) for v, _ in model.sched.observed)


def test_adaptive_optimizer_is_fed_preconditioned_values_from_step_0(tmp_path: Path) -> None:
    class Adam(_WithObservingScheduler):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            self.sched = _ObservingSGD(opt)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}

    class Reference(pl.Callback):
        """λ_max(P^{-1/2} H P^{-1/2}) of the fixed batch, dense float64; P from a real Adam step (step 0: a fresh
        Adam fed the fixed batch's gradient, the step the first update will take; step 2: the optimizer's state)."""

        def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
            self.monitor, self.refs = monitor, {}

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            step = trainer.global_step
            if step not in (0, 2):
                return
            fixed = self.monitor._source.get(None)
            opt = trainer.optimizers[0]
            if step == 0:
                net = copy.deepcopy(pl_module.net).double()
                grads = torch.autograd.grad(ce_loss(net, pooled_batch(fixed)), list(net.parameters()))
                precond = first_step_preconditioner(opt, grads)
            else:
                precond = optimizer_preconditioner(opt, list(pl_module.parameters()))
            self.refs[step] = float(dense_preconditioned_eigvalsh(pl_module.net, fixed, precond)[0])

    torch.manual_seed(0)
    model = Adam()
    x, y = random_tensors(n=48)
    hess = HessianEigenvalueMonitor(every_n_steps=2, k=1, tol=1e-6, num_examples=16)
    ref = Reference(hess)
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[ref, hess])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    # step 0: no Adam state yet; the preconditioner of Adam's first step is predicted from the gradient and fed
    assert [s for s, _ in hess.history] == [0, 2]
    assert model.sched.observed == [(v, s) for s, v in hess.history]
    for value, step in model.sched.observed:
        assert value == pytest.approx(ref.refs[step], rel=1e-5), step


class _WithSharpnessAwareLR(TinyClassifier):
    def configure_optimizers(self) -> Any:
        from lightning_curvature import SharpnessAwareLR

        opt = torch.optim.SGD(self.parameters(), lr=5.0)  # far above 2/sharpness: the cap must bind
        self.sched = SharpnessAwareLR(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}


def test_end_to_end_with_sharpness_aware_lr(tmp_path: Path) -> None:
    """The wiring of API.md: the callback plus the returned scheduler, nothing else."""
    torch.manual_seed(0)
    model = _WithSharpnessAwareLR()
    x, y = random_tensors(n=48)
    hess = HessianEigenvalueMonitor(every_n_steps=2, k=1, num_examples=16)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[hess])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    steps = [s for s, _ in hess.history]
    assert {0, 2} <= set(steps)  # the cadence; the scheduler may ask for more (held below its base lr)
    assert model.sched.monitor_attached and model.sched.num_observations == len(steps)
    assert model.sched.sharpness == pytest.approx(hess.last_sharpness)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr < 5.0 and lr * hess.last_sharpness <= 2.0
