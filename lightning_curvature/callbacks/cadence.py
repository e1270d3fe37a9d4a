r"""When a monitor measures: a fixed cadence, or one planned from a wall-time budget. No Trainer inside.

:class:`CadencePlanner` keeps the plan of one monitor. With ``every_n_steps`` it measures at every multiple of it
(an exactly reproducible series). Without, it measures at step 0 and then, after a measurement that took
``t_measure``, :func:`adaptive_gap` steps later,

.. math:: \mathrm{gap} = \operatorname{clamp}\left(\left\lceil
    \frac{t_\mathrm{measure}}{\mathrm{max\_overhead}\cdot t_\mathrm{step}} \right\rceil,
    \ \mathrm{min\_gap},\ \mathrm{max\_gap}\right),

so measuring costs ``max_overhead`` of the training time. ``t_step`` is a moving average of the wall time of one
optimizer step, fed by :meth:`CadencePlanner.time_step` with the clock and the time every monitor of the process
spent measuring (so measurements do not count as training): the first interval of a fit (one-off costs) is not
averaged, and an interval longer than :data:`EMA_CLIP` times the average (a validation run, a checkpoint) counts as
that many. Before any step was timed the next measurement is provisionally ``min_gap`` steps away and re-planned
when reached. Under DDP a ``broadcast`` callable makes every process adopt rank 0's plan. The plan is checkpointed
(:meth:`CadencePlanner.state_dict`), so a resumed run continues it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["EMA_CLIP", "EMA_WEIGHT", "CadencePlanner", "adaptive_gap"]

#: Smoothing of the step-time average: ``ema += max(1/n, EMA_WEIGHT) * (dt - ema)`` for the ``n``-th timed step
#: (a running mean for the first ``1/EMA_WEIGHT`` steps, then an exponential average over about as many steps).
EMA_WEIGHT = 0.02
#: A step interval longer than this many times the average (validation, checkpointing, a stall) counts as this many.
EMA_CLIP = 10.0

Broadcast = Callable[[tuple[int, bool]], tuple[int, bool]]


def adaptive_gap(t_measure: float, t_step: float, max_overhead: float, min_gap: int = 10, max_gap: int = 10_000) -> int:
    r"""Steps until the next measurement so that measuring costs ``max_overhead`` of the training time.

    A relative ``1e-9`` is forgiven before rounding up, so that an exact ratio is not pushed to the next integer by
    floating-point error. Pure: no clock, no state.

    Args:
        t_measure: wall time of one measurement (seconds).
        t_step: wall time of one training step (seconds).
        max_overhead: budget, measuring time / training time.
        min_gap: fewest steps between measurements.
        max_gap: most steps between measurements (the overhead can exceed the budget when this binds).

    Returns:
        The number of optimizer steps until the next measurement.

    Example::

        >>> adaptive_gap(t_measure=0.5, t_step=0.01, max_overhead=0.05)
        1000
        >>> adaptive_gap(t_measure=0.001, t_step=0.01, max_overhead=0.05), adaptive_gap(60.0, 0.01, 0.05)
        (10, 10000)
    """
    if not (t_step > 0 and math.isfinite(t_step)):
        return min_gap
    ratio = max(t_measure, 0.0) / (max_overhead * t_step)
    if not math.isfinite(ratio):
        return max_gap
    return int(min(max(math.ceil(ratio * (1.0 - 1e-9)), min_gap), max_gap))


def _identity(plan: tuple[int, bool]) -> tuple[int, bool]:
    return plan


class CadencePlanner:
    """The measuring plan of one monitor (see the module docstring).

    Args:
        every_n_steps: a fixed cadence, or ``None`` to plan from ``max_overhead``.
        max_overhead: measuring time / training time to spend (adaptive cadence).
        min_gap: fewest steps between adaptive measurements.
        max_gap: most steps between adaptive measurements.

    Example::

        >>> planner = CadencePlanner(every_n_steps=None, max_overhead=0.05)
        >>> planner.due(0, last_step=-1)
        True
        >>> planner.start_fit()
        >>> planner.time_step(0, now=0.0, spent=0.0); planner.time_step(1, now=0.01, spent=0.0)  # first: not averaged
        >>> planner.time_step(2, now=0.02, spent=0.0)
        >>> planner.step_time_s
        0.01
        >>> planner.plan(step=2, t_measure=0.1)  # 0.1 s of measuring at 5% of 0.01 s steps: 200 steps later
        >>> planner.next_step
        202
    """

    def __init__(self, every_n_steps: int | None, max_overhead: float, min_gap: int = 10, max_gap: int = 10_000):
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.min_gap = min_gap
        self.max_gap = max_gap
        # the plan (checkpointed)
        self.next_step = 0
        self.provisional = False
        self.step_time_s: float | None = None
        self.last_measure_s = 0.0
        # this fit's timing (not checkpointed)
        self.train_time_s = 0.0
        self._t_prev: float | None = None
        self._spent_prev = 0.0
        self._step_prev = -1
        self._count = 0
        self._skip_interval = False

    @property
    def adaptive(self) -> bool:
        """Whether the cadence is planned from the budget."""
        return self.every_n_steps is None

    # -- a fit ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the plan (a new fit that is not resumed)."""
        self.next_step, self.provisional, self.step_time_s, self.last_measure_s = 0, False, None, 0.0

    def start_fit(self) -> None:
        """Start timing a fit: the first interval is not averaged (it carries one-off costs)."""
        self.train_time_s, self._t_prev, self._step_prev = 0.0, None, -1
        self._count = 0 if self.step_time_s is None else round(1 / EMA_WEIGHT)  # a resumed average counts as settled
        self._skip_interval = True

    def time_step(self, step: int, now: float, spent: float) -> None:
        """Fold the interval since the last step change into the step-time average.

        Args:
            step: the step axis now (unchanged under gradient accumulation: nothing to do).
            now: the clock.
            spent: the time all monitors of the process have spent measuring so far (subtracted).
        """
        if step == self._step_prev:
            return
        if self._t_prev is not None and step > self._step_prev:
            dt = max(0.0, (now - self._t_prev) - (spent - self._spent_prev))
            self.train_time_s += dt
            per_step = dt / (step - self._step_prev)
            ema = self.step_time_s
            if self._skip_interval:
                self._skip_interval = False
            elif ema is None:
                self.step_time_s, self._count = per_step, 1
            else:
                self._count += 1
                per_step = min(per_step, EMA_CLIP * ema)
                self.step_time_s = ema + max(1.0 / self._count, EMA_WEIGHT) * (per_step - ema)
        self._t_prev, self._spent_prev, self._step_prev = now, spent, step

    # -- decisions ------------------------------------------------------------------------------------------------
    def due(self, step: int, last_step: int, broadcast: Broadcast = _identity) -> bool:
        """Whether to measure at ``step`` (``last_step``: the latest measured step); re-plans a provisional plan."""
        if step == last_step:
            return False
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        if step < self.next_step:
            return False
        if self.provisional:
            self._replan(step, last_step, broadcast)
            return step >= self.next_step
        return True

    def scheduled(self, last_step: int) -> int:
        """The step of the next measurement (fixed cadence: the next multiple of ``every_n_steps``)."""
        if self.every_n_steps is None:
            return self.next_step
        n = self.every_n_steps
        return (last_step // n + 1) * n if last_step >= 0 else 0

    def gap(self, t_measure: float, t_step: float) -> int:
        """:func:`adaptive_gap` with this planner's budget and bounds."""
        return adaptive_gap(t_measure, t_step, self.max_overhead, self.min_gap, self.max_gap)

    def plan(self, step: int, t_measure: float, broadcast: Broadcast = _identity) -> None:
        """After a measurement at ``step`` that took ``t_measure``: plan the next one (adaptive cadence only)."""
        self.last_measure_s = t_measure
        if self.every_n_steps is not None:
            return
        if self.step_time_s is None:  # no step timed yet: a conservative gap, re-planned when it is reached
            self._adopt(broadcast((step + self.min_gap, True)))
        else:
            self._adopt(broadcast((step + self.gap(t_measure, self.step_time_s), False)))

    def _replan(self, step: int, last_step: int, broadcast: Broadcast) -> None:
        if self.step_time_s is None:
            self._adopt(broadcast((step + self.min_gap, True)))
        else:
            self._adopt(broadcast((last_step + self.gap(self.last_measure_s, self.step_time_s), False)))

    def _adopt(self, plan: tuple[int, bool]) -> None:
        self.next_step, self.provisional = int(plan[0]), bool(plan[1])

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The plan as plain values."""
        return {
            "next_step": int(self.next_step),
            "plan_provisional": bool(self.provisional),
            "step_time_ema_s": None if self.step_time_s is None else float(self.step_time_s),
            "last_measure_s": float(self.last_measure_s),
        }

    def load_state_dict(self, state: dict[str, Any], last_step: int) -> None:
        """Restore :meth:`state_dict` output; a checkpoint without a plan re-plans ``min_gap`` after ``last_step``."""
        default_next = last_step + self.min_gap if last_step >= 0 else 0
        self.next_step = int(state.get("next_step", default_next))
        self.provisional = bool(state.get("plan_provisional", "next_step" not in state))
        ema = state.get("step_time_ema_s")
        self.step_time_s = None if ema is None else float(ema)
        self.last_measure_s = float(state.get("last_measure_s", 0.0))
