"""What both curvature monitors share: argument checks, cadence, the step axis, logging, state and DDP reduce.

Step axis: every value is written at ``trainer.fit_loop.epoch_loop._batches_that_stepped`` (the number of
optimizer steps taken so far), the step ``LearningRateMonitor`` and the training loss are logged at. Step
measurements run in ``on_train_batch_start``, before the batch's update, so the value at step ``t`` is the
curvature at the parameters the ``t``-th update starts from (step 0: the initial parameters), next to the loss
of the same batch and the learning rate of the same update.

Cadence. A fixed ``every_n_steps`` measures at every multiple of it: the measured steps are known in advance and
the series is exactly reproducible. ``every_n_steps=None`` (the default) plans the cadence from a wall-time
budget ``max_overhead`` (:func:`adaptive_gap`): measure at step 0, then after each measurement the next one
``gap = ceil(t_measure / (max_overhead * t_step))`` steps later, clamped to ``[min_gap, max_gap]``, with
``t_measure`` the wall time of the measurement just done and ``t_step`` an exponential moving average of the wall
time of one optimizer step, timed between consecutive ``on_train_batch_start`` calls without the time any curvature
monitor of the process spent measuring (data loading and other callbacks count as training time; the first step of
a fit, with its one-off costs, is not averaged, and an interval longer than ``EMA_CLIP`` times the average, such as
a validation run, counts as that many: step-time outliers would otherwise swing the plan). Until a step has been
timed (the step-0 measurement of a fresh run) the next measurement is provisionally planned ``min_gap`` steps later
and re-planned there. Only ``time.perf_counter`` is read per step (no device sync: on an accelerator the work still
queued from the previous step is counted in the measurement, which syncs; a slight overestimate). Under DDP rank
0's plan is broadcast at each measurement, so all processes measure at the same steps. The plan (next step,
step-time average, last measurement time) is checkpointed, so a resumed run continues it. The budget is per monitor
instance: two monitors at 0.05 cost about 10% together.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_curvature.callbacks._batch_source import BatchSource
from lightning_curvature.callbacks._compiled import lightning_eager
from lightning_curvature.callbacks._loss import LossFn, resolve_loss_fn
from lightning_curvature.core import NonFiniteCurvatureError, preserved_model_state
from lightning_curvature.core._batch import iter_batches

__all__ = [
    "SUPPORTED_STRATEGIES",
    "CurvatureMonitorBase",
    "adaptive_gap",
    "check_choice",
    "check_overhead",
    "check_positive_float",
    "check_positive_int",
    "check_strategy",
    "log_scalars",
    "make_reduce_fn",
    "measured_parameters",
    "step_axis",
]

#: What the monitors support, quoted in the error raised for other strategies.
SUPPORTED_STRATEGIES = (
    "single device ('auto', SingleDeviceStrategy), DDP ('ddp', 'ddp_spawn', 'ddp_fork'), and for the Hessian "
    "monitor also FSDP (ModelParallelStrategy with fully_shard, FSDPStrategy)"
)
_UNSUPPORTED = ("DeepSpeedStrategy",)
_SHARDED = ("FSDPStrategy", "ModelParallelStrategy")

#: The clock of the adaptive cadence (a module global so that tests can replace it with a fake clock).
_now: Callable[[], float] = time.perf_counter
#: Smoothing of the step-time average: ``ema += max(1/n, EMA_WEIGHT) * (dt - ema)`` for the ``n``-th timed step
#: (a running mean for the first ``1/EMA_WEIGHT`` steps, then an exponential average over about as many steps).
EMA_WEIGHT = 0.02
#: A step interval longer than this many times the average (validation, checkpointing, a stall) counts as this many.
EMA_CLIP = 10.0


class _MeasuringClock:
    """Wall time spent measuring by every curvature monitor of this process (subtracted from step times)."""

    total_s = 0.0


def adaptive_gap(t_measure: float, t_step: float, max_overhead: float, min_gap: int = 10, max_gap: int = 10_000) -> int:
    r"""Steps until the next measurement so that measuring costs ``max_overhead`` of the training time.

    .. math:: \mathrm{gap} = \operatorname{clamp}\left(\left\lceil
        \frac{t_\mathrm{measure}}{\mathrm{max\_overhead}\cdot t_\mathrm{step}} \right\rceil,
        \ \mathrm{min\_gap},\ \mathrm{max\_gap}\right)

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


# --- argument checks ------------------------------------------------------------------------------------------
def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``.

    Raises:
        MisconfigurationException: naming ``name`` and the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MisconfigurationException(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a finite float ``> 0``.

    Raises:
        MisconfigurationException: naming ``name`` and the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise MisconfigurationException(f"`{name}` must be a positive finite number, got {value!r}.")
    return float(value)


def check_overhead(value: Any) -> float:
    """``value`` as a float in ``(0, 1]`` (the ``max_overhead`` budget).

    Raises:
        MisconfigurationException: naming ``max_overhead`` and the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise MisconfigurationException(
            f"`max_overhead` must be a fraction of the training time in (0, 1], got {value!r}."
        )
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        MisconfigurationException: naming ``name``, the choices and the bad value.
    """
    if value not in choices:
        raise MisconfigurationException(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
    return str(value)


def check_strategy(strategy: Any, owner: str, sharded_ok: bool = False) -> None:
    """Reject strategies the monitor cannot measure under.

    Sharded strategies (FSDP) are supported where ``sharded_ok`` (Hessian products by finite differences through
    the shards); DeepSpeed is not (its ZeRO stages partition parameters outside ``torch.distributed.tensor``).

    Raises:
        MisconfigurationException: for DeepSpeed, or a sharded strategy where ``sharded_ok`` is false, naming what
            is supported.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names.intersection(_UNSUPPORTED) or (names.intersection(_SHARDED) and not sharded_ok):
        raise MisconfigurationException(
            f"{owner} does not support the strategy {type(strategy).__name__}; supported are {SUPPORTED_STRATEGIES}."
        )


# --- trainer helpers ------------------------------------------------------------------------------------------
def step_axis(trainer: pl.Trainer) -> int:
    """The step every curvature value is logged at: optimizer steps taken so far (``LearningRateMonitor``'s)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def make_reduce_fn(trainer: pl.Trainer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A SUM all-reduce through the strategy when there are several processes, else ``None``."""
    if trainer.world_size <= 1:
        return None
    strategy = trainer.strategy

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:
        return strategy.reduce(t.clone(), reduce_op="sum")  # the DDP reduce works in place

    return reduce_fn


def first_optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer | None:
    """``trainer.optimizers[0]``, whose parameters and hyperparameters the monitors measure, or ``None``."""
    return trainer.optimizers[0] if trainer.optimizers else None


def measured_parameters(pl_module: torch.nn.Module, optimizer: Any | None) -> list[torch.Tensor]:
    """Trainable parameters curvature is taken over: those managed by ``optimizer`` (all if ``None``)."""
    trainable: list[torch.Tensor] = [p for p in pl_module.parameters() if p.requires_grad]
    if optimizer is None:
        return trainable
    managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    chosen = [p for p in trainable if id(p) in managed]
    return chosen or trainable


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` through every logger (rank zero only; nothing without loggers)."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _is_finite(value: float | None, may_be_infinite: bool = False) -> bool:
    if value is None:
        return True
    return not math.isnan(value) if may_be_infinite else math.isfinite(value)


# --- base callback --------------------------------------------------------------------------------------------
class CurvatureMonitorBase(Callback):
    """Cadence, batch, loss, logging, state and failure handling shared by the curvature monitors.

    Subclasses implement :meth:`_measure` (return the scalars to log; may raise
    :class:`~lightning_curvature.core.NonFiniteCurvatureError`) and :meth:`_failed_metrics`.

    Attributes:
        history: ``(step, value)`` of the headline quantity at every measurement (sharpness, ``grad_cov/eig_1``);
            checkpointed, so a resumed run continues it. It accumulates across fits with the same instance.
        last_metrics: every scalar of the latest measurement (NaN where it failed); checkpointed.
        num_measurements: measurements so far; checkpointed.
        last_step: step of the latest measurement in this fit (``-1``: none yet); checkpointed.
        measure_time_s: wall time spent measuring in this process (not checkpointed).
        train_time_s: wall time of the training steps timed in this fit, without any monitor's measuring time (not
            checkpointed).
        min_gap: fewest steps between adaptive measurements (class attribute; an instance may override it).
        max_gap: most steps between adaptive measurements.
    """

    #: Tag shown in the progress bar (``None``: none).
    _prog_bar_key: str | None = None
    #: Tag whose value goes into :attr:`history`.
    _headline_key: str = ""
    #: Tags for which ``inf`` is a legitimate value (e.g. a condition number with ``λ_k = 0``).
    _may_be_infinite: frozenset[str] = frozenset()
    #: Tag of the realised overhead (measuring time / training time in this fit).
    _overhead_key: str = ""
    #: Whether the monitor measures under sharded strategies (FSDP).
    _sharded_ok: bool = False
    min_gap: int = 10
    max_gap: int = 10_000

    def __init__(
        self,
        *,
        every_n_steps: int | None,
        max_overhead: float,
        batch: Any,
        num_examples: int | None,
        loss_fn: LossFn | None,
        on_epoch_end: bool,
        prog_bar: bool,
    ) -> None:
        self.every_n_steps = None if every_n_steps is None else check_positive_int("every_n_steps", every_n_steps)
        self.max_overhead = check_overhead(max_overhead)
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException(
                f"`loss_fn` must be callable as loss_fn(pl_module, batch), got {loss_fn!r}."
            )
        if not isinstance(on_epoch_end, bool):
            raise MisconfigurationException(f"`on_epoch_end` must be a bool, got {on_epoch_end!r}.")
        self._source = BatchSource(batch, num_examples)
        self.loss_fn = loss_fn
        self.on_epoch_end = on_epoch_end
        self.prog_bar = bool(prog_bar)
        self._resolved_loss: LossFn | None = None
        self._last_batch: Any = None
        # checkpointed state
        self.num_measurements = 0
        self.last_step = -1
        self.history: list[tuple[int, float]] = []
        self.last_metrics: dict[str, float] = {}
        # adaptive plan (checkpointed): next step, provisional flag, step-time average, last measuring time
        self._next_step = 0
        self._provisional = False
        self._step_time_ema: float | None = None
        self._last_measure_s = 0.0
        # not checkpointed
        self.measure_time_s = 0.0
        self.train_time_s = 0.0
        self._fit_measure_s = 0.0
        self._t_prev: float | None = None  # clock at the latest step change, and what had been spent measuring then
        self._spent_prev = 0.0
        self._step_prev = -1
        self._ema_count = 0  # steps averaged into the step-time average (a resumed average counts as settled)
        self._skip_interval = False  # the next step interval is not averaged (the first of a fit)

    # -- identity and state -------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "batch": self._source.key}

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): build it once, the identity never changes
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(**self._identity())
        return key

    # -- public view of the plan ----------------------------------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        """Whether the cadence is planned from the ``max_overhead`` budget (``every_n_steps=None``)."""
        return self.every_n_steps is None

    @property
    def next_step(self) -> int:
        """Step of the next planned measurement (fixed cadence: the next multiple of ``every_n_steps``)."""
        if self.every_n_steps is None:
            return self._next_step
        n = self.every_n_steps
        return (self.last_step // n + 1) * n if self.last_step >= 0 else 0

    @property
    def step_time_s(self) -> float | None:
        """Moving average of the wall time of one training step (``None`` before a step was timed)."""
        return self._step_time_ema

    @property
    def overhead(self) -> float | None:
        """Realised overhead in this fit: measuring time / timed training time (``None`` before a step was timed).

        It counts the step-0 measurement, which no training time has paid for yet, so under the adaptive cadence
        it approaches ``max_overhead`` from above (after ``n`` equal measurements about ``max_overhead·n/(n−1)``).
        """
        return self._fit_measure_s / self.train_time_s if self.train_time_s > 0 else None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_measurements": self.num_measurements,
            "last_step": self.last_step,
            "history": [[int(s), float(v)] for s, v in self.history],
            "last_metrics": {k: float(v) for k, v in self.last_metrics.items()},
            "next_step": int(self._next_step),
            "plan_provisional": bool(self._provisional),
            "step_time_ema_s": None if self._step_time_ema is None else float(self._step_time_ema),
            "last_measure_s": float(self._last_measure_s),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_measurements = int(state_dict.get("num_measurements", 0))
        self.last_step = int(state_dict.get("last_step", -1))
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self.last_metrics = {k: float(v) for k, v in state_dict.get("last_metrics", {}).items()}
        # checkpoints without a plan: re-plan `min_gap` steps after the latest measurement
        default_next = self.last_step + self.min_gap if self.last_step >= 0 else 0
        self._next_step = int(state_dict.get("next_step", default_next))
        self._provisional = bool(state_dict.get("plan_provisional", "next_step" not in state_dict))
        ema = state_dict.get("step_time_ema_s")
        self._step_time_ema = None if ema is None else float(ema)
        self._last_measure_s = float(state_dict.get("last_measure_s", 0.0))

    # -- hooks --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, type(self).__name__, sharded_ok=self._sharded_ok)
        if stage == "fit":
            self._resolved_loss = resolve_loss_fn(pl_module, self.loss_fn)
            # a new fit starts its own step axis and plan; a resumed one gets `last_step` and the plan back from the
            # checkpoint (callbacks' states are loaded after `setup`)
            self.last_step = -1
            self._next_step, self._provisional, self._step_time_ema, self._last_measure_s = 0, False, None, 0.0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resolved_loss is None:
            self._resolved_loss = resolve_loss_fn(pl_module, self.loss_fn)
        self._source.prepare(trainer, pl_module)
        self.train_time_s, self._fit_measure_s, self._t_prev, self._step_prev = 0.0, 0.0, None, -1
        self._ema_count = 0 if self._step_time_ema is None else round(1 / EMA_WEIGHT)
        self._skip_interval = True  # the first step of a fit carries one-off costs

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._source.kind == "current":
            self._last_batch = batch
        step = step_axis(trainer)
        self._time_step(step)
        if step == self.last_step:
            return
        if self.every_n_steps is not None:
            if step % self.every_n_steps == 0:
                self.measure(trainer, pl_module, batch, step, prog_bar=self.prog_bar)
            return
        if step < self._next_step:
            return
        if self._provisional:
            self._replan(trainer, step)
            if step < self._next_step:
                return
        self.measure(trainer, pl_module, batch, step, prog_bar=self.prog_bar)
        self._plan(trainer, step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = step_axis(trainer)
        if not self.on_epoch_end or step == self.last_step:
            return
        if self._source.kind == "current" and self._last_batch is None:
            return  # no training batch seen yet
        self.measure(trainer, pl_module, self._last_batch, step, prog_bar=False)
        if self.every_n_steps is None:
            self._plan(trainer, step)

    # -- adaptive cadence -----------------------------------------------------------------------------------------
    def _time_step(self, step: int) -> None:
        """Update the step-time average when the step axis has moved (hot path: one clock read, no sync)."""
        if step == self._step_prev:
            return  # gradient accumulation: the optimizer step is still running
        now, spent = _now(), _MeasuringClock.total_s
        if self._t_prev is not None and step > self._step_prev:
            dt = max(0.0, (now - self._t_prev) - (spent - self._spent_prev))
            self.train_time_s += dt
            per_step = dt / (step - self._step_prev)
            ema = self._step_time_ema
            if self._skip_interval:
                self._skip_interval = False
            elif ema is None:
                self._step_time_ema, self._ema_count = per_step, 1
            else:
                self._ema_count += 1
                per_step = min(per_step, EMA_CLIP * ema)
                self._step_time_ema = ema + max(1.0 / self._ema_count, EMA_WEIGHT) * (per_step - ema)
        self._t_prev, self._spent_prev, self._step_prev = now, spent, step

    def _gap(self, t_measure: float, t_step: float) -> int:
        """Steps from a measurement that took ``t_measure`` to the next one (:func:`adaptive_gap`)."""
        return adaptive_gap(t_measure, t_step, self.max_overhead, self.min_gap, self.max_gap)

    def _agree(self, trainer: pl.Trainer, next_step: int, provisional: bool) -> None:
        """Adopt rank 0's plan on every process (the measurement all-reduces: all must measure together)."""
        if trainer.world_size > 1:
            next_step, provisional = trainer.strategy.broadcast((int(next_step), bool(provisional)), src=0)
        self._next_step, self._provisional = int(next_step), bool(provisional)

    def _plan(self, trainer: pl.Trainer, step: int) -> None:
        """Plan the next measurement after the one just done at ``step``."""
        if self._step_time_ema is None:  # no step timed yet: a conservative gap, re-planned when it is reached
            self._agree(trainer, step + self.min_gap, True)
        else:
            self._agree(trainer, step + self._gap(self._last_measure_s, self._step_time_ema), False)

    def _replan(self, trainer: pl.Trainer, step: int) -> None:
        """At a provisional step: plan from the latest measurement with the step time known by now."""
        if self._step_time_ema is None:
            self._agree(trainer, step + self.min_gap, True)
        else:
            self._agree(trainer, self.last_step + self._gap(self._last_measure_s, self._step_time_ema), False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._last_batch = None
        self._source.release()

    # -- measurement --------------------------------------------------------------------------------------------
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, current_batch: Any, step: int, prog_bar: bool
    ) -> dict[str, float]:
        """Measure now, log at ``step``, update state; a NaN/inf result is logged as such with a warning.

        Returns:
            The scalars written to the loggers.
        """
        t0 = _now()
        batch = self._source.get(current_batch)
        loss_fn = self._resolved_loss or resolve_loss_fn(pl_module, self.loss_fn)
        error: str | None = None
        if not self._all_ranks_finite(trainer, pl_module, loss_fn, batch):
            error = "the loss of the curvature batch is NaN or infinite"
            metrics = self._failed_metrics(trainer)
        else:
            try:
                eager = lightning_eager(pl_module) if self._eager_measurement() else nullcontext()
                with eager:  # Lightning-compiled methods run eagerly where the measurement needs it
                    metrics = self._measure(trainer, pl_module, loss_fn, batch, step)
            except NonFiniteCurvatureError as exc:
                error = str(exc)
                metrics = self._failed_metrics(trainer)
        bad = sorted(k for k, v in metrics.items() if not _is_finite(v, k in self._may_be_infinite))
        if error is None and bad:
            error = f"non-finite values for {bad}"
        if error is not None:
            rank_zero_warn(
                f"{type(self).__name__}: the measurement at step {step} is not finite ({error}); it is logged as "
                "NaN/inf and not passed to schedulers. Training continues."
            )
        elapsed = _now() - t0
        if self._overhead_key and self.train_time_s > 0:
            metrics[self._overhead_key] = (self._fit_measure_s + elapsed) / self.train_time_s
        self.num_measurements += 1
        self.last_step = step
        self.last_metrics = dict(metrics)
        self.history.append((step, float(metrics.get(self._headline_key, math.nan))))
        log_scalars(trainer, metrics, step)
        if prog_bar and self._prog_bar_key is not None and self._prog_bar_key in metrics:
            pl_module.log(
                self._prog_bar_key, metrics[self._prog_bar_key], prog_bar=True, logger=False, on_step=True,
                on_epoch=False,
            )  # fmt: skip
        self._after_measurement(trainer, pl_module, metrics, step, ok=error is None)
        elapsed = _now() - t0
        self._last_measure_s = elapsed
        self._fit_measure_s += elapsed
        self.measure_time_s += elapsed
        _MeasuringClock.total_s += elapsed
        return metrics

    def _all_ranks_finite(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, batch: Any
    ) -> bool:
        """Under DDP, agree on whether every rank's loss is finite before any collective call.

        The engine raises on a non-finite local loss before its first all-reduce; a rank raising alone would
        leave the others waiting in the all-reduce forever. Single process: ``True`` (the engine decides).
        """
        if trainer.world_size <= 1:
            return True
        ok = True
        with preserved_model_state(pl_module, self._mode_for(pl_module)), torch.no_grad():
            for b in iter_batches(batch):
                loss = loss_fn(pl_module, b)
                ok = ok and bool(torch.isfinite(loss.detach()).all())
        return bool(trainer.strategy.reduce_boolean_decision(ok, all=True))

    def _eager_measurement(self) -> bool:
        """Whether to run Lightning-compiled methods eagerly during a measurement (double backward and vmap need it)."""
        return True

    def _mode_for(self, pl_module: torch.nn.Module) -> Any:
        return getattr(self, "mode", "train")

    @abstractmethod
    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, batch: Any, step: int
    ) -> dict[str, float]:
        """The scalars of one measurement (may raise ``NonFiniteCurvatureError``)."""

    @abstractmethod
    def _failed_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The scalars logged when a measurement fails (NaN)."""

    def _after_measurement(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float], step: int, ok: bool
    ) -> None:
        """Hook run after logging (TensorBoard extras, schedulers)."""
