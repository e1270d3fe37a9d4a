"""The adaptive cadence: the planned gap follows ``ceil(t_measure / (max_overhead · t_step))`` clamped to
``[min_gap, max_gap]`` (checked with a fake clock), the plan survives a checkpoint, and a fixed ``every_n_steps``
ignores the budget.

Times are powers of two, so every sum the monitors form is exact: the expected steps are closed-form.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import FakeClock, TinyClassifier, classification_loader, make_trainer, random_tensors

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor
from lightning_curvature.callbacks._common import EMA_CLIP, CurvatureMonitorBase, adaptive_gap

pytestmark = pytest.mark.usefixtures("torch_single_thread")

STEP_S = 2.0**-6  # simulated wall time of one training step


def _reference_gap(t_measure: float, t_step: float, budget: float, lo: int, hi: int) -> int:
    """The formula, independently: smallest integer gap with gap · budget · t_step >= t_measure, clamped."""
    gap = 1
    while gap * budget * t_step < t_measure and gap <= hi:
        gap += 1
    return min(max(gap, lo), hi)


GAP_CASES = [
    # (t_measure, t_step, max_overhead, min_gap, max_gap)
    (0.036, 0.0018, 0.05, 10, 10_000),  # digits MLP, Hessian (measured orders of magnitude)
    (0.015, 0.0018, 0.05, 10, 10_000),  # digits MLP, covariance
    (14.0, 0.044, 0.05, 10, 10_000),  # ~1M-parameter CNN, Hessian
    (0.25, 2.0**-6, 0.5, 10, 10_000),  # exact ratio 32: not rounded up to 33
    (0.001, 0.01, 0.05, 10, 10_000),  # cheap measurement: min_gap binds
    (600.0, 0.01, 0.05, 10, 10_000),  # expensive measurement: max_gap binds
    (0.3, 0.01, 1.0, 1, 100),  # the whole budget
]


@pytest.mark.parametrize(
    ("t_measure", "t_step", "budget", "lo", "hi"), GAP_CASES, ids=[f"t_measure={c[0]},t_step={c[1]}" for c in GAP_CASES]
)
def test_adaptive_gap_formula(t_measure: float, t_step: float, budget: float, lo: int, hi: int) -> None:
    gap = adaptive_gap(t_measure, t_step, budget, lo, hi)
    assert gap == _reference_gap(t_measure, t_step, budget, lo, hi)
    if lo < gap < hi:  # the budget is met, and one step fewer would exceed it
        assert t_measure / (gap * t_step) <= budget * (1 + 1e-9)
        assert t_measure / ((gap - 1) * t_step) > budget


def test_adaptive_gap_without_a_step_time_is_conservative() -> None:
    assert adaptive_gap(1.0, 0.0, 0.05, 10, 10_000) == 10
    assert adaptive_gap(1.0, math.nan, 0.05, 10, 10_000) == 10


class _Tick(pl.Callback):
    """Runs before the monitors: each training step takes ``step_s`` on the fake clock.

    ``schedule`` changes ``step_s`` from a step on; ``spikes`` adds a one-off delay before a step's batch start
    (it lands in the interval of the step before).
    """

    def __init__(
        self,
        clock: FakeClock,
        step_s: float = STEP_S,
        schedule: dict[int, float] | None = None,
        spikes: dict[int, float] | None = None,
    ) -> None:
        self.clock, self.step_s, self.schedule, self.spikes = clock, step_s, schedule or {}, spikes or {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        self.step_s = self.schedule.get(trainer.global_step, self.step_s)
        self.clock.advance(self.step_s + self.spikes.get(trainer.global_step, 0.0))


class _Simulated:
    """A monitor mixin: every measurement costs ``cost`` on the fake clock; records every plan it makes."""

    clock: FakeClock
    cost: float
    plans: list[tuple[int, int, bool, float | None, float]]

    def _measure(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._measure(*args, **kwargs)  # type: ignore[misc]
        self.clock.advance(self.cost)
        return out

    def _agree(self, trainer: Any, next_step: int, provisional: bool) -> None:
        super()._agree(trainer, next_step, provisional)  # type: ignore[misc]
        m: Any = self
        self.plans.append((m.last_step, m.next_step, m._provisional, m.step_time_s, m._last_measure_s))


class SimHessian(_Simulated, HessianEigenvalueMonitor):
    pass


class SimCovariance(_Simulated, GradientCovarianceMonitor):
    pass


def _simulated(cls: type, clock: FakeClock, cost: float, **kwargs: Any) -> Any:
    monitor = cls(k=1, num_examples=16, **kwargs)
    monitor.clock, monitor.cost, monitor.plans = clock, cost, []
    return monitor


def _fit(callbacks: list[pl.Callback], tmp_path: Path, **trainer_kwargs: Any) -> pl.Trainer:
    torch.manual_seed(0)
    x, y = random_tensors(n=64)  # 4 steps per epoch
    trainer = make_trainer(tmp_path, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=16, shuffle=False))
    return trainer


def test_plan_follows_the_formula_with_a_fake_clock(tmp_path: Path, fake_clock: FakeClock) -> None:
    """Step 0, a provisional plan ``min_gap`` later (no step timed yet), then ``gap = t_measure/(budget·t_step)``.

    The Hessian measurement costs 0.25 s and the covariance one 0.125 s on the fake clock, a step 1/64 s, budget 0.5:
    gaps 32 and 16. Each monitor's step time excludes the other's measurements.
    """
    hess = _simulated(SimHessian, fake_clock, 2.0**-2, max_overhead=0.5)
    cov = _simulated(SimCovariance, fake_clock, 2.0**-3, max_overhead=0.5)
    _fit([_Tick(fake_clock), hess, cov], tmp_path, max_steps=65)
    assert [s for s, _ in hess.history] == [0, 32, 64]
    assert [s for s, _ in cov.history] == [0, 16, 32, 48, 64]
    # after step 0: provisional, `min_gap` (10) steps later; there the plan from the step time known by then
    assert hess.plans[0] == (0, 10, True, None, 0.25)
    assert hess.plans[1] == (0, 32, False, pytest.approx(STEP_S, rel=1e-12), 0.25)
    assert cov.plans[1][:3] == (0, 16, False)
    for monitor in (hess, cov):
        assert monitor.step_time_s == pytest.approx(STEP_S, rel=1e-12)
        assert monitor.train_time_s == pytest.approx(64 * STEP_S, rel=1e-12)  # 65 batch starts, 64 intervals
        for last, nxt, provisional, t_step, t_measure in monitor.plans[1:]:
            assert not provisional
            assert nxt - last == _reference_gap(t_measure, t_step, 0.5, 10, 10_000)
    # realised overhead: the unpaid step-0 measurement makes it approach the budget (0.5) from above: n/(n-1)·0.5
    assert hess.last_metrics["curvature/overhead"] == pytest.approx(3 * 0.25 / (64 * STEP_S), rel=1e-12)
    assert cov.last_metrics["grad_cov/overhead"] == pytest.approx(5 * 0.125 / (64 * STEP_S), rel=1e-12)
    assert hess.overhead == pytest.approx(0.75 / (64 * STEP_S), rel=1e-12)


def test_plan_follows_a_changing_step_time(tmp_path: Path, fake_clock: FakeClock) -> None:
    """Steps four times slower from step 20 on: the moving average rises and the gaps shrink, by the formula."""
    hess = _simulated(SimHessian, fake_clock, 2.0**-2, max_overhead=0.5)
    hess.min_gap = 4
    _fit([_Tick(fake_clock, schedule={20: 4 * STEP_S}), hess], tmp_path, max_steps=80)
    gaps = [b - a for (a, _), (b, _) in zip(hess.history, hess.history[1:])]
    assert gaps[0] == 32 and min(gaps[1:]) < 32
    for last, nxt, provisional, t_step, t_measure in hess.plans[1:]:
        assert not provisional and t_step is not None
        assert nxt - last == _reference_gap(t_measure, t_step, 0.5, 4, 10_000)
    assert STEP_S < hess.step_time_s <= 4 * STEP_S


def test_step_time_average_skips_the_first_step_and_clips_stalls(tmp_path: Path, fake_clock: FakeClock) -> None:
    """A slow first step (one-off costs) is not averaged; a stall counts as at most ``EMA_CLIP`` average steps.

    Both are still training time for the realised overhead.
    """
    hess = _simulated(SimHessian, fake_clock, 2.0**-2, max_overhead=0.5)
    _fit([_Tick(fake_clock, spikes={1: 100 * STEP_S, 40: 1000 * STEP_S}), hess], tmp_path, max_steps=12)
    assert hess.plans[1] == (0, 32, False, pytest.approx(STEP_S, rel=1e-12), 0.25)  # as without the slow step
    hess2 = _simulated(SimHessian, fake_clock, 2.0**-2, max_overhead=0.5)
    _fit([_Tick(fake_clock, spikes={40: 1000 * STEP_S}), hess2], tmp_path, max_steps=42)
    # intervals ending at steps 2..41 are averaged (a running mean up to 1/EMA_WEIGHT = 50 of them); the 39th is the
    # stall, entered as EMA_CLIP steps
    clipped = STEP_S + (EMA_CLIP - 1) * STEP_S / 39
    assert hess2.step_time_s == pytest.approx(clipped + (STEP_S - clipped) / 40, rel=1e-9)
    assert hess2.train_time_s == pytest.approx(1041 * STEP_S, rel=1e-12)


def test_step_time_is_per_optimizer_step_under_gradient_accumulation(tmp_path: Path, fake_clock: FakeClock) -> None:
    hess = _simulated(SimHessian, fake_clock, 2.0**-2, max_overhead=0.5)
    _fit([_Tick(fake_clock), hess], tmp_path, max_steps=12, accumulate_grad_batches=2)
    assert hess.step_time_s == pytest.approx(2 * STEP_S, rel=1e-12)  # two batches per optimizer step
    assert hess.plans[1] == (0, 16, False, pytest.approx(2 * STEP_S, rel=1e-12), 0.25)


def test_fixed_every_n_steps_ignores_the_budget(tmp_path: Path, fake_clock: FakeClock) -> None:
    hess = _simulated(SimHessian, fake_clock, 1.0, every_n_steps=3, max_overhead=0.01)
    _fit([_Tick(fake_clock), hess], tmp_path, max_steps=7)
    assert [s for s, _ in hess.history] == [0, 3, 6]
    assert hess.plans == [] and hess.next_step == 9
    # the realised overhead is still logged: 3 s of measuring over 6 steps of 1/64 s
    assert hess.last_metrics["curvature/overhead"] == pytest.approx(3.0 / (6 * STEP_S), rel=1e-12)


def test_state_dict_round_trip_keeps_the_plan() -> None:
    a = HessianEigenvalueMonitor(k=2)
    a.num_measurements, a.last_step, a.history = 2, 40, [(0, 1.0), (40, 2.0)]
    a._next_step, a._provisional, a._step_time_ema, a._last_measure_s = 437, False, 0.0021, 0.04
    state = a.state_dict()
    assert state["next_step"] == 437 and state["step_time_ema_s"] == 0.0021 and state["last_measure_s"] == 0.04
    b = HessianEigenvalueMonitor(k=2)
    b.load_state_dict(state)
    assert b.state_dict() == state
    assert (b.next_step, b.step_time_s, b._provisional) == (437, 0.0021, False)
    # a checkpoint written before the adaptive plan existed: re-planned `min_gap` steps after its last measurement
    c = HessianEigenvalueMonitor(k=2)
    c.load_state_dict({"num_measurements": 2, "last_step": 40})
    assert (c.next_step, c._provisional, c.step_time_s) == (40 + CurvatureMonitorBase.min_gap, True, None)


def _resumable_fit(
    tmp_path: Path, clock: FakeClock, max_epochs: int, ckpt_path: Path | None = None, save_to: Path | None = None
) -> tuple[Any, Any]:
    hess = _simulated(SimHessian, clock, 2.0**-4, max_overhead=0.5)  # gap 0.0625 / (0.5 / 64) = 8
    cov = _simulated(SimCovariance, clock, 2.0**-5, max_overhead=0.5)  # gap 4
    for monitor in (hess, cov):
        monitor.min_gap = 2
    torch.manual_seed(0)
    x, y = random_tensors(n=64)
    trainer = make_trainer(tmp_path, max_epochs=max_epochs, callbacks=[_Tick(clock), hess, cov])
    trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=16, shuffle=False), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return hess, cov


def test_resume_continues_the_adaptive_plan(tmp_path: Path, fake_clock: FakeClock) -> None:
    full_h, full_c = _resumable_fit(tmp_path, fake_clock, max_epochs=7)  # 28 steps
    assert [s for s, _ in full_h.history] == [0, 8, 16, 24]
    assert [s for s, _ in full_c.history] == [0, 4, 8, 12, 16, 20, 24]
    ckpt = tmp_path / "half.ckpt"
    first_h, _ = _resumable_fit(tmp_path, fake_clock, max_epochs=3, save_to=ckpt)  # stops at step 12
    assert [s for s, _ in first_h.history] == [0, 8] and first_h.next_step == 16
    resumed_h, resumed_c = _resumable_fit(tmp_path, fake_clock, max_epochs=7, ckpt_path=ckpt)
    assert [s for s, _ in resumed_h.history] == [s for s, _ in full_h.history]
    assert [s for s, _ in resumed_c.history] == [s for s, _ in full_c.history]
    # the resumed run planned from the checkpointed step time at once (no provisional re-plan)
    assert all(not provisional for _, _, provisional, _, _ in resumed_h.plans)
    assert resumed_h.step_time_s == pytest.approx(STEP_S, rel=1e-12)
