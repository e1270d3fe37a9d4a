"""The channel from monitors to schedulers: per optimizer, by protocol, learning rates changed only in ``step()``
(CDAT excepted), measurements on request, and the step's loss passed to CDAT."""

from __future__ import annotations

import copy
import csv
import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _product_targets import record_product_targets
from _reference import ce_loss, dense_hessian, pooled_batch
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from lightning_curvature import (
    CurvatureDynamicsAwareLR,
    DirectionalCurvatureMonitor,
    HessianEigenvalueMonitor,
    SharpnessAwareLR,
)
from lightning_curvature.schedules.protocols import DirectionSubscriber, MeasurementRequester, SharpnessSubscriber

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class Recording(torch.optim.lr_scheduler.LambdaLR):
    """A user's own subscriber: nothing inherited from the library, only the protocol's methods."""

    def __init__(self, optimizer: torch.optim.Optimizer, requests: tuple[int, ...] = ()) -> None:
        self.observed: list[tuple[float, int | None]] = []
        self.attached: list[Any] = []
        self.requests = requests
        super().__init__(optimizer, lambda step: 1.0)

    def attach_monitor(self, monitor: object) -> None:
        self.attached.append(monitor)

    def observe_sharpness(self, sharpness: float, step: int | None = None) -> None:
        self.observed.append((sharpness, step))

    def wants_measurement(self, step: int | None = None) -> bool:
        return step in self.requests


def test_the_library_schedulers_implement_the_protocols() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert isinstance(SharpnessAwareLR(opt), SharpnessSubscriber)
    assert isinstance(SharpnessAwareLR(opt), MeasurementRequester)
    assert isinstance(CurvatureDynamicsAwareLR(opt), DirectionSubscriber)
    assert not isinstance(CurvatureDynamicsAwareLR(opt), SharpnessSubscriber)
    assert not isinstance(torch.optim.lr_scheduler.StepLR(opt, 1), SharpnessSubscriber)


class TwoOptimizers(TinyClassifier):
    """A body (first layer, SGD) and a head (last layer, SGD), each with its own subscribing scheduler."""

    def __init__(self) -> None:
        super().__init__(hidden=6, num_classes=3, lr=0.05)
        self.automatic_optimization = False

    def curvature_loss(self, batch: Any) -> torch.Tensor:
        return self.loss(batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        for opt in self.optimizers():  # type: ignore[union-attr]
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():  # type: ignore[union-attr]
            opt.step()
        return loss

    def configure_optimizers(self) -> Any:
        body = torch.optim.SGD(self.net[0].parameters(), lr=self.lr)
        head = torch.optim.SGD(self.net[2].parameters(), lr=self.lr)
        self.scheds = [Recording(body), Recording(head)]
        return [body, head], [{"scheduler": s, "interval": "step"} for s in self.scheds]


def test_each_subscriber_receives_the_sharpness_of_its_own_optimizers_parameters(tmp_path: Path) -> None:
    """Reference: the top eigenvalue of the dense float64 Hessian block of each optimizer's parameters."""

    class Reference(pl.Callback):
        def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
            self.monitor, self.refs = monitor, {}

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the monitors' step axis (batches here)
            if step not in (0, 2):
                return
            H = dense_hessian(
                copy.deepcopy(pl_module.net).double(), ce_loss, pooled_batch(self.monitor._source.get(None))
            )
            n_body = sum(p.numel() for p in pl_module.net[0].parameters())
            body, head = H[:n_body, :n_body], H[n_body:, n_body:]
            self.refs[step] = [float(torch.linalg.eigvalsh(b)[-1]) for b in (body, head)]

    torch.manual_seed(0)
    model = TwoOptimizers()
    x, y = random_tensors(n=48)
    hess = HessianEigenvalueMonitor(every_n_steps=2, k=1, tol=1e-8, num_examples=16)
    ref = Reference(hess)
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[ref, hess])  # 2 optimizer steps per batch
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    assert all(s.attached == [hess] for s in model.scheds)
    for i, sched in enumerate(model.scheds):
        assert [step for _, step in sched.observed] == [0, 2]
        for value, step in sched.observed:
            assert value == pytest.approx(ref.refs[step][i], rel=1e-6), (i, step)
    assert ref.refs[0][0] != pytest.approx(ref.refs[0][1], rel=1e-2)  # the blocks differ: a mix-up would show


class Asking(TinyClassifier):
    """SGD whose scheduler (a :class:`Recording`) asks for measurements before the updates ``requests``."""

    def __init__(self, requests: tuple[int, ...]) -> None:
        super().__init__()
        self.requests = requests

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        self.sched = Recording(opt, requests=self.requests)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}


class TopEigenvalue(pl.Callback):
    """The dense float64 top Hessian eigenvalue of the monitor's fixed batch before every update."""

    def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
        self.monitor, self.refs = monitor, {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        fixed = pooled_batch(self.monitor._source.get(None))
        H = dense_hessian(copy.deepcopy(pl_module.net).double(), ce_loss, fixed)
        self.refs[trainer.global_step] = float(torch.linalg.eigvalsh(H)[-1])


def test_a_subscriber_asks_for_a_measurement(tmp_path: Path) -> None:
    """Requests are honoured at most every `min_gap` steps, with the top eigenvalue only (to 1%)."""

    torch.manual_seed(0)
    model = Asking(requests=(3, 4))
    x, y = random_tensors(n=96)
    hess = HessianEigenvalueMonitor(every_n_steps=5, k=2, num_examples=16)
    hess.min_gap = 2
    ref = TopEigenvalue(hess)
    logger = CSVLogger(tmp_path, name="asks")
    trainer = make_trainer(tmp_path, max_steps=6, logger=logger, callbacks=[ref, hess])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    # the cadence (0, 5) and the request at 3; the one at 4 comes too soon after 3
    assert [s for s, _ in hess.history] == [0, 3, 5]
    assert [s for _, s in model.sched.observed] == [0, 3, 5]
    for value, step in model.sched.observed:
        assert value == pytest.approx(ref.refs[step], rel=1e-2), step
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = {int(r["step"]): r for r in csv.DictReader(fh) if r.get("curvature/sharpness")}
    assert rows[0]["curvature/eig_2"] and rows[5]["curvature/eig_2"]
    assert not rows[3]["curvature/eig_2"]  # a requested measurement: the top eigenvalue only


def test_finite_difference_products_are_searched_only_as_far_as_each_solve_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requested measurements solve to 1% (``FEED_TOL``), so their products need less than the cadence's certified
    solves to ``tol``; the trace on the same operator keeps the default accuracy. Every value still matches the dense
    Hessian to its solve's tolerance."""
    from lightning_curvature.callbacks import hessian_monitor as hm
    from lightning_curvature.core import hvp as hvp_module

    seen = record_product_targets(monkeypatch)

    torch.manual_seed(0)
    model = Asking(requests=(3,))
    x, y = random_tensors(n=96)
    hess = HessianEigenvalueMonitor(
        every_n_steps=5, k=1, num_examples=16, method="finite_difference", compute_trace=True, trace_samples=6
    )
    hess.min_gap = 2
    ref = TopEigenvalue(hess)
    make_trainer(tmp_path, max_steps=6, callbacks=[ref, hess]).fit(model, classification_loader(x, y, batch_size=16))
    assert [step for _, step in model.sched.observed] == [0, 3, 5]
    certified, requested = hm.fd_target_for(hess.tol), hm.fd_target_for(hm.FEED_TOL)
    assert certified == hvp_module.FD_TARGET < requested
    assert seen == [
        {("solve", certified), ("trace", hvp_module.FD_TARGET)},
        {("solve", requested)},  # the requested measurement: the top eigenvalue only
        {("solve", certified), ("trace", hvp_module.FD_TARGET)},
    ]
    for value, step in model.sched.observed:
        tol = hm.FEED_TOL if step == 3 else hess.tol
        assert value == pytest.approx(ref.refs[step], rel=tol), step


def test_sharpness_aware_lr_requests_measurements_while_held_by_the_edge(tmp_path: Path) -> None:
    """Adam far above its edge: the first measurement resets the lr below it; the lr then rises to twice the
    measured edge and is held there, so the scheduler asks for measurements (at most every 1/(1 - β₁) steps)."""

    class FastAdam(TinyClassifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=1.0)
            self.sched = SharpnessAwareLR(opt)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}

    torch.manual_seed(0)
    model = FastAdam()
    x, y = random_tensors(n=480)
    hess = HessianEigenvalueMonitor(every_n_steps=1000, k=1, num_examples=16)
    trainer = make_trainer(tmp_path, max_steps=30, callbacks=[hess])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    steps = [s for s, _ in hess.history]
    assert steps[0] == 0 and len(steps) > 1  # the cadence alone would measure at step 0 only
    assert all(b - a >= model.sched.hold_interval for a, b in itertools.pairwise(steps[1:]))
    assert model.sched.num_observations == len(steps)


@pytest.mark.parametrize("monitor_first", [True, False])
def test_learning_rate_monitor_shows_the_lr_of_the_update_whatever_the_callback_order(
    tmp_path: Path, monitor_first: bool
) -> None:
    class Capped(TinyClassifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=5.0)  # far above 2/sharpness
            self.sched = SharpnessAwareLR(opt)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}

    class UsedLR(pl.Callback):
        def __init__(self) -> None:
            self.lrs: dict[int, float] = {}

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            self.lrs[trainer.global_step] = float(optimizer.param_groups[0]["lr"])

    torch.manual_seed(0)
    x, y = random_tensors(n=96)
    hess = HessianEigenvalueMonitor(every_n_steps=2, k=1, num_examples=16)
    lrm, used = LearningRateMonitor(logging_interval="step"), UsedLR()
    logger = CSVLogger(tmp_path, name="lr")
    callbacks: list[Any] = [hess, lrm, used] if monitor_first else [lrm, hess, used]
    trainer = make_trainer(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1, callbacks=callbacks)
    trainer.fit(Capped(), classification_loader(x, y, batch_size=16))
    logged = {}
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("lr-SGD"):
                logged[int(row["step"])] = float(row["lr-SGD"])
    assert logged and all(logged[s] == pytest.approx(used.lrs[s], rel=1e-12) for s in logged)
    assert used.lrs[0] < 5.0  # the measurement before the first update capped it at once


def test_a_subscriber_on_a_foreign_optimizer_is_refused(tmp_path: Path) -> None:
    class Foreign(TinyClassifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
            other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            sched = Recording(other)
            sched.optimizer = other
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    x, y = random_tensors(n=32)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[HessianEigenvalueMonitor(every_n_steps=1)])
    with pytest.raises(Exception, match="not among the Trainer's optimizers|optimizer"):
        trainer.fit(Foreign(), classification_loader(x, y, batch_size=16))


def test_an_epoch_interval_subscriber_is_warned_about(tmp_path: Path) -> None:
    class PerEpoch(TinyClassifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": SharpnessAwareLR(opt), "interval": "epoch"}}

    x, y = random_tensors(n=32)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[HessianEigenvalueMonitor(every_n_steps=1, k=1)])
    with pytest.warns(UserWarning, match='"interval": "step"'):
        trainer.fit(PerEpoch(), classification_loader(x, y, batch_size=16))


def test_cdat_receives_the_loss_of_the_update(tmp_path: Path) -> None:
    """The monitor passes the loss of the step's batch at the update's parameters (runaway detection is armed)."""

    class Spy(CurvatureDynamicsAwareLR):
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.losses: list[float | None] = []
            super().__init__(optimizer)

        def observe_direction(self, numerator: Any, denominator: Any, step: Any = None, *, loss: Any = None) -> None:
            self.losses.append(None if loss is None else float(loss))
            super().observe_direction(numerator, denominator, step, loss=loss)

    class WithCDAT(TinyClassifier):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
            self.sched = Spy(opt)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}

    class Reference(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            net = copy.deepcopy(pl_module.net).double()
            self.losses.append(float(ce_loss(net, (batch[0].double(), batch[1]))))

    torch.manual_seed(0)
    model, ref = WithCDAT(), Reference()
    x, y = random_tensors(n=64)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[ref, DirectionalCurvatureMonitor()])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    assert len(model.sched.losses) == 4
    assert model.sched.losses == pytest.approx(ref.losses, rel=1e-5)
