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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_curvature.core.hvp import HessianOperator, HVPMethod, LossFn, ReduceFn
from lightning_curvature.core.lanczos import Operator, as_matvec

__all__ = ["TraceResult", "hessian_trace", "hutchinson_trace", "hutchpp_trace"]


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the estimated trace.
        std_error: standard error of ``estimate`` (0 when exact).
        num_hvp: products used (for :func:`hessian_trace`; ``num_matvecs`` for the generic estimators).
    """

    estimate: float
    std_error: float
    num_hvp: int


def _rademacher(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randint(0, 2, (n,), generator=gen, device=device).to(dtype).mul_(2).sub_(1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _mean_and_se(samples: list[float]) -> tuple[float, float]:
    m = len(samples)
    mean = math.fsum(samples) / m
    if m < 2:
        return mean, math.inf
    var = math.fsum((s - mean) ** 2 for s in samples) / (m - 1)
    return mean, math.sqrt(var / m)


def _infer(A: Operator, dim: int | None, dtype: torch.dtype | None, device: Any) -> tuple[int, torch.dtype, Any]:
    if isinstance(A, Tensor):
        return A.shape[0], A.dtype, A.device
    if dim is None:
        raise ValueError("`dim` is required when `A` is a callable.")
    return dim, dtype or torch.float32, device or torch.device("cpu")


def hutchinson_trace(
    A: Operator,
    dim: int | None = None,
    num_matvecs: int = 100,
    *,
    deflate: Tensor | None = None,
    deflate_eigenvalues: Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceResult:
    """Hutchinson's estimator with Rademacher probes (optionally deflated by known eigenpairs).

    Args:
        A: symmetric matrix or callable ``v -> Av``.
        dim: vector size (inferred from a matrix).
        num_matvecs: number of probes (= products).
        deflate: ``(k, n)`` orthonormal eigenvectors to project out; their eigenvalues are added exactly.
        deflate_eigenvalues: the ``k`` eigenvalues of ``deflate``.
        seed: seed of the probes (the global RNG is not touched).
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
    n, dt, dev = _infer(A, dim, dtype, device)
    matvec = as_matvec(A)
    V = None
    exact = 0.0
    if deflate is not None and deflate_eigenvalues is not None:
        V = deflate.reshape(-1, n).to(device=dev, dtype=dt)
        exact = float(deflate_eigenvalues.sum())
    gen = _generator(seed, torch.device(dev))
    samples = []
    for _ in range(num_matvecs):
        z = _rademacher(n, gen, dt, torch.device(dev))
        if V is not None:
            z = z - V.T @ (V @ z)
        samples.append(float(torch.dot(z, matvec(z).reshape(-1).to(dt))))
    mean, se = _mean_and_se(samples)
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

    Raises:
        ValueError: for ``num_matvecs < 3``.

    Example::

        >>> A = torch.diag(torch.tensor([100.0, 50.0, 1.0, 1.0, 1.0], dtype=torch.float64))
        >>> round(hutchpp_trace(A, num_matvecs=15).estimate, 6)  # the 5-column sketch spans everything: exact
        153.0
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs `num_matvecs` >= 3, got {num_matvecs!r}.")
    n, dt, dev = _infer(A, dim, dtype, device)
    dev = torch.device(dev)
    matvec = as_matvec(A)
    gen = _generator(seed, dev)
    s = max(1, min(num_matvecs // 3, n))
    h = num_matvecs - 2 * s
    AS = torch.stack([matvec(_rademacher(n, gen, dt, dev)).reshape(-1).to(dt) for _ in range(s)], dim=1)
    Q, _ = torch.linalg.qr(AS)
    exact = math.fsum(
        float(torch.dot(Q[:, i], matvec(Q[:, i].contiguous()).reshape(-1).to(dt))) for i in range(Q.shape[1])
    )
    samples = []
    for _ in range(h):
        z = _rademacher(n, gen, dt, dev)
        z = z - Q @ (Q.T @ z)
        Az = matvec(z).reshape(-1).to(dt)
        samples.append(float(torch.dot(z, Az - Q @ (Q.T @ Az))))
    if samples:
        mean, se = _mean_and_se(samples)
    else:
        mean, se = 0.0, math.inf
    return TraceResult(estimate=exact + mean, std_error=se, num_hvp=s + Q.shape[1] + h)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    num_samples: int = 100,
    *,
    estimator: Literal["hutch++", "hutchinson"] = "hutch++",
    deflate: Any | None = None,
    params: Sequence[Tensor] | None = None,
    method: HVPMethod = "double_backward",
    mode: Literal["train", "eval"] = "train",
    reduce_fn: ReduceFn | None = None,
    seed: int = 0,
) -> TraceResult:
    """Trace of the Hessian of ``loss_fn(model, batch)`` with a standard error.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss.
        batch: the batch (or ``MultiBatch``).
        num_samples: Hessian-vector products to spend.
        estimator: ``"hutch++"`` (default) or ``"hutchinson"``.
        deflate: an :class:`~lightning_curvature.core.eigen.EigenResult` with eigenvectors: its eigenvalues are
            counted exactly and Hutchinson estimates the rest (overrides ``estimator``).
        params: parameters (default: all trainable).
        method: HVP implementation.
        mode: ``"train"`` or ``"eval"``.
        reduce_fn: SUM all-reduce for distributed measurements.
        seed: seed of the probes.

    Returns:
        :class:`TraceResult` with ``num_hvp``.

    Raises:
        ValueError: for a bad ``estimator`` or a ``deflate`` result without eigenvectors.
        NonFiniteCurvatureError: if the loss or a product is NaN or infinite.
    """
    if estimator not in ("hutch++", "hutchinson"):
        raise ValueError(f"`estimator` must be 'hutch++' or 'hutchinson', got {estimator!r}.")
    if deflate is not None and getattr(deflate, "eigenvectors", None) is None:
        raise ValueError("`deflate` must be an EigenResult computed with return_eigenvectors=True.")
    with HessianOperator(
        model, loss_fn, batch, params=params, method=method, mode=mode, reduce_fn=reduce_fn, seed=seed
    ) as H:
        mv: Callable[[Tensor], Tensor] = H.matvec
        if deflate is not None:
            res = hutchinson_trace(
                mv,
                H.dim,
                num_samples,
                deflate=deflate.eigenvectors,
                deflate_eigenvalues=deflate.eigenvalues,
                seed=seed,
                dtype=H.dtype,
                device=H.device,
            )
        elif estimator == "hutchinson":
            res = hutchinson_trace(mv, H.dim, num_samples, seed=seed, dtype=H.dtype, device=H.device)
        else:
            res = hutchpp_trace(mv, H.dim, num_samples, seed=seed, dtype=H.dtype, device=H.device)
        return TraceResult(estimate=res.estimate, std_error=res.std_error, num_hvp=H.num_hvp)
