"""``resolve_loss_fn``: explicit, ``curvature_loss``, or a ``training_step`` re-run that leaves logging alone."""

from __future__ import annotations

import csv
from typing import Any

import pytest
import torch
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_curvature import HessianEigenvalueMonitor
from lightning_curvature.callbacks._loss import resolve_loss_fn

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class _WithMetric(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes=3)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log_dict({"train_acc": self.acc}, on_step=True, on_epoch=True)
        return {"loss": loss, "logits": logits.detach()}


class _WithCurvatureLoss(TinyClassifier):
    calls = 0

    def curvature_loss(self, batch: Any) -> Tensor:
        type(self).calls += 1
        return self.loss(batch)


def test_explicit_loss_fn_is_returned_unchanged() -> None:
    def fn(m: Any, b: Any) -> Tensor:
        return m.loss(b)

    assert resolve_loss_fn(TinyClassifier(), fn) is fn
    with pytest.raises(MisconfigurationException, match="3"):
        resolve_loss_fn(TinyClassifier(), 3)  # type: ignore[arg-type]


def test_curvature_loss_method_is_preferred() -> None:
    model = _WithCurvatureLoss()
    x, y = random_tensors(8)
    fn = resolve_loss_fn(model)
    torch.testing.assert_close(fn(model, (x, y)), model.loss((x, y)))
    assert _WithCurvatureLoss.calls == 1


def test_training_step_rerun_takes_dict_loss_and_restores_metric_state() -> None:
    model = _WithMetric()
    x, y = random_tensors(8)
    model.acc.update(model(x), y)
    before = {k: v.clone() for k, v in model.acc.metric_state.items()}
    count = model.acc._update_count
    loss = resolve_loss_fn(model)(model, (x, y))
    torch.testing.assert_close(loss, model.loss((x, y)))
    assert model.acc._update_count == count
    for k, v in model.acc.metric_state.items():
        assert torch.equal(v, before[k]), k
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__  # patches removed


def test_manual_optimization_needs_curvature_loss() -> None:
    model = TinyClassifier()
    model.automatic_optimization = False
    with pytest.raises(MisconfigurationException, match="manual optimization"):
        resolve_loss_fn(model)


def test_rerun_does_not_change_logged_metrics(tmp_path: Any) -> None:
    """The monitor re-runs ``training_step`` (which logs and updates a metric): the logs are those of a plain run.

    At epoch end an unsuppressed ``self.log(on_step=True)`` would raise; at batch start it would add results.
    """

    def run(with_monitor: bool, sub: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
        torch.manual_seed(0)
        model = _WithMetric()
        x, y = random_tensors()
        cbs = (
            [HessianEigenvalueMonitor(every_n_steps=1, k=1, num_examples=40, on_epoch_end=True)] if with_monitor else []
        )
        logger = CSVLogger(tmp_path, name=sub)
        trainer = make_trainer(tmp_path, max_steps=5, logger=logger, log_every_n_steps=1, callbacks=cbs)
        trainer.fit(model, classification_loader(x, y, shuffle=False))
        with open(f"{logger.log_dir}/metrics.csv") as fh:
            rows = [
                {k: v for k, v in r.items() if not k.startswith("curvature/") and v != ""} for r in csv.DictReader(fh)
            ]
        return dict(trainer.logged_metrics), [r for r in rows if len(r) > 1]

    logged_a, rows_a = run(False, "plain")
    logged_b, rows_b = run(True, "monitored")
    assert rows_a == rows_b
    assert logged_a.keys() == {k for k in logged_b if not k.startswith("curvature/")}
    for key, value in logged_a.items():
        assert torch.equal(value, logged_b[key]), key
