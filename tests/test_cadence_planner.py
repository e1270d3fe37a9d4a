"""The cadence planner on its own (no Trainer): the gap formula, timing, provisional plans, state, broadcast."""

from __future__ import annotations

import math

import pytest

from lightning_curvature.callbacks.cadence import EMA_CLIP, CadencePlanner, adaptive_gap


def _timed(planner: CadencePlanner, steps: int, dt: float, start: float = 0.0) -> float:
    now = start
    for s in range(steps):
        planner.time_step(s, now, spent=0.0)
        now += dt
    return now


def test_gap_is_the_ceiling_of_the_budget_ratio_clamped() -> None:
    assert adaptive_gap(1.0, 0.01, 0.05) == 2000  # 1 s / (5% of 10 ms)
    assert adaptive_gap(0.3, 0.01, 0.1) == 300  # exact ratio: not pushed to 301 by rounding
    assert adaptive_gap(0.0, 0.01, 0.05) == 10 and adaptive_gap(1e6, 0.01, 0.05) == 10_000
    assert adaptive_gap(1.0, 0.0, 0.05) == 10 and adaptive_gap(1.0, math.nan, 0.05) == 10


def test_fixed_cadence_measures_every_multiple() -> None:
    planner = CadencePlanner(every_n_steps=4, max_overhead=0.05)
    assert [s for s in range(13) if planner.due(s, last_step=-1)] == [0, 4, 8, 12]
    assert not planner.due(8, last_step=8)  # the same step twice (gradient accumulation)
    assert planner.scheduled(last_step=8) == 12


def test_adaptive_plan_is_provisional_until_a_step_is_timed_then_follows_the_formula() -> None:
    planner = CadencePlanner(every_n_steps=None, max_overhead=0.05, min_gap=10)
    planner.start_fit()
    assert planner.due(0, last_step=-1)
    planner.plan(step=0, t_measure=0.5)  # no step timed: min_gap later, provisional
    assert (planner.next_step, planner.provisional) == (10, True)
    _timed(planner, steps=11, dt=0.01)  # the first interval is skipped, the other nine average 10 ms
    assert planner.step_time_s == pytest.approx(0.01)
    assert not planner.due(10, last_step=0)  # reached: re-planned from step 0, 0 + ceil(0.5 / (0.05 · 0.01)) = 1000
    assert (planner.next_step, planner.provisional) == (1000, False)
    assert planner.due(1000, last_step=0)


def test_measuring_time_is_not_training_time_and_outliers_are_clipped() -> None:
    planner = CadencePlanner(every_n_steps=None, max_overhead=0.05)
    planner.start_fit()
    last = _timed(planner, steps=30, dt=0.01) - 0.01  # the clock at step 29
    # a step whose interval holds 2 s of measuring (by any monitor) still counts as 10 ms of training
    planner.time_step(30, last + 2.01, spent=2.0)
    assert planner.step_time_s == pytest.approx(0.01)
    # a validation run of 100x a step counts as EMA_CLIP steps; it is the 30th interval averaged (the first of the
    # fit is skipped), so its weight is 1/30 (a running mean until 1/EMA_WEIGHT intervals)
    before = planner.step_time_s
    planner.time_step(31, last + 2.01 + 1.0, spent=2.0)
    assert planner.step_time_s == pytest.approx(before + (EMA_CLIP * before - before) / 30)


def test_state_round_trip_and_checkpoints_without_a_plan() -> None:
    a = CadencePlanner(every_n_steps=None, max_overhead=0.05)
    a.next_step, a.provisional, a.step_time_s, a.last_measure_s = 437, False, 0.0021, 0.04
    b = CadencePlanner(every_n_steps=None, max_overhead=0.05)
    b.load_state_dict(a.state_dict(), last_step=400)
    assert (b.next_step, b.provisional, b.step_time_s, b.last_measure_s) == (437, False, 0.0021, 0.04)
    c = CadencePlanner(every_n_steps=None, max_overhead=0.05, min_gap=10)
    c.load_state_dict({}, last_step=40)  # an old checkpoint: re-plan min_gap after the last measurement
    assert (c.next_step, c.provisional, c.step_time_s) == (50, True, None)


def test_every_process_adopts_the_broadcast_plan() -> None:
    planner = CadencePlanner(every_n_steps=None, max_overhead=0.05)
    planner.start_fit()
    _timed(planner, steps=5, dt=0.01)
    planner.plan(step=4, t_measure=0.5, broadcast=lambda plan: (777, False))  # rank 0 planned differently
    assert (planner.next_step, planner.provisional) == (777, False)
