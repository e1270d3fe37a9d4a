r"""CurvatureDynamicsAwareLR: Curvature Dynamics Aware Tuning (CDAT, Roulet et al. 2024).

Along the base optimizer's update direction :math:`u_t` (the step it would take with learning rate 1, see
:func:`~lightning_curvature.core.update_direction.update_direction`) the loss is, to second order,

.. math::

    L(\theta_t + \eta u_t) \approx L(\theta_t) - \eta\, n_t + \tfrac{\eta^2}{2}\, d_t, \qquad
    n_t = \max(-g_t^\top u_t, 0), \quad d_t = |u_t^\top H_t u_t| .

The quadratically greedy step (the model's minimiser) is :math:`n_t/d_t`; the step at which the model comes
back to the current loss, the *edge*, is :math:`2 n_t/d_t`. CDAT takes

.. math::

    \eta_t = \sigma\, \frac{\bar n_t}{\bar d_t + \varepsilon},

with :math:`\bar n_t, \bar d_t` exponential moving averages. :math:`\sigma = 1` is greedy; :math:`\sigma = 2`
("on the edge") is the paper's recommendation in full batch, where it beats greedy tuning and tuned constant
learning rates and shows a warm-up-like rise of the learning rate. In mini-batch the best :math:`\sigma` shrinks
with the batch size.

Reference:
    V. Roulet, A. Agarwala, J.-B. Grill, G. Swirszcz, M. Blondel, F. Pedregosa, "Stepping on the Edge: Curvature
    Aware Learning Rate Tuners", NeurIPS 2024, arXiv 2407.06183 (section 3 and appendix).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch

from lightning_curvature.schedules._fed import FedScheduler

__all__ = ["CurvatureDynamicsAwareLR", "cdat_learning_rate", "ema_update"]

_MISSING_FEED = (
    "CurvatureDynamicsAwareLR was stepped but never received a measurement and no monitor is attached. In "
    "Lightning, add the callback that feeds it: `Trainer(callbacks=[DirectionalCurvatureMonitor()])` "
    "(from lightning_curvature import DirectionalCurvatureMonitor). In a plain PyTorch loop, call "
    "`scheduler.observe_direction(numerator=..., denominator=..., step=...)` after `loss.backward()` and before "
    "`optimizer.step()` (see examples/plain_pytorch_cdat.py)."
)

_TRANSIENT = ("optimizer", "_monitor_attached")
_LOSS_BETA = 0.9  # EMA of the fed losses for runaway detection
_LOSS_MIN_COUNT = 10  # losses seen before a rise can count as a runaway


def cdat_learning_rate(numerator: float, denominator: float, *, sigma: float = 2.0, eps: float = 0.0) -> float:
    r"""The CDAT rule :math:`\eta = \sigma\, n / (d + \varepsilon)`. Pure: no optimizer, no state.

    Args:
        numerator: :math:`n = \max(-g^\top u, 0)` (or its moving average); negative values are clipped to 0.
        denominator: :math:`d = |u^\top H u|` (or its moving average); its absolute value is used.
        sigma: scaling factor: 1 is quadratically greedy, 2 is on the edge.
        eps: :math:`\varepsilon` added to the denominator.

    Returns:
        The learning rate (``inf`` when the denominator and ``eps`` are both 0 and the numerator is positive;
        0 when the numerator is 0).

    Example::

        >>> # quadratic with H = diag(1, 4), gradient g = (1, 1), GD direction u = -g: n = 2, d = 5
        >>> cdat_learning_rate(2.0, 5.0, sigma=1.0)  # greedy
        0.4
        >>> cdat_learning_rate(2.0, 5.0, sigma=2.0)  # edge
        0.8
    """
    n = max(float(numerator), 0.0)
    d = abs(float(denominator)) + float(eps)
    if n == 0.0:
        return 0.0
    if d == 0.0:
        return math.inf
    return float(sigma) * n / d


def ema_update(average: float, value: float, beta: float) -> float:
    r"""One step of the (biased) exponential moving average :math:`\beta a + (1-\beta) x`.

    Example::

        >>> ema_update(0.0, 1.0, 0.9)
        0.09999999999999998
    """
    return beta * average + (1.0 - beta) * value


class CurvatureDynamicsAwareLR(FedScheduler):
    r"""Set the learning rate at every step from the curvature along the optimizer's own update direction.

    .. math::

        \bar n_t = \beta \bar n_{t-1} + (1-\beta) n_t, \quad
        \bar d_t = \beta \bar d_{t-1} + (1-\beta) d_t, \quad
        \eta_t = \operatorname{clip}_{[\eta_{\min}, \eta_{\max}]}
        \Bigl(\sigma\, \frac{\bar n_t / (1-\beta^k)}{\bar d_t / (1-\beta^k) + \varepsilon}\Bigr)

    with :math:`n_t = \max(-g_t^\top u_t, 0)`, :math:`d_t = |u_t^\top H_t u_t|`, :math:`k` the number of accepted
    measurements, and parameter group ``i`` getting :math:`\eta_t\cdot r_i`, :math:`r_i` = its initial lr over
    group 0's (one scalar tuner, the relative group lrs of the optimizer kept). See :func:`cdat_learning_rate`.

    **Defaults.** ``sigma=2.0``: the paper's "on edge" setting (its section 3 and figure 5); in mini-batch the best
    σ shrinks with the batch size. ``ema_beta=0.9``: numerator and denominator are averaged *separately* (a ratio
    of averages), which the paper reports makes CDAT robust to the batch size; both averages are bias-corrected, so
    the first step is the raw rule. **Use** ``ema_beta=0`` **in full-batch training**, where the raw rule did
    better. ``eps``: only keeps the denominator away from zero; ``lr_max`` guards against vanishing curvature. The
    measurements behind these choices are in ``benchmarks/README.md``.

    **Bounded, and a runaway detected.** The rule trusts a quadratic model of the loss along :math:`u_t`; where
    the curvature along the update vanishes (saturated softmax, dead ReLUs, a flat direction) :math:`\bar d_t \to 0`
    and the model's step, the loss and the lr grow without bound together. Two guards, on by default:

    * ``lr_max="auto"``: :math:`\eta_t \le` ``max_lr_factor`` (10) times the optimizer's initial lr (group 0's),
      a scale the user chose; ``lr_max=None`` is the paper's unbounded rule.
    * Runaway detection, armed when the monitor passes the step's ``loss`` to :meth:`observe_direction`: on the
      edge (σ = 2) the model predicts the loss to come back to its current value, not to grow, so a smoothed loss
      (EMA 0.9, bias-corrected) above ``runaway_factor`` (2) times its minimum, or a non-finite loss, falsifies it.
      Then the lr is bounded from that step on by the lr in force when the smoothed loss was lowest, and a
      ``RuntimeWarning`` says so (once).

    **Where CDAT helps and where it does not.** Full-batch (or large-batch) gradient descent, momentum and Adam
    without decoupled weight decay: the regime of the paper, where σ = 2 beats tuned constant lrs with a
    warm-up-like rise. Small mini-batches: the best σ shrinks with the batch size and the tuned lr is noisy. AdamW:
    the decoupled decay enters the direction and, as
    :func:`~lightning_curvature.core.update_direction.directional_terms` counts it, the numerator, which turns
    negative once the weights grow, so the lr collapses (see the README's GPT study). Cost: one Hessian-vector
    product per step on the training batch.

    **Feeding it.** In Lightning, :class:`~lightning_curvature.callbacks.DirectionalCurvatureMonitor` computes
    :math:`n_t, d_t` in ``on_before_optimizer_step`` (one Hessian-vector product on the current batch) and calls
    :meth:`observe_direction`, which writes the lr *for this step* at once; :meth:`step`, called by Lightning
    after ``optimizer.step()``, only advances ``last_epoch``. In a plain loop: ``loss.backward()``, measure,
    ``observe_direction``, ``optimizer.step()``, ``scheduler.step()``. A non-finite measurement is skipped (the
    previous lr is kept) with a single warning.

    Args:
        optimizer: the optimizer whose lr is tuned; its initial lrs fix the relative lrs of the groups.
        sigma: scaling factor :math:`\sigma > 0` (1 greedy, 2 on the edge).
        ema_beta: EMA factor :math:`\beta \in [0, 1)` for :math:`\bar n, \bar d` (0: no averaging).
        eps: :math:`\varepsilon \ge 0` added to the averaged denominator.
        lr_min: floor on :math:`\eta_t` (group 0's lr).
        lr_max: cap on :math:`\eta_t`: ``"auto"`` (``max_lr_factor`` times the optimizer's initial lr of group 0),
            a float, or ``None`` for none. A detected runaway lowers it.
        max_lr_factor: the multiple of the initial lr ``lr_max="auto"`` allows.
        runaway_factor: a smoothed fed loss above this multiple of its minimum is a runaway (> 1).
        warn_missing: raise at the first :meth:`step` if no monitor is attached and nothing was observed.
        last_epoch: as in ``LRScheduler``.

    Raises:
        ValueError: for ``sigma``, ``ema_beta``, ``eps``, ``lr_min``, ``lr_max``, ``max_lr_factor`` or
            ``runaway_factor`` out of range, or a parameter group with a zero initial lr (its relative scale would
            be undefined).
        RuntimeError: from :meth:`step`, see ``warn_missing``.

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> sched = CurvatureDynamicsAwareLR(opt, sigma=2.0, ema_beta=0.0)
        >>> sched.observe_direction(numerator=2.0, denominator=5.0, step=0)
        >>> round(opt.param_groups[0]["lr"], 6)  # 2 * 2 / 5
        0.8
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        sigma: float = 2.0,
        ema_beta: float = 0.9,
        eps: float = 1e-12,
        lr_min: float = 0.0,
        lr_max: float | Literal["auto"] | None = "auto",
        max_lr_factor: float = 10.0,
        runaway_factor: float = 2.0,
        warn_missing: bool = True,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer.")
        if not (float(sigma) > 0 and math.isfinite(sigma)):
            raise ValueError(f"Expected sigma > 0 (1 greedy, 2 on the edge), got sigma={sigma!r}.")
        if not 0.0 <= float(ema_beta) < 1.0:
            raise ValueError(f"Expected 0 <= ema_beta < 1, got ema_beta={ema_beta!r}.")
        if not (float(eps) >= 0 and math.isfinite(eps)):
            raise ValueError(f"Expected finite eps >= 0, got eps={eps!r}.")
        if not (float(lr_min) >= 0 and math.isfinite(lr_min)):
            raise ValueError(f"Expected finite lr_min >= 0, got lr_min={lr_min!r}.")
        if not (float(max_lr_factor) > 0 and math.isfinite(max_lr_factor)):
            raise ValueError(f"Expected a finite max_lr_factor > 0, got max_lr_factor={max_lr_factor!r}.")
        if not (float(runaway_factor) > 1 and math.isfinite(runaway_factor)):
            raise ValueError(f"Expected a finite runaway_factor > 1, got runaway_factor={runaway_factor!r}.")
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise ValueError(
                f"Every parameter group needs a positive initial lr (it fixes the groups' relative lrs), got {lrs}."
            )
        if lr_max == "auto":
            lr_max = float(max_lr_factor) * lrs[0]
        elif isinstance(lr_max, str):
            raise ValueError(f"`lr_max` must be a float, 'auto' or None, got {lr_max!r}.")
        if lr_max is not None and not (float(lr_max) > 0 and float(lr_max) >= float(lr_min)):
            raise ValueError(f"Expected lr_max > 0 and lr_max >= lr_min={lr_min}, got lr_max={lr_max!r}.")
        self.sigma = float(sigma)
        self.ema_beta = float(ema_beta)
        self.eps = float(eps)
        self.lr_min = float(lr_min)
        self.lr_max = None if lr_max is None else float(lr_max)
        self.max_lr_factor = float(max_lr_factor)
        self.runaway_factor = float(runaway_factor)
        self.warn_missing = bool(warn_missing)
        self.loss_avg = 0.0  # biased EMA of the fed losses (β = 0.9 whatever ema_beta), for runaway detection
        self.num_losses = 0
        self.best_loss: float | None = None  # smallest bias-corrected loss average so far ...
        self.lr_at_best_loss: float | None = None  # ... and the lr in force then
        self.num_runaways = 0
        self.runaway_steps: list[int | None] = []
        self.numerator_avg = 0.0  # biased EMAs (Adam-style); see `numerator`/`denominator` for corrected ones
        self.denominator_avg = 0.0
        self.num_accepted = 0
        self.num_observations = 0
        self.num_skipped = 0
        self.last_numerator: float | None = None
        self.last_denominator: float | None = None
        self.last_step: int | None = None
        self.eta: float | None = None
        self._init_feed()
        super().__init__(optimizer, last_epoch)  # last: it runs the first step (get_lr)

    # -- feeding --------------------------------------------------------------------------------------------------
    def _adopt_group(self, index: int, group: dict) -> None:
        # an added group keeps the ratio of its lr to group 0's current one (BackboneFinetuning: a tenth of it)
        self.base_lrs[index] = (
            float(group["lr"]) / float(self.optimizer.param_groups[0]["lr"]) * float(self.base_lrs[0])
        )

    def group_scales(self) -> list[float]:
        """:math:`r_i`: each group's initial lr over group 0's; group ``i`` gets ``η · r_i`` (a group added to the
        optimizer later keeps the ratio of its lr to group 0's when it was added)."""
        self._adopt_new_groups()
        ref = float(self.base_lrs[0])
        return [float(b) / ref for b in self.base_lrs]

    @property
    def numerator(self) -> float | None:
        r"""Bias-corrected :math:`\bar n_t` (``None`` before the first accepted measurement)."""
        if self.num_accepted == 0:
            return None
        return self.numerator_avg / (1.0 - self.ema_beta**self.num_accepted)

    @property
    def denominator(self) -> float | None:
        r"""Bias-corrected :math:`\bar d_t` (``None`` before the first accepted measurement)."""
        if self.num_accepted == 0:
            return None
        return self.denominator_avg / (1.0 - self.ema_beta**self.num_accepted)

    def edge_lr(self) -> float | None:
        r"""The edge step :math:`2\bar n_t/(\bar d_t + \varepsilon)` whatever :math:`\sigma` (unclipped)."""
        n, d = self.numerator, self.denominator
        if n is None or d is None:
            return None
        return cdat_learning_rate(n, d, sigma=2.0, eps=self.eps)

    def observe_direction(
        self,
        numerator: float | torch.Tensor,
        denominator: float | torch.Tensor,
        step: int | None = None,
        *,
        loss: float | torch.Tensor | None = None,
    ) -> None:
        r"""Feed :math:`n_t = \max(-g_t^\top u_t, 0)` and :math:`d_t = |u_t^\top H_t u_t|`; sets this step's lr.

        Negative numerators are clipped to 0 and the absolute value of the denominator is used, so the raw
        :math:`-g^\top u` and :math:`u^\top H u` may be passed. Non-finite values are skipped (the previous lr
        stays) with one warning per scheduler.

        Args:
            numerator: :math:`n_t` (or :math:`-g_t^\top u_t`).
            denominator: :math:`d_t` (or :math:`u_t^\top H_t u_t`).
            step: training step of the measurement (kept for inspection).
            loss: the training loss at the parameters this update starts from (the batch's loss), optional: it
                arms the runaway detection (see the class docstring). A non-finite loss is a runaway.
        """
        n = float(numerator.item()) if isinstance(numerator, torch.Tensor) else float(numerator)
        d = float(denominator.item()) if isinstance(denominator, torch.Tensor) else float(denominator)
        self.num_observations += 1
        self.last_step = None if step is None else int(step)
        if loss is not None:
            self._watch_loss(float(loss.item()) if isinstance(loss, torch.Tensor) else float(loss))
        if not (math.isfinite(n) and math.isfinite(d)):
            self.num_skipped += 1
            self._warn_bad_once(
                f"CurvatureDynamicsAwareLR skipped a non-finite measurement (numerator={n!r}, "
                f"denominator={d!r}) and keeps the previous lr; further ones are skipped silently."
            )
            return
        n, d = max(n, 0.0), abs(d)
        self.last_numerator, self.last_denominator = n, d
        self.numerator_avg = ema_update(self.numerator_avg, n, self.ema_beta)
        self.denominator_avg = ema_update(self.denominator_avg, d, self.ema_beta)
        self.num_accepted += 1
        n_bar, d_bar = self.numerator, self.denominator
        assert n_bar is not None and d_bar is not None
        eta = cdat_learning_rate(n_bar, d_bar, sigma=self.sigma, eps=self.eps)
        eta = max(eta, self.lr_min)
        if self.lr_max is not None:
            eta = min(eta, self.lr_max)
        if not math.isfinite(eta):
            # zero curvature and eps = 0 without lr_max: nothing sensible to set
            self.num_skipped += 1
            return
        self.eta = eta
        self._apply([eta * r for r in self.group_scales()])

    def _watch_loss(self, loss: float) -> None:
        """Runaway detection: the smoothed loss above ``runaway_factor`` times its minimum (or not finite)."""
        if math.isfinite(loss):
            self.loss_avg = ema_update(self.loss_avg, loss, _LOSS_BETA)
            self.num_losses += 1
            smoothed = self.loss_avg / (1.0 - _LOSS_BETA**self.num_losses)
            if self.best_loss is None or smoothed < self.best_loss:
                self.best_loss, self.lr_at_best_loss = smoothed, self.eta
                return
            rise = smoothed - self.best_loss
            if self.num_losses < _LOSS_MIN_COUNT or rise <= (self.runaway_factor - 1.0) * abs(self.best_loss):
                return
        self._runaway(loss)

    def _runaway(self, loss: float) -> None:
        """Bound the lr by the one in force at the best smoothed loss, and warn (once per scheduler)."""
        safe = self.lr_at_best_loss if self.lr_at_best_loss is not None else float(self.base_lrs[0])
        bound = max(self.lr_min, safe) if self.lr_max is None else max(self.lr_min, min(self.lr_max, safe))
        self.num_runaways += 1
        self.runaway_steps.append(self.last_step)
        if self.num_runaways == 1:
            warnings.warn(
                f"CurvatureDynamicsAwareLR: runaway detected at step {self.last_step} (loss {loss:.4g}, smoothed "
                f"loss above {self.runaway_factor:g}x its minimum {self.best_loss!r}, lr {self.eta!r}): the "
                f"quadratic model along the update no longer describes the loss. The lr is now bounded by "
                f"{bound:.4g}, the lr in force at the best loss. CDAT is for full-batch or large-batch training; "
                "see the README.",
                RuntimeWarning,
                stacklevel=3,
            )
        self.lr_max = bound
        self.best_loss, self.lr_at_best_loss = None, None  # watch again from here
        self.loss_avg, self.num_losses = 0.0, 0

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The lrs set by the last :meth:`observe_direction` (the initial lrs before any)."""
        self._adopt_new_groups()
        if not self._is_initial:
            self._raise_if_never_fed(_MISSING_FEED)
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain values only (EMAs, counters, last measurements)."""
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys keep their current values)."""
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in _TRANSIENT})
