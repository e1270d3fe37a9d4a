"""A measurement that cannot be made is skipped: NaN in the logs, one warning per kind, nothing published or fed,
training untouched and going on; for every monitor and every reason (issue 10, "crashes that stop training")."""

from __future__ import annotations

import copy
import csv
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import DestroyProcessGroup, TinyClassifier, classification_loader, make_trainer, random_tensors
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from lightning_curvature import (
    CurvatureDynamicsAwareLR,
    DirectionalCurvatureMonitor,
    GradientCovarianceMonitor,
    HessianEigenvalueMonitor,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MONITORS = ("hessian", "covariance", "directional")


class CDATClassifier(TinyClassifier):
    """TinyClassifier whose SGD is tuned by CDAT (for the directional monitor)."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": CurvatureDynamicsAwareLR(opt), "interval": "step"}}


def _monitor(kind: str, **kwargs: Any) -> Any:
    if kind == "hessian":
        return HessianEigenvalueMonitor(every_n_steps=1, k=1, num_examples=16, **kwargs)
    if kind == "covariance":
        return GradientCovarianceMonitor(every_n_steps=1, k=2, num_examples=16, **kwargs)
    return DirectionalCurvatureMonitor(**kwargs)


def _values(monitor: Any) -> list[float]:
    """The headline value of every measurement (for the directional monitor: d_t of the latest only)."""
    if isinstance(monitor, DirectionalCurvatureMonitor):
        return [monitor.last_metrics["cdat/denominator"]]
    return [v for _, v in monitor.history]


def _fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Any], steps: int = 3, n: int = 48) -> pl.Trainer:
    x, y = random_tensors(n=n)
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=callbacks)
    trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False))
    return trainer


def _failure_warnings(record: Any, monitor: Any) -> list[str]:
    prefix = f"{type(monitor).__name__}: the measurement"
    return [str(w.message) for w in record if str(w.message).startswith(prefix)]


def test_covariance_on_a_last_batch_of_one_example_is_skipped(tmp_path: Path) -> None:
    """``batch="current"``: 33 examples in batches of 16 end with a batch of 1, which has no covariance."""
    torch.manual_seed(0)
    cov = GradientCovarianceMonitor(every_n_steps=1, k=2, batch="current")
    x, y = random_tensors(n=33)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[cov])
    with pytest.warns(UserWarning, match="at least 2 examples") as record:
        trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=16, shuffle=False))
    assert trainer.global_step == 6  # both epochs ran to the end
    steps = [s for s, _ in cov.history]
    values = dict(cov.history)
    assert steps == [0, 1, 2, 3, 4, 5]
    assert all(math.isfinite(values[s]) for s in (0, 1, 3, 4)) and math.isnan(values[2]) and math.isnan(values[5])
    assert len(_failure_warnings(record, cov)) == 1 and cov.num_failures == 2
    assert isinstance(cov.last_error, ValueError)


class _FailingLoss:
    """A loss whose evaluations raise from ``fail_from`` on (a product that fails, e.g. a lost device)."""

    def __init__(self, fail_from: int) -> None:
        self.fail_from = fail_from

    def __call__(self, model: Any, batch: Any) -> Tensor:
        if model.global_step >= self.fail_from:
            raise RuntimeError("product failed: the device is gone")
        return model.loss(batch)


@pytest.mark.parametrize("kind", MONITORS)
def test_an_exception_from_a_product_is_contained(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model_cls = CDATClassifier if kind == "directional" else TinyClassifier
    model = model_cls(lr=0.05)
    reference = copy.deepcopy(model)
    monitor = _monitor(kind, loss_fn=_FailingLoss(fail_from=2))
    with pytest.warns(UserWarning, match="product failed: the device is gone") as record:
        trainer = _fit(tmp_path, model, [monitor], steps=4)
    assert trainer.global_step == 4
    assert len(_failure_warnings(record, monitor)) == 1 and monitor.num_failures == 2
    assert math.isnan(_values(monitor)[-1])
    if kind != "directional":
        assert all(math.isfinite(v) for v in _values(monitor)[:2])
        # the observer did not perturb the run: the same parameters as training without it
        _fit(tmp_path / "plain", reference, [], steps=4)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q)


class _Compiled(TinyClassifier):
    """``self.net = torch.compile(self.net)``: a compiled submodule, the common pattern."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net = torch.compile(self.net, backend="aot_eager")  # aot_autograd: no double backward, no C compiler


class _CompiledCDAT(_Compiled, CDATClassifier):
    pass


@pytest.mark.parametrize("kind", MONITORS)
def test_compiled_submodule_never_stops_training(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = (_CompiledCDAT if kind == "directional" else _Compiled)(lr=0.05)
    monitor = _monitor(kind)
    trainer = _fit(tmp_path, model, [monitor], steps=3)
    assert trainer.global_step == 3
    if monitor.num_failures:  # a failure (double backward through aot_autograd) is named, not raised
        assert "double backward" in str(monitor.last_error)
        assert all(math.isnan(v) for v in _values(monitor))


@pytest.mark.parametrize("kind", ["hessian", "directional"])
def test_compiled_submodule_is_measured(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = (_CompiledCDAT if kind == "directional" else _Compiled)(lr=0.05)
    monitor = _monitor(kind)
    _fit(tmp_path, model, [monitor], steps=2)
    assert monitor.num_failures == 0 and all(math.isfinite(v) for v in _values(monitor))


def _detached(m: Any, b: Any) -> Tensor:
    return m.loss(b).detach()


def _no_grad(m: Any, b: Any) -> Tensor:
    with torch.no_grad():
        return m.loss(b)


def _integer(m: Any, b: Any) -> Tensor:
    return (m.loss(b) * 1000).long()


def _per_example(m: Any, b: Any) -> Tensor:
    x, y = b
    return nn.functional.cross_entropy(m(x), y, reduction="none")


def _infinite(m: Any, b: Any) -> Tensor:
    return m.loss(b) * float("inf")


BAD_LOSSES = [
    (_detached, "does not depend on the parameters"),
    (_no_grad, "does not depend on the parameters"),
    (_integer, "floating point"),
    (_per_example, "must be a scalar"),
    (_infinite, "not finite"),
]


@pytest.mark.parametrize("kind", MONITORS)
@pytest.mark.parametrize(("loss_fn", "reason"), BAD_LOSSES, ids=[f.__name__.strip("_") for f, _ in BAD_LOSSES])
def test_a_bad_loss_is_one_clear_warning_and_nan(tmp_path: Path, kind: str, loss_fn: Any, reason: str) -> None:
    torch.manual_seed(0)
    model = (CDATClassifier if kind == "directional" else TinyClassifier)(lr=0.05)
    monitor = _monitor(kind, loss_fn=loss_fn)
    with pytest.warns(UserWarning, match=reason) as record:
        trainer = _fit(tmp_path, model, [monitor], steps=2)
    assert trainer.global_step == 2
    assert len(_failure_warnings(record, monitor)) == 1
    assert monitor.num_failures == 2 and all(math.isnan(v) for v in _values(monitor))
    assert not any(k in trainer.callback_metrics for k in monitor.last_metrics)  # nothing published


class _FakeStrategy:
    """Answers the boolean all-reduces of a two-process run with scripted decisions of the other process."""

    root_device = torch.device("cpu")

    def __init__(self, other: list[bool]) -> None:
        self.other = list(other)
        self.calls = 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.calls += 1
        return decision and self.other.pop(0)

    def reduce(self, t: Tensor, reduce_op: str = "sum") -> Tensor:
        return t  # the other process contributes nothing to the engine's sums


class _FakeTrainer:
    world_size = 2
    global_rank = 0

    def __init__(self, strategy: _FakeStrategy) -> None:
        self.strategy = strategy
        self.callback_metrics: dict[str, Any] = {}
        self.loggers: list[Any] = []
        self.optimizers: list[Any] = []
        self.lr_scheduler_configs: list[Any] = []


def test_processes_agree_on_a_failure_of_another_process() -> None:
    """Under DDP a process whose measurement succeeded logs NaN when another process's failed (no divergence of
    logs or schedulers), after the loss was checked on every process before the engine's collectives."""
    model = TinyClassifier()
    x, y = random_tensors(n=16)
    cov = GradientCovarianceMonitor(every_n_steps=1, k=2, batch="current")
    cov._resolve_loss(model)
    strategy = _FakeStrategy(other=[True, False])  # the other process: loss fine, measurement failed
    with pytest.warns(UserWarning, match="another process could not make it"):
        metrics = cov.measure(_FakeTrainer(strategy), model, (x, y), step=0, prog_bar=False)  # type: ignore[arg-type]
    assert strategy.calls == 2  # preflight agreement, then success agreement
    assert metrics and all(math.isnan(v) for v in metrics.values())
    assert cov.num_failures == 1
    strategy = _FakeStrategy(other=[False])  # the other process's loss failed: skipped before any collective
    trainer = _FakeTrainer(strategy)
    cov.measure(trainer, model, (x, y), step=1, prog_bar=False)  # type: ignore[arg-type]
    assert cov.num_failures == 2 and "another process" in str(cov.last_error)
    assert trainer.callback_metrics == {}


class _RankOneFails:
    """Module-level (spawned workers import it): the loss raises on rank 1 from step 2 on."""

    def __call__(self, model: Any, batch: Any) -> Tensor:
        if model.global_rank == 1 and model.global_step >= 2:
            raise RuntimeError("rank 1 cannot evaluate its shard")
        return model.loss(batch)


class _SameHistory(pl.Callback):
    """Fails in a worker if the processes logged different values (NaN included) or training stopped early."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        values = torch.tensor([v for _, v in self.monitor.history], dtype=torch.float64)
        gathered = pl_module.all_gather(values)
        assert torch.equal(gathered[0], gathered[1]) or torch.equal(gathered[0].isnan(), gathered[1].isnan())
        assert torch.equal(gathered[0].nan_to_num(), gathered[1].nan_to_num()), gathered

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        assert trainer.global_step == 4
        assert [math.isnan(v) for _, v in self.monitor.history] == [False, False, True, True]


@pytest.mark.integration
@pytest.mark.distributed
def test_ddp_a_failure_on_one_rank_skips_the_measurement_on_all(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hess = HessianEigenvalueMonitor(every_n_steps=1, k=1, num_examples=32, loss_fn=_RankOneFails())
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120))  # a divergence would hang
    logger = CSVLogger(tmp_path, name="ddp_fail")
    trainer = make_trainer(tmp_path, strategy=strategy, devices=2, max_steps=4, logger=logger,
                           callbacks=[hess, _SameHistory(hess), DestroyProcessGroup()])  # fmt: skip
    x, y = random_tensors(n=64)
    trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=8, shuffle=False))
    (path,) = (tmp_path / "ddp_fail").glob("version_*/metrics.csv")  # rank 0's log
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if r["curvature/sharpness"]]
    sharp = {int(r["step"]): float(r["curvature/sharpness"]) for r in rows}
    assert sorted(sharp) == [0, 1, 2, 3]
    assert math.isfinite(sharp[1]) and math.isnan(sharp[2]) and math.isnan(sharp[3])  # rank 0 itself succeeded
