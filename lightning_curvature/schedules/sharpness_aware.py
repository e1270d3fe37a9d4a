r"""SharpnessAwareLR: keep the learning rate below the stability threshold of the measured sharpness.

On a quadratic with top Hessian eigenvalue :math:`\lambda`, gradient descent is stable iff
:math:`\eta < 2/\lambda`; momentum, Nesterov and adaptive methods have their own thresholds
(:mod:`lightning_curvature.core.stability`), all of the form :math:`c/\eta`. The scheduler caps a base schedule
:math:`\eta^{\text{base}}_t` at a fraction ``safety`` of the largest stable rate of the latest sharpness
measurement :math:`\lambda_t`:

.. math::

    \eta_t = \max\Bigl(\eta_{\min},\ \min\bigl(\eta^{\text{base}}_t,\ \text{safety}\cdot c/\lambda_t\bigr)\Bigr).

Early in training, when the sharpness is high (Gilmer et al. 2021, arXiv 2110.04369), the cap is low and relaxes
as the network flattens: a warm-up emerges by itself.

References:
    J. Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability",
    arXiv 2103.00065; "Adaptive Gradient Methods at the Edge of Stability", arXiv 2207.14484.
    J. Gilmer et al., "A Loss Curvature Perspective on Training Instability in Deep Learning", arXiv 2110.04369.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_curvature.core.stability import max_stable_lr
from lightning_curvature.schedules._fed import FedScheduler

__all__ = ["SharpnessAwareLR", "sharpness_aware_lr"]

BaseSchedule = LRScheduler | float | Callable[[int], float] | None

_MISSING_FEED = (
    "SharpnessAwareLR was stepped but no sharpness was ever observed and no monitor is attached. In Lightning, "
    "add the monitor that feeds it: `Trainer(callbacks=[HessianEigenvalueMonitor(...)])` "
    "(from lightning_curvature import HessianEigenvalueMonitor). In a plain PyTorch loop, call "
    "`scheduler.observe_sharpness(sharpness, step)` with a measurement (e.g. "
    "`hessian_eigenvalues(model, loss_fn, batch).eigenvalues[0]`) before `scheduler.step()`, or pass "
    "`warn_missing=False` to follow the base schedule until the first measurement."
)

# runtime wiring and unpicklable objects: never in state_dict
_TRANSIENT = ("optimizer", "_base_scheduler", "_base_fn", "_monitor_attached")


def sharpness_aware_lr(
    base_lr: float,
    sharpness: float | None,
    stability_constant: float,
    *,
    safety: float = 0.9,
    min_lr: float = 0.0,
) -> float:
    r"""The SharpnessAwareLR rule for one parameter group. Pure: no optimizer, no state.

    .. math::

        \eta = \max\bigl(\eta_{\min},\ \min(\eta^{\text{base}},\ \text{safety}\cdot c/\lambda)\bigr)

    Args:
        base_lr: the base schedule's learning rate :math:`\eta^{\text{base}}`.
        sharpness: the measured sharpness :math:`\lambda` (preconditioned for adaptive optimizers), or ``None``
            before the first measurement (then only the floor applies).
        stability_constant: :math:`c` such that the largest stable lr is :math:`c/\lambda` (2 for plain SGD,
            :math:`2+2\beta` with heavy-ball momentum, :math:`(2+2\beta_1)/(1-\beta_1)` for Adam); equal to
            :func:`~lightning_curvature.core.stability.max_stable_lr` at sharpness 1.
        safety: fraction of the largest stable lr allowed.
        min_lr: floor :math:`\eta_{\min}`; it wins over both caps.

    Returns:
        The learning rate.

    Raises:
        ValueError: for a non-positive or non-finite ``sharpness``.

    Example::

        >>> sharpness_aware_lr(0.5, sharpness=10.0, stability_constant=2.0, safety=0.9)  # 0.9 * 2 / 10
        0.18
        >>> sharpness_aware_lr(0.1, sharpness=10.0, stability_constant=2.0)  # below the cap: base wins
        0.1
        >>> sharpness_aware_lr(0.5, sharpness=None, stability_constant=2.0)
        0.5
    """
    lr = float(base_lr)
    if sharpness is not None:
        s = float(sharpness)
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"`sharpness` must be positive and finite, got {sharpness!r}.")
        lr = min(lr, safety * stability_constant / s)
    return max(float(min_lr), lr)


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class SharpnessAwareLR(FedScheduler):
    r"""Cap any base schedule at ``safety`` times the largest stable learning rate of the measured sharpness.

    Per parameter group ``i`` and step ``t``:

    .. math::

        \eta_{t,i} = \max\Bigl(\eta_{\min,i},\ \min\bigl(\eta^{\text{base}}_{t,i},\
        \text{safety}\cdot\texttt{max\_stable\_lr}(\text{optimizer}, \lambda, i)\bigr)\Bigr)

    with :math:`\lambda` the latest good sharpness measurement and the optimizer's own threshold (SGD:
    :math:`2/\lambda`; heavy-ball momentum β: :math:`(2+2\beta)/\lambda`; Nesterov:
    :math:`(2+2\beta)/((1+2\beta)\lambda)`; Adam/AdamW: :math:`(2+2\beta_1)/((1-\beta_1)\lambda)` and RMSprop
    :math:`(2+2\beta)/\lambda`, where for these adaptive methods :math:`\lambda` must be the *preconditioned*
    sharpness :math:`\lambda_{\max}(P^{-1}H)`). See :func:`sharpness_aware_lr` for the pure rule.

    **Feeding it.** In Lightning, :class:`~lightning_curvature.callbacks.HessianEigenvalueMonitor` calls
    :meth:`attach_monitor` at fit start and :meth:`observe_sharpness` after every measurement; the new cap applies
    at once (to the next optimizer step). In a plain loop, call :meth:`observe_sharpness` yourself. Before the
    first measurement the base schedule is followed. A non-finite, zero or negative measurement is ignored with a
    single warning; the last good value is kept.

    **Wrapping a scheduler.** ``base`` may be another ``LRScheduler`` built on the same optimizer (construct it
    first). It is stepped by this scheduler (do not step it yourself, and return only this one to Lightning);
    its unclamped lrs are kept in :attr:`base_values` and written back before each of its steps, so chainable
    schedulers never see (and compound) the clamping. Its ``state_dict`` is saved inside this one's.

    Args:
        optimizer: an ``SGD`` (momentum, Nesterov), ``Adam``, ``AdamW`` or ``RMSprop`` instance.
        base: ``None`` (each group's initial lr), a float (one constant lr for every group), a callable
            ``step -> multiplier`` of each group's initial lr (like ``LambdaLR``), or an ``LRScheduler``.
        safety: fraction of the largest stable lr, in ``(0, 1]``.
        min_lr: absolute floor per group (a float or one per group).
        min_lr_ratio: floor as a fraction of the base lr, in ``[0, 1]``; the larger floor applies.
        warn_missing: raise at the first :meth:`step` if no monitor is attached and no sharpness was observed;
            ``False`` follows the base schedule silently until the first measurement.
        last_epoch: as in ``LRScheduler`` (``-1`` for a fresh start).

    Raises:
        ValueError: for ``safety``/``min_lr``/``min_lr_ratio`` out of range, a non-positive constant ``base``, a
            base scheduler on another optimizer, or a wrong number of ``min_lr`` entries.
        TypeError: for an optimizer without known stability threshold, or an unsupported ``base``
            (e.g. ``ReduceLROnPlateau``).
        RuntimeError: from :meth:`step`, see ``warn_missing``.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> sched = SharpnessAwareLR(opt, safety=0.9)
        >>> sched.observe_sharpness(10.0, step=0)  # 2/λ = 0.2
        >>> round(opt.param_groups[0]["lr"], 6)
        0.18
        >>> opt.step(); sched.step()
        >>> sched.observe_sharpness(2.0, step=1)  # flatter: the base lr 0.5 < 0.9 * 2/2 applies again
        >>> opt.param_groups[0]["lr"]
        0.5
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base: BaseSchedule = None,
        safety: float = 0.9,
        min_lr: float | Sequence[float] = 0.0,
        min_lr_ratio: float = 0.0,
        warn_missing: bool = True,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer.")
        safety = float(safety)
        if not 0.0 < safety <= 1.0:
            raise ValueError(f"Expected 0 < safety <= 1, got safety={safety!r}.")
        n_groups = len(optimizer.param_groups)
        mins = [float(min_lr)] * n_groups if isinstance(min_lr, (int, float)) else [float(m) for m in min_lr]
        if len(mins) != n_groups:
            raise ValueError(f"Expected {n_groups} `min_lr` values (one per parameter group), got {len(mins)}.")
        if any(not (m >= 0 and math.isfinite(m)) for m in mins):
            raise ValueError(f"Expected finite min_lr >= 0, got min_lr={min_lr!r}.")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"Expected 0 <= min_lr_ratio <= 1, got min_lr_ratio={min_lr_ratio!r}.")
        for i in range(n_groups):
            max_stable_lr(optimizer, 1.0, i)  # TypeError now for an optimizer without a known threshold

        self._base_scheduler: LRScheduler | None = None
        self._base_fn: Callable[[int], float] | None = None
        self._base_constant: float | None = None
        if base is None:
            self.base_kind = "initial_lr"
        elif isinstance(base, ReduceLROnPlateau):
            raise TypeError("`base` cannot be ReduceLROnPlateau (it needs a metric); wrap a step-based schedule.")
        elif isinstance(base, LRScheduler):
            if base.optimizer is not optimizer:
                raise ValueError("The `base` scheduler must be built on the same optimizer as SharpnessAwareLR.")
            self.base_kind = "scheduler"
            self._base_scheduler = base
        elif isinstance(base, (int, float)) and not isinstance(base, bool):
            if not (base > 0 and math.isfinite(base)):
                raise ValueError(f"A constant `base` learning rate must be positive and finite, got {base!r}.")
            self.base_kind = "constant"
            self._base_constant = float(base)
        elif callable(base):
            self.base_kind = "callable"
            self._base_fn = base
        else:
            raise TypeError(
                f"`base` must be None, a float, a callable step -> multiplier or an LRScheduler, got {base!r}."
            )

        self.safety = safety
        self.min_lrs = mins
        self.min_lr_ratio = float(min_lr_ratio)
        self.warn_missing = bool(warn_missing)
        self.sharpness: float | None = None
        self.sharpness_step: int | None = None
        self.num_observations = 0
        self.num_rejected = 0
        self._init_feed()
        self.base_values: list[float] = [_as_float(g["lr"]) for g in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)  # last: it runs the first step (get_lr)

    # -- feeding --------------------------------------------------------------------------------------------------
    def observe_sharpness(self, sharpness: float | torch.Tensor, step: int | None = None) -> None:
        """Feed a sharpness measurement; the new cap is written to the optimizer at once.

        Non-finite, zero or negative values are ignored (the last good one is kept) with one warning per
        scheduler.

        Args:
            sharpness: top Hessian eigenvalue (preconditioned for Adam/AdamW/RMSprop).
            step: training step of the measurement (kept for inspection).
        """
        value = _as_float(sharpness)
        self.num_observations += 1
        if not (value > 0 and math.isfinite(value)):
            self.num_rejected += 1
            self._warn_bad_once(
                f"SharpnessAwareLR ignored a sharpness of {value!r} (non-finite, zero or negative) and keeps "
                f"the last good value {self.sharpness!r}; further bad values are ignored silently."
            )
            return
        self.sharpness = value
        self.sharpness_step = None if step is None else int(step)
        self._apply(self._clamped())

    # -- schedule -------------------------------------------------------------------------------------------------
    def max_stable_lrs(self) -> list[float] | None:
        """Largest stable lr of each group for the current sharpness (``None`` before the first measurement)."""
        if self.sharpness is None:
            return None
        return [max_stable_lr(self.optimizer, self.sharpness, i) for i in range(len(self.optimizer.param_groups))]

    def _read_base(self) -> list[float]:
        groups = self.optimizer.param_groups
        if self.base_kind == "scheduler":
            return [_as_float(g["lr"]) for g in groups]
        if self.base_kind == "constant":
            assert self._base_constant is not None
            return [self._base_constant] * len(groups)
        if self.base_kind == "callable":
            assert self._base_fn is not None
            m = float(self._base_fn(self.last_epoch))
            return [_as_float(b) * m for b in self.base_lrs]
        return [_as_float(b) for b in self.base_lrs]

    def _clamped(self) -> list[float]:
        out = []
        for i, base_lr in enumerate(self.base_values):
            c = max_stable_lr(self.optimizer, 1.0, i)
            floor = max(self.min_lrs[i], self.min_lr_ratio * base_lr)
            out.append(sharpness_aware_lr(base_lr, self.sharpness, c, safety=self.safety, min_lr=floor))
        return out

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Step the base schedule (not on the initial call) and return the clamped lrs."""
        if not self._is_initial:
            self._raise_if_never_fed(_MISSING_FEED)
            if self._base_scheduler is not None:
                # the base sees its own unclamped values, so chainable schedules do not compound the clamp
                self._apply(self.base_values)
                self._base_scheduler.step()
        self.base_values = self._read_base()
        return self._clamped()

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain values only; a wrapped scheduler's ``state_dict`` is stored under ``"base_state_dict"``."""
        state = {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}
        if self._base_scheduler is not None:
            state["base_state_dict"] = self._base_scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys keep their current values)."""
        state = dict(state_dict)
        base_state = state.pop("base_state_dict", None)
        for key in _TRANSIENT:
            state.pop(key, None)
        self.__dict__.update(state)
        if base_state is not None and self._base_scheduler is not None:
            self._base_scheduler.load_state_dict(base_state)
