"""Re-running ``training_step`` must not change the training it observes: every RNG stream a step may draw from is
forked (torch by the engine; NumPy and Python's ``random`` around every loss evaluation), buffers are restored, and
a warning says once what cannot be undone (issue 10, "the observer changes the experiment")."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors
from torch import Tensor, nn

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor
from lightning_curvature.callbacks._loss import HostRNGForkedLoss, forked_host_rng

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class _Mixup(TinyClassifier):
    """Mixup with NumPy's global stream, jitter from Python's ``random``, a permutation from torch's; an EMA of the
    logits' scale in a buffer."""

    def __init__(self) -> None:
        super().__init__(lr=0.2)
        self.register_buffer("ema_scale", torch.zeros(()))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        lam = float(np.random.beta(0.4, 0.4))  # noqa: NPY002 (the legacy global stream is what users draw from)
        jitter = random.gauss(0.0, 0.1)
        perm = torch.randperm(len(x))
        logits = self(lam * x + (1 - lam) * x[perm] + jitter)
        loss = lam * nn.functional.cross_entropy(logits, y) + (1 - lam) * nn.functional.cross_entropy(logits, y[perm])
        with torch.no_grad():
            self.ema_scale.mul_(0.9).add_(0.1 * logits.abs().mean())
        self.log("train_loss", loss)
        return loss


def _train(tmp_path: Path, callbacks: list[Any]) -> tuple[_Mixup, Any, Any, Tensor]:
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    random.seed(0)
    model = _Mixup()
    x, y = random_tensors(n=64)
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=callbacks)
    trainer.fit(model, classification_loader(x, y, batch_size=16, seed=0))
    return model, np.random.get_state(), random.getstate(), torch.random.get_rng_state()  # noqa: NPY002


def test_mixup_and_jitter_draws_do_not_change_the_training(tmp_path: Path) -> None:
    plain, np_plain, py_plain, torch_plain = _train(tmp_path / "plain", [])
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=1, k=2, num_examples=32, reuse_graph=False),
        GradientCovarianceMonitor(every_n_steps=2, k=2, batch="current"),
    ]
    with pytest.warns(UserWarning, match="re-run `_Mixup.training_step`") as record:
        observed, np_obs, py_obs, torch_obs = _train(tmp_path / "observed", monitors)
    assert sum("re-run" in str(w.message) for w in record) == 1  # once per module, not per monitor
    for (name, p), q in zip(plain.named_parameters(), observed.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(plain.ema_scale, observed.ema_scale)  # an EMA in a buffer is restored after every re-run
    assert np.array_equal(np_plain[1], np_obs[1]) and np_plain[2] == np_obs[2]
    assert py_plain == py_obs and torch.equal(torch_plain, torch_obs)
    assert all(np.isfinite(v) for _, v in monitors[0].history)


def test_one_measurement_sees_one_draw(tmp_path: Path) -> None:
    """Every loss evaluation of a measurement starts from the same seeded streams, so the operator is one matrix:
    re-evaluating the loss for every product (``reuse_graph=False``) gives the value of one graph reused."""
    values = []
    for reuse in (True, False):
        torch.manual_seed(0)
        model = _Mixup()
        monitor = HessianEigenvalueMonitor(every_n_steps=10, k=2, tol=1e-7, num_examples=32, reuse_graph=reuse)
        x, y = random_tensors(n=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = make_trainer(tmp_path / str(reuse), max_steps=1, callbacks=[monitor])
            trainer.fit(model, classification_loader(x, y))
        values.append([monitor.last_metrics["curvature/eig_1"], monitor.last_metrics["curvature/eig_2"]])
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_host_rng_forked_loss_repeats_its_draws_and_leaves_the_streams() -> None:
    def loss(model: Any, batch: Any) -> Tensor:
        return torch.tensor(np.random.rand() + random.random())  # noqa: NPY002

    wrapped = HostRNGForkedLoss(loss, seed=3)
    np_before, py_before = np.random.get_state(), random.getstate()  # noqa: NPY002
    first, second = wrapped(None, None), wrapped(None, None)  # type: ignore[arg-type]
    assert torch.equal(first, second)
    assert float(first) == pytest.approx(np.random.RandomState(3).rand() + random.Random(3).random())
    assert np.array_equal(np.random.get_state()[1], np_before[1]) and random.getstate() == py_before  # noqa: NPY002
    with forked_host_rng():
        random.random()
    assert random.getstate() == py_before


def test_the_fallback_warning_names_what_cannot_be_undone() -> None:
    from lightning_curvature.callbacks._loss import resolve_loss_fn

    with pytest.warns(UserWarning, match=r"EMA or a counter.*curvature_loss\(self, batch\).*loss_fn=") as record:
        resolve_loss_fn(TinyClassifier())
    assert len(record) == 1

    class WithCurvatureLoss(TinyClassifier):
        def curvature_loss(self, batch: Any) -> Tensor:
            return self.loss(batch)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the module says what its loss is
        resolve_loss_fn(WithCurvatureLoss())
