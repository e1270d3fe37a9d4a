r"""Block Lanczos with full orthogonalisation and thick restarts (Krylov–Schur form), on parameter-shaped vectors.

The state is a basis :math:`V` (``m`` orthonormal vectors), the projected matrix :math:`T = V^\top A V`
(``m × m``, float64, on the host), a pending block :math:`Q` of ``b`` orthonormal vectors orthogonal to :math:`V`,
and its coupling :math:`C` (``b × m``) such that

.. math:: A V^\top = V^\top T + Q^\top C .

One step appends :math:`Q` to the basis, takes ``b`` products :math:`W = AQ`, removes the known couplings, one
classical Gram–Schmidt pass against the whole basis whose coefficients are folded into :math:`T` (a second pass when
the first removed most of a vector, Daniel–Gragg–Kaufman–Stewart), and factors :math:`W = Q_{\text{next}} R`. With
``b = 1`` and no restart this is Lanczos with full reorthogonalisation; ``b > 1`` is block Lanczos, which sees an
eigenvalue of multiplicity up to ``b`` (a single vector sees each eigenspace as one direction).

Ritz pairs :math:`(\theta_i, V^\top s_i)` come from :math:`T = S\Theta S^\top`, with residuals
:math:`\|C s_i\|` (no product). When the basis would exceed ``max_vectors`` it is replaced in place by the Ritz
vectors wanted (the thick restart of Wu and Simon 2000; :math:`T \leftarrow \Theta_{\text{keep}}`,
:math:`C \leftarrow C S_{\text{keep}}`), so memory stays bounded with the same stopping guarantee.

A vanishing residual block (the Krylov space is invariant, e.g. a rank-deficient operator in float32 whose range is
exhausted) is detected relative to the dtype and the operator's scale; the step then continues from a fresh random
direction orthogonal to the basis with zero coupling, so the remaining eigenvalues (zeros, for a rank-deficient
operator) are found instead of amplified rounding noise. The norm dropped there is added to every residual.

References:
    K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM J. Matrix
    Anal. Appl. 22(2), 2000.
    G. W. Stewart, "A Krylov–Schur algorithm for large eigenproblems", SIAM J. Matrix Anal. Appl. 23(3), 2001.
    G. H. Golub and R. Underwood, "The block Lanczos method for computing eigenvalues", 1977.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_curvature.core._basis import Basis
from lightning_curvature.core._ritz import (
    GUARD,
    StoppingRule,
    Which,
    error_bounds,
    precision_floor,
    refined_residuals,
    ritz_pairs,
)
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.operators import CurvatureOperator
from lightning_curvature.core.vectors import Vector, add_, scale_

__all__ = ["KrylovOutcome", "krylov_schur", "orthonormal_block"]

#: A residual norm at most this many unit roundoffs times the operator's scale is an invariant subspace.
BREAKDOWN_ULPS = 64.0
#: DGKS: a second Gram–Schmidt pass when one pass left less than this fraction of a vector's norm.
DGKS_RATIO = 0.7


@dataclass
class KrylovOutcome:
    """What :func:`krylov_schur` found (Ritz values ordered from the wanted end)."""

    theta: Tensor
    residuals: Tensor
    bounds: Tensor
    num_matvecs: int
    converged: bool
    vectors: list[Vector] = field(default_factory=list)
    peak_vectors: int = 0
    #: the largest absolute error of one product (its relative error estimate times its norm); in every bound
    product_floor: float = 0.0


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


def _random_orthogonal(op: CurvatureOperator, basis: Basis, others: list[Vector], gen: torch.Generator) -> Vector:
    """A unit vector orthogonal to ``basis`` and ``others`` (two Gram–Schmidt passes)."""
    space = op.space
    for _ in range(3):
        z = space.randn(gen)
        for _ in range(2):
            basis.subtract(z, basis.dots(z))
            for o in others:
                add_(z, o, -space.dot(o, z))
        nrm = float(space.norm(z))
        if nrm > 1e-3:
            return scale_(z, 1.0 / nrm)
    raise RuntimeError("could not draw a direction orthogonal to the basis (the space is exhausted)")


def orthonormal_block(
    op: CurvatureOperator, vectors: list[Vector], gen: torch.Generator, in_place: bool = False
) -> list[Vector]:
    """Orthonormalise ``vectors`` (Gram–Schmidt twice); a dependent or zero one is replaced by a random one.

    The vectors are copied unless ``in_place`` (the solver owns them: see :class:`~.lanczos.Handoff`).
    """
    space = op.space
    out: list[Vector] = []
    empty = Basis(space)
    for v in vectors:
        w = [t.detach().to(dtype=d, device=dev) for t, d, dev in zip(v, space.dtypes, space.devices)]
        if not in_place:
            w = [t.clone() for t in w]
        before = float(space.norm(w))
        for _ in range(2):
            for o in out:
                add_(w, o, -space.dot(o, w))
        nrm = float(space.norm(w))
        if not math.isfinite(nrm):
            raise ValueError("The start vector must be finite.")
        if nrm <= 1e-6 * max(before, 1e-300):
            w = _random_orthogonal(op, empty, out, gen)
        else:
            scale_(w, 1.0 / nrm)
        out.append(w)
    return out


def krylov_schur(
    op: CurvatureOperator,
    start: list[Vector],
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
    """Run block Lanczos (block size ``len(start)``) until ``rule`` accepts the top ``k`` or ``max_iter`` products.

    Args:
        op: the symmetric operator.
        start: ``b`` start vectors (orthonormalised here).
        k: wanted eigenvalues.
        which: ``"largest"`` or ``"smallest"``.
        rule: the stopping rule.
        max_iter: most products.
        max_vectors: most parameter-sized vectors held at once (basis, products, pending block); ``None``: no bound.
        num_vectors: Ritz vectors to return (in place of the basis, which is rotated).
        seed: seed of the random directions drawn after a breakdown.
        owned: ``start`` belongs to the solver: normalised in place and released (the list is emptied).
        basis_device: where the basis is stored (``"cpu"``: host memory; see :class:`~._basis.Basis`); ``None``: on
            the parameters' devices.

    Returns:
        A :class:`KrylovOutcome`.

    Raises:
        NonFiniteCurvatureError: if a product is NaN or infinite.
        ValueError: if ``max_vectors`` is too small for ``k`` and the block size.
    """
    space = op.space
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
    b = len(start)
    dim = space.dim
    if max_vectors is not None and max_vectors < k + GUARD + 3 * b:
        raise ValueError(
            f"`max_vectors`={max_vectors} is too small: a measurement of k={k} with block size {b} needs at least "
            f"{k + GUARD + 3 * b} vectors (k + 1 kept Ritz vectors, the block, its products and the next block)."
        )
    capacity = None if max_vectors is None else max_vectors - b
    basis = Basis(space, block_rows=16 if max_vectors is None else 4, capacity=capacity, storage=basis_device)
    Q = orthonormal_block(op, start, gen, in_place=owned)
    if owned:
        start.clear()  # the caller's references go: the start vectors live on only in the basis
    T = torch.zeros(0, 0, dtype=torch.float64)
    C = torch.zeros(b, 0, dtype=torch.float64)
    u = _unit_roundoff(space.coarsest_dtype)
    anorm = 0.0
    lost = 0.0
    product_floor = 0.0  # largest absolute error of a product so far (finite differences)
    nprod = 0
    peak = b
    theta = resid = bounds = torch.zeros(0, dtype=torch.float64)
    S = torch.zeros(0, 0, dtype=torch.float64)
    while True:
        m_old = len(basis)
        bq = len(Q)  # the block size, smaller than b only for the last block of an exhausted space
        for q in Q:
            basis.append(q)
        del Q
        m = len(basis)
        T_new = torch.zeros(m, m, dtype=torch.float64)
        T_new[:m_old, :m_old] = T
        T_new[m_old:, :m_old] = C
        T_new[:m_old, m_old:] = C.T
        T = T_new
        W, errors = [], []
        for i in range(bq):
            W.append(op.matvec(basis.local(m_old + i)))
            errors.append(float(op.last_product_error))
        W = [[t.to(dtype=d) if t.dtype != d else t for t, d in zip(w, space.dtypes)] for w in W]
        nprod += bq
        peak = max(peak, m + bq)
        # (a) known couplings with the previous basis (the three-term recurrence, or the arrow after a restart)
        if m_old:
            nz = C.abs().sum(0).nonzero().flatten().tolist()
            for i, w in enumerate(W):
                if len(nz) <= b:
                    for j in nz:
                        if C[i, j] != 0:
                            add_(w, basis.local(j), -float(C[i, j]))
                else:
                    coeffs = torch.zeros(m, dtype=torch.float64)
                    coeffs[:m_old] = C[i]
                    basis.subtract(w, coeffs)
        # (b) the diagonal block, then (c) one Gram–Schmidt pass against everything, folded into T
        h_all = torch.zeros(bq, m, dtype=torch.float64, device=space.device)
        norms_before = []
        for i, w in enumerate(W):
            for j in range(bq):
                q = basis.local(m_old + j)
                d = space.dot(q, w)
                add_(w, q, -d)
                h_all[i, m_old + j] += d
            norms_before.append(space.norm(w))
            h = basis.dots(w)
            basis.subtract(w, h)
            h_all[i] += h
        norms_after = [space.norm(w) for w in W]
        stats = torch.cat([h_all.reshape(-1), torch.stack(norms_before), torch.stack(norms_after)]).cpu()  # one sync
        h_host = stats[: bq * m].view(bq, m)
        nb, na = stats[bq * m : bq * m + bq], stats[bq * m + bq :]
        if not bool(torch.isfinite(stats).all()):
            raise NonFiniteCurvatureError("Lanczos met a non-finite product; the operator produced NaN/inf.")
        # (d) a second pass where the first removed most of a vector (rounding would otherwise survive)
        for i, w in enumerate(W):
            if float(na[i]) < DGKS_RATIO * float(nb[i]):
                h2 = basis.dots(w)
                basis.subtract(w, h2)
                h_host[i] += h2.cpu()
        col = T[:, m_old:] + h_host.T
        T[:, m_old:] = col
        T[m_old:, :] = col.T
        T[m_old:, m_old:] = 0.5 * (T[m_old:, m_old:] + T[m_old:, m_old:].T)
        anorm = max(anorm, float(T.abs().max()))
        # (e) the next block: W = Q R, breakdowns replaced by random orthogonal directions with zero coupling
        threshold = BREAKDOWN_ULPS * u * max(anorm, 1e-300) * math.sqrt(b)
        # (rows of R: the new block's vectors in the order they are appended; a product whose direction is already
        # in the span once the space is full adds none)
        Q, R = [], torch.zeros(bq, bq, dtype=torch.float64)
        for i, w in enumerate(W):
            for j, q in enumerate(Q):
                r = space.dot(q, w)
                add_(w, q, -r)
                R[j, i] += float(r)
            nrm = float(space.norm(w))
            if nrm <= threshold or m + len(Q) >= dim:
                lost += nrm if m + len(Q) < dim else 0.0
                if m + len(Q) < dim:
                    Q.append(_random_orthogonal(op, basis, Q, gen))  # zero coupling
            else:
                R[len(Q), i] = nrm
                Q.append(scale_(w, 1.0 / nrm))
        del W
        C = torch.zeros(len(Q), m, dtype=torch.float64)
        C[:, m - bq :] = R[: len(Q)]
        if any(errors):  # the products' absolute errors: relative error times ‖A q‖ (its T column and coupling)
            norms = (col.square().sum(0) + R.square().sum(0)).sqrt()
            product_floor = max(product_floor, max(e * float(n) for e, n in zip(errors, norms)))
        # Ritz pairs and bounds
        theta, S = ritz_pairs(T, which)
        resid = torch.linalg.vector_norm(C @ S, dim=0) + lost
        refine = min(k + GUARD, m)
        refined = refined_residuals(T, C, theta[:refine]) if refine else None
        rule.floor = max(precision_floor(space.coarsest_dtype, anorm, space.dim), product_floor)
        bounds = error_bounds(theta, resid, which, refined).clamp_min(rule.floor)
        if rule(theta, resid, bounds, nprod):
            break
        exhausted = m >= dim or not Q
        if exhausted or nprod + len(Q) > max_iter:
            rule.converged = m >= dim  # the whole space: the Ritz values are the eigenvalues
            break
        # thick restart: keep the wanted Ritz vectors when the next step would exceed max_vectors
        if max_vectors is not None and m + 2 * b > max_vectors:
            keep = max(k + GUARD, min((max_vectors - 2 * b) // 2 + k // 2, max_vectors - 3 * b))
            keep = min(keep, m)
            basis.rotate_(S[:, :keep].T.contiguous())
            T = torch.diag(theta[:keep])
            C = C @ S[:, :keep]
    out_vectors: list[Vector] = []
    if num_vectors:
        rows = min(num_vectors, len(basis))
        basis.rotate_(S[:, :rows].T.contiguous())
        out_vectors = [basis.local(j) for j in range(rows)]
    return KrylovOutcome(
        theta=theta,
        residuals=resid,
        bounds=bounds,
        num_matvecs=nprod,
        converged=rule.converged,
        vectors=out_vectors,
        peak_vectors=peak,
        product_floor=product_floor,
    )
