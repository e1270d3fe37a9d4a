"""Lightning conventions users rely on: every measured value in ``trainer.callback_metrics`` (so ``EarlyStopping`` and
``ModelCheckpoint`` can monitor it), and bad arguments refused at construction, naming the value (issue 10)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor

from lightning_curvature import (
    CurvatureDynamicsAwareLR,
    DirectionalCurvatureMonitor,
    GradientCovarianceMonitor,
    HessianEigenvalueMonitor,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _loss(model: Any, batch: Any) -> Tensor:
    return model.loss(batch)


# --- callback_metrics ------------------------------------------------------------------------------------------------
def test_early_stopping_on_the_edge_ratio(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hess = HessianEigenvalueMonitor(every_n_steps=1, k=1, num_examples=32, loss_fn=_loss)
    early = EarlyStopping(monitor="curvature/edge_ratio", mode="min", stopping_threshold=10.0,
                          check_on_train_epoch_end=True)  # fmt: skip
    x, y = random_tensors(n=64)
    trainer = make_trainer(tmp_path, max_epochs=5, callbacks=[hess, early])
    trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=16))
    # the edge ratio (about 0.05 here) is below 10 at the first check: stopped after epoch 0, i.e. 4 steps
    assert trainer.should_stop and early.stopped_epoch == 0 and trainer.global_step == 4
    published = trainer.callback_metrics["curvature/edge_ratio"]
    assert float(published) == pytest.approx(hess.last_metrics["curvature/edge_ratio"], rel=1e-6)
    for tag, value in hess.last_metrics.items():  # every measured value is there, not only the edge ratio
        assert float(trainer.callback_metrics[tag]) == pytest.approx(value, rel=1e-6), tag


def test_model_checkpoint_on_a_covariance_value(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cov = GradientCovarianceMonitor(every_n_steps=1, k=2, num_examples=32, loss_fn=_loss)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="grad_cov/eig_1", mode="min", every_n_train_steps=1,
                           save_top_k=1)  # fmt: skip
    x, y = random_tensors(n=64)
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[cov, ckpt], enable_checkpointing=True)
    trainer.fit(TinyClassifier(lr=0.5), classification_loader(x, y, batch_size=16))
    values = [v for _, v in cov.history]
    best = int(np.argmin(values))
    assert float(ckpt.best_model_score) == pytest.approx(min(values), rel=1e-6)
    # the value measured at step s (before update s) is checkpointed at the end of that batch: step s + 1
    assert Path(ckpt.best_model_path).exists() and Path(ckpt.best_model_path).name.endswith(f"step={best + 1}.ckpt")


class _CDAT(TinyClassifier):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": CurvatureDynamicsAwareLR(opt), "interval": "step"}}


def test_directional_values_are_published_every_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    seen: list[float] = []

    class Spy(DirectionalCurvatureMonitor):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            seen.append(float(trainer.callback_metrics["cdat/lr"]))

    monitor = Spy(loss_fn=_loss, log=False)
    x, y = random_tensors(n=64)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[monitor])
    trainer.fit(_CDAT(), classification_loader(x, y, batch_size=16))
    assert len(seen) == 4 and seen[-1] == pytest.approx(trainer.optimizers[0].param_groups[0]["lr"], rel=1e-6)
    assert {"cdat/numerator", "cdat/denominator", "cdat/edge_lr"} <= set(trainer.callback_metrics)


def test_a_failed_measurement_keeps_the_published_value(tmp_path: Path) -> None:
    """NaN is logged but not published: ``EarlyStopping(check_finite=True)`` would stop the run on it."""
    torch.manual_seed(0)

    def flaky(model: Any, batch: Any) -> Tensor:
        return model.loss(batch) * (float("nan") if model.global_step == 3 else 1.0)

    hess = HessianEigenvalueMonitor(every_n_steps=1, k=1, num_examples=32, loss_fn=flaky)
    early = EarlyStopping(monitor="curvature/sharpness", mode="max", patience=100, check_on_train_epoch_end=True)
    x, y = random_tensors(n=64)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[hess, early])
    with pytest.warns(UserWarning, match="could not be made"):
        trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=16))
    assert trainer.global_step == 4 and not early.stopped_epoch
    history = dict(hess.history)
    assert math.isnan(history[3])
    assert float(trainer.callback_metrics["curvature/sharpness"]) == pytest.approx(history[2], rel=1e-6)


# --- bad arguments ---------------------------------------------------------------------------------------------------
COVARIANCE_BAD = [
    ({"on_epoch_end": "yes"}, "'yes'"),
    ({"on_epoch_end": 1}, "on_epoch_end"),
    ({"k": 2.0}, "2.0"),
    ({"k": "10"}, "'10'"),
    ({"every_n_steps": "50"}, "'50'"),
    ({"every_n_steps": 5.0}, "5.0"),
    ({"num_examples": 64.0}, "64.0"),
    ({"chunk_size": True}, "True"),
    ({"batch_dim": "1"}, "batch_dim"),
    ({"batch_dim": (1, 0.5)}, "batch_dim"),
]
DIRECTIONAL_BAD = [
    ({"log": "no"}, "'no'"),
    ({"log": 0}, "`log`"),
    ({"seed": 1.5}, "1.5"),
    ({"seed": "0"}, "'0'"),
    ({"mode": 1}, "`mode`"),
    ({"batch_dim": [1, "x"]}, "batch_dim"),
]
HESSIAN_BASE_BAD = [  # checked by the shared base class
    ({"prog_bar": "no"}, "'no'"),
    ({"on_epoch_end": 0}, "on_epoch_end"),
    ({"every_n_steps": 10.0}, "10.0"),
]


@pytest.mark.parametrize(("kwargs", "match"), COVARIANCE_BAD, ids=[str(k) for k, _ in COVARIANCE_BAD])
def test_covariance_monitor_refuses_strings_and_floats(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        GradientCovarianceMonitor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), DIRECTIONAL_BAD, ids=[str(k) for k, _ in DIRECTIONAL_BAD])
def test_directional_monitor_refuses_strings_and_floats(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        DirectionalCurvatureMonitor(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), HESSIAN_BASE_BAD, ids=[str(k) for k, _ in HESSIAN_BASE_BAD])
def test_hessian_monitor_base_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        HessianEigenvalueMonitor(**kwargs)


HESSIAN_OWN_BOOLS = ["compute_trace", "compute_density", "compute_overlap", "warm_start", "log_histogram",
                     "reuse_graph"]  # fmt: skip


@pytest.mark.parametrize("name", HESSIAN_OWN_BOOLS)
def test_hessian_monitor_refuses_string_flags(name: str) -> None:
    with pytest.raises(MisconfigurationException, match=f"`{name}` must be True or False, got 'no'"):
        HessianEigenvalueMonitor(**{name: "no"})


def test_numpy_integers_are_integers() -> None:
    cov = GradientCovarianceMonitor(every_n_steps=np.int64(5), k=np.int32(3), num_examples=np.int64(16))
    assert (cov.every_n_steps, cov.k) == (5, 3) and type(cov.every_n_steps) is int
    assert DirectionalCurvatureMonitor(seed=np.int64(7)).seed == 7
