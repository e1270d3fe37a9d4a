r"""Extreme eigenpairs of a symmetric operator: Lanczos (single-vector or block, thick-restarted) and warm starts.

:func:`lanczos` takes a :class:`~lightning_curvature.core.operators.CurvatureOperator` (vectors shaped like the
parameters), a dense symmetric matrix, or a callable ``v -> Av`` on flat vectors. It runs

* a cold start: block Lanczos with full orthogonalisation in Krylov–Schur form (:mod:`._krylov_schur`), block size
  ``block_size`` (1: plain Lanczos), thick-restarted to stay within ``max_vectors`` parameter-sized vectors;
* a warm start when ``v0`` is a block of vectors (a previous result's ``warm_start``): Rayleigh–Ritz on it expanded
  by residuals (:mod:`._davidson`).

Both stop by the rule of :mod:`._ritz`: Kato–Temple bounds with an estimated gap, guarded by a stagnation test.
Inner products are accumulated in float64 (:mod:`.vectors`), so a float32 basis of tens of millions of entries
stays orthonormal and the projected matrix equals :math:`V^\top A V`.

What no stopping rule can see. The residual :math:`r = \|Av - \theta v\|` says how far a returned value is from *an*
eigenvalue; the error bound :math:`\min(r, r^2/\delta)` also trusts a gap :math:`\delta` estimated from the other
Ritz values, and is too small where the next eigenvalue is not yet in the Krylov space (a cluster narrower than the
space resolves, the dense end of a bulk: ``benchmarks/bench_bounds.py`` counts how often). Neither can prove that
no eigenvalue is missing. An eigenvector almost absent from the start vector is found late, and a single-vector
Krylov method (ARPACK included) can then return :math:`\lambda_{k+1}` in place of :math:`\lambda_k` with a tight
bound; an eigenvalue of multiplicity :math:`p > 1` is seen by a single vector as one direction, so the other copies
are skipped (the next distinct value is returned instead). Where the k-th value or multiplicities matter, use
``block_size >= p`` (a block of ``b`` vectors sees multiplicities up to ``b``) or compare two ``seed`` values.

References:
    C. Lanczos, J. Res. Nat. Bur. Standards 45, 1950.
    B. N. Parlett, *The Symmetric Eigenvalue Problem*, SIAM 1998.
    K. Wu and H. Simon, SIAM J. Matrix Anal. Appl. 22(2), 2000 (thick restart).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_curvature.core._basis import Basis, as_basis_device
from lightning_curvature.core._davidson import davidson_min_vectors, davidson_warm_start
from lightning_curvature.core._krylov_schur import krylov_schur
from lightning_curvature.core._ritz import GUARD, WHICH, StoppingRule, Which
from lightning_curvature.core._validation import is_integer
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.operators import (
    CallableOperator,
    CurvatureOperator,
    DenseOperator,
    as_operator,
    unreliable_products,
)
from lightning_curvature.core.vectors import Vector, add_, scale_

__all__ = ["Handoff", "LanczosResult", "Operator", "Which", "lanczos", "lanczos_tridiagonal"]

Operator = CurvatureOperator | Tensor | Callable[[Tensor], Tensor]


class Handoff(list):  # type: ignore[type-arg]
    """Start vectors handed to :func:`lanczos` to own: normalised in place and released during the solve.

    ``lanczos(op, v0=Handoff([vector]))`` (or a block) saves the copy a start vector otherwise costs, so the memory
    bound ``max_vectors`` counts the start vectors too. The list is emptied.
    """


@dataclass
class LanczosResult:
    """Ritz pairs from :func:`lanczos`.

    Attributes:
        eigenvalues: float64 CPU tensor of length ``k``, largest first (``which="largest"``) or most negative
            first (``which="smallest"``).
        eigenvectors: the ``k`` orthonormal Ritz vectors, or ``None``: a ``(k, n)`` tensor for a matrix or a
            callable on flat vectors, a list of parameter-shaped vectors for a parameter-space operator.
        residuals: float64 ``‖Ay − θy‖`` of each pair (from the Krylov relation; explicit for warm starts).
        error_bounds: float64 error estimates ``min(r, r²/gap)`` of each eigenvalue (the gap is estimated from Ritz
            values: see :mod:`._ritz`).
        num_matvecs: products used.
        converged: every wanted eigenvalue met the tolerance.
        warm_start: the top ``k + 1`` Ritz vectors (with ``return_warm_start=True``), in the format of
            ``eigenvectors``: pass them as ``v0`` to re-measure a slowly changing operator.
        peak_vectors: the most parameter-sized vectors the solver held at once.
    """

    eigenvalues: Tensor
    eigenvectors: Any
    residuals: Tensor
    error_bounds: Tensor
    num_matvecs: int
    converged: bool
    warm_start: Any = None
    peak_vectors: int = 0

    @property
    def num_hvp(self) -> int:
        """Products used (the name :class:`~lightning_curvature.core.eigen.EigenResult` uses)."""
        return self.num_matvecs


def _is_flat(op: CurvatureOperator) -> bool:
    return isinstance(op, (DenseOperator, CallableOperator))


def _start_vectors(op: CurvatureOperator, v0: Any) -> tuple[list[Vector], bool]:
    """``(vectors, is_block)`` from any accepted ``v0`` form (flat, ``(m, n)``, a vector, a list of vectors)."""
    space = op.space
    if isinstance(v0, Tensor):
        if v0.dim() == 1 or (v0.dim() == 2 and v0.shape[0] == 1 and not _is_flat(op) and len(space) != 1):
            return [space.coerce(v0.reshape(-1))], False
        if v0.dim() == 2:
            if v0.shape[0] == 1:
                return [space.coerce(v0[0])], False
            return [space.coerce(row) for row in v0], True
        if v0.dim() == len(space.shapes[0]) and len(space) == 1 and v0.shape == space.shapes[0]:
            return [space.coerce([v0])], False
        raise ValueError(f"`v0` has shape {tuple(v0.shape)}, expected ({space.dim},) or (m, {space.dim}).")
    v0 = list(v0)
    if (
        v0
        and isinstance(v0[0], Tensor)
        and len(v0) == len(space)
        and all(t.shape == s for t, s in zip(v0, space.shapes))
    ):
        return [space.coerce(v0)], False
    vectors = [space.coerce(v) for v in v0]
    if len(vectors) == 1:
        return vectors, False
    return vectors, True


def _output(op: CurvatureOperator, vectors: list[Vector]) -> Any:
    if _is_flat(op):
        return torch.stack([v[0] for v in vectors]) if vectors else None
    return vectors


def lanczos(
    A: Operator,
    dim: int | None = None,
    *,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-3,
    abs_tol: float = 1e-6,
    max_iter: int = 100,
    min_iter: int | None = None,
    v0: Any = None,
    return_eigenvectors: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    rule: Literal["kato_temple", "residual"] = "kato_temple",
    return_warm_start: bool = False,
    block_size: int = 1,
    max_vectors: int | None = None,
    abs_floor: float | None = None,
    basis_device: torch.device | str | None = None,
) -> LanczosResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator (see the module docstring).

    Args:
        A: a :class:`~lightning_curvature.core.operators.CurvatureOperator`, a dense symmetric matrix, or a callable
            ``v -> Av`` on flat vectors.
        dim: size of the flat vectors (for a callable without ``v0``).
        k: number of eigenpairs.
        which: ``"largest"`` (algebraic, largest first) or ``"smallest"`` (most negative first).
        tol: relative tolerance on each eigenvalue: stop when its error estimate is at most
            ``tol · max(|θ|, abs_tol)``.
        abs_tol: absolute floor of the tolerance scale, for spectra near zero.
        max_iter: maximum number of products.
        min_iter: do not stop before this many products (default ``k + 1``).
        v0: start vector (flat, or parameter-shaped for a parameter-space operator), default a seeded Gaussian
            (the global RNG is not touched); or a block of vectors (an ``(m, n)`` tensor or a list of vectors, e.g.
            a previous result's ``warm_start``): Rayleigh–Ritz on its span, then residual expansion.
        return_eigenvectors: also return the Ritz vectors.
        seed: seed of the start vector and of the directions drawn after a breakdown.
        dtype: vector dtype for a callable without ``v0`` (default float32).
        device: vector device for a callable without ``v0``.
        rule: stopping rule: ``"kato_temple"`` (default) or ``"residual"`` (``r ≤ tol·|θ|``, more products).
        return_warm_start: also return :attr:`LanczosResult.warm_start`.
        block_size: vectors per Krylov block (1: Lanczos; ``b > 1`` sees eigenvalues of multiplicity up to ``b``).
        max_vectors: the most parameter-sized vectors held at once (the basis is thick-restarted to stay within it;
            the answer still meets ``tol``); ``None`` for no bound.
        abs_floor: deprecated name of ``abs_tol``.
        basis_device: where the Krylov basis is stored: ``"cpu"`` keeps it in host memory when the operator's vectors
            are on an accelerator, which then holds only the few vectors being worked on (each pass over the basis
            moves one vector across; the basis never moves). ``None`` (default): on the vectors' devices.

    Returns:
        A :class:`LanczosResult`.

    Raises:
        ValueError: for ``k < 1``, ``k > dim``, a bad ``which``/``rule``, ``tol <= 0``, ``max_iter < k``, a bad
            ``block_size``, a too small ``max_vectors``, a ``basis_device`` that is not a device, or a ``v0`` that
            does not match the operator.
        NonFiniteCurvatureError: if a product is NaN or infinite.

    Example::

        >>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0, -2.0], dtype=torch.float64))
        >>> [round(v, 10) for v in lanczos(A, k=2).eigenvalues.tolist()]
        [5.0, 3.0]
        >>> [round(v, 10) for v in lanczos(A, k=1, which="smallest").eigenvalues.tolist()]
        [-2.0]
    """
    if which not in WHICH:
        raise ValueError(f"`which` must be one of {WHICH}, got {which!r}.")
    if abs_floor is not None:
        warnings.warn("`abs_floor` is deprecated; use `abs_tol`.", DeprecationWarning, stacklevel=2)
        abs_tol = abs_floor
    if isinstance(v0, Tensor) and not isinstance(A, (CurvatureOperator, Tensor)):
        dim = v0.shape[-1] if dim is None else dim
        dtype = v0.dtype if dtype is None else dtype
        device = v0.device if device is None else device
    op = as_operator(A, dim, dtype, device)
    n = op.dim
    if not is_integer(k) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if k > n:
        raise ValueError(f"`k`={k} exceeds the operator size {n}.")
    if not tol > 0:
        raise ValueError(f"`tol` must be > 0, got {tol!r}.")
    if rule not in ("kato_temple", "residual"):
        raise ValueError(f"`rule` must be 'kato_temple' or 'residual', got {rule!r}.")
    if max_iter < k:
        raise ValueError(f"`max_iter` must be at least `k`={k}, got {max_iter!r}.")
    if not is_integer(block_size) or not 1 <= block_size <= n:
        raise ValueError(f"`block_size` must be an integer in [1, {n}], got {block_size!r}.")
    if max_vectors is not None and not is_integer(max_vectors):
        raise ValueError(f"`max_vectors` must be an integer or None, got {max_vectors!r}.")
    k, block_size = int(k), int(block_size)  # NumPy integers too
    max_vectors = None if max_vectors is None else int(max_vectors)
    basis_device = as_basis_device(basis_device)
    min_iter = k + 1 if min_iter is None else min_iter
    gen = torch.Generator(device="cpu").manual_seed(seed)
    block = False
    owned = v0 is None or isinstance(v0, Handoff)
    if v0 is None:
        start = [op.space.randn(gen) for _ in range(block_size)]
    else:
        try:
            start, block = _start_vectors(op, v0)
        except ValueError as err:
            raise ValueError(f"`v0` does not match the operator: {err}") from err
        if isinstance(v0, Handoff):
            v0.clear()
        if not block:
            norm = float(op.space.norm(start[0]))
            if not (math.isfinite(norm) and norm > 0):
                raise ValueError("The start vector `v0` must be finite and non-zero.")
        if not block and block_size > 1:
            start = start + [op.space.randn(gen) for _ in range(block_size - 1)]
    num_vectors = max(k if return_eigenvectors else 0, min(k + GUARD, n) if return_warm_start else 0)
    use_davidson = block and (max_vectors is None or max_vectors >= davidson_min_vectors(k))
    if block and not use_davidson:
        warnings.warn(
            f"max_vectors={max_vectors} is too small for a block warm start of k={k} (needs "
            f"{davidson_min_vectors(k)}); starting from the sum of the block instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        summed = start[0]
        for v in start[1:]:
            add_(summed, v)
        start = [summed]
    stopping = StoppingRule(k, tol, abs_tol, rule, min(min_iter, n), warm=use_davidson)
    if use_davidson:
        out = davidson_warm_start(
            op, start, k=k, which=which, rule=stopping, max_iter=max_iter, max_vectors=max_vectors,
            num_vectors=num_vectors, seed=seed, owned=owned, basis_device=basis_device,
        )  # fmt: skip
    else:
        out = krylov_schur(
            op, start, k=k, which=which, rule=stopping, max_iter=max_iter, max_vectors=max_vectors,
            num_vectors=num_vectors, seed=seed, owned=owned, basis_device=basis_device,
        )  # fmt: skip
    if out.theta.numel() < k:
        raise ValueError(f"The search space has dimension {out.theta.numel()} < k={k}.")
    vecs = out.vectors
    bounds = out.bounds[:k].clone()
    unreliable = unreliable_products(op, "no error bound is reported (inf) and the eigenvalues are not certified")
    if unreliable:
        bounds.fill_(math.inf)
    return LanczosResult(
        eigenvalues=out.theta[:k].clone(),
        eigenvectors=_output(op, vecs[:k]) if return_eigenvectors else None,
        residuals=out.residuals[:k].clone(),
        error_bounds=bounds,
        num_matvecs=out.num_matvecs,
        # products less accurate than tol (finite differences that found no good step) cannot meet it, and products
        # past RELIABLE_PRODUCT_ERROR certify nothing (their floor alone can be below a loose tol)
        converged=out.converged
        and not unreliable
        and not out.product_floor > tol * max(float(out.theta[:k].abs().max()), abs_tol),
        warm_start=_output(op, vecs) if return_warm_start else None,
        peak_vectors=out.peak_vectors,
    )


def lanczos_tridiagonal(
    A: Operator,
    v0: Tensor | Vector,
    num_iters: int,
    stop: Callable[[Tensor, Tensor, int], bool] | None = None,
    *,
    reorthogonalize: bool = True,
    basis_device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Basis | None]:
    """Up to ``num_iters`` steps of the three-term Lanczos recurrence (stochastic Lanczos quadrature's kernel).

    Args:
        A: symmetric operator (an operator, a dense matrix or a callable on flat vectors).
        v0: start vector (flat or parameter-shaped; normalised here).
        num_iters: maximum number of steps (= products).
        stop: ``stop(alpha, beta, m) -> bool`` called after each step with the float64 CPU coefficients so far.
        reorthogonalize: orthogonalise each new vector against the whole basis (memory ``m`` vectors). ``False``
            runs the bare recurrence keeping two vectors: converged Ritz values then repeat as "ghosts", which
            Gauss quadrature tolerates but eigenvector extraction does not.
        basis_device: where the basis is stored (see :func:`lanczos`).

    Returns:
        ``(alpha, beta, basis)``: diagonal (length m), off-diagonal (length m, the last is the residual norm), and
        the Lanczos vectors (``None`` without reorthogonalisation).

    Raises:
        NonFiniteCurvatureError: if a product is NaN or infinite.
        ValueError: for a zero or non-finite start vector.
    """
    if isinstance(v0, Tensor) and not isinstance(A, (CurvatureOperator, Tensor)):
        op = as_operator(A, v0.numel(), v0.dtype, v0.device)
    else:
        op = as_operator(A)
    space = op.space
    v = space.coerce(v0)
    nrm = float(space.norm(v))
    if not (math.isfinite(nrm) and nrm > 0):
        raise ValueError("The start vector must be finite and non-zero.")
    v = scale_([t.clone() for t in v], 1.0 / nrm)
    basis = Basis(space, storage=as_basis_device(basis_device)) if reorthogonalize else None
    prev: Vector | None = None
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(min(num_iters, space.dim)):
        if basis is not None:
            basis.append(v)
        w = op.matvec(list(v))
        a = space.dot(v, w)
        add_(w, v, -a)
        if prev is not None:
            add_(w, prev, -betas[-1])
        if basis is not None:
            basis.subtract(w, basis.dots(w))
        ab = torch.stack([a, space.norm(w)]).cpu()  # one host sync per step
        alpha, beta = float(ab[0]), float(ab[1])
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise NonFiniteCurvatureError("Lanczos met a non-finite product; the operator produced NaN/inf.")
        alphas.append(alpha)
        betas.append(beta)
        scale = max(scale, abs(alpha), beta)
        m = j + 1
        if stop is not None and stop(torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas), m):
            break
        if beta <= 64 * torch.finfo(space.coarsest_dtype).eps * max(scale, 1e-300):
            break  # invariant subspace: the Ritz values are exact
        prev, v = v, scale_(w, 1.0 / beta)
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64), basis
