r"""Power iteration: the dominant eigenpair (largest in *magnitude*) of a symmetric operator.

Kept for comparison with tools that use it (PyHessian): it converges slowly when the top eigenvalues are close, and
it returns the largest-magnitude eigenvalue, which is the most negative one when the spectrum's negative end is
larger than its positive end. :func:`~lightning_curvature.core.lanczos.lanczos` is the method to use.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.lanczos import LanczosResult, Operator
from lightning_curvature.core.operators import CallableOperator, DenseOperator, as_operator, unreliable_products
from lightning_curvature.core.vectors import scale_

__all__ = ["power_iteration"]


def power_iteration(
    A: Operator,
    dim: int | None = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    v0: Any = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LanczosResult:
    """Dominant eigenpair by power iteration; stops when the Rayleigh quotient moves by at most ``tol`` (relative).

    Raises:
        ValueError: if ``tol <= 0``, ``max_iter < 1``, or ``dim`` cannot be inferred.
        NonFiniteCurvatureError: if a product is NaN or infinite.

    Example::

        >>> A = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
        >>> round(power_iteration(A, tol=1e-10).eigenvalues.item(), 6)
        4.0
    """
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0, got {tol!r}.")
    if max_iter < 1:
        raise ValueError(f"`max_iter` must be >= 1, got {max_iter!r}.")
    if isinstance(v0, torch.Tensor) and callable(A) and not isinstance(A, torch.Tensor) and dim is None:
        dim, dtype, device = v0.numel(), v0.dtype, v0.device
    op = as_operator(A, dim, dtype, device)
    space = op.space
    if v0 is None:
        v = space.randn(torch.Generator(device="cpu").manual_seed(seed))
    else:
        v = [t.clone() for t in space.coerce(v0 if not isinstance(v0, torch.Tensor) else v0.reshape(-1))]
    nrm = float(space.norm(v))
    if not (math.isfinite(nrm) and nrm > 0):
        raise ValueError("The start vector must be finite and non-zero.")
    scale_(v, 1.0 / nrm)
    lam_prev = lam = math.nan
    resid = math.inf
    converged = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        w = op.matvec(list(v))
        lam = float(space.dot(v, w))
        if not math.isfinite(lam):
            raise NonFiniteCurvatureError(f"Power iteration met a non-finite Rayleigh quotient ({lam}).")
        r = [wi - lam * vi for wi, vi in zip(w, v)]
        resid = float(space.norm(r))
        nrm = float(space.norm(w))
        if nrm == 0.0:
            converged = True
            break
        v = scale_(w, 1.0 / nrm)
        if math.isfinite(lam_prev) and abs(lam - lam_prev) <= tol * max(abs(lam), 1e-12):
            converged = True
            break
        lam_prev = lam
    f64 = torch.float64
    vec = v[0].unsqueeze(0) if isinstance(op, (DenseOperator, CallableOperator)) else [v]
    # inexact products: never a bound below their error, none at all where its estimate is not reliable
    bound = max(resid, op.product_error * abs(lam))
    if unreliable_products(op, "no error bound is reported (inf)"):
        bound, converged = math.inf, False
    return LanczosResult(
        eigenvalues=torch.tensor([lam], dtype=f64),
        eigenvectors=vec,
        residuals=torch.tensor([resid], dtype=f64),
        error_bounds=torch.tensor([bound], dtype=f64),
        num_matvecs=it,
        converged=converged,
    )
