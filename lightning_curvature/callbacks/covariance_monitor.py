r"""``GradientCovarianceMonitor``: spectrum and conditioning of the per-example gradient covariance.

The callback decides when, on which batch and in which mode to measure, and what to log; the numerics are
:func:`~lightning_curvature.core.gradient_covariance` (per-example gradients with ``torch.func.vmap``, the
:math:`N \times N` Gram matrix, never the :math:`P \times P` covariance).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_curvature.callbacks._common import (
    CurvatureMonitorBase,
    check_choice,
    check_positive_float,
    check_positive_int,
    first_optimizer,
    make_reduce_fn,
    measured_parameters,
)
from lightning_curvature.callbacks._loss import LossFn
from lightning_curvature.core import NoiseScaleEstimate, gradient_covariance
from lightning_curvature.core._batch import BatchDim
from lightning_curvature.tags import (
    GRAD_COV_CONDITION_NUMBER,
    GRAD_COV_EIG_1,
    GRAD_COV_FROBENIUS_NORM,
    GRAD_COV_NOISE_SCALE,
    GRAD_COV_NOISE_SCALE_BATCH,
    GRAD_COV_OVERHEAD,
    GRAD_COV_TRACE,
    grad_cov_eig_tag,
)
from lightning_curvature.tensorboard import add_curvature_layout, find_summary_writer

__all__ = ["GRAD_COV_OVERHEAD", "GradientCovarianceMonitor", "has_batch_norm"]


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` contains a BatchNorm layer (any ``_BatchNorm``, e.g. ``SyncBatchNorm``)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class GradientCovarianceMonitor(CurvatureMonitorBase):
    r"""Log the top-k spectrum, trace, conditioning and noise scale of the gradient covariance.

    .. math:: K = \frac{1}{N}\sum_{i=1}^N (g_i - \bar g)(g_i - \bar g)^\top

    over the per-example gradients :math:`g_i` of the curvature batch (Jastrzebski et al. 2020, arXiv
    2002.09572; noise scale :math:`\mathrm{tr}K/\|\bar g\|^2` of McCandlish et al. 2018, arXiv 1812.06162).

    **When.** As :class:`~lightning_curvature.callbacks.HessianEigenvalueMonitor`: at step 0, then at the cadence
    below, in ``on_train_batch_start`` (the parameters before that step's update), optionally at epoch end, at
    ``LearningRateMonitor``'s step axis, through every logger at each measurement.

    **Cadence.** By default (``every_n_steps=None``) the cadence is planned so that measuring costs about
    ``max_overhead`` (5%) of the training wall time: after each measurement the next one comes
    ``ceil(t_measure / (max_overhead · t_step))`` steps later (between 10 and 10,000), from the wall time of that
    measurement and a moving average of the step time (see :mod:`lightning_curvature.callbacks._common`). The
    measured steps therefore depend on timing; training is not affected, and the value at a measured step is a
    deterministic function of the parameters of that step and the curvature batch. Pass an explicit
    ``every_n_steps`` for an exactly reproducible series (the budget is then ignored). The step-0 measurement is
    paid for by no training time, so the realised overhead (logged as ``grad_cov/overhead``) approaches the budget
    from above as the run goes on. The budget is per monitor (with the Hessian monitor as well, give each 0.025 for
    5% together).

    **What.** Logged tags: ``grad_cov/eig_{i}`` (i = 1..k, capped at ``N − 1``, largest first),
    ``grad_cov/condition_number`` (:math:`\lambda_1/\lambda_k` over the computed top-k), ``grad_cov/trace``,
    ``grad_cov/noise_scale`` (the simple noise scale :math:`\mathrm{tr}\Sigma/|G|^2` from unbiased estimates,
    pooled over measurements with weight ``noise_scale_beta``; ``grad_cov/noise_scale_batch`` is this batch's
    alone), ``grad_cov/frobenius_norm`` (single process only: under DDP it needs
    cross-process pairs and is not logged) and ``grad_cov/overhead`` (measuring time / training time in this fit,
    from the second measurement on).

    **Mode.** Per-example gradients do not exist for BatchNorm in train mode (its output mixes the examples of
    the batch). ``mode="auto"`` (default) therefore measures in eval mode (running statistics, no dropout) when
    the model has a BatchNorm layer, and in train mode otherwise (dropout active with an independent mask per
    example). ``"train"``/``"eval"`` force a mode; ``"train"`` with BatchNorm fails. The model's flags, buffers
    and RNG streams are restored after every measurement.

    **Distributed.** Under DDP the examples of all processes form the batch; only rank 0 writes.

    **Batch dimension.** Any container Lightning trains on (tuples, dicts, named tuples, dataclasses). The examples
    are along the leading dimension of every tensor unless ``batch_dim`` says otherwise or the batch shows it (a
    sequence-first batch ``(T, B, ...)`` is recognised from the DataLoader's ``batch_size``, with a warning; an
    ambiguous one raises): see :mod:`lightning_curvature.callbacks._batch_source`.

    **Failures.** A measurement that cannot be made (e.g. ``batch="current"`` on a last batch of one example, a
    non-finite gradient) is logged as NaN with one warning, published nowhere else, and training goes on. Every
    value of a successful one is also in ``trainer.callback_metrics`` under its tag.

    Args:
        every_n_steps: measure every this many optimizer steps (and at step 0): an exactly reproducible series.
            ``None`` (default): plan the cadence from ``max_overhead``.
        max_overhead: wall-time budget of the adaptive cadence, measuring time / training time, in ``(0, 1]``
            (ignored with an explicit ``every_n_steps``).
        k: number of top eigenvalues.
        batch: ``"fixed"``, ``"current"`` or a ``DataLoader`` (see the Hessian monitor).
        num_examples: size of the fixed batch (all processes together); per process for a ``DataLoader``
            (``None``: all of it).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar mean loss``; called on batches of one example.
        mode: ``"auto"``, ``"train"`` or ``"eval"`` (see above).
        chunk_size: examples per chunk of per-example gradients (default: as many as fit in
            ``max_memory_bytes``).
        max_memory_bytes: memory budget for per-example gradients: all are kept (exact Gram path) when they fit,
            else one chunk at a time (see :func:`~lightning_curvature.core.gradient_covariance`).
        on_epoch_end: also measure after the last update of every training epoch.
        batch_dim: the batch dimension: an int for every tensor, or one entry per element of the batch (``None``
            for a tensor not split into examples), e.g. ``(1, 0)`` for ``(x of shape (T, B, F), y of shape (B,))``;
            ``None`` (default): inferred (see above).
        noise_scale_beta: weight of the past in the pooled noise scale's moving averages, in ``[0, 1)``
            (0: the latest batch alone).

    Raises:
        MisconfigurationException: for ``noise_scale_beta`` outside ``[0, 1)``; for ``every_n_steps`` (unless
            ``None``), ``k`` or ``chunk_size`` below 1, a
            ``max_overhead`` outside ``(0, 1]``, ``num_examples`` below 2, a non-positive ``max_memory_bytes``, an
            unknown ``batch`` or ``mode``, a non-callable ``loss_fn``, a non-bool ``on_epoch_end``, a malformed
            ``batch_dim``, ``num_examples=None`` with a loader without a length; at setup, for a sharded strategy;
            at the start of training, for a fixed batch whose batch dimension is ambiguous.

    Example::

        >>> monitor = GradientCovarianceMonitor(k=10)  # adaptive cadence, about 5% of the training time
        >>> monitor.k, monitor.mode, monitor.every_n_steps, monitor.max_overhead
        (10, 'auto', None, 0.05)
        >>> trainer = Trainer(callbacks=[monitor])  # doctest: +SKIP
    """

    _headline_key = GRAD_COV_EIG_1
    _may_be_infinite = frozenset({GRAD_COV_CONDITION_NUMBER, GRAD_COV_NOISE_SCALE, GRAD_COV_NOISE_SCALE_BATCH})
    _overhead_key = GRAD_COV_OVERHEAD

    def __init__(
        self,
        every_n_steps: int | None = None,
        max_overhead: float = 0.05,
        k: int = 10,
        batch: Literal["fixed", "current"] | DataLoader = "fixed",
        num_examples: int | None = 128,
        loss_fn: LossFn | None = None,
        mode: Literal["auto", "train", "eval"] = "auto",
        chunk_size: int | None = None,
        max_memory_bytes: float = 512e6,
        on_epoch_end: bool = False,
        batch_dim: BatchDim = None,
        noise_scale_beta: float = 0.9,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            max_overhead=max_overhead,
            batch=batch,
            num_examples=num_examples,
            loss_fn=loss_fn,
            on_epoch_end=on_epoch_end,
            prog_bar=False,
            batch_dim=batch_dim,
        )
        if num_examples is not None:
            check_positive_int("num_examples", num_examples, minimum=2)
        self.k = check_positive_int("k", k)
        self.mode = check_choice("mode", mode, ("auto", "train", "eval"))
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        self.max_memory_bytes = check_positive_float("max_memory_bytes", max_memory_bytes)
        if isinstance(noise_scale_beta, bool) or not isinstance(noise_scale_beta, (int, float)):
            raise MisconfigurationException(f"`noise_scale_beta` must be a number in [0, 1), got {noise_scale_beta!r}.")
        if not 0.0 <= noise_scale_beta < 1.0:
            raise MisconfigurationException(f"`noise_scale_beta` must be in [0, 1), got {noise_scale_beta!r}.")
        self._noise = NoiseScaleEstimate(float(noise_scale_beta))

    @override
    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "k": self.k, "mode": self.mode}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "noise_scale": self._noise.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if isinstance(state_dict.get("noise_scale"), dict):
            self._noise.load_state_dict(state_dict["noise_scale"])

    @override
    def _mode_for(self, pl_module: nn.Module) -> str:
        if self.mode == "auto":
            return "eval" if has_batch_norm(pl_module) else "train"
        return self.mode

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        add_curvature_layout(find_summary_writer(trainer))

    @override
    def _failed_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        nan = math.nan
        metrics = {grad_cov_eig_tag(i): nan for i in range(1, self.k + 1)}
        metrics.update({GRAD_COV_CONDITION_NUMBER: nan, GRAD_COV_TRACE: nan, GRAD_COV_NOISE_SCALE: nan})
        return metrics

    @override
    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, batch: Any, step: int
    ) -> dict[str, float]:
        optimizer = first_optimizer(trainer)
        cov = gradient_covariance(
            pl_module,
            loss_fn,
            batch,
            k=self.k,
            params=measured_parameters(pl_module, optimizer),
            chunk_size=self.chunk_size,
            max_memory_bytes=self.max_memory_bytes,
            mode=self._mode_for(pl_module),  # type: ignore[arg-type]
            reduce_fn=make_reduce_fn(trainer),
        )
        metrics = {grad_cov_eig_tag(i + 1): float(v) for i, v in enumerate(cov.eigenvalues)}
        metrics[GRAD_COV_CONDITION_NUMBER] = cov.condition_number
        metrics[GRAD_COV_TRACE] = cov.trace
        # pooled over measurements: the ratio of averaged unbiased |G|² and tr Σ (McCandlish et al. 2018, A.1)
        metrics[GRAD_COV_NOISE_SCALE] = self._noise.update(cov.gradient_norm_sq_unbiased, cov.trace_sigma_unbiased)
        if not math.isnan(cov.noise_scale):  # NaN: too few examples for the unbiased estimates (N < 2)
            metrics[GRAD_COV_NOISE_SCALE_BATCH] = cov.noise_scale
        if cov.frobenius_norm is not None:
            metrics[GRAD_COV_FROBENIUS_NORM] = cov.frobenius_norm
        return metrics
