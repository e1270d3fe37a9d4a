r"""SharpnessAwareLR: a learning rate that follows the edge of stability of the measured sharpness.

On a quadratic with top Hessian eigenvalue :math:`\lambda`, gradient descent is stable iff :math:`\eta < 2/\lambda`;
momentum, Nesterov and adaptive methods have their own thresholds (:mod:`lightning_curvature.core.stability`), all
of the form :math:`c/\eta`, so :math:`c/\lambda` is the *edge*: the largest stable learning rate, and
:math:`\rho = \eta\lambda/c` the *edge ratio* (1 on the edge). For Adam/AdamW/RMSprop :math:`\lambda` is the
preconditioned sharpness :math:`\lambda_{\max}(P^{-1/2} H P^{-1/2})`.

Two rules, per parameter group, on top of any base schedule :math:`\eta^{\text{base}}_t`.

**Edge following** (``rule="edge"``, the default). What the papers separate:

* running far past the edge early in training is what blows a run up (Gilmer et al. 2021): the first updates of
  an untuned run sit at tens to thousands of times the edge;
* sitting *at* the edge is benign: gradient descent, momentum and adaptive methods self-stabilise there, the
  sharpness hovering around :math:`c/\eta` whatever :math:`\eta` (Cohen et al. 2021, 2022), so a measured
  :math:`\rho \approx 1` says nothing against the current lr, and a cap at a fraction of :math:`c/\lambda` only
  ratchets the lr down;
* warm-up works because raising the lr towards and past the edge makes the network move to flatter regions, so
  the lr can rise as fast as the curvature follows; it may start at the edge of the initial sharpness rather than
  at zero (Kalra & Barkeshli 2024). Adaptive methods also flatten through their preconditioner, which grows with
  the oscillation an lr past the edge causes (Cohen et al. 2022); heavy-ball momentum has no such mechanism and
  amplifies a mode past its edge by a factor 1.8 per step already at :math:`\rho = 1.1` (β = 0.9).

Hence, with :math:`e = c/\lambda` the edge of the latest measurement, ``safety`` :math:`s` (0.9),
``growth_edge_ratio`` :math:`\rho_g` and ``max_edge_ratio`` :math:`\rho_{\max}` (2 and 2 for Adam/AdamW/RMSprop;
:math:`s` and 1 for SGD) and ``max_growth`` :math:`\gamma` (:func:`default_growth`, :math:`e^{1-\beta}`):

.. math::

    \eta_{t+1} = \min\Bigl(\eta^{\text{base}}_{t+1},\ \max\bigl(\eta_t,\ \min(\gamma\,\eta_t,\
    \rho_g\, e)\bigr)\Bigr),

and, at the first measurement and after any measurement that finds the run far past the edge
(:math:`\eta_s\lambda_s/c > \rho_{\max}`, :math:`\eta_s` the lr of the measured update), a reset:
:math:`\eta_{t+1} = \min(\eta^{\text{base}}_{t+1}, s\,e)`. The lr starts just below the edge, rises at most
:math:`\gamma` per step while it is below :math:`\rho_g` times the latest edge, reaches the base schedule when the
curvature allows, and is lowered only by a measured runaway, never by a sharpness that rose to meet it.

**Cap** (``rule="cap"``, the earlier rule): :math:`\eta_t = \max(\eta_{\min}, \min(\eta^{\text{base}}_t,
s\,e))`. It holds full-batch gradient descent just below the edge (use it on convex problems, where nothing
self-stabilises above the edge); with mini-batches and adaptive optimizers, whose sharpness rises to meet
:math:`c/\eta`, it lowers the lr at every measurement.

References:
    J. Gilmer et al., "A Loss Curvature Perspective on Training Instability in Deep Learning", arXiv 2110.04369.
    J. Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability",
    arXiv 2103.00065; "Adaptive Gradient Methods at the Edge of Stability", arXiv 2207.14484.
    D. S. Kalra, M. Barkeshli, "Why Warmup the Learning Rate? Underlying Mechanisms and Improvements",
    arXiv 2406.09405.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_curvature.core.stability import is_adaptive, max_stable_lr
from lightning_curvature.schedules._fed import FedScheduler

__all__ = ["SharpnessAwareLR", "default_growth", "edge_following_lr", "sharpness_aware_lr"]

BaseSchedule = LRScheduler | float | Callable[[int], float] | None
Rule = Literal["edge", "cap"]
_RULES = ("edge", "cap")
_ADAPTIVE_MAX_EDGE_RATIO = 2.0  # Adam/AdamW/RMSprop may be pushed up to 2x the edge (the preconditioner adapts)

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


def _check_sharpness(sharpness: float) -> float:
    s = float(sharpness)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"`sharpness` must be positive and finite, got {sharpness!r}.")
    return s


def sharpness_aware_lr(
    base_lr: float,
    sharpness: float | None,
    stability_constant: float,
    *,
    safety: float = 0.9,
    min_lr: float = 0.0,
) -> float:
    r"""The cap rule for one parameter group. Pure: no optimizer, no state.

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
        lr = min(lr, safety * stability_constant / _check_sharpness(sharpness))
    return max(float(min_lr), lr)


def edge_following_lr(
    base_lr: float,
    previous_lr: float | None,
    sharpness: float | None,
    stability_constant: float,
    *,
    reset: bool = False,
    growth_edge_ratio: float = 2.0,
    reset_edge_ratio: float = 0.9,
    max_growth: float = 1.2,
    min_lr: float = 0.0,
) -> float:
    r"""The edge-following rule for one parameter group and one step. Pure: no optimizer, no state.

    With :math:`e = c/\lambda` the edge of the latest sharpness, :math:`\rho_g` = ``growth_edge_ratio``,
    :math:`s` = ``reset_edge_ratio`` and :math:`\gamma` = ``max_growth``:

    .. math::

        \eta_{t+1} =
        \begin{cases}
          \max\bigl(\eta_{\min},\ \min(\eta^{\text{base}}_{t+1},\ s\,e)\bigr)
            & \text{reset (first measurement, or a runaway)},\\
          \max\Bigl(\eta_{\min},\ \min\bigl(\eta^{\text{base}}_{t+1},\
            \max(\eta_t,\ \min(\gamma\,\eta_t,\ \rho_g\, e))\bigr)\Bigr)
            & \text{otherwise:}
        \end{cases}

    the lr rises by at most :math:`\gamma` per step while it is below :math:`\rho_g e`, is held (never lowered)
    above it, and never exceeds the base schedule.

    Args:
        base_lr: :math:`\eta^{\text{base}}_{t+1}`, the base schedule's lr for the coming update.
        previous_lr: :math:`\eta_t`, the lr of the previous update (``None``: treated as a reset).
        sharpness: the latest sharpness :math:`\lambda` (preconditioned for adaptive optimizers), or ``None``
            before the first measurement (then the base lr, floored, is returned).
        stability_constant: :math:`c`, the edge being :math:`c/\lambda` (see :func:`sharpness_aware_lr`).
        reset: start again from :math:`s\,e`.
        growth_edge_ratio: :math:`\rho_g`, the multiple of the edge up to which the lr may rise.
        reset_edge_ratio: :math:`s`, the multiple of the edge a reset goes to.
        max_growth: :math:`\gamma`, the largest factor by which the lr may rise from one update to the next.
        min_lr: floor :math:`\eta_{\min}`; it wins over everything.

    Returns:
        The learning rate of the coming update.

    Raises:
        ValueError: for a non-positive or non-finite ``sharpness``.

    Example::

        >>> # Adam (c = 38) measured at λ = 3800: edge 0.01; base lr 0.1
        >>> round(edge_following_lr(0.1, None, 3800.0, 38.0), 6)  # first measurement: start at 0.9x the edge
        0.009
        >>> edge_following_lr(0.1, 0.01, 3800.0, 38.0)  # then rise by at most 1.2x per step
        0.012
        >>> edge_following_lr(0.1, 0.019, 3800.0, 38.0)  # ... up to twice the measured edge
        0.02
        >>> edge_following_lr(0.1, 0.02, 380.0, 38.0)  # flatter (edge 0.1): the growth limit binds
        0.024
        >>> edge_following_lr(0.1, 0.02, 7600.0, 38.0)  # sharper (edge 0.005): held, not lowered
        0.02
        >>> round(edge_following_lr(0.1, 0.02, 7600.0, 38.0, reset=True), 6)  # a runaway: back below the edge
        0.0045
    """
    lr = float(base_lr)
    if sharpness is not None:
        edge = stability_constant / _check_sharpness(sharpness)
        if reset or previous_lr is None:
            lr = min(lr, reset_edge_ratio * edge)
        else:
            prev = float(previous_lr)
            lr = min(lr, max(prev, min(max_growth * prev, growth_edge_ratio * edge)))
    return max(float(min_lr), lr)


def default_growth(group: dict[str, Any]) -> float:
    r"""The default largest lr growth per step of a parameter group: :math:`\gamma = e^{1-\beta}`.

    :math:`\beta` is the group's momentum (``momentum`` for SGD and RMSprop, ``betas[0]`` for Adam/AdamW; 0
    without). A momentum method averages its last :math:`1/(1-\beta)` updates, so it takes about that many steps
    to respond to a change of lr; the lr may grow by at most a factor :math:`e` over that time (plain gradient
    descent, without memory, by :math:`e` per step).

    Example::

        >>> round(default_growth({"betas": (0.9, 0.95)}), 4)  # Adam: e^0.1
        1.1052
        >>> round(default_growth({"momentum": 0.0}), 4)  # gradient descent: e
        2.7183
    """
    beta = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
    return math.exp(1.0 - float(beta))


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class SharpnessAwareLR(FedScheduler):
    r"""Keep a base schedule within reach of the edge of stability of the measured sharpness.

    The default rule (``rule="edge"``, see :func:`edge_following_lr` and the module docstring): per group,

    .. math::

        \eta_{t+1} = \min\Bigl(\eta^{\text{base}}_{t+1},\ \max\bigl(\eta_t,\ \min(\gamma\,\eta_t,\
        \rho_g\,c/\lambda)\bigr)\Bigr),

    reset to :math:`\min(\eta^{\text{base}}, s\,c/\lambda)` at the first measurement and whenever a measurement
    finds the edge ratio :math:`\eta\lambda/c` above :math:`\rho_{\max}`. A warm-up emerges: an untuned high-lr run
    starts just below the edge of its initial sharpness and rises to the base schedule at most :math:`\gamma` per
    step, as fast as the sharpness lets it; a run that equilibrates at the edge (:math:`\rho \approx 1`, the
    normal state of adaptive optimizers) keeps its lr. ``rule="cap"`` is the earlier cap at ``safety`` times the
    edge (:func:`sharpness_aware_lr`), for convex problems and full-batch gradient descent held below the edge.

    :math:`c/\lambda` is the optimizer's own edge (:func:`~lightning_curvature.core.stability.max_stable_lr`):
    SGD :math:`2/\lambda`; heavy-ball momentum β :math:`(2+2\beta)/\lambda`; Nesterov
    :math:`(2+2\beta)/((1+2\beta)\lambda)`; Adam/AdamW :math:`(2+2\beta_1)/((1-\beta_1)\lambda)` and RMSprop
    :math:`(2+2\beta)/\lambda`, where for these adaptive methods :math:`\lambda` must be the *preconditioned*
    sharpness :math:`\lambda_{\max}(P^{-1/2}HP^{-1/2})`.

    **Feeding it.** In Lightning, :class:`~lightning_curvature.callbacks.HessianEigenvalueMonitor` calls
    :meth:`attach_monitor` at fit start and :meth:`observe_sharpness` after every finite measurement (made at the
    parameters the update ``step`` starts from). In a plain loop, call :meth:`observe_sharpness` yourself.
    Learning rates change only in :meth:`step`, so the lr an update uses is the one set by the previous
    :meth:`step` (what ``LearningRateMonitor`` shows): a measurement is recorded and takes effect at the next
    :meth:`step`, except one made before the first :meth:`step`, which sets the initial lrs at once. Before the
    first measurement the base schedule is followed. A non-finite, zero or negative measurement is ignored with a
    single warning; the last good value is kept.

    **When to measure.** With the edge rule the lr can only rise past :math:`\rho_g` times the last measured
    edge after a new measurement: :meth:`wants_measurement` says so (it is ``True`` while the coming update's lr
    is held by that bound, or before any measurement). A monitor that measures when it is ``True`` (and otherwise
    at its own cadence) measures densely while the lr climbs and sparsely once the base schedule is reached.

    **Wrapping a scheduler.** ``base`` may be another ``LRScheduler`` built on the same optimizer (construct it
    first). It is stepped by this scheduler (do not step it yourself, and return only this one to Lightning);
    its unclamped lrs are kept in :attr:`base_values` and written back before each of its steps, so chainable
    schedulers never see (and compound) the clamping. Its ``state_dict`` is saved inside this one's.

    Args:
        optimizer: an ``SGD`` (momentum, Nesterov), ``Adam``, ``AdamW`` or ``RMSprop`` instance.
        base: ``None`` (each group's initial lr), a float (one constant lr for every group), a callable
            ``step -> multiplier`` of each group's initial lr (like ``LambdaLR``), or an ``LRScheduler``.
        rule: ``"edge"`` (default) or ``"cap"`` (see above).
        max_edge_ratio: edge rule: :math:`\rho_{\max} \ge 1`, the edge ratio above which a measured run is "far
            past the edge" and reset; ``None``: 2 for Adam/AdamW/RMSprop (their preconditioner absorbs an overshoot),
            1 for SGD (heavy-ball momentum amplifies any mode past its edge).
        growth_edge_ratio: edge rule: :math:`\rho_g \le \rho_{\max}`, the multiple of the latest edge up to which
            the lr may rise; ``None``: :math:`\min(2, \rho_{\max})` for Adam/AdamW/RMSprop, ``safety`` for SGD.
        max_growth: edge rule: :math:`\gamma > 1`, the largest factor between consecutive updates' lrs; ``None``:
            :func:`default_growth` of each group, :math:`e^{1-\beta}`.
        safety: :math:`s`, the fraction of the edge a start or reset goes to (edge rule) and the cap (cap rule),
            in ``(0, 1]``.
        min_lr: absolute floor per group (a float or one per group; a group added to the optimizer later, e.g. by
            Lightning's ``BackboneFinetuning``, gets the float, or 0 if one per group was given).
        min_lr_ratio: floor as a fraction of the base lr, in ``[0, 1]``; the larger floor applies.
        warn_missing: raise at the first :meth:`step` if no monitor is attached and no sharpness was observed;
            ``False`` follows the base schedule silently until the first measurement.
        last_epoch: as in ``LRScheduler`` (``-1`` for a fresh start).

    Raises:
        ValueError: for ``rule``, ``max_edge_ratio``, ``growth_edge_ratio``, ``max_growth``, ``safety``, ``min_lr``
            or ``min_lr_ratio`` out of range, a non-positive constant ``base``, a base scheduler on another
            optimizer, or a wrong number of ``min_lr`` entries.
        TypeError: for an optimizer without known stability threshold, or an unsupported ``base``
            (e.g. ``ReduceLROnPlateau``).
        RuntimeError: from :meth:`step`, see ``warn_missing``.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> sched = SharpnessAwareLR(opt)  # edge rule, base lr 0.5
        >>> sched.observe_sharpness(10.0, step=0)  # before the first step: at once, 0.9 x the edge 2/λ = 0.2
        >>> round(opt.param_groups[0]["lr"], 6)
        0.18
        >>> opt.step(); sched.step()  # SGD rises only up to 0.9 x the edge: held
        >>> round(opt.param_groups[0]["lr"], 6)
        0.18
        >>> sched.observe_sharpness(2.0, step=1)  # flatter (edge 1.0): recorded, applied at the next step
        >>> opt.step(); sched.step()  # rises by at most e^(1 - momentum) = e per step ...
        >>> round(opt.param_groups[0]["lr"], 6)
        0.489291
        >>> opt.step(); sched.step(); opt.param_groups[0]["lr"]  # ... to the base lr
        0.5
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base: BaseSchedule = None,
        rule: Rule = "edge",
        max_edge_ratio: float | None = None,
        growth_edge_ratio: float | None = None,
        max_growth: float | None = None,
        safety: float = 0.9,
        min_lr: float | Sequence[float] = 0.0,
        min_lr_ratio: float = 0.0,
        warn_missing: bool = True,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer.")
        if rule not in _RULES:
            raise ValueError(f"`rule` must be one of {_RULES}, got {rule!r}.")
        adaptive = is_adaptive(optimizer)
        if max_edge_ratio is None:
            max_edge_ratio = _ADAPTIVE_MAX_EDGE_RATIO if adaptive else 1.0
        if isinstance(max_edge_ratio, bool) or not (float(max_edge_ratio) >= 1.0 and math.isfinite(max_edge_ratio)):
            raise ValueError(f"Expected a finite max_edge_ratio >= 1, got max_edge_ratio={max_edge_ratio!r}.")
        if max_growth is not None and (
            isinstance(max_growth, bool) or not (float(max_growth) > 1.0 and math.isfinite(max_growth))
        ):
            raise ValueError(f"Expected None or a finite max_growth > 1, got max_growth={max_growth!r}.")
        safety = float(safety)
        if not 0.0 < safety <= 1.0:
            raise ValueError(f"Expected 0 < safety <= 1, got safety={safety!r}.")
        if growth_edge_ratio is None:
            growth_edge_ratio = min(_ADAPTIVE_MAX_EDGE_RATIO, float(max_edge_ratio)) if adaptive else safety
        if isinstance(growth_edge_ratio, bool) or not 0.0 < float(growth_edge_ratio) <= float(max_edge_ratio):
            raise ValueError(
                f"Expected 0 < growth_edge_ratio <= max_edge_ratio={max_edge_ratio}, got {growth_edge_ratio!r}."
            )
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

        self.rule: Rule = rule
        self.max_edge_ratio = float(max_edge_ratio)
        self.growth_edge_ratio = float(growth_edge_ratio)
        self.max_growth = None if max_growth is None else float(max_growth)
        # while held by the edge, a new measurement is useful once the optimizer has responded: 1/(1 - β) steps
        self.hold_interval = max(1, round(min(1.0 / math.log(g) for g in self._default_growths(optimizer))))
        self.growths = [
            default_growth(optimizer.param_groups[i]) if max_growth is None else float(max_growth)
            for i in range(n_groups)
        ]
        self.safety = safety
        self.min_lrs = mins
        #: the absolute floor of a parameter group added after construction: ``min_lr`` if it was one number
        self.min_lr_for_added_groups = mins[0] if isinstance(min_lr, (int, float)) else 0.0
        self.min_lr_ratio = float(min_lr_ratio)
        self.warn_missing = bool(warn_missing)
        self.sharpness: float | None = None
        self.sharpness_step: int | None = None
        self.num_observations = 0
        self.num_rejected = 0
        self.num_resets = 0  # measurements that found the run past max_edge_ratio times the edge (edge rule)
        self.reset_steps: list[int | None] = []  # their steps (for inspection)
        self._reset_pending = False
        self._bound_active = False  # the coming update's lr is held by growth_edge_ratio times the last edge
        self._init_feed()
        self.constants = [max_stable_lr(optimizer, 1.0, i) for i in range(n_groups)]
        self.base_values: list[float] = [_as_float(g["lr"]) for g in optimizer.param_groups]
        self.lrs_in_use: list[float] = list(self.base_values)
        super().__init__(optimizer, last_epoch)  # last: it runs the first step (get_lr)

    @staticmethod
    def _default_growths(optimizer: torch.optim.Optimizer) -> list[float]:
        return [default_growth(g) for g in optimizer.param_groups]

    def _adopt_group(self, index: int, group: dict) -> None:
        lr = _as_float(group["lr"])
        self.constants.append(max_stable_lr(self.optimizer, 1.0, index))
        self.growths.append(default_growth(group) if self.max_growth is None else self.max_growth)
        self.min_lrs.append(self.min_lr_for_added_groups)
        self.base_values.append(lr)
        self.lrs_in_use.append(lr)

    # -- feeding --------------------------------------------------------------------------------------------------
    def observe_sharpness(self, sharpness: float | torch.Tensor, step: int | None = None) -> None:
        """Record a sharpness measurement; it takes effect at the next :meth:`step` (at once before the first).

        Non-finite, zero or negative values are ignored (the last good one is kept) with one warning per
        scheduler.

        Args:
            sharpness: top Hessian eigenvalue (preconditioned for Adam/AdamW/RMSprop), measured at the parameters
                the update ``step`` starts from.
            step: optimizer steps taken before the measurement (kept for inspection).
        """
        value = _as_float(sharpness)
        self._adopt_new_groups()
        self.num_observations += 1
        if not (value > 0 and math.isfinite(value)):
            self.num_rejected += 1
            self._warn_bad_once(
                f"SharpnessAwareLR ignored a sharpness of {value!r} (non-finite, zero or negative) and keeps "
                f"the last good value {self.sharpness!r}; further bad values are ignored silently."
            )
            return
        first = self.sharpness is None
        self.sharpness = value
        self.sharpness_step = None if step is None else int(step)
        if self.rule == "edge":
            runaway = any(self._edge_ratio(i) > self.max_edge_ratio for i in range(len(self.lrs_in_use)))
            if runaway and not first:
                self.num_resets += 1
                self.reset_steps.append(self.sharpness_step)
            self._reset_pending = self._reset_pending or first or runaway
        if self.last_epoch <= 0:  # nothing stepped yet: the initial lrs follow the measurement at once
            self._set(self._rule_lrs())

    # -- inspection -----------------------------------------------------------------------------------------------
    def _edge_ratio(self, group: int) -> float:
        assert self.sharpness is not None
        return self.lrs_in_use[group] * self.sharpness / self.constants[group]

    def edge_ratios(self) -> list[float] | None:
        r""":math:`\eta\lambda/c` of each group's current lr and the latest sharpness (``None`` before any)."""
        if self.sharpness is None:
            return None
        self._adopt_new_groups()
        return [self._edge_ratio(i) for i in range(len(self.lrs_in_use))]

    def max_stable_lrs(self) -> list[float] | None:
        """Largest stable lr (the edge) of each group for the latest sharpness (``None`` before any)."""
        if self.sharpness is None:
            return None
        self._adopt_new_groups()
        return [c / self.sharpness for c in self.constants]

    def wants_measurement(self, step: int | None = None) -> bool:
        """Whether a new measurement would change what this scheduler does next.

        ``True`` before the first measurement, and (edge rule) while the lr is held by ``growth_edge_ratio`` times
        the last measured edge below the base schedule and the growth limit (only a new measurement can let it
        rise), once :attr:`hold_interval` steps (:math:`1/(1-\beta)`, the optimizer's momentum memory) have passed
        since the last measurement. A monitor may measure when this is ``True`` and at its own cadence otherwise.

        Args:
            step: the step about to be taken (optimizer steps so far); ``None`` skips the interval check.
        """
        if self.sharpness is None:
            return True
        if self.rule != "edge" or not self._bound_active:
            return False
        if step is None or self.sharpness_step is None:
            return True
        return step - self.sharpness_step >= self.hold_interval

    # -- schedule -------------------------------------------------------------------------------------------------
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

    def _floor(self, i: int, base_lr: float) -> float:
        return max(self.min_lrs[i], self.min_lr_ratio * base_lr)

    def _rule_lrs(self) -> list[float]:
        """The lrs of the coming update from :attr:`base_values`, the previous lrs and the latest sharpness."""
        out = []
        bound_active = False
        for i, base_lr in enumerate(self.base_values):
            c, floor = self.constants[i], self._floor(i, base_lr)
            if self.rule == "cap":
                out.append(sharpness_aware_lr(base_lr, self.sharpness, c, safety=self.safety, min_lr=floor))
                continue
            lr = edge_following_lr(
                base_lr, self.lrs_in_use[i], self.sharpness, c, reset=self._reset_pending,
                growth_edge_ratio=self.growth_edge_ratio, reset_edge_ratio=self.safety,
                max_growth=self.growths[i], min_lr=floor,
            )  # fmt: skip
            if self.sharpness is not None and not self._reset_pending:
                bound = self.growth_edge_ratio * c / self.sharpness
                bound_active |= bound < min(base_lr, self.growths[i] * self.lrs_in_use[i])
            out.append(lr)
        self._bound_active = bound_active
        if self.sharpness is not None:
            self._reset_pending = False
        return out

    def _set(self, lrs: list[float]) -> None:
        self.lrs_in_use = list(lrs)
        self._apply(lrs)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Step the base schedule (not on the initial call) and return the lrs of the coming update."""
        self._adopt_new_groups()
        if not self._is_initial:
            self._raise_if_never_fed(_MISSING_FEED)
            if self._base_scheduler is not None:
                # the base sees its own unclamped values, so chainable schedules do not compound the clamp
                self._apply(self.base_values)
                self._base_scheduler.step()
        self.base_values = self._read_base()
        lrs = self._rule_lrs()
        self.lrs_in_use = list(lrs)
        return lrs

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
