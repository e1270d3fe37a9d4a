"""Checkpoint state: a resumed run continues the same series; state_dict round trip; state keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _monitors(on_epoch_end: bool) -> tuple[HessianEigenvalueMonitor, GradientCovarianceMonitor]:
    return (
        HessianEigenvalueMonitor(every_n_steps=2, k=2, tol=1e-6, num_examples=32, on_epoch_end=on_epoch_end),
        GradientCovarianceMonitor(every_n_steps=2, k=2, num_examples=16, on_epoch_end=on_epoch_end),
    )


def _fit(
    max_epochs: int, tmp_path: Path, on_epoch_end: bool, ckpt_path: Path | None = None, save_to: Path | None = None
) -> tuple:
    torch.manual_seed(0)
    model = TinyClassifier(batch_norm=True, momentum=0.9)
    x, y = random_tensors(n=64)  # 4 batches per epoch
    hess, cov = _monitors(on_epoch_end)
    # stop at epoch ends (Lightning replays a batch when resuming from a max_steps stop at an epoch's last batch)
    trainer = make_trainer(tmp_path, max_epochs=max_epochs, callbacks=[hess, cov])
    # no shuffling and no dropout: the resumed trajectory is exactly the uninterrupted one
    trainer.fit(model, classification_loader(x, y, batch_size=16, shuffle=False), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return hess, cov


@pytest.mark.parametrize("on_epoch_end", [False, True], ids=lambda b: f"on_epoch_end={b}")
def test_resume_continues_the_same_series(tmp_path: Path, on_epoch_end: bool) -> None:
    full_h, full_c = _fit(2, tmp_path, on_epoch_end)
    ckpt = tmp_path / "half.ckpt"
    first_h, _ = _fit(1, tmp_path, on_epoch_end, save_to=ckpt)
    # the epoch-end measurement at step 4 is not repeated by the resumed run's first batch (same step)
    expected = [0, 2, 4, 6, 8] if on_epoch_end else [0, 2, 4, 6]
    assert [s for s, _ in first_h.history] == expected[: 3 if on_epoch_end else 2]
    resumed_h, resumed_c = _fit(2, tmp_path, on_epoch_end, ckpt_path=ckpt)
    for full, resumed in ((full_h, resumed_h), (full_c, resumed_c)):
        assert [s for s, _ in resumed.history] == [s for s, _ in full.history] == expected
        assert [v for _, v in resumed.history] == pytest.approx([v for _, v in full.history], rel=1e-4)
        assert resumed.num_measurements == full.num_measurements == len(expected)
    # the warm start is small enough to be checkpointed: the resumed run measures exactly what the full run did
    # (0.1 restarted cold after a resume: 4e-4 relative off, which a SharpnessAwareLR passed on to the lr)
    assert [v for _, v in resumed_h.history] == [v for _, v in full_h.history]
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {full_h.state_key, full_c.state_key} <= set(state)


def test_state_dict_round_trip_and_defaults() -> None:
    a = HessianEigenvalueMonitor(every_n_steps=5, k=3)
    a.num_measurements, a.last_step, a.history = 2, 5, [(0, 1.5), (5, 2.5)]
    a.last_metrics = {"curvature/sharpness": 2.5, "curvature/stability_threshold": 20.0}
    state = a.state_dict()
    assert all(v is None or isinstance(v, (int, float, list, dict)) for v in state.values())  # plain values
    b = HessianEigenvalueMonitor(every_n_steps=5, k=3)
    b.load_state_dict(state)
    assert b.state_dict() == state
    assert b.last_sharpness == 2.5 and b.last_threshold == 20.0
    c = HessianEigenvalueMonitor(every_n_steps=5, k=3)
    c.load_state_dict({"num_measurements": 1})  # keys of older versions may be missing
    assert c.num_measurements == 1 and c.history == [] and c.last_step == -1 and c.last_sharpness is None


def test_state_keys_distinguish_instances() -> None:
    keys = {
        HessianEigenvalueMonitor(k=5, every_n_steps=50).state_key,
        HessianEigenvalueMonitor(k=1).state_key,
        HessianEigenvalueMonitor(k=5).state_key,
        HessianEigenvalueMonitor(k=5, batch="current").state_key,
        GradientCovarianceMonitor(k=5).state_key,
    }
    assert len(keys) == 5
    assert HessianEigenvalueMonitor(k=5).state_key == HessianEigenvalueMonitor(k=5, tol=1e-2).state_key
    # the budget is not part of the identity: a resumed run may change it and keep its series
    assert HessianEigenvalueMonitor(k=5).state_key == HessianEigenvalueMonitor(k=5, max_overhead=0.2).state_key


def test_a_new_fit_starts_a_new_step_axis(tmp_path: Path) -> None:
    """The same instance in a second, fresh Trainer measures at step 0 again (no stale de-duplication)."""
    hess = HessianEigenvalueMonitor(every_n_steps=2, k=1, num_examples=16)
    x, y = random_tensors(n=32)
    for _ in range(2):
        trainer = make_trainer(tmp_path, max_steps=1, callbacks=[hess])
        trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=16))
    assert [s for s, _ in hess.history] == [0, 0]
