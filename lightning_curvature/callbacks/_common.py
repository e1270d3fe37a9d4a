"""What both curvature monitors share: argument checks, cadence, the step axis, logging, state and DDP reduce.

Step axis: every value is written at ``trainer.fit_loop.epoch_loop._batches_that_stepped`` (the number of
optimizer steps taken so far), the step ``LearningRateMonitor`` and the training loss are logged at. Step
measurements run in ``on_train_batch_start``, before the batch's update, so the value at step ``t`` is the
curvature at the parameters the ``t``-th update starts from (step 0: the initial parameters), next to the loss
of the same batch and the learning rate of the same update.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_curvature.callbacks._batch_source import BatchSource
from lightning_curvature.callbacks._loss import LossFn, resolve_loss_fn
from lightning_curvature.core import NonFiniteCurvatureError, preserved_model_state
from lightning_curvature.core._batch import iter_batches

__all__ = [
    "SUPPORTED_STRATEGIES",
    "CurvatureMonitorBase",
    "check_choice",
    "check_positive_float",
    "check_positive_int",
    "check_strategy",
    "log_scalars",
    "make_reduce_fn",
    "measured_parameters",
    "step_axis",
]

#: What the monitors support, quoted in the error raised for other strategies.
SUPPORTED_STRATEGIES = "single device ('auto', SingleDeviceStrategy) and DDP ('ddp', 'ddp_spawn', 'ddp_fork')"
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


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


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        MisconfigurationException: naming ``name``, the choices and the bad value.
    """
    if value not in choices:
        raise MisconfigurationException(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
    return str(value)


def check_strategy(strategy: Any, owner: str) -> None:
    """Reject sharded strategies (their parameters are split across processes).

    Raises:
        MisconfigurationException: for FSDP, DeepSpeed or model-parallel strategies, naming what is supported.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    sharded = names.intersection(_SHARDED)
    if sharded:
        raise MisconfigurationException(
            f"{owner} does not support the sharded strategy {type(strategy).__name__} yet; supported are "
            f"{SUPPORTED_STRATEGIES}."
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
    """

    #: Tag shown in the progress bar (``None``: none).
    _prog_bar_key: str | None = None
    #: Tag whose value goes into :attr:`history`.
    _headline_key: str = ""
    #: Tags for which ``inf`` is a legitimate value (e.g. a condition number with ``λ_k = 0``).
    _may_be_infinite: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        every_n_steps: int,
        batch: Any,
        num_examples: int | None,
        loss_fn: LossFn | None,
        on_epoch_end: bool,
        prog_bar: bool,
    ) -> None:
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
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
        # not checkpointed
        self.measure_time_s = 0.0

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

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_measurements": self.num_measurements,
            "last_step": self.last_step,
            "history": [[int(s), float(v)] for s, v in self.history],
            "last_metrics": {k: float(v) for k, v in self.last_metrics.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_measurements = int(state_dict.get("num_measurements", 0))
        self.last_step = int(state_dict.get("last_step", -1))
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self.last_metrics = {k: float(v) for k, v in state_dict.get("last_metrics", {}).items()}

    # -- hooks --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy, type(self).__name__)
        if stage == "fit":
            self._resolved_loss = resolve_loss_fn(pl_module, self.loss_fn)
            # a new fit starts its own step axis; a resumed one gets `last_step` back from the checkpoint
            # (callbacks' states are loaded after `setup`)
            self.last_step = -1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resolved_loss is None:
            self._resolved_loss = resolve_loss_fn(pl_module, self.loss_fn)
        self._source.prepare(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._source.kind == "current":
            self._last_batch = batch
        step = step_axis(trainer)
        if step % self.every_n_steps == 0 and step != self.last_step:
            self.measure(trainer, pl_module, batch, step, prog_bar=self.prog_bar)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = step_axis(trainer)
        if not self.on_epoch_end or step == self.last_step:
            return
        if self._source.kind == "current" and self._last_batch is None:
            return  # no training batch seen yet
        self.measure(trainer, pl_module, self._last_batch, step, prog_bar=False)

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
        t0 = time.perf_counter()
        batch = self._source.get(current_batch)
        loss_fn = self._resolved_loss or resolve_loss_fn(pl_module, self.loss_fn)
        error: str | None = None
        if not self._all_ranks_finite(trainer, pl_module, loss_fn, batch):
            error = "the loss of the curvature batch is NaN or infinite"
            metrics = self._failed_metrics(trainer)
        else:
            try:
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
        self.measure_time_s += time.perf_counter() - t0
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
