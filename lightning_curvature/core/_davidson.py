r"""Warm start: Rayleigh–Ritz on a previous block of Ritz vectors, expanded by residuals (block Davidson).

For a slowly changing operator (the Hessian a few training steps later) the previous top ``k + 1`` Ritz vectors span
a nearly invariant subspace. The block :math:`B` (orthonormalised) and its products :math:`W = AB` give the
Rayleigh–Ritz matrix :math:`T = BW^\top` and :math:`G = WW^\top`, each grown by one row per added vector. Each step
adds, for every wanted pair not yet within ``tol``, its residual :math:`r_i = W^\top y_i - \theta_i B^\top y_i`
orthogonalised against :math:`B` (a block Davidson step without preconditioner). Residuals of the top ``k + 1`` pairs
are computed explicitly from the stored products; those further in only estimate the gap and come from the Gram
identity :math:`\|r\|^2 = y^\top G y - \theta^2`. Refined residuals (:func:`~._ritz.refined_coefficients`) sharpen
the gap estimate. Vectors are formed one at a time, so beyond :math:`B` and :math:`W` at most three
parameter-sized vectors are held; with ``max_vectors`` the pair :math:`(B, W)` is collapsed onto the current Ritz
vectors when it would grow past the bound.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_curvature.core._basis import Basis
from lightning_curvature.core._krylov_schur import DGKS_RATIO, KrylovOutcome, orthonormal_block
from lightning_curvature.core._ritz import (
    GUARD,
    StoppingRule,
    Which,
    error_bounds,
    precision_floor,
    refined_coefficients,
    ritz_pairs,
)
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.operators import CurvatureOperator
from lightning_curvature.core.vectors import Vector, add_, scale_

__all__ = ["davidson_min_vectors", "davidson_warm_start"]


def davidson_min_vectors(k: int) -> int:
    """Fewest vectors a warm start of ``k`` values needs: ``B``, ``W`` for ``k + 1`` vectors, one expansion, 3 spare."""
    return 2 * (k + GUARD) + 2 + 3


def _combine(basis: Basis, y: Tensor) -> Vector:
    """``Σ_j y_j b_j`` over the first ``len(y)`` vectors (later ones get coefficient 0)."""
    coeffs = torch.zeros(1, len(basis), dtype=torch.float64)
    coeffs[0, : y.numel()] = y
    return basis.combine(coeffs)[0]


class _Pair:
    """The orthonormal basis ``B``, its products ``W``, and the Gram matrices ``T = BWᵀ``, ``G = WWᵀ``."""

    def __init__(self, op: CurvatureOperator, capacity: int | None, storage: torch.device | str | None = None) -> None:
        self.op = op
        self.space = op.space
        rows = 4 if capacity else 16
        self.B = Basis(self.space, block_rows=rows, capacity=capacity, storage=storage)
        self.W = Basis(self.space, block_rows=rows, capacity=capacity, storage=storage)
        self.T = torch.zeros(0, 0, dtype=torch.float64)
        self.G = torch.zeros(0, 0, dtype=torch.float64)
        self.num_products = 0

    def __len__(self) -> int:
        return len(self.B)

    def add(self, q: Vector) -> None:
        """Append the unit vector ``q`` (orthogonal to ``B``) and its product."""
        p = self.op.matvec(list(q))
        self.num_products += 1
        sp = self.space
        t_new = self.B.dots(p)
        g_new = self.W.dots(p)
        qp, pp = sp.dots([(q, p), (p, p)])
        row = torch.cat([t_new, g_new, qp.reshape(1), pp.reshape(1)]).cpu()  # one sync
        if not bool(torch.isfinite(row).all()):
            raise NonFiniteCurvatureError("The warm start met a non-finite product; the operator produced NaN/inf.")
        m = len(self)
        self.B.append(q)
        self.W.append(p)
        T = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        G = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        T[:m, :m], G[:m, :m] = self.T, self.G
        T[m, :m] = T[:m, m] = row[:m]
        G[m, :m] = G[:m, m] = row[m : 2 * m]
        T[m, m], G[m, m] = row[2 * m], row[2 * m + 1]
        self.T, self.G = T, G

    def orthonormal_direction(self, r: Vector) -> Vector | None:
        """``r`` orthogonalised against ``B`` and normalised, or ``None`` if it lies in the span (DGKS test)."""
        sp = self.space
        norm = float(sp.norm(r))
        for _ in range(2):
            self.B.subtract(r, self.B.dots(r))
            new = float(sp.norm(r))
            if new == 0.0 or new <= 1e-8 * norm:
                return None
            if new > DGKS_RATIO * norm:
                break
            norm = new
        return scale_(r, 1.0 / new)

    def collapse(self, Y: Tensor, theta: Tensor) -> None:
        """Replace ``B`` and ``W`` by ``YᵀB`` and ``YᵀW`` in place (columns of ``Y``: the Ritz vectors kept)."""
        self.B.rotate_(Y.T.contiguous())
        self.W.rotate_(Y.T.contiguous())
        self.T = torch.diag(theta[: Y.shape[1]])
        self.G = Y.T @ self.G @ Y


def davidson_warm_start(
    op: CurvatureOperator,
    block: list[Vector],
    *,
    k: int,
    which: Which,
    rule: StoppingRule,
    max_iter: int,
    max_vectors: int | None = None,
    num_vectors: int = 0,
    seed: int = 0,
    owned: bool = False,
    basis_device: torch.device | str | None = None,
) -> KrylovOutcome:
    """Rayleigh–Ritz on ``block`` expanded by residuals until ``rule`` accepts the top ``k`` (see module docstring).

    Raises:
        NonFiniteCurvatureError: if a product is NaN or infinite.
        ValueError: if the block spans fewer than ``k`` directions.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed + 104729)
    sp = op.space
    capacity = None if max_vectors is None else (max_vectors - 3) // 2
    pair = _Pair(op, capacity, basis_device)
    ortho = orthonormal_block(op, block, gen, in_place=owned)
    if owned:
        block.clear()
    while ortho:
        pair.add(ortho.pop(0))
    kk_max = min(k + GUARD, sp.dim)
    theta = resid = bounds = torch.zeros(0, dtype=torch.float64)
    Y = torch.zeros(0, 0, dtype=torch.float64)
    while True:
        m = len(pair)
        theta, Y = ritz_pairs(pair.T, which)
        kk = min(kk_max, m)
        # residuals: explicit for the top kk pairs, from the Gram identity further in
        resid = ((Y * (pair.G @ Y)).sum(0) - theta**2).clamp_min(0.0).sqrt()
        coeffs = refined_coefficients(pair.T, pair.G, theta[:kk])
        residual_vectors: list[Vector] | None = None
        if capacity is None:  # memory is not bounded: all 2kk combinations in one pass over each basis
            both_coeffs = torch.cat([Y[:, :kk].T, coeffs])
            xs, axs = pair.B.combine(both_coeffs), pair.W.combine(both_coeffs)
            shifts = torch.cat([theta[:kk], theta[:kk]]).tolist()
            for ax, x, t in zip(axs, xs, shifts):
                add_(ax, x, -t)
            sq = sp.dots([(r, r) for r in axs] + [(u, u) for u in xs[kk:]])
            norms = sq.clamp_min(0.0).sqrt()
            both = torch.cat([norms[:kk], norms[kk : 2 * kk] / norms[2 * kk :].clamp_min(1e-300)]).cpu()  # one sync
            residual_vectors = axs[:kk]
            del xs
        else:  # one vector at a time: at most three beyond B and W
            explicit = []
            for i in range(kk):
                r = _combine(pair.W, Y[:, i])
                add_(r, _combine(pair.B, Y[:, i]), -float(theta[i]))
                explicit.append(sp.norm(r))
            refined = []
            for i in range(kk):
                u = _combine(pair.B, coeffs[i])
                au = _combine(pair.W, coeffs[i])
                add_(au, u, -float(theta[i]))
                refined.append(sp.norm(au) / sp.norm(u).clamp_min(1e-300))
            both = torch.stack(explicit + refined).cpu()  # one sync
        resid[:kk] = both[:kk]
        if not (math.isfinite(float(theta.abs().max())) and bool(torch.isfinite(both).all())):
            raise NonFiniteCurvatureError("The warm start met a non-finite Rayleigh–Ritz value.")
        t_norm = float(pair.T.abs().max())
        rule.floor = max(precision_floor(sp.dtype, t_norm, sp.dim), op.product_error * t_norm)
        bounds = error_bounds(theta, resid, which, both[kk:]).clamp_min(rule.floor)
        if (m >= k and rule(theta, resid, bounds, pair.num_products)) or m >= sp.dim:
            if m >= sp.dim:
                rule.converged = True
            break
        if pair.num_products >= max_iter:
            break
        scale = theta[:k].abs().clamp_min(rule.abs_floor)
        ratio = bounds[:k] / scale
        todo = [i for i in torch.argsort(ratio, descending=True).tolist() if ratio[i] > rule.tol] or [
            int(ratio.argmax())
        ]
        todo = todo[: max(1, max_iter - pair.num_products)]
        if capacity is not None and m + len(todo) > capacity:
            pair.collapse(Y[:, :kk], theta)
            Y = torch.eye(kk, dtype=torch.float64)
            m = kk
            todo = todo[: max(1, capacity - kk)]
        added = 0
        for i in todo:
            if residual_vectors is not None:
                resid_i = residual_vectors[i]  # computed above, before the basis grew
            else:
                resid_i = _combine(pair.W, Y[:m, i])
                add_(resid_i, _combine(pair.B, Y[:m, i]), -float(theta[i]))
            direction = pair.orthonormal_direction(resid_i)
            if direction is not None:
                pair.add(direction)
                added += 1
        if added == 0:
            rule.converged = True  # the basis is invariant: the Ritz values are exact
            break
    if len(pair) < k:
        raise ValueError(f"The warm-start basis has dimension {len(pair)} < k={k}.")
    out_vectors: list[Vector] = []
    if num_vectors:
        rows = min(num_vectors, len(pair))
        pair.B.rotate_(Y[:, :rows].T.contiguous())
        out_vectors = [pair.B.local(j) for j in range(rows)]
    return KrylovOutcome(
        theta=theta,
        residuals=resid,
        bounds=bounds,
        num_matvecs=pair.num_products,
        converged=rule.converged,
        vectors=out_vectors,
        peak_vectors=2 * len(pair) + 2,
        product_floor=op.product_error * float(pair.T.abs().max()),
    )
