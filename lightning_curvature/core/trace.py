r"""Hessian trace by Hutchinson and Hutch++, with a standard error, optionally deflated.

Hutchinson: :math:`\mathrm{tr}(A) = \mathbb{E}[z^\top A z]` for Rademacher :math:`z`; the estimate is the mean
of :math:`m` samples and its standard error the sample standard deviation over :math:`\sqrt{m}`.

Hutch++ (Meyer, Musco, Musco, Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021,
arXiv 2010.09649) spends a third of the products on a sketch :math:`Q = \mathrm{orth}(AS)`, a third on the exact
:math:`\mathrm{tr}(Q^\top A Q)`, and a third on Hutchinson for the deflated rest
:math:`(I-QQ^\top)A(I-QQ^\top)`. Only that last part is random, so its standard error is the estimate's.

Deflation by known eigenpairs :math:`(\lambda_i, v_i)`:
:math:`\mathrm{tr}(A) = \sum_i \lambda_i + \mathrm{tr}((I-VV^\top)A(I-VV^\top))`, the second term by Hutchinson.
This removes the outliers' variance, which dominates for network Hessians.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_curvature.core._basis import Basis
from lightning_curvature.core._batch import as_batch_first
from lightning_curvature.core._validation import is_integer
from lightning_curvature.core.hvp import HessianOperator, HVPMethod, LossFn, ReduceFn
from lightning_curvature.core.lanczos import Operator
from lightning_curvature.core.operators import CurvatureOperator, as_operator, unreliable_products

__all__ = ["HUTCHPP_MIN_MATVECS", "TraceResult", "hessian_trace", "hutchinson_trace", "hutchpp_trace"]

#: Fewest products Hutch++ can split into its sketch, its exact part and its Hutchinson part.
HUTCHPP_MIN_MATVECS = 3


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the estimated trace.
        std_error: standard error of ``estimate`` (0 when exact); with finite-difference products, plus the bias
            their estimated error allows (``inf`` when that estimate is not reliable). It is a sample standard
            error from ``s`` random samples (Hutch++: a third of the products), so ``(estimate − trace)/std_error``
            follows roughly Student's t with ``s − 1`` degrees of freedom: a 95% interval is ±2.26 standard errors
            for ``s = 10`` (30 products of Hutch++), ±2.04 for ``s = 33`` (100), ±4.3 for ``s = 3`` (9).
        num_hvp: products used (for :func:`hessian_trace`; ``num_matvecs`` for the generic estimators).
    """

    estimate: float
    std_error: float
    num_hvp: int


def _mean_and_se(samples: list[float]) -> tuple[float, float]:
    m = len(samples)
    mean = math.fsum(samples) / m
    if m < 2:
        return mean, math.inf
    var = math.fsum((s - mean) ** 2 for s in samples) / (m - 1)
    return mean, math.sqrt(var / m)


def _with_product_bias(op: CurvatureOperator, se: float, bias: float) -> float:
    r"""``se`` plus the bias inexact products add to the estimate: ``bias`` sums the estimated errors of its
    quadratic forms :math:`z^\top Az` (:attr:`~lightning_curvature.core.operators.CurvatureOperator.form_error`,
    averaged where the samples are). Above :data:`~lightning_curvature.core.operators.RELIABLE_PRODUCT_ERROR` the
    estimates are not trusted and no bound is given (``inf``), with a warning.
    """
    if unreliable_products(op, "the trace's std_error is inf", stacklevel=4):
        return math.inf
    return se + bias


def _operator_and_probes(
    A: Operator, dim: int | None, dtype: torch.dtype | None, device: Any, seed: int
) -> tuple[CurvatureOperator, torch.Generator]:
    return as_operator(A, dim, dtype, device), torch.Generator(device="cpu").manual_seed(seed)


def _deflation_basis(op: CurvatureOperator, vectors: Any) -> Basis:
    """The eigenvectors to deflate (a ``(k, n)`` tensor or a list of vectors) as a basis of ``op``'s space."""
    space = op.space
    if isinstance(vectors, Tensor):
        rows = [space.coerce(r) for r in vectors.reshape(-1, space.dim if len(space) == 1 else vectors.shape[-1])]
    else:
        rows = [space.coerce(v) for v in vectors]
    return Basis.from_vectors(space, rows)


def hutchinson_trace(
    A: Operator,
    dim: int | None = None,
    num_matvecs: int = 100,
    *,
    deflate: Any = None,
    deflate_eigenvalues: Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceResult:
    """Hutchinson's estimator with Rademacher probes (optionally deflated by known eigenpairs).

    Args:
        A: a :class:`~lightning_curvature.core.operators.CurvatureOperator`, a symmetric matrix or a callable
            ``v -> Av`` on flat vectors.
        dim: vector size (for a callable).
        num_matvecs: number of probes (= products).
        deflate: ``k`` orthonormal eigenvectors to project out (a ``(k, n)`` tensor or a list of vectors); their
            eigenvalues are added exactly.
        deflate_eigenvalues: the ``k`` eigenvalues of ``deflate``.
        seed: seed of the probes (a CPU generator; the global RNG is not touched).
        dtype: probe dtype for a callable.
        device: probe device for a callable.

    Returns:
        :class:`TraceResult` with ``num_hvp`` = products used.

    Raises:
        ValueError: for ``num_matvecs < 1`` or a ``deflate`` without its eigenvalues.

    Example::

        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> hutchinson_trace(A, num_matvecs=10).estimate  # diagonal: every Rademacher probe is exact
        15.0
    """
    if num_matvecs < 1:
        raise ValueError(f"`num_matvecs` must be >= 1, got {num_matvecs!r}.")
    if (deflate is None) != (deflate_eigenvalues is None):
        raise ValueError("Pass both `deflate` (eigenvectors) and `deflate_eigenvalues`, or neither.")
    op, gen = _operator_and_probes(A, dim, dtype, device, seed)
    space = op.space
    V = None
    exact = 0.0
    if deflate is not None and deflate_eigenvalues is not None:
        V = _deflation_basis(op, deflate)
        exact = float(deflate_eigenvalues.sum())
    samples, form_errors = [], []
    for _ in range(num_matvecs):
        z = space.rademacher(gen)
        if V is not None:
            V.subtract(z, V.dots(z))
        samples.append(float(space.dot(z, op.matvec(z))))
        form_errors.append(float(op.form_error))
    mean, se = _mean_and_se(samples)
    se = _with_product_bias(op, se, math.fsum(form_errors) / num_matvecs)
    return TraceResult(estimate=exact + mean, std_error=se, num_hvp=num_matvecs)


def hutchpp_trace(
    A: Operator,
    dim: int | None = None,
    num_matvecs: int = 99,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceResult:
    """Hutch++ with ``num_matvecs`` products split in thirds (sketch, exact part, Hutchinson on the rest).

    Memory: the sketch keeps ``num_matvecs // 3`` vectors of the operator's size.

    Raises:
        ValueError: for ``num_matvecs`` below :data:`HUTCHPP_MIN_MATVECS`.

    Example::

        >>> A = torch.diag(torch.tensor([100.0, 50.0, 1.0, 1.0, 1.0], dtype=torch.float64))
        >>> round(hutchpp_trace(A, num_matvecs=30).estimate, 6)  # a 10-column sketch spans all 5 dimensions: exact
        153.0
    """
    if num_matvecs < HUTCHPP_MIN_MATVECS:
        raise ValueError(f"Hutch++ needs `num_matvecs` >= {HUTCHPP_MIN_MATVECS}, got {num_matvecs!r}.")
    op, gen = _operator_and_probes(A, dim, dtype, device, seed)
    space = op.space
    s = max(1, num_matvecs // 3)  # may exceed the dimension: dependent sketch columns are dropped
    h = num_matvecs - 2 * s
    Q = Basis(space)
    for _ in range(s):  # Q = orth(A S), one sketch column at a time (two Gram–Schmidt passes)
        y = op.matvec(space.rademacher(gen))
        before = float(space.norm(y))
        for _ in range(2):
            Q.subtract(y, Q.dots(y))
        nrm = float(space.norm(y))
        if nrm > 1e-10 * max(before, 1e-300):
            Q.append([t / nrm for t in y])
    exact_parts, exact_errors = [], []
    for i in range(len(Q)):
        q = Q.vector(i)
        exact_parts.append(float(space.dot(q, op.matvec(list(q)))))
        exact_errors.append(float(op.form_error))
    exact = math.fsum(exact_parts)
    samples, form_errors = [], []
    for _ in range(h):
        z = space.rademacher(gen)
        Q.subtract(z, Q.dots(z))
        Az = op.matvec(z)
        form_errors.append(float(op.form_error))  # of z'Az; the projection below changes Az, not z'Az (Qᵀz = 0)
        Q.subtract(Az, Q.dots(Az))
        samples.append(float(space.dot(z, Az)))
    mean, se = _mean_and_se(samples) if samples else (0.0, math.inf)
    bias = math.fsum(exact_errors) + (math.fsum(form_errors) / len(form_errors) if form_errors else 0.0)
    se = _with_product_bias(op, se, bias)
    return TraceResult(estimate=exact + mean, std_error=se, num_hvp=s + len(Q) + h)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    num_samples: int = 100,
    *,
    estimator: Literal["hutch++", "hutchinson"] = "hutch++",
    deflate: Any | None = None,
    params: Sequence[Tensor] | None = None,
    method: HVPMethod = "auto",
    mode: Literal["train", "eval"] = "train",
    reduce_fn: ReduceFn | None = None,
    seed: int = 0,
    reuse_graph: bool | None = None,
    batch_dim: Any = None,
    dtype: torch.dtype | None = None,
) -> TraceResult:
    """Trace of the Hessian of ``loss_fn(model, batch)`` with a standard error.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss.
        batch: one batch, a ``MultiBatch`` or a re-iterable of batches (a ``DataLoader``).
        num_samples: Hessian-vector products to spend.
        estimator: ``"hutch++"`` (default) or ``"hutchinson"``.
        deflate: an :class:`~lightning_curvature.core.eigen.EigenResult` with eigenvectors: its eigenvalues are
            counted exactly and Hutchinson estimates the rest (overrides ``estimator``).
        params: parameters (default: all trainable).
        method: HVP implementation (``"auto"``: see :class:`~lightning_curvature.core.hvp.HessianOperator`).
        mode: ``"train"`` or ``"eval"``.
        reduce_fn: SUM all-reduce for distributed measurements.
        seed: seed of the probes.
        reuse_graph: see :class:`~lightning_curvature.core.hvp.HessianOperator`.
        batch_dim: where the examples are in the batch's tensors (see :func:`~.eigen.hessian_eigenvalues`).
        dtype: the dtype of the products (see :class:`~lightning_curvature.core.hvp.HessianOperator`).

    Returns:
        :class:`TraceResult` with ``num_hvp``.

    Raises:
        ValueError: for a bad ``estimator``, too few ``num_samples`` (3 for Hutch++, 1 for Hutchinson), or a
            ``deflate`` result without eigenvectors.
        NonFiniteCurvatureError: if the loss or a product is NaN or infinite.
    """
    if estimator not in ("hutch++", "hutchinson"):
        raise ValueError(f"`estimator` must be 'hutch++' or 'hutchinson', got {estimator!r}.")
    fewest = HUTCHPP_MIN_MATVECS if estimator == "hutch++" and deflate is None else 1
    if not is_integer(num_samples) or num_samples < fewest:
        raise ValueError(
            f"`num_samples` must be an integer >= {fewest} for estimator={estimator!r}"
            + (" (>= 1 with estimator='hutchinson')" if fewest > 1 else "")
            + f", got {num_samples!r}."
        )
    num_samples = int(num_samples)
    if batch_dim is not None:
        batch, loss_fn = as_batch_first(batch, loss_fn, batch_dim)
    if deflate is not None and getattr(deflate, "eigenvectors", None) is None:
        raise ValueError("`deflate` must be an EigenResult computed with return_eigenvectors=True.")
    with HessianOperator(
        model, loss_fn, batch, params=params, method=method, mode=mode, reduce_fn=reduce_fn, seed=seed,
        reuse_graph=reuse_graph, dtype=dtype,
    ) as H:  # fmt: skip
        if deflate is not None:
            vectors = getattr(deflate, "eigenvector_list", None)
            vectors = vectors if vectors is not None else deflate.eigenvectors
            res = hutchinson_trace(
                H, num_matvecs=num_samples, deflate=vectors, deflate_eigenvalues=deflate.eigenvalues, seed=seed
            )
        elif estimator == "hutchinson":
            res = hutchinson_trace(H, num_matvecs=num_samples, seed=seed)
        else:
            res = hutchpp_trace(H, num_matvecs=num_samples, seed=seed)
        return TraceResult(estimate=res.estimate, std_error=res.std_error, num_hvp=H.num_hvp)
