"""Misconfiguration errors naming the value, sharded strategies refused at setup, NaN measurements survived,
and LightningCLI-style construction from a config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

from lightning_curvature import DirectionalCurvatureMonitor, GradientCovarianceMonitor, HessianEigenvalueMonitor
from lightning_curvature.callbacks._common import check_strategy

pytestmark = pytest.mark.usefixtures("torch_single_thread")

HESSIAN_BAD = [
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"every_n_steps": 2.5}, "2.5"),
    ({"every_n_steps": -3}, "-3"),
    ({"max_overhead": 0}, "max_overhead"),
    ({"max_overhead": -0.1}, "-0.1"),
    ({"max_overhead": 1.5}, "1.5"),
    ({"max_overhead": float("nan")}, "nan"),
    ({"max_overhead": "5%"}, "'5%'"),
    ({"max_overhead": True}, "True"),
    ({"k": 0}, "`k`"),
    ({"tol": -1.0}, "-1.0"),
    ({"max_iter": 0}, "max_iter"),
    ({"batch": "random"}, "'random'"),
    ({"batch": torch.zeros(3)}, "batch"),
    ({"num_examples": 0}, "num_examples"),
    ({"num_examples": None}, "None"),
    ({"mode": "test"}, "'test'"),
    ({"loss_fn": 3}, "3"),
    ({"trace_samples": 2}, "trace_samples"),
    ({"on_epoch_end": "yes"}, "'yes'"),
]
COVARIANCE_BAD = [
    ({"k": -1}, "-1"),
    ({"num_examples": 1}, "num_examples"),
    ({"mode": "fast"}, "'fast'"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"max_memory_bytes": 0}, "max_memory_bytes"),
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"max_overhead": 0.0}, "max_overhead"),
    ({"max_overhead": 2}, "2"),
]


@pytest.mark.parametrize(("kwargs", "match"), HESSIAN_BAD, ids=[str(k) for k, _ in HESSIAN_BAD])
def test_hessian_monitor_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match.replace(".", r"\.").replace("`", ".")):
        HessianEigenvalueMonitor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), COVARIANCE_BAD, ids=[str(k) for k, _ in COVARIANCE_BAD])
def test_covariance_monitor_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        GradientCovarianceMonitor(**kwargs)


def test_unsupported_strategies_are_refused_naming_the_supported_ones() -> None:
    class FSDPStrategy:  # a stand-in: only the class name matters to the check
        pass

    class DeepSpeedStrategy(DDPStrategy):
        pass

    for sharded_ok in (False, True):  # DeepSpeed: never
        with pytest.raises(MisconfigurationException, match=r"DeepSpeedStrategy.*ddp_spawn.*FSDP"):
            check_strategy(DeepSpeedStrategy(), "HessianEigenvalueMonitor", sharded_ok=sharded_ok)
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy"):  # per-example gradients need full params
        check_strategy(FSDPStrategy(), "GradientCovarianceMonitor", sharded_ok=False)
    check_strategy(FSDPStrategy(), "HessianEigenvalueMonitor", sharded_ok=True)
    check_strategy(SingleDeviceStrategy(device=torch.device("cpu")), "x")
    check_strategy(DDPStrategy(), "x")

    class FakeTrainer:
        strategy = DeepSpeedStrategy()

    with pytest.raises(MisconfigurationException, match="DeepSpeedStrategy"):
        HessianEigenvalueMonitor().setup(FakeTrainer(), TinyClassifier(), "fit")  # type: ignore[arg-type]

    class FSDPTrainer:
        strategy = FSDPStrategy()

    for monitor in (GradientCovarianceMonitor(), DirectionalCurvatureMonitor()):  # per-example / local products
        with pytest.raises(MisconfigurationException, match=f"{type(monitor).__name__}.*FSDPStrategy"):
            monitor.setup(FSDPTrainer(), TinyClassifier(), "fit")  # type: ignore[arg-type]
    # float64 products run on copies; sharded products run through FSDP's own passes in the parameters' dtype
    with pytest.raises(MisconfigurationException, match="product_dtype=torch.float64.*sharded"):
        HessianEigenvalueMonitor(product_dtype=torch.float64).setup(FSDPTrainer(), TinyClassifier(), "fit")  # type: ignore[arg-type]


def test_manual_optimization_without_curvature_loss_fails_at_setup(tmp_path: Path) -> None:
    class Manual(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()

    x, y = random_tensors(n=32)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[HessianEigenvalueMonitor()])
    with pytest.raises(MisconfigurationException, match="curvature_loss"):
        trainer.fit(Manual(), classification_loader(x, y))


class _Poisoned(TinyClassifier):
    """From step 3 on the training loss is NaN, so the update turns every parameter into NaN."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 3 else loss


def test_nan_is_logged_with_a_warning_and_training_continues(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Poisoned()
    x, y = random_tensors(n=64)
    hess = HessianEigenvalueMonitor(every_n_steps=2, k=2, num_examples=16)
    cov = GradientCovarianceMonitor(every_n_steps=2, k=2, num_examples=16)
    logger = CSVLogger(tmp_path, name="nan")
    trainer = make_trainer(tmp_path, max_steps=7, logger=logger, callbacks=[hess, cov])
    with pytest.warns(UserWarning, match="could not be made") as record:
        trainer.fit(model, classification_loader(x, y, batch_size=16))
    assert trainer.global_step == 7
    # one warning per monitor for the same kind of failure (steps 4 and 6), both counted
    for monitor in (hess, cov):
        name = type(monitor).__name__
        assert sum(f"{name}: the measurement" in str(w.message) for w in record) == 1, name
        assert monitor.num_failures == 2 and monitor.num_measurements == 4
    for monitor in (hess, cov):
        steps = [s for s, _ in monitor.history]
        values = [v for _, v in monitor.history]
        assert steps == [0, 2, 4, 6]
        assert all(math.isfinite(v) for v in values[:2]) and all(math.isnan(v) for v in values[2:])
    assert math.isnan(hess.last_sharpness) and hess.last_threshold == pytest.approx(20.0)
    assert math.isnan(hess.last_metrics["curvature/eig_2"]) and math.isnan(hess.last_metrics["curvature/edge_ratio"])
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "nan" in text.lower()
    # the warm start was dropped: the next finite measurement starts fresh (no stale vectors kept)
    assert hess._warm_start == {}


def test_lightning_cli_config_instantiates_the_callbacks(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "lightning_curvature.HessianEigenvalueMonitor",
                    "init_args": {"every_n_steps": 10, "k": 3, "batch": "current", "compute_trace": True},
                },
                {
                    "class_path": "lightning_curvature.GradientCovarianceMonitor",
                    "init_args": {"k": 4, "mode": "eval", "num_examples": 32, "max_overhead": 0.1},
                },
            ],
        },
        "model": {"lr": 0.05},
    }
    cli = LightningCLI(TinyClassifier, run=False, args=config, save_config_callback=None)
    hess = next(c for c in cli.trainer.callbacks if isinstance(c, HessianEigenvalueMonitor))
    cov = next(c for c in cli.trainer.callbacks if isinstance(c, GradientCovarianceMonitor))
    assert (hess.every_n_steps, hess.k, hess._source.kind, hess.compute_trace) == (10, 3, "current", True)
    assert (cov.k, cov.mode, cov._source.num_examples) == (4, "eval", 32)
    assert (cov.every_n_steps, cov.max_overhead, hess.max_overhead) == (None, 0.1, 0.05)
