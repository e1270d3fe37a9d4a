r"""``HessianEigenvalueMonitor``: sharpness, top-k Hessian spectrum and stability threshold during training.

The callback decides when (a cadence planned from a wall-time budget, or every ``every_n_steps``; optionally at
epoch end), on which batch and in which mode to measure, and what to log; the numerics are
:func:`~lightning_curvature.core.hessian_eigenvalues` (Lanczos, warm-started from the previous measurement's Ritz
vectors), :func:`~lightning_curvature.core.hessian_trace`,
:func:`~lightning_curvature.core.hessian_spectral_density` and
:func:`~lightning_curvature.core.top_subspace_overlap`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_curvature.callbacks._common import (
    CurvatureMonitorBase,
    check_bool,
    check_choice,
    check_positive_float,
    check_positive_int,
    first_optimizer,
    make_reduce_fn,
    measured_parameters,
)
from lightning_curvature.callbacks._compiled import lightning_compiled
from lightning_curvature.callbacks._loss import LossFn
from lightning_curvature.callbacks._subscriptions import attach
from lightning_curvature.callbacks._validation import check_device, check_floating_dtype, is_sharded_strategy
from lightning_curvature.core import (
    HessianOperator,
    LanczosResult,
    NonFiniteCurvatureError,
    hutchpp_trace,
    is_adaptive,
    lanczos,
    slq_density,
    stability_threshold,
)
from lightning_curvature.core._batch import BatchDim
from lightning_curvature.core.eigen import cold_start_vector, preconditioned_operator
from lightning_curvature.core.errors import InaccurateProductsError, InaccurateProductsWarning
from lightning_curvature.core.hvp import FD_SAFETY, FD_TARGET, HVPMethod
from lightning_curvature.core.lanczos import Handoff
from lightning_curvature.core.operators import RELIABLE_PRODUCT_ERROR, ScaledOperator
from lightning_curvature.core.preconditioner import preconditioner_parts, predicted_first_step_preconditioner
from lightning_curvature.core.sharded import reshard
from lightning_curvature.core.trace import HUTCHPP_MIN_MATVECS
from lightning_curvature.core.vectors import Vector
from lightning_curvature.schedules.protocols import MeasurementRequester, SharpnessSubscriber
from lightning_curvature.tensorboard import (
    EDGE_RATIO,
    HESSIAN_TRACE,
    SHARPNESS,
    STABILITY_THRESHOLD,
    SUBSPACE_OVERLAP,
    add_curvature_layout,
    eig_tag,
    find_summary_writer,
    log_density_figure,
    log_spectrum_histogram,
)

__all__ = [
    "DENSITY_FIGURE",
    "ERROR_BOUND",
    "HESSIAN_OVERHEAD",
    "HESSIAN_TRACE_STD_ERROR",
    "NUM_HVP",
    "SPECTRUM_HISTOGRAM",
    "HessianEigenvalueMonitor",
]

_METHODS = ("auto", "double_backward", "finite_difference", "forward_over_reverse")
#: Relative tolerance (at least) of a measurement made because a scheduler asked for it: the edge-following rule
#: compares edge ratios with factors of 0.9 and 2, so 1% is ample.
FEED_TOL = 1e-2
#: Finite-difference accuracy a tracking measurement asks of its products (:attr:`HessianOperator.fd_target`): its
#: reported product errors (2.5x this) stay well below the residual bounds a tracked value carries, and the step
#: searches that chase :data:`FD_TARGET` near the float32 floor at every step (README, tracking) are skipped.
TRACKING_FD_TARGET = 4 * FD_TARGET


from lightning_curvature.tags import (  # noqa: E402 - re-exported under their 0.1 names
    DENSITY_FIGURE,
    ERROR_BOUND,
    HESSIAN_OVERHEAD,
    HESSIAN_TRACE_STD_ERROR,
    NUM_HVP,
    SPECTRUM_HISTOGRAM,
)


def fd_target_for(tol: float) -> float:
    """The finite-difference accuracy a solve to relative tolerance ``tol`` asks of its products
    (:attr:`HessianOperator.fd_target`): reported product errors (:data:`FD_SAFETY` times the estimate) of at most
    ``tol / 2``, never stricter than :data:`FD_TARGET` nor looser than :data:`TRACKING_FD_TARGET`. Looser targets do
    not pay: a search that stops at the first step meeting one, right after a large improvement, reports the
    disagreement of its last two steps, which can be several times the target (past
    :data:`~lightning_curvature.core.operators.RELIABLE_PRODUCT_ERROR`, where nothing is certified)."""
    return max(FD_TARGET, min(TRACKING_FD_TARGET, tol / (2.0 * FD_SAFETY)))


class HessianEigenvalueMonitor(CurvatureMonitorBase):
    r"""Log the sharpness :math:`\lambda_{\max}(H)`, the top-k Hessian eigenvalues and the stability threshold.

    **When.** In ``on_train_batch_start``, at step 0 (before the first update) and then at the cadence below: the
    value at step ``t`` is the curvature at the parameters the ``t``-th update starts from, logged at the step axis
    of ``LearningRateMonitor`` and of the training loss. With ``on_epoch_end=True`` also after the last update of
    every epoch. Values are written through every logger's ``log_metrics`` at each measurement, independently of
    ``log_every_n_steps``; ``curvature/sharpness`` is also shown in the progress bar (and available in
    ``trainer.callback_metrics``).

    **Cadence.** By default (``every_n_steps=None``) the cadence is planned so that measuring costs about
    ``max_overhead`` (5%) of the training wall time, whatever the model: after each measurement the next one comes
    ``ceil(t_measure / (max_overhead · t_step))`` steps later (between 10 and 10,000), with ``t_measure`` the wall
    time of that measurement and ``t_step`` a moving average of the wall time of one training step (see
    :mod:`lightning_curvature.callbacks._common`). The steps at which it measures therefore depend on timing and
    differ between runs and machines; training itself is not affected (bit-identical with and without the
    monitor), so a value measured at step ``t`` is always that of the parameters of step ``t``. Pass an explicit
    ``every_n_steps`` for an exactly reproducible series (the same steps every run; the budget is then ignored).
    The step-0 measurement is paid for by no training time, so over a run shorter than the first gap the realised
    overhead exceeds the budget; it approaches ``max_overhead`` from above as the run goes on.
    ``curvature/overhead`` logs the realised fraction. The budget is per monitor: with a
    :class:`~lightning_curvature.callbacks.GradientCovarianceMonitor` as well, give each ``max_overhead=0.025`` for
    5% together.

    **How.** One :class:`~lightning_curvature.core.HessianOperator` per measurement serves Lanczos
    (:func:`~lightning_curvature.core.lanczos`), Hutch++ (:func:`~lightning_curvature.core.hutchpp_trace`),
    stochastic Lanczos quadrature (:func:`~lightning_curvature.core.slq_density`) and the mean gradient, so the
    gradient graph is built once. With ``warm_start=True`` the eigenvalue solve starts from the previous
    measurement's top ``k + 1`` Ritz vectors (``LanczosResult.warm_start``: Rayleigh–Ritz on them, then residual
    expansion), which needs fewer Hessian-vector products while the spectrum moves slowly; the vectors are saved in
    checkpoints when they hold at most ``checkpoint_warm_start_max_entries`` numbers (so a resumed run continues
    with the uninterrupted run's values; larger ones start cold after a resume) and dropped after a failed
    measurement. Products are computed by ``method`` (``"auto"``: double backward where valid, finite differences
    for compiled code and FSDP shards; see :class:`~lightning_curvature.core.HessianOperator`), and ``max_vectors``
    bounds the parameter-sized vectors a measurement holds, warm-start vectors included. A cold start for
    ``k=1`` begins from the gradient mixed with a seeded Gaussian
    (:func:`~lightning_curvature.core.gradient_start_vector`), for ``k > 1`` from a Gaussian.
    The result still meets ``tol``, but its last digits depend on the start: with the adaptive cadence, on which
    earlier steps were measured.

    **What.** Logged tags: ``curvature/sharpness``, ``curvature/eig_{i}`` (i = 1..k, largest first),
    ``curvature/stability_threshold`` (of ``trainer.optimizers[0]`` at the learning rate of its first parameter
    group: ``2/lr`` for SGD, ``(2+2β)/lr`` with momentum β, ``(2+2β₁)/((1−β₁)lr)`` for Adam/AdamW, ``(2+2β)/lr``
    for RMSprop), ``curvature/edge_ratio`` (sharpness / threshold; 1 is the edge of stability),
    ``curvature/num_hvp`` (Hessian-vector products of the measurement), ``curvature/overhead`` (realised overhead:
    measuring time / training time in this fit; from the second measurement on), optionally ``curvature/trace`` and
    ``curvature/trace_std_error``, ``curvature/subspace_overlap``; on TensorBoard also the spectrum as a histogram
    (``curvature/spectrum``), the spectral density as a figure (``curvature/density``, with the threshold marked)
    and, once at the start of training, a custom-scalars layout putting sharpness and threshold on one chart.

    **Adaptive optimizers.** For Adam, AdamW and RMSprop the sharpness and eigenvalues are those of the
    *preconditioned* Hessian :math:`P^{-1/2} H P^{-1/2}`, with :math:`P` read from the optimizer state
    (:func:`~lightning_curvature.core.adaptive_preconditioner`), which is what their threshold applies to (Cohen et
    al. 2022, arXiv 2207.14484). Before the optimizer's first step there is no state to read: the preconditioner of
    its first step is predicted from the curvature batch's gradient (Adam: :math:`P_1 = (1-\beta_1)(|g| + \epsilon)`,
    :func:`~lightning_curvature.core.preconditioner.predicted_first_step_preconditioner`), so the value at step 0
    is the sharpness the first update meets and schedulers are fed from the start. Trace and density are always those
    of the plain Hessian; the subspace overlap is computed in the preconditioned coordinates (gradient
    :math:`P^{-1/2} g`).

    **Parameters measured.** Those of ``trainer.optimizers[0]`` that require grad (all trainable parameters
    without an optimizer), logged under the tags above; and those of every other optimizer that a curvature-fed
    scheduler is built on, logged as ``curvature/optimizer_{i}/sharpness`` and ``.../edge_ratio``.

    **Batch, BatchNorm and dropout.** See :mod:`lightning_curvature.callbacks._batch_source` for ``batch``. With
    ``mode="train"`` (default) the model keeps its flags: BatchNorm normalises with the curvature batch's own
    statistics and its running statistics are restored afterwards; dropout is active with one fixed mask per
    measurement (seeded, so every Hessian-vector product sees the same function). ``mode="eval"`` measures the
    eval-mode network (running statistics, no dropout). Nothing the training run depends on changes: RNG
    streams, buffers, ``.grad``, train/eval flags and optimizer state are left exactly as they were.

    **Loss.** ``loss_fn(pl_module, batch)`` if given, else ``pl_module.curvature_loss(batch)`` if defined, else
    ``training_step(batch, 0)`` re-run with logging suppressed (see
    :func:`~lightning_curvature.callbacks._loss.resolve_loss_fn`). Curvature is computed in float32 under mixed
    precision (autocast is not active in callbacks; half-precision parameters are upcast).

    **Distributed.** Under DDP every Hessian-vector product is all-reduced, so the estimate is that of the
    global curvature batch and all processes compute the same eigenvalues; only rank 0 writes. Under FSDP
    (``ModelParallelStrategy`` with ``fully_shard``, ``FSDPStrategy``) products are finite differences through the
    sharded module (:mod:`lightning_curvature.core.sharded`) and the vectors stay sharded. DeepSpeed raises at setup.

    **Schedulers.** Every scheduler of ``trainer.lr_scheduler_configs`` that subscribes
    (:class:`~lightning_curvature.schedules.protocols.SharpnessSubscriber`: ``optimizer``, ``attach_monitor``,
    ``observe_sharpness``) receives, after each successful measurement, the sharpness of its own optimizer's
    parameters; :class:`~lightning_curvature.schedules.SharpnessAwareLR` applies it at its next ``step()``. A
    subscriber that asks for a measurement (``wants_measurement(step)``,
    :class:`~lightning_curvature.schedules.protocols.MeasurementRequester`) gets one before that step in addition
    to the cadence, at most every ``min_gap`` (10) steps: the top eigenvalue only (``k=1``, to ``max(tol, 1e-2)``,
    from the last top vector; no other eigenvalue, trace, density or overlap is logged at that step). The adaptive
    cadence counts its time, so the planned measurements move further apart.

    **Failures.** A NaN or infinite measurement is logged as NaN/inf with a warning and never stops training.

    Args:
        every_n_steps: measure every this many optimizer steps (and at step 0): an exactly reproducible series.
            ``None`` (default): plan the cadence from ``max_overhead``.
        max_overhead: wall-time budget of the adaptive cadence, measuring time / training time, in ``(0, 1]``
            (ignored with an explicit ``every_n_steps``).
        k: number of top eigenvalues.
        tol: relative tolerance of each eigenvalue (Lanczos stopping rule). Finite-difference products are searched
            only as far as it needs (:func:`fd_target_for`: reported product errors up to ``tol / 2``, within
            ``[FD_TARGET, TRACKING_FD_TARGET]``); the trace and density, if logged, keep the default accuracy.
        max_iter: maximum Hessian-vector products of the eigenvalue solve.
        batch: ``"fixed"`` (a batch drawn once from the training data), ``"current"`` (the training batch) or a
            ``DataLoader``.
        num_examples: size of the fixed curvature batch (all processes together); for a ``DataLoader``, the most
            examples taken from it per process (``None``: all).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar mean loss``.
        mode: ``"train"`` or ``"eval"`` (see above).
        compute_trace: also log the Hessian trace (Hutch++) and its standard error.
        trace_samples: Hessian-vector products spent on the trace.
        compute_density: also log the spectral density (stochastic Lanczos quadrature) as a figure.
        density_num_probes: SLQ probe vectors.
        density_num_iters: Lanczos steps per SLQ probe.
        compute_overlap: also log the share of the mean gradient in the top-k eigenspace.
        warm_start: start the eigenvalue solve from the previous measurement's Ritz vectors (kept in memory, not in
            checkpoints).
        tracking_products: tracking mode (with ``every_n_steps=1``): a warm measurement takes at most this many
            products from the previous Ritz vectors (for ``k=1``, Lanczos from the last top vector: 2 products give
            the Rayleigh–Ritz value of the plane it spans with its residual) instead of running to ``tol``, and every
            ``cold_start_every`` measurements a cold, certified one runs (Ramasinghe et al. 2026 track the
            preconditioned sharpness at every step this way). A tracked value is a Ritz value, so (with exact
            products) it never exceeds the top eigenvalue; for a measurement that stopped before meeting ``tol``,
            ``curvature/error_bound`` is its residual norm :math:`\|Av - \theta v\|`: *an* eigenvalue lies within it,
            but not necessarily the top one (a gap estimated from two Ritz values would claim more than it knows).
            Its finite-difference products keep their step when their estimated error is below
            :data:`TRACKING_FD_TARGET` (certified solves search down to :func:`fd_target_for` ``(tol)``).
        cold_start_every: with ``warm_start``, every this many warm measurements one starts cold from a random
            vector instead: a direction that became dominant outside the previous top ``k + 1`` eigenspace is then
            found at the latest that many measurements later.
        on_epoch_end: also measure after the last update of every training epoch.
        log_histogram: write the top-k spectrum as a TensorBoard histogram.
        prog_bar: show ``curvature/sharpness`` in the progress bar.
        batch_dim: where the examples are in each tensor of the batch (an int, or one entry per element of the batch,
            ``None`` for tensors not split into examples); default: the leading dimension, cross-checked against the
            DataLoader's batch size (see :mod:`lightning_curvature.callbacks._batch_source`).
        reuse_graph: keep the gradient graph of every physical batch of the curvature batch for the whole
            measurement (fastest: each Hessian-vector product is one double-backward pass per batch; memory as for
            one batch of ``num_examples``); ``False`` rebuilds it per product (memory of one physical batch, about
            twice the compute).
        product_dtype: compute the products in this dtype (``torch.float64``: finite differences of a large float32
            model whose float32 products are too inaccurate and skipped, at the cost of float64 arithmetic);
            default: the parameters' dtype. Not under sharded strategies.
        max_vectors: the most parameter-sized vectors a measurement holds at once, warm-start vectors included
            (thick-restarted Lanczos keeps it there at the same ``tol``); ``None``: no bound.
        basis_device: where the solver's basis, the density's Lanczos vectors and the warm-start vectors between
            measurements are kept: ``"cpu"`` holds them in host memory while the model trains on an accelerator,
            which then holds only the few vectors being worked on; ``None`` (default): beside the parameters.

    Raises:
        MisconfigurationException: for ``every_n_steps`` (unless ``None``), ``k``, ``max_iter`` below 1, a
            ``max_overhead`` outside ``(0, 1]``, ``trace_samples`` below 3,
            ``density_num_probes`` or ``density_num_iters`` below 1, a non-positive ``tol``, an unknown ``batch``
            or ``mode``, a bad ``num_examples``, a non-callable ``loss_fn``, a non-floating ``product_dtype``, a
            ``basis_device`` that is not a device; at
            setup, for an unsupported strategy, ``product_dtype`` under a sharded one, or a module with manual
            optimization and no ``curvature_loss``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> monitor = HessianEigenvalueMonitor(k=5)  # adaptive cadence: about 5% of the training time
        >>> monitor.every_n_steps, monitor.max_overhead, monitor.k
        (None, 0.05, 5)
        >>> HessianEigenvalueMonitor(every_n_steps=50).every_n_steps  # fixed cadence: a reproducible series
        50
        >>> trainer = Trainer(callbacks=[monitor], max_steps=200)  # doctest: +SKIP
        >>> trainer.fit(model)  # doctest: +SKIP
        >>> monitor.last_sharpness, monitor.last_threshold  # doctest: +SKIP
    """

    _feeds = SharpnessSubscriber

    _prog_bar_key = SHARPNESS
    _headline_key = SHARPNESS
    _overhead_key = HESSIAN_OVERHEAD
    _sharded_ok = True

    def __init__(
        self,
        every_n_steps: int | None = None,
        max_overhead: float = 0.05,
        k: int = 5,
        tol: float = 1e-3,
        max_iter: int = 100,
        batch: Literal["fixed", "current"] | DataLoader = "fixed",
        num_examples: int | None = 256,
        loss_fn: LossFn | None = None,
        mode: Literal["train", "eval"] = "train",
        compute_trace: bool = False,
        trace_samples: int = 30,
        compute_density: bool = False,
        density_num_probes: int = 2,
        density_num_iters: int = 60,
        compute_overlap: bool = False,
        warm_start: bool = True,
        cold_start_every: int = 10,
        on_epoch_end: bool = False,
        log_histogram: bool = True,
        prog_bar: bool = True,
        reuse_graph: bool | None = None,
        method: HVPMethod = "auto",
        max_vectors: int | None = None,
        checkpoint_warm_start_max_entries: int = 1_000_000,
        tracking_products: int | None = None,
        batch_dim: BatchDim = None,
        product_dtype: torch.dtype | None = None,
        basis_device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            max_overhead=max_overhead,
            batch=batch,
            num_examples=num_examples,
            loss_fn=loss_fn,
            on_epoch_end=on_epoch_end,
            prog_bar=prog_bar,
            batch_dim=batch_dim,
        )
        self.k = check_positive_int("k", k)
        self.tol = check_positive_float("tol", tol)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.mode: Literal["train", "eval"] = check_choice("mode", mode, ("train", "eval"))  # type: ignore[assignment]
        self.compute_trace = check_bool("compute_trace", compute_trace)
        self.trace_samples = check_positive_int("trace_samples", trace_samples, minimum=HUTCHPP_MIN_MATVECS)
        self.compute_density = check_bool("compute_density", compute_density)
        self.density_num_probes = check_positive_int("density_num_probes", density_num_probes)
        self.density_num_iters = check_positive_int("density_num_iters", density_num_iters)
        self.compute_overlap = check_bool("compute_overlap", compute_overlap)
        self.warm_start = check_bool("warm_start", warm_start)
        self.cold_start_every = check_positive_int("cold_start_every", cold_start_every)
        self._warm_in_a_row = 0
        self.log_histogram = check_bool("log_histogram", log_histogram)
        self.reuse_graph = None if reuse_graph is None else check_bool("reuse_graph", reuse_graph)
        self.method: HVPMethod = check_choice("method", method, _METHODS)  # type: ignore[assignment]
        self.product_dtype: torch.dtype | None = check_floating_dtype("product_dtype", product_dtype)
        if max_vectors is not None:
            check_positive_int("max_vectors", max_vectors, minimum=self.k + 4)
        self.max_vectors = max_vectors
        self.basis_device = check_device("basis_device", basis_device)
        self.checkpoint_warm_start_max_entries = check_positive_int(
            "checkpoint_warm_start_max_entries", checkpoint_warm_start_max_entries, minimum=0
        )
        if tracking_products is not None:
            check_positive_int("tracking_products", tracking_products, minimum=self.k + 1)
            if not self.warm_start:
                raise MisconfigurationException(
                    "`tracking_products` needs `warm_start=True` (it refines the last Ritz vectors)."
                )
        self.tracking_products = tracking_products
        # previous top k + 1 Ritz vectors per measured optimizer (warm start); checkpointed when small
        self._warm_start: dict[int, list[Vector]] = {}
        self._feed_start: dict[int, Vector] = {}  # the top vector of the last requested measurement, per optimizer
        self._warned: set[str] = set()
        self._fed: dict[int, float] = {}  # optimizer index -> sharpness fed to its schedulers
        # optimizer index -> where the last finite-difference search ended (checkpointed: a resumed run starts there)
        self._fd_step_ratio: dict[int, float] = {}
        self._subscribers: dict[int, list[SharpnessSubscriber]] = {}  # optimizer index -> schedulers (fit start)
        self._requesters: list[MeasurementRequester] = []  # those of them that may ask for a measurement
        self.last_method: str | None = None  # how the latest products were computed

    # -- public view of the latest measurement --------------------------------------------------------------------
    @property
    def last_sharpness(self) -> float | None:
        """Sharpness of the latest measurement (NaN if it failed; ``None`` before the first)."""
        return self.last_metrics.get(SHARPNESS)

    @property
    def last_threshold(self) -> float | None:
        """Stability threshold at the latest measurement (``None`` if unknown)."""
        return self.last_metrics.get(STABILITY_THRESHOLD)

    @override
    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "k": self.k, "mode": self.mode}

    # -- hooks ----------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.product_dtype is not None and is_sharded_strategy(trainer.strategy):
            raise MisconfigurationException(
                f"`product_dtype={self.product_dtype}` is not supported under sharded strategies (products run "
                "through FSDP's own forward and backward in the parameters' dtype)."
            )
        if stage == "fit":
            # a fit starts cold (the vectors may belong to another model or batch) unless a checkpoint restores them
            self._warm_start = {}
            self._feed_start = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._subscribers = attach(trainer, SharpnessSubscriber, self)
        # checked once here, not per step (a runtime protocol check is slow for a hot path)
        self._requesters = [
            s for scheds in self._subscribers.values() for s in scheds if isinstance(s, MeasurementRequester)
        ]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        add_curvature_layout(find_summary_writer(trainer), k=self.k)

    # -- measurement ----------------------------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _threshold(self, optimizer: torch.optim.Optimizer | None) -> float | None:
        if optimizer is None:
            return None
        try:
            return stability_threshold(optimizer)
        except (TypeError, ValueError) as exc:
            self._warn_once("threshold", f"{type(self).__name__}: no stability threshold is logged ({exc}).")
            return None

    @override
    def _eager_measurement(self) -> bool:
        # "auto" measures Lightning-compiled code through its compiled methods (finite differences)
        return self.method != "auto"

    @override
    def _failed_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        nan = math.nan
        metrics = {SHARPNESS: nan, **{eig_tag(i): nan for i in range(1, self.k + 1)}}
        optimizer = first_optimizer(trainer)
        threshold = self._threshold(optimizer)
        if threshold is not None:
            metrics[STABILITY_THRESHOLD] = threshold
            metrics[EDGE_RATIO] = nan
        self._warm_start = {}
        self._feed_start = {}
        self._fed = {}
        return metrics

    def _preconditioner(
        self, optimizer: torch.optim.Optimizer | None, params: list[Tensor], H: HessianOperator
    ) -> tuple[Vector | None, bool]:
        """``(P, predicted)``: the adaptive optimizer's preconditioner, or before its first step the one it will use."""
        if optimizer is None or not is_adaptive(optimizer):
            return None, False
        P = preconditioner_parts(optimizer, params)
        predicted = False
        if P is None:
            P = predicted_first_step_preconditioner(optimizer, params, H.gradient())
            predicted = True
        if P is None:
            return None, False
        vec = H.space.coerce(list(P))
        if not all(bool((torch.isfinite(t) & (t > 0)).all()) for t in vec):
            raise NonFiniteCurvatureError("The optimizer's preconditioner is not finite and positive.")
        return vec, predicted

    def _optimizers_to_measure(self, trainer: pl.Trainer) -> list[int]:
        """Optimizer 0 (the logged tags) and every other optimizer a subscribed scheduler is built on."""
        indices = [0] if trainer.optimizers else []
        return indices + sorted(i for i in self._subscribers if i not in indices)

    @override
    def _requested(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether a subscribed scheduler asks for a measurement before the update ``step``."""
        return any(sched.wants_measurement(step) for sched in self._requesters)

    @override
    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: LossFn, batch: Any, step: int
    ) -> dict[str, float]:
        self._fed = {}
        reshard(pl_module)  # FSDP2: a forward without backward (the finiteness check) leaves the modules unsharded
        indices: list[int | None] = list(self._optimizers_to_measure(trainer)) or [None]
        metrics: dict[str, float] = {}
        density = None
        res_main = None
        threshold_main = None
        adaptive_main = False
        for index in indices:
            optimizer = trainer.optimizers[index] if index is not None else None
            params = measured_parameters(pl_module, optimizer)
            adaptive = optimizer is not None and is_adaptive(optimizer)
            threshold = self._threshold(optimizer)
            with HessianOperator(
                pl_module, loss_fn, batch, params=params, mode=self.mode, reduce_fn=make_reduce_fn(trainer),
                reuse_graph=self.reuse_graph, method=self.method, dtype=self.product_dtype,
                compiled=True if lightning_compiled(pl_module) and self.method == "auto" else None,
            ) as H:  # fmt: skip
                H.fd_step_ratio = self._fd_step_ratio.get(index or 0, 1.0)  # where the last search ended
                precond, _ = self._preconditioner(optimizer, params, H)
                feedable = (not adaptive) or precond is not None
                op = preconditioned_operator(H, precond)
                feed = self._requested_only
                with warnings.catch_warnings():  # an unreliable estimate is reported below as a skipped measurement
                    warnings.simplefilter("ignore", InaccurateProductsWarning)
                    res = self._feed_eigenpair(op, H, index or 0) if feed else self._eigenpairs(op, H, index or 0)
                if H.method == "finite_difference":
                    self._fd_step_ratio[index or 0] = H.fd_step_ratio
                if op.product_error > RELIABLE_PRODUCT_ERROR:  # a measurement that cannot be made: skipped
                    raise InaccurateProductsError(
                        f"finite-difference products are {op.product_error:.1%} off by their own estimate (the "
                        "step search found no better step); the model is too large or too far from quadratic for "
                        f"{H.space.dtype} differences. Measure with method='double_backward' (eager code) if it "
                        "runs, or with product_dtype=torch.float64."
                    )
                sharpness = float(res.eigenvalues[0])
                if feedable and math.isfinite(sharpness):
                    self._fed[index or 0] = sharpness
                if index not in (0, None):
                    tag = f"curvature/optimizer_{index}"
                    metrics[f"{tag}/sharpness"] = sharpness
                    if threshold is not None and feedable:
                        metrics[f"{tag}/edge_ratio"] = sharpness / threshold
                    metrics[NUM_HVP] = metrics.get(NUM_HVP, 0.0) + float(H.num_hvp)
                    continue
                res_main, threshold_main, adaptive_main = res, threshold, adaptive
                metrics[SHARPNESS] = sharpness
                metrics.update({eig_tag(i + 1): float(v) for i, v in enumerate(res.eigenvalues[: 1 if feed else None])})
                # converged: min(r, r²/gap) with the gap from the Ritz values; stopped early (tracking): only the
                # residual is a statement the subspace supports (and never below the products' own accuracy)
                bound = res.error_bounds[0] if res.converged else max(res.residuals[0], res.error_bounds[0])
                metrics[ERROR_BOUND] = float(bound)
                if threshold is not None:
                    metrics[STABILITY_THRESHOLD] = threshold
                    if feedable:
                        metrics[EDGE_RATIO] = sharpness / threshold
                if feed:  # the scheduler's value only: no other eigenvalue, trace, density or overlap
                    metrics[NUM_HVP] = metrics.get(NUM_HVP, 0.0) + float(H.num_hvp)
                    self.last_method = H.method
                    res_main = None
                    continue
                if self.compute_trace:
                    tr = hutchpp_trace(H, num_matvecs=self.trace_samples)
                    metrics[HESSIAN_TRACE] = tr.estimate
                    metrics[HESSIAN_TRACE_STD_ERROR] = tr.std_error
                if self.compute_overlap and res.eigenvectors is not None:
                    g = H.gradient()
                    if isinstance(op, ScaledOperator):
                        g = [d * t for d, t in zip(op.scale, g)]
                    metrics[SUBSPACE_OVERLAP] = _overlap(H.space, g, res.eigenvectors)
                if self.compute_density:
                    density = slq_density(
                        H,
                        num_probes=self.density_num_probes,
                        num_iters=self.density_num_iters,
                        basis_device=self.basis_device,
                    )
                metrics[NUM_HVP] = metrics.get(NUM_HVP, 0.0) + float(H.num_hvp)
                self.last_method = H.method
        writer = find_summary_writer(trainer)
        if density is not None:
            markers = (
                {"stability threshold": threshold_main} if threshold_main is not None and not adaptive_main else None
            )
            log_density_figure(writer, DENSITY_FIGURE, density.grid, density.density, step, markers=markers)  # type: ignore[arg-type]
        if self.log_histogram and res_main is not None:
            log_spectrum_histogram(writer, SPECTRUM_HISTOGRAM, res_main.eigenvalues, step)
        return metrics

    def _feed_eigenpair(self, op: Any, H: HessianOperator, index: int) -> LanczosResult:
        """The top eigenvalue only, for a measurement a scheduler asked for: from the last top vector, to
        ``max(tol, FEED_TOL)`` (the stored top-k block is kept for the next full measurement)."""
        start = self._feed_start.get(index)
        block = self._warm_start.get(index)
        if start is None and self.warm_start and block and all(t.shape == s for t, s in zip(block[0], H.space.shapes)):
            start = block[0]
        if start is not None and len(start) == len(H.space.shapes):
            # copied straight to the parameters' devices (a host-kept start is not cloned on the host first)
            v0: Any = Handoff([[t.to(d, copy=True) for t, d in zip(start, H.space.devices)]])
        else:
            v0 = _cold_start(op, H, 1)
        tol = max(self.tol, FEED_TOL)
        with H.fd_target_as(fd_target_for(tol)):
            res = lanczos(
                op, k=1, tol=tol, max_iter=self.max_iter, v0=v0, return_warm_start=self.warm_start,
                max_vectors=self.max_vectors, basis_device=self.basis_device,
            )  # fmt: skip
        if self.warm_start and res.warm_start is not None:
            self._feed_start[index] = [self._kept(t) for t in res.warm_start[0]]
        return res

    def _kept(self, t: Tensor) -> Tensor:
        """A copy of ``t`` to keep between measurements (on ``basis_device`` when one is set)."""
        return t.clone() if self.basis_device is None else t.to(self.basis_device, copy=True)

    def _eigenpairs(self, op: Any, H: HessianOperator, index: int) -> LanczosResult:
        """Top-k eigenpairs of ``op`` (``H`` or ``P^{-1/2} H P^{-1/2}``), warm-started from the last Ritz vectors."""
        k = min(self.k, H.dim)
        if k < self.k:
            self._warn_once("k", f"{type(self).__name__}: k={self.k} exceeds the {H.dim} parameters; using k={k}.")
        prev = self._warm_start.get(index)
        # the previous block, if it lives in the same parameter space (the block start needs at least k vectors)
        usable = (
            self.warm_start
            and prev is not None
            and len(prev) >= k
            and all(t.shape == s for t, s in zip(prev[0], H.space.shapes))
            and len(prev[0]) == len(H.space.shapes)
        )
        v0: Any = prev if usable else None
        if v0 is not None and self._warm_in_a_row >= self.cold_start_every:
            v0 = None  # the periodic cold start (see `cold_start_every`)
        self._warm_in_a_row = 0 if v0 is None else self._warm_in_a_row + 1
        self._warm_start.pop(index, None)  # its memory counts in max_vectors: drop it before the solve
        max_iter = max(self.max_iter, k)
        target = fd_target_for(self.tol)
        if v0 is None:
            v0 = _cold_start(op, H, k)
        elif self.tracking_products is not None:
            # tracking: a few products from the previous top-k vectors (for k = 1 Lanczos from the last top vector),
            # not run to tol; the error estimate is logged and a certified cold solve comes every cold_start_every
            v0 = Handoff([v0[0]] if k == 1 else v0[:k])
            max_iter = self.tracking_products
            target = TRACKING_FD_TARGET  # the loosest fd_target_for allows
        else:
            v0 = Handoff(v0)  # the solver owns the warm block (it counts in max_vectors)
        with H.fd_target_as(target):
            res = lanczos(
                op, k=k, tol=self.tol, max_iter=max_iter, v0=v0,
                return_eigenvectors=self.compute_overlap, return_warm_start=self.warm_start,
                max_vectors=self.max_vectors, basis_device=self.basis_device,
            )  # fmt: skip
        if self.warm_start and res.warm_start is not None:
            self._warm_start[index] = [[self._kept(t) for t in v] for v in res.warm_start]
        self._feed_start.pop(index, None)  # requested measurements start again from this block's top vector
        return res

    @override
    def _after_measurement(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float], step: int, ok: bool
    ) -> None:
        if not ok:
            return
        for index, scheds in self._subscribers.items():
            value = self._fed.get(index)
            if value is not None:
                for sched in scheds:
                    sched.observe_sharpness(value, step)

    # -- checkpointing --------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        total = sum(t.numel() for vectors in self._warm_start.values() for v in vectors for t in v)
        if self.warm_start and 0 < total <= self.checkpoint_warm_start_max_entries:
            state["warm_start"] = {
                int(i): [[t.detach().cpu().clone() for t in v] for v in vectors]
                for i, vectors in self._warm_start.items()
            }
            state["warm_in_a_row"] = self._warm_in_a_row
        state["fd_step_ratio"] = dict(self._fd_step_ratio)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restored = state_dict.get("warm_start")
        if isinstance(restored, dict):
            self._warm_start = {int(i): [list(v) for v in vectors] for i, vectors in restored.items()}
        self._warm_in_a_row = int(state_dict.get("warm_in_a_row", self._warm_in_a_row))
        self._fd_step_ratio = {int(i): float(r) for i, r in state_dict.get("fd_step_ratio", {}).items()}


def _cold_start(op: Any, H: HessianOperator, k: int) -> Handoff | None:
    """The start of a cold solve, as in ``hessian_eigenvalues`` (the gradient mixed in for ``k = 1``), or ``None``."""
    cold = cold_start_vector(H, k, scale=op.scale if isinstance(op, ScaledOperator) else None)
    return None if cold is None else Handoff([cold])


def _overlap(space: Any, gradient: Vector, eigenvectors: list[Vector]) -> float:
    r"""Share of the gradient in the eigenvectors' span, :math:`\sum_i (v_i^\top g)^2 / \|g\|^2`."""
    gg = float(space.dot(gradient, gradient))
    if gg == 0.0 or not math.isfinite(gg):  # zero gradient: the overlap is undefined
        return math.nan
    proj = space.dots([(v, gradient) for v in eigenvectors])
    return min(1.0, float((proj**2).sum()) / gg)
