r"""Ritz values, their error bounds and the stopping rule shared by the eigenvalue solvers.

Error bounds. A Ritz pair :math:`(\theta_i, y_i)` of a symmetric :math:`A` has residual
:math:`r_i = \|Ay_i - \theta_i y_i\|`, and an eigenvalue lies within :math:`r_i` of :math:`\theta_i`. Ritz values
of a subspace never overshoot (Cauchy interlacing: :math:`\theta_i \le \lambda_i` counting from the top), so only the
next eigenvalue *inwards* limits the error, and Kato–Temple gives :math:`0 \le \lambda_i - \theta_i \le
r_i^2/\delta_i`, :math:`\delta_i = \theta_i - a` for any :math:`a` above :math:`\lambda_{i+1}`; :math:`a` is estimated
by the largest :math:`\theta_j + \rho_j` further in, :math:`\rho_j` a radius within which :math:`\theta_j` has an
eigenvalue: :math:`r_j`, or the smaller *refined* residual :math:`\min_{u \in \mathcal{V}} \|(A - \theta_j)u\|`
(Jia 1997), which needs no product. The bound on value :math:`i` is :math:`\min(r_i, r_i^2/\delta_i)`.

Every bound is at least the accuracy the products themselves have (:func:`precision_floor`: a few ulps of the
operator's scale in the vectors' dtype), and the stopping rule accepts a value whose bound meets that floor even when
``tol`` asks for more. These are **estimates**, not proofs: the gap is estimated from Ritz values, and no bound
can see an eigenvalue that the subspace has not found yet (see :mod:`lightning_curvature.core.lanczos`, "What no
stopping rule can see").

Stopping rule. A value is accepted when its bound is at most :math:`\mathrm{tol}\cdot\max(|\theta_i|,
\mathrm{abs\_floor})` **and** the Ritz values have settled (moved by at most that much over the last 3 steps for
k = 1, over the last 2 steps for the top k + 1 for k > 1): an eigenvalue the subspace has not resolved yet makes the
estimated gap too large, but it also keeps the Ritz values moving.

References:
    B. N. Parlett, *The Symmetric Eigenvalue Problem*, SIAM 1998, §4.5 (residual bounds), §10.2 and §11.4
    (Kato–Temple).
    Z. Jia, "Refined iterative algorithms based on Arnoldi's process for large unsymmetric eigenproblems",
    Linear Algebra Appl. 259, 1997 (refined Ritz vectors).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "GUARD",
    "PRECISION_ULPS",
    "StoppingRule",
    "Which",
    "error_bounds",
    "precision_floor",
    "refined_residuals",
    "ritz_pairs",
]

#: Products computed in a floating-point dtype are exact only to a few ulps of the operator's scale; eigenvalues of
#: the computed operator can differ from the true ones by that much (a backward error), whatever the solver does.
#: The floor allows 64 ulps (float32 products of the benchmark models are within about 10: ``benchmarks/README.md``).
PRECISION_ULPS = 64.0
#: The Krylov arithmetic adds rounding that grows slowly with the number of entries ``n``, most where the wanted
#: eigenvectors concentrate on a few coordinates (a diagonal operator is the worst case; its calibration is in
#: ``benchmarks/README.md`` and ``tests/test_krylov.py``). The floor adds sqrt(n)/64 ulps.
SIZE_ULPS_PER_SQRT_N = 1.0 / 64.0


def precision_floor(dtype: torch.dtype, scale: float, n: int = 0) -> float:
    """The absolute accuracy attainable with ``n``-entry vectors in ``dtype`` on an operator of norm ``scale``."""
    ulps = PRECISION_ULPS + SIZE_ULPS_PER_SQRT_N * max(n, 0) ** 0.5
    return ulps * float(torch.finfo(dtype).eps) / 2.0 * max(scale, 0.0)


Which = Literal["largest", "smallest"]
WHICH = ("largest", "smallest")

#: Ritz values kept beyond k: the next one inwards sets the gap (and is part of a warm-start block).
GUARD = 1


def ritz_pairs(T: Tensor, which: Which) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of the symmetric projected matrix ``T``, ordered from the wanted end."""
    theta, S = torch.linalg.eigh(T)
    if which == "largest":
        theta, S = theta.flip(0), S.flip(1)
    return theta, S


def _smallest_rank_one_update(d: Tensor, c: Tensor, iters: int = 100) -> Tensor:
    r"""Smallest eigenvalue of :math:`\mathrm{diag}(d) + cc^\top` (``d ≥ 0``) for each row of ``d``, ``c``.

    It lies between the two smallest ``d`` (interlacing) where the secular function
    :math:`1 + \sum_j c_j^2/(d_j - \lambda)` crosses zero; found by bisection, :math:`O(m)` per step.
    """
    order = torch.argsort(d, dim=1)
    d = torch.gather(d, 1, order)
    c2 = torch.gather(c * c, 1, order)
    lo = d[:, 0].clone()
    hi = d[:, 1].clone() if d.shape[1] > 1 else d[:, 0] + c2.sum(1)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f = 1.0 + (c2 / (d - mid[:, None])).sum(1)
        hi = torch.where(f > 0, mid, hi)
        lo = torch.where(f > 0, lo, mid)
    out = 0.5 * (lo + hi)
    return torch.where(c2[:, 0] <= 1e-300, d[:, 0], out)  # no coupling to the nearest value: it stays


def refined_residuals(T: Tensor, coupling: Tensor, theta: Tensor) -> Tensor:
    r""":math:`\min_{\|u\|=1,\ u \in \mathrm{span}(V)} \|(A - \theta) u\|` for each ``theta``: the refined residuals.

    With :math:`AV^\top = V^\top T + Q^\top C` (``C`` = ``coupling``, the ``(b, m)`` coupling of the next block
    :math:`Q` orthogonal to :math:`V`), the minimum is the smallest singular value of
    :math:`\begin{bmatrix} T - \theta I \\ C \end{bmatrix}`: no product and no pass over the basis. The Ritz vector
    is one candidate, so it never exceeds the Ritz residual.
    """
    m = T.shape[0]
    if coupling.shape[0] == 1 and m > 1:
        # σ_min² = λ_min((T − θ)² + CᵀC) = λ_min(diag((θ_j − θ)²) + ccᵀ) in T's eigenbasis (c = Sᵀ Cᵀ): a rank-one
        # update of a diagonal, solved by its secular equation instead of an SVD per θ (which cost O(m³) each)
        evals, S = torch.linalg.eigh(T.to(torch.float64))
        c = (coupling.to(torch.float64) @ S).reshape(-1)
        d = (evals[None, :] - theta.to(torch.float64)[:, None]) ** 2
        return _smallest_rank_one_update(d, c.expand_as(d)).clamp_min(0.0).sqrt()
    stacked = torch.cat([T, coupling]).to(torch.float64)
    eye = torch.eye(m + coupling.shape[0], m, dtype=torch.float64)
    return torch.linalg.svdvals(stacked - theta[:, None, None] * eye)[:, -1]


def error_bounds(theta: Tensor, resid: Tensor, which: Which, refined: Tensor | None = None) -> Tensor:
    r"""Error bounds ``min(r_i, r_i²/δ_i)`` with the one-sided Kato–Temple gap ``δ_i`` (see the module docstring).

    ``theta`` is ordered from the wanted end inwards; ``refined`` (optional) are refined residuals of the first
    values, which only shrink the radii used for the gap (as the radius of the value itself a refined vector can
    sit on the next eigenvalue down). The innermost value keeps the residual bound.
    """
    m = theta.numel()
    if m == 1:
        return resid.clone()
    radius = resid.clone()
    if refined is not None and refined.numel():
        n_ref = refined.numel()
        radius[:n_ref] = torch.minimum(resid[:n_ref], refined.to(resid.dtype))
    phi = theta if which == "largest" else -theta  # descending either way
    upper = phi + radius
    inner_max = torch.cummax(upper.flip(0), dim=0).values.flip(0)  # inner_max[i] = max_{j >= i} upper_j
    a = torch.cat([inner_max[1:], torch.full((1,), math.inf, dtype=theta.dtype)])
    gap = (phi - a).clamp_min(0.0)
    return torch.minimum(resid, resid**2 / gap.clamp_min(1e-300))


def settle_window(k: int) -> tuple[int, int]:
    """``(steps, extra values)`` of the stagnation test: 3 steps of the top value for k = 1, else 2 of the top k+1."""
    return (3, 0) if k == 1 else (2, 1)


class StoppingRule:
    """Decides, step by step, whether the wanted Ritz values are accurate to ``tol`` (see the module docstring).

    Args:
        k: wanted values.
        tol: relative tolerance.
        abs_floor: absolute floor of the tolerance scale.
        rule: ``"kato_temple"`` (bound plus stagnation test) or ``"residual"`` (``r_i ≤ tol·|θ_i|``).
        min_iter: never stop before this many products.
        warm: a block warm start begins in a nearly invariant subspace: one settled step suffices.
    """

    def __init__(self, k: int, tol: float, abs_floor: float, rule: str, min_iter: int, warm: bool = False) -> None:
        self.k, self.tol, self.abs_floor, self.rule, self.min_iter = k, tol, abs_floor, rule, min_iter
        self.warm = warm
        self.floor = 0.0  # absolute accuracy of the operator itself (set by the solver from the dtype and scale)
        self.history: list[Tensor] = []
        self.converged = False

    def reset_history(self) -> None:
        """Forget the settling history (after a thick restart the Ritz values carry on; nothing to forget)."""
        self.history.clear()

    def __call__(self, theta: Tensor, resid: Tensor, bounds: Tensor, m: int) -> bool:
        k = self.k
        window, guard = settle_window(k)
        if self.warm:
            window = 1
        kk = min(k + guard, theta.numel())
        self.history.append(theta[:kk].clone())
        if m < self.min_iter or theta.numel() < k:
            self.converged = False
            return False
        scale = theta[:kk].abs().clamp_min(self.abs_floor)
        allowed = (self.tol * scale).clamp_min(self.floor)
        if self.rule == "residual":
            ok = bool((resid[:k] <= allowed[:k]).all())
        else:
            h = self.history
            ok = (
                len(h) > window
                and all(
                    h[-1 - w].numel() == h[-1].numel() and bool(((h[-1] - h[-1 - w]).abs() <= allowed).all())
                    for w in range(1, window + 1)
                )
                and bool((bounds[:k] <= allowed[:k]).all())
            )
        self.converged = ok
        return ok

    def accepted(self, theta: Tensor, bounds: Tensor) -> bool:
        """Whether the bounds alone meet ``tol`` (used when the subspace is invariant or exhausted)."""
        scale = theta[: self.k].abs().clamp_min(self.abs_floor)
        return bool((bounds[: self.k] <= (self.tol * scale).clamp_min(self.floor)).all())


def refined_coefficients(T: Tensor, G: Tensor, theta: Tensor) -> Tensor:
    r"""Coefficients ``y`` (rows, unit norm) minimising :math:`\|(A - \theta) B^\top y\|` for each ``theta``.

    With :math:`T = BAB^\top` and :math:`G = BA^2B^\top` the squared norm is :math:`y^\top (G - 2\theta T +
    \theta^2 I) y`, minimised by the bottom eigenvector. The Gram matrices carry rounding of size
    :math:`\epsilon\|A\|^2`, so the minimiser is only approximate; callers compute its residual explicitly.
    """
    eye = torch.eye(T.shape[0], dtype=T.dtype)
    shifted = G - 2 * theta[:, None, None] * T + theta[:, None, None] ** 2 * eye
    return torch.linalg.eigh(shifted).eigenvectors[..., 0]
