"""The monitors' base classes: measuring safely (failures contained, DDP agreement), publishing, state.

Argument checks live in :mod:`._validation`, the Trainer helpers (step axis, reductions, logging) in
:mod:`._trainer`, the cadence in :mod:`.cadence`; their names are re-exported here.

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

Publication. Every value a measurement writes to the loggers is also put in ``trainer.callback_metrics`` under its
tag (as ``LearningRateMonitor`` does), so ``EarlyStopping(monitor="curvature/edge_ratio")`` and
``ModelCheckpoint(monitor=...)`` can use it. A failed measurement leaves the previous published values in place
(``EarlyStopping`` stops a run on a NaN it watches); before the first successful one the keys are absent.

Failures. A measurement that cannot be made, for any reason (too few examples, a loss that is not a finite
differentiable scalar, a non-finite product, an ambiguous batch layout, any exception raised by a product, such as
compiled code without a double backward), is skipped: it is logged as NaN, not passed to schedulers, not published,
and training goes on. One warning per monitor and kind of failure says why (later failures of the same kind are
counted in ``num_failures``; the exception is kept in ``last_error``). Under DDP the processes agree on success
before logging or feeding a scheduler (one boolean all-reduce), and the loss is checked on every process before the
first collective call of a measurement, so a failure of the loss on one process skips the measurement everywhere.
What cannot be guaranteed: an exception raised on one process only *inside* the engine, between its collective
calls (e.g. running out of memory on one rank mid-way), leaves the other processes waiting in the next collective
until the process group's timeout ends the run.
"""

from __future__ import annotations

import math
import re
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call
from typing_extensions import override

from lightning_curvature.callbacks._batch_source import BatchSource
from lightning_curvature.callbacks._compiled import lightning_eager
from lightning_curvature.callbacks._loss import (
    HostRNGForkedLoss,
    LossFn,
    forked_host_rng,
    is_training_step_fallback,
    resolve_loss_fn,
)
from lightning_curvature.callbacks._subscriptions import pending_feed
from lightning_curvature.callbacks._trainer import (
    first_optimizer,
    log_scalars,
    make_reduce_fn,
    measured_parameters,
    publish_metrics,
    step_axis,
)
from lightning_curvature.callbacks._validation import (
    SUPPORTED_STRATEGIES,
    check_batch_dim_arg,
    check_bool,
    check_choice,
    check_optional_int,
    check_overhead,
    check_positive_float,
    check_positive_int,
    check_strategy,
)
from lightning_curvature.callbacks.cadence import EMA_CLIP, EMA_WEIGHT, CadencePlanner, adaptive_gap
from lightning_curvature.core import NonFiniteCurvatureError, math_attention, preserved_model_state
from lightning_curvature.core._batch import BatchDim, LayoutLoss, iter_batches, to_compute
from lightning_curvature.core.hvp import _LossModule, check_loss, compute_dtype_for
from lightning_curvature.core.sharded import is_sharded

__all__ = [
    "EMA_CLIP",
    "EMA_WEIGHT",
    "SUPPORTED_STRATEGIES",
    "CurvatureCallback",
    "CurvatureMonitorBase",
    "adaptive_gap",
    "check_batch_dim_arg",
    "check_bool",
    "check_choice",
    "check_loss_value",
    "check_optional_int",
    "check_overhead",
    "check_positive_float",
    "check_positive_int",
    "check_strategy",
    "first_optimizer",
    "log_scalars",
    "make_reduce_fn",
    "measured_parameters",
    "publish_metrics",
    "step_axis",
]

#: The clock of the adaptive cadence (a module global so that tests can replace it with a fake clock).
_now: Callable[[], float] = time.perf_counter


class _MeasuringClock:
    """Wall time spent measuring by every curvature monitor of this process (subtracted from step times)."""

    total_s = 0.0


def check_loss_value(loss: Any) -> Tensor:
    """``loss`` if it is what curvature needs: a finite floating-point scalar tensor that depends on the parameters.

    Raises:
        TypeError: for a non-tensor, non-scalar or non-floating loss.
        ValueError: for a loss that does not require grad (detached or computed without grad).
        NonFiniteCurvatureError: for a NaN or infinite loss.
    """
    check_loss(loss)  # the engine's own check: a floating scalar connected to the parameters
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteCurvatureError(f"The loss is not finite ({float(loss.detach().reshape(-1)[0])}).")
    return loss


@contextmanager
def _loss_evaluation(pl_module: nn.Module, mode: Any) -> Iterator[Callable[[LossFn, Any, bool], Any]]:
    """Evaluate losses of ``pl_module`` on copies of its parameters, leaving no trace on it.

    Yields ``call(loss_fn, batch, grad)``: the loss with the parameters replaced by clones (trainable ones requiring
    grad when ``grad``), so a forward pass that writes its weights in place (``nn.Embedding(max_norm=...)``) writes
    the clones; RNG streams, buffers and flags are restored by :func:`preserved_model_state`.
    """
    named = list(pl_module.named_parameters())
    dtype = compute_dtype_for(named[0][1].dtype) if named else torch.float32
    device = named[0][1].device if named else torch.device("cpu")
    half_model = bool(named) and dtype != named[0][1].dtype

    with ExitStack() as stack:
        stack.enter_context(preserved_model_state(pl_module, mode))
        stack.enter_context(math_attention())
        stack.enter_context(torch.inference_mode(False))

        def call(loss_fn: LossFn, batch: Any, grad: bool) -> Any:
            with torch.set_grad_enabled(grad):
                # each parameter in its own compute dtype, as the engine measures it (a frozen one of a
                # full-precision model, such as the half base under float32 adapters, as it is)
                mapping = {
                    f"model.{n}": p.detach()
                    .to(compute_dtype_for(p.dtype) if (p.requires_grad or half_model) else p.dtype)
                    .clone()
                    .requires_grad_(grad and p.requires_grad)
                    for n, p in named
                }
                for n, b in pl_module.named_buffers():
                    if b.is_floating_point() and b.dtype != dtype and half_model:
                        mapping[f"model.{n}"] = b.detach().to(dtype)
                batch = to_compute(batch, device, dtype)
                return functional_call(_LossModule(pl_module, loss_fn), mapping, (batch,), strict=False)

        yield call


def _is_finite(value: float | None, may_be_infinite: bool = False) -> bool:
    if value is None:
        return True
    return not math.isnan(value) if may_be_infinite else math.isfinite(value)


class MeasurementSkipped(RuntimeError):
    """Another process could not make the measurement (under DDP every process skips it)."""


def _describe_failure(error: BaseException | str) -> tuple[str, str]:
    """``(kind, text)``: the kind (numbers blanked, so repeats of one failure share it) and a one-line reason."""
    if isinstance(error, str):
        text = error
        kind = error
    else:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
        kind = type(error).__name__ + ":" + message
    if len(text) > 400:
        text = text[:397] + "..."
    return re.sub(r"[-+]?\d[\d.e+-]*|nan|inf", "#", kind), text


# --- shared base ---------------------------------------------------------------------------------------------
class CurvatureCallback(Callback):
    """What every curvature callback shares: the loss and batch layout, failure containment, publication, state.

    Subclasses measure by calling :meth:`_engine_inputs` (the batch in the engine's form and the loss to use with
    it), :meth:`_preflight` (the loss is a finite differentiable scalar, agreed across processes), then the
    engine; they report a failure with :meth:`_report_failure` and publish values with :meth:`_publish`.

    Attributes:
        last_metrics: every scalar of the latest measurement (NaN where it failed); checkpointed.
        num_measurements: measurements so far, failed ones included; checkpointed.
        num_failures: measurements that could not be made; checkpointed.
        last_error: the exception (or reason) of the latest failure in this process (not checkpointed).
    """

    #: Whether the monitor measures under sharded strategies (FSDP).
    _sharded_ok: bool = False
    #: The scheduler protocol this callback feeds (``None``: it feeds none); such schedulers of the Trainer are told
    #: from ``setup`` to ``teardown`` that a monitor will feed them (see :func:`~._subscriptions.pending_feed`).
    _feeds: type[Any] | None = None

    def __init__(self, *, loss_fn: LossFn | None, batch_dim: BatchDim = None) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException(
                f"`loss_fn` must be callable as loss_fn(pl_module, batch), got {loss_fn!r}."
            )
        self.loss_fn = loss_fn
        self.batch_dim = check_batch_dim_arg(batch_dim)
        self._resolved_loss: LossFn | None = None
        self._engine_loss: LossFn | None = None
        self._loss_checked = False  # the loss passed the structural checks once in this fit
        self._warned_failures: set[str] = set()
        # checkpointed state
        self.num_measurements = 0
        self.num_failures = 0
        self.last_metrics: dict[str, float] = {}
        # not checkpointed
        self.last_error: BaseException | str | None = None
        self._end_pending_feed: Callable[[], None] | None = None

    # -- hooks ----------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, type(self).__name__, sharded_ok=self._sharded_ok)
        if stage == "fit":
            self._resolve_loss(pl_module)
            self._loss_checked = False
            self._warned_failures.clear()
            if self._feeds is not None:
                self._stop_pending_feed()
                self._end_pending_feed = pending_feed(trainer, self._feeds)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_pending_feed()

    def _stop_pending_feed(self) -> None:
        if self._end_pending_feed is not None:
            self._end_pending_feed()
            self._end_pending_feed = None

    def _resolve_loss(self, pl_module: pl.LightningModule) -> LossFn:
        """The user's loss (explicit, ``curvature_loss`` or the ``training_step`` fallback) and its engine form."""
        self._resolved_loss = resolve_loss_fn(pl_module, self.loss_fn)
        engine: LossFn = LayoutLoss(self._resolved_loss)  # the engine's batch is batch-first: restore the user's layout
        if is_training_step_fallback(self._resolved_loss):
            # a re-run step may draw from Python's and NumPy's RNG (mixup, jitter): the same draws in every evaluation
            engine = HostRNGForkedLoss(engine)
        self._engine_loss = engine
        return engine

    def _loss_for_engine(self, pl_module: pl.LightningModule) -> LossFn:
        return self._engine_loss if self._engine_loss is not None else self._resolve_loss(pl_module)

    # -- state ----------------------------------------------------------------------------------------------------
    def _base_state(self) -> dict[str, Any]:
        return {
            "num_measurements": self.num_measurements,
            "num_failures": self.num_failures,
            "last_metrics": {k: float(v) for k, v in self.last_metrics.items()},
        }

    def _load_base_state(self, state_dict: dict[str, Any]) -> None:
        self.num_measurements = int(state_dict.get("num_measurements", 0))
        self.num_failures = int(state_dict.get("num_failures", 0))
        self.last_metrics = {k: float(v) for k, v in state_dict.get("last_metrics", {}).items()}

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._base_state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict)

    # -- measuring safely -----------------------------------------------------------------------------------------
    def _mode_for(self, pl_module: torch.nn.Module) -> Any:
        return getattr(self, "mode", "train")

    def _preflight(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, batch: Any, collective: bool = True
    ) -> None:
        """Check the loss before any collective call: a finite floating scalar that depends on the parameters.

        The structural checks (:func:`check_loss_value` on the first physical batch, one forward pass with a graph
        on copies of the parameters) run once per fit, until they pass. Under DDP with ``collective`` (a
        measurement whose engine all-reduces) every measurement also checks that every process's loss is finite
        (forward passes without a graph) and the processes agree (one boolean all-reduce), so that a process never
        raises alone in front of the engine's all-reduces.

        Raises:
            TypeError, ValueError, NonFiniteCurvatureError: from :func:`check_loss_value` or the loss itself.
            MeasurementSkipped: if the loss failed on another process only.
        """
        distributed = collective and trainer.world_size > 1
        if self._loss_checked and not distributed:
            return
        if is_sharded(list(pl_module.parameters())):
            # FSDP: the loss runs through the module's own forward (its all-gathers are collective calls every
            # process makes together); copies of the shards cannot stand in for them, so the engine checks the loss
            return
        error: BaseException | None = None
        try:
            with _loss_evaluation(pl_module, self._mode_for(pl_module)) as call:
                for i, b in enumerate(iter_batches(batch)):
                    if i == 0 and not self._loss_checked:
                        check_loss_value(call(loss_fn, b, True))
                    elif distributed:
                        loss = call(loss_fn, b, False)
                        if not bool(torch.isfinite(torch.as_tensor(loss)).all()):
                            raise NonFiniteCurvatureError("The loss of the curvature batch is NaN or infinite.")
                    else:
                        break
        except Exception as exc:
            error = exc
        if distributed and not trainer.strategy.reduce_boolean_decision(error is None, all=True) and error is None:
            error = MeasurementSkipped("the loss could not be evaluated on another process")
        if error is not None:
            raise error
        self._loss_checked = True

    def _all_succeeded(self, trainer: pl.Trainer, ok: bool) -> bool:
        """Whether every process succeeded (the same answer everywhere under DDP; ``ok`` for one process)."""
        if trainer.world_size <= 1:
            return ok
        return bool(trainer.strategy.reduce_boolean_decision(ok, all=True))

    def _report_failure(self, step: int, error: BaseException | str) -> None:
        """Count a failed measurement; warn once per kind of failure."""
        self.num_failures += 1
        self.last_error = error
        kind, text = _describe_failure(error)
        if kind in self._warned_failures:
            return
        self._warned_failures.add(kind)
        rank_zero_warn(
            f"{type(self).__name__}: the measurement at step {step} could not be made ({text}). It is logged as NaN, "
            "not passed to schedulers, and training continues; later failures of this kind are not warned again "
            "(counted in `num_failures`)."
        )

    def _publish(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Put the values of a successful measurement in ``trainer.callback_metrics`` (see the module docstring)."""
        publish_metrics(trainer, metrics)


# --- base of the periodic monitors -----------------------------------------------------------------------------
class CurvatureMonitorBase(CurvatureCallback):
    """Cadence, batch, loss, logging, state and failure handling shared by the periodic curvature monitors.

    Subclasses implement :meth:`_measure` (return the scalars to log; may raise anything: a failure is contained,
    see the module docstring) and :meth:`_failed_metrics`. ``_measure`` receives the batch in the engine's form
    (examples along dimension 0, whatever the container) and the loss to use with it.

    Attributes:
        history: ``(step, value)`` of the headline quantity at every measurement (sharpness, ``grad_cov/eig_1``);
            checkpointed, so a resumed run continues it. It accumulates across fits with the same instance.
        last_metrics: every scalar of the latest measurement (NaN where it failed); checkpointed.
        num_measurements: measurements so far; checkpointed.
        num_failures: measurements that could not be made (logged as NaN); checkpointed.
        last_error: the exception (or reason) of the latest failure in this process.
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
        batch_dim: BatchDim = None,
    ) -> None:
        super().__init__(loss_fn=loss_fn, batch_dim=batch_dim)
        self.every_n_steps = None if every_n_steps is None else check_positive_int("every_n_steps", every_n_steps)
        self.max_overhead = check_overhead(max_overhead)
        self.on_epoch_end = check_bool("on_epoch_end", on_epoch_end)
        self.prog_bar = check_bool("prog_bar", prog_bar)
        self._source = BatchSource(batch, num_examples, self.batch_dim)
        self._last_batch: Any = None
        # checkpointed state (and the base class's)
        self.last_step = -1
        self.history: list[tuple[int, float]] = []
        #: the measuring plan (checkpointed): :class:`~lightning_curvature.callbacks.cadence.CadencePlanner`
        self.planner = CadencePlanner(self.every_n_steps, self.max_overhead, self.min_gap, self.max_gap)
        # not checkpointed
        self.measure_time_s = 0.0
        self._fit_measure_s = 0.0

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
        return self.planner.scheduled(self.last_step)

    @property
    def step_time_s(self) -> float | None:
        """Moving average of the wall time of one training step (``None`` before a step was timed)."""
        return self.planner.step_time_s

    @property
    def train_time_s(self) -> float:
        """Wall time of the training steps timed in this fit, without any monitor's measuring time."""
        return self.planner.train_time_s

    # the plan under its 0.1 attribute names
    @property
    def _next_step(self) -> int:
        return self.planner.next_step

    @_next_step.setter
    def _next_step(self, value: int) -> None:
        self.planner.next_step = value

    @property
    def _provisional(self) -> bool:
        return self.planner.provisional

    @_provisional.setter
    def _provisional(self, value: bool) -> None:
        self.planner.provisional = value

    @property
    def _step_time_ema(self) -> float | None:
        return self.planner.step_time_s

    @_step_time_ema.setter
    def _step_time_ema(self, value: float | None) -> None:
        self.planner.step_time_s = value

    @property
    def _last_measure_s(self) -> float:
        return self.planner.last_measure_s

    @_last_measure_s.setter
    def _last_measure_s(self, value: float) -> None:
        self.planner.last_measure_s = value

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
            **self._base_state(),
            "last_step": self.last_step,
            "history": [[int(s), float(v)] for s, v in self.history],
            **self.planner.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict)
        self.last_step = int(state_dict.get("last_step", -1))
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self.planner.load_state_dict(state_dict, self.last_step)

    # -- hooks --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            # a new fit starts its own step axis and plan; a resumed one gets `last_step` and the plan back from the
            # checkpoint (callbacks' states are loaded after `setup`)
            self.last_step = -1
            self.planner.reset()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resolved_loss is None:
            self._resolve_loss(pl_module)
        self._source.prepare(trainer, pl_module)
        self._fit_measure_s = 0.0
        self.planner.start_fit()
        if self._source.kind != "current":
            # a measurement due before the first update that needs no training batch is made now, so the schedulers
            # it feeds set that update's lrs before any callback reads them (LearningRateMonitor reads them in
            # on_train_batch_start, whatever the callback order); the progress bar gets the next one
            self._measure_if_due(trainer, pl_module, None, step_axis(trainer), prog_bar=False)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._source.kind == "current":
            self._last_batch = batch
        step = step_axis(trainer)
        self.planner.time_step(step, _now(), _MeasuringClock.total_s)  # hot path: one clock read, no device sync
        self._measure_if_due(trainer, pl_module, batch, step, prog_bar=self.prog_bar)

    def _measure_if_due(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int, prog_bar: bool
    ) -> None:
        """Measure before the update ``step`` if the cadence or a subscriber asks for it, then plan the next one."""
        self.planner.min_gap, self.planner.max_gap = self.min_gap, self.max_gap  # an instance may override them
        due = self.planner.due(step, self.last_step, self._broadcast(trainer))
        # a request is honoured at most every `min_gap` steps (its cost counts in the cadence's budget)
        requested = (
            not due and (self.last_step < 0 or step - self.last_step >= self.min_gap) and self._requested(trainer, step)
        )
        if not (due or requested):
            return
        self._requested_only = requested
        try:
            self.measure(trainer, pl_module, batch, step, prog_bar=prog_bar)
        finally:
            self._requested_only = False
        self.planner.plan(step, self._last_measure_s, self._broadcast(trainer))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = step_axis(trainer)
        if not self.on_epoch_end or step == self.last_step:
            return
        if self._source.kind == "current" and self._last_batch is None:
            return  # no training batch seen yet
        self.measure(trainer, pl_module, self._last_batch, step, prog_bar=False)
        self.planner.min_gap, self.planner.max_gap = self.min_gap, self.max_gap
        self.planner.plan(step, self._last_measure_s, self._broadcast(trainer))

    # -- adaptive cadence -----------------------------------------------------------------------------------------
    def _agree(self, trainer: pl.Trainer, next_step: int, provisional: bool) -> None:
        """Adopt rank 0's plan on every process (a measurement all-reduces: all must measure at the same steps)."""
        if trainer.world_size > 1:
            next_step, provisional = trainer.strategy.broadcast((int(next_step), bool(provisional)), src=0)
        self.planner.next_step, self.planner.provisional = int(next_step), bool(provisional)

    def _broadcast(self, trainer: pl.Trainer) -> Callable[[tuple[int, bool]], tuple[int, bool]]:
        """The planner's way to agree on a plan: through :meth:`_agree`."""

        def agree(plan: tuple[int, bool]) -> tuple[int, bool]:
            self._agree(trainer, plan[0], plan[1])
            return self.planner.next_step, self.planner.provisional

        return agree

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._last_batch = None
        self._source.release()

    # -- measurement --------------------------------------------------------------------------------------------
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, current_batch: Any, step: int, prog_bar: bool
    ) -> dict[str, float]:
        """Measure now, log at ``step``, update state, publish; a failure is logged as NaN with one warning.

        Returns:
            The scalars written to the loggers.
        """
        t0 = _now()
        error: BaseException | str | None = None
        metrics: dict[str, float] = {}
        try:
            batch = self._source.get_for_engine(current_batch)
            loss_fn = self._loss_for_engine(pl_module)
            with forked_host_rng():  # whatever the loss draws from Python's or NumPy's RNG does not reach training
                self._preflight(trainer, pl_module, loss_fn, batch)
                eager = lightning_eager(pl_module) if self._eager_measurement() else nullcontext()
                with eager:  # Lightning-compiled methods run eagerly where the measurement needs it
                    metrics = self._measure(trainer, pl_module, loss_fn, batch, step)
        except Exception as exc:  # contained: a measurement never stops training (see the module docstring)
            error = exc
        if error is None:
            bad = sorted(k for k, v in metrics.items() if not _is_finite(v, k in self._may_be_infinite))
            if bad:
                error = f"non-finite values for {bad}"
        ok = self._all_succeeded(trainer, error is None)
        if not ok:
            if error is None:  # this process succeeded, another did not: log what every process logs
                error = "another process could not make it"
                metrics = self._safe_failed_metrics(trainer)
            elif isinstance(error, BaseException) or not metrics:
                metrics = self._safe_failed_metrics(trainer)
            # (non-finite values are logged as computed: NaN/inf where they are)
            self._report_failure(step, error)
        elapsed = _now() - t0
        if self._overhead_key and self.train_time_s > 0:
            metrics[self._overhead_key] = (self._fit_measure_s + elapsed) / self.train_time_s
        self.num_measurements += 1
        self.last_step = step
        self.last_metrics = dict(metrics)
        self.history.append((step, float(metrics.get(self._headline_key, math.nan))))
        log_scalars(trainer, metrics, step)
        if ok:
            self._publish(trainer, metrics)
        if ok and prog_bar and self._prog_bar_key is not None and self._prog_bar_key in metrics:
            pl_module.log(
                self._prog_bar_key, metrics[self._prog_bar_key], prog_bar=True, logger=False, on_step=True,
                on_epoch=False,
            )  # fmt: skip
        self._after_measurement(trainer, pl_module, metrics, step, ok=ok)
        elapsed = _now() - t0
        self._last_measure_s = elapsed
        self._fit_measure_s += elapsed
        self.measure_time_s += elapsed
        _MeasuringClock.total_s += elapsed
        return metrics

    def _safe_failed_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        try:
            return self._failed_metrics(trainer)
        except Exception:  # the NaN record must not fail either
            return {self._headline_key: math.nan} if self._headline_key else {}

    #: set while a measurement runs only because a subscriber asked for it (:meth:`_requested`)
    _requested_only = False

    def _requested(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether a subscriber asks for a measurement before the update ``step`` besides the cadence (none here).

        The answer must agree across processes: it may depend only on state every process holds alike (schedulers
        fed the same all-reduced measurements)."""
        return False

    def _eager_measurement(self) -> bool:
        """Whether to run Lightning-compiled methods eagerly during a measurement (double backward and vmap need it)."""
        return True

    @abstractmethod
    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, batch: Any, step: int
    ) -> dict[str, float]:
        """The scalars of one measurement (anything it raises is contained: see the module docstring)."""

    @abstractmethod
    def _failed_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The scalars logged when a measurement fails (NaN)."""

    def _after_measurement(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float], step: int, ok: bool
    ) -> None:
        """Hook run after logging (TensorBoard extras, schedulers)."""
