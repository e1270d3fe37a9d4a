"""The monitors leave training exactly as it was: bit-identical runs, flags and buffers untouched per hook."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors
from torch import Tensor

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class _LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def _fit(monitors: list[pl.Callback], **loader_kwargs: Any) -> dict[str, Any]:
    pl.seed_everything(123, verbose=False)
    model = TinyClassifier(batch_norm=True, dropout=0.3, momentum=0.9)
    x, y = random_tensors(n=64)
    recorder = _LossRecorder()
    trainer = make_trainer("unused", max_steps=7, callbacks=[*monitors, recorder], log_every_n_steps=1)
    trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=True, **loader_kwargs))
    opt = trainer.optimizers[0]
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "opt": [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        "losses": recorder.losses,
        "logged": {k: v.clone() for k, v in trainer.logged_metrics.items()},
        "rng": torch.random.get_rng_state(),
    }


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    for group in ("params", "buffers"):
        assert a[group].keys() == b[group].keys()
        for name in a[group]:
            assert torch.equal(a[group][name], b[group][name]), f"{group}: {name}"
    assert "net.1.num_batches_tracked" in a["buffers"]
    for sa, sb in zip(a["opt"], b["opt"], strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert len(a["losses"]) == len(b["losses"]) == 7
    for la, lb in zip(a["losses"], b["losses"]):
        assert torch.equal(la, lb)
    for key, value in a["logged"].items():
        assert torch.equal(value, b["logged"][key]), key
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("batch", ["fixed", "current"], ids=lambda b: f"batch={b}")
def test_bit_identical_with_batchnorm_and_dropout(batch: str) -> None:
    plain = _fit([])
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=2, k=2, batch=batch, num_examples=24, compute_overlap=True),
        GradientCovarianceMonitor(every_n_steps=2, k=2, batch=batch, num_examples=24),
    ]
    watched = _fit(monitors)
    _assert_identical(plain, watched)
    assert [s for s, _ in monitors[0].history] == [0, 2, 4, 6]
    assert [s for s, _ in monitors[1].history] == [0, 2, 4, 6]


def test_bit_identical_with_the_adaptive_default_cadence() -> None:
    """Default cadence: which steps are measured depends on timing, the training never does."""
    plain = _fit([])
    monitors = [
        HessianEigenvalueMonitor(k=2, num_examples=24, compute_overlap=True),
        GradientCovarianceMonitor(k=2, num_examples=24),
    ]
    for monitor in monitors:
        monitor.min_gap = 2  # several measurements within the 7 steps
    watched = _fit(monitors)
    _assert_identical(plain, watched)
    for monitor in monitors:
        assert monitor.every_n_steps is None and monitor.history[0][0] == 0 and monitor.step_time_s is not None


def test_bit_identical_with_loader_generator_and_workers() -> None:
    """A loader with its own generator and worker processes: the fixed batch is drawn without touching either."""
    kwargs = dict(seed=7, num_workers=1, persistent_workers=True)
    plain = _fit([], **kwargs)
    watched = _fit([HessianEigenvalueMonitor(every_n_steps=3, k=1, num_examples=20)], **kwargs)
    _assert_identical(plain, watched)


def _snapshot(module: torch.nn.Module) -> tuple[dict[str, bool], dict[str, Tensor], dict[str, Tensor | None]]:
    flags = {name: m.training for name, m in module.named_modules()}
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}
    return flags, buffers, grads


class _Before(pl.Callback):
    def __init__(self) -> None:
        self.snap: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        self.snap = _snapshot(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.snap = _snapshot(pl_module)


class _After(pl.Callback):
    def __init__(self, before: _Before) -> None:
        self.before, self.checked, self.grads_seen = before, 0, 0

    def _check(self, pl_module: Any) -> None:
        flags, buffers, grads = _snapshot(pl_module)
        assert flags == self.before.snap[0]
        for name, b in buffers.items():
            assert torch.equal(b, self.before.snap[1][name]), name
        for name, g in grads.items():  # the .grad training left (the previous step's) is the one it finds again
            g0 = self.before.snap[2][name]
            assert (g is None and g0 is None) or (g is not None and g0 is not None and torch.equal(g, g0)), name
        self.grads_seen += sum(g is not None for g in grads.values())
        self.checked += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        self._check(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._check(pl_module)


@pytest.mark.parametrize("mode", ["train", "eval"], ids=lambda m: f"mode={m}")
def test_flags_and_buffers_unchanged_after_each_hook(mode: str) -> None:
    torch.manual_seed(0)
    model = TinyClassifier(batch_norm=True, dropout=0.3)
    model.net[3].eval()  # a submodule with its own flag: must come back as it was, not as the parent's
    x, y = random_tensors(n=48)
    before = _Before()
    after = _After(before)
    monitors = [
        HessianEigenvalueMonitor(every_n_steps=1, k=2, num_examples=16, mode=mode, on_epoch_end=True),
        GradientCovarianceMonitor(every_n_steps=1, k=2, num_examples=16, on_epoch_end=True),
    ]
    trainer = make_trainer("unused", max_steps=4, callbacks=[before, *monitors, after])
    trainer.fit(model, classification_loader(x, y, batch_size=16))
    assert after.checked == 4 + 2  # every batch start and both epoch ends (the second epoch is cut by max_steps)
    assert after.grads_seen > 0  # the .grad comparison above compared tensors, not only Nones
    assert not model.net[3].training and model.net[1].training
    assert all(p.grad is not None for p in model.parameters())  # training's own gradients, untouched
