r"""Symmetric linear operators on parameter-shaped vectors: the unit every solver works with.

A :class:`CurvatureOperator` has a :class:`~lightning_curvature.core.vectors.VectorSpace` and a product
:meth:`~CurvatureOperator.matvec` on vectors of that space (lists of tensors). It also accepts a flat tensor and then
returns a flat tensor, for convenience (cf. curvlinops' ``PyTorchLinearOperator``). Solvers (Lanczos, Hutch++,
stochastic Lanczos quadrature, power iteration) take an operator, a dense symmetric matrix (wrapped in
:class:`DenseOperator`, for tests) or a callable on flat vectors (:class:`CallableOperator`, the 0.1 interface).

* :class:`~lightning_curvature.core.hvp.HessianOperator`: :math:`v \mapsto Hv` of a model's loss.
* :class:`ScaledOperator`: :math:`v \mapsto D A D v` for a positive diagonal :math:`D` (the preconditioned Hessian
  :math:`P^{-1/2} H P^{-1/2}` of an adaptive optimizer).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, overload

import torch
from torch import Tensor

from lightning_curvature.core.errors import InaccurateProductsWarning
from lightning_curvature.core.vectors import Vector, VectorSpace, contiguous

__all__ = [
    "RELIABLE_PRODUCT_ERROR",
    "CallableOperator",
    "CurvatureOperator",
    "DenseOperator",
    "ScaledOperator",
    "as_operator",
    "unreliable_products",
]

#: Above this relative :attr:`CurvatureOperator.product_error` the estimate itself is not trusted: the error estimate
#: of finite-difference products (:meth:`~lightning_curvature.core.hvp.HessianOperator._richardson`) holds only where
#: the differences are in their asymptotic regime, and a step search that ends at percents of error has not found
#: it. The solvers then report no bound (``inf``) and ``converged=False``, and the monitors skip the measurement.
RELIABLE_PRODUCT_ERROR = 0.05


def unreliable_products(op: Any, consequence: str, stacklevel: int = 3) -> bool:
    """Whether ``op``'s products are past :data:`RELIABLE_PRODUCT_ERROR`; if so, an
    :class:`~lightning_curvature.core.errors.InaccurateProductsWarning` says so and names ``consequence``."""
    error = float(getattr(op, "product_error", 0.0))
    if not error > RELIABLE_PRODUCT_ERROR:
        return False
    warnings.warn(
        f"The finite-difference products are {error:.1%} off by their own estimate, beyond which the estimate is not "
        f"reliable: {consequence}. Use method='double_backward' (eager code) where it runs, or dtype=torch.float64.",
        InaccurateProductsWarning,
        stacklevel=stacklevel,
    )
    return True


class CurvatureOperator:
    """Base class: a symmetric linear map on the vectors of :attr:`space`.

    Subclasses implement :meth:`_matvec` on vectors of the space. :attr:`num_matvecs` counts products.
    """

    space: VectorSpace
    num_matvecs: int = 0
    #: largest relative error of the products so far (0 for exact ones; finite differences estimate theirs): no
    #: solver reports a finite bound above :data:`RELIABLE_PRODUCT_ERROR`; power iteration and the warm-start solver
    #: never report one below it times the operator's scale (Krylov–Schur: below :attr:`last_product_error` times
    #: each product's norm)
    product_error: float = 0.0
    #: relative accuracy of the last product alone (0 for exact ones): the Krylov solvers turn it into an absolute
    #: error with that product's norm, so a product whose output is small adds little
    last_product_error: float = 0.0
    #: estimated absolute error of the quadratic form :math:`v^\top Av` of the last product (0 for exact ones): what
    #: the trace estimators add to their standard error
    form_error: float = 0.0

    @property
    def dim(self) -> int:
        """Number of entries of the (global) vectors."""
        return self.space.dim

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the vectors."""
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        """Device of the first tensor of a vector."""
        return self.space.device

    def _matvec(self, v: Vector) -> Vector:
        raise NotImplementedError

    @overload
    def matvec(self, v: Tensor) -> Tensor: ...

    @overload
    def matvec(self, v: Vector) -> Vector: ...

    def matvec(self, v: Any) -> Any:
        """The product with ``v``: a parameter-shaped list (returns one) or a flat tensor (returns a flat tensor).

        Raises:
            ValueError: if ``v`` does not match the space.
        """
        flat = isinstance(v, Tensor)
        out = contiguous(self._matvec(self.space.coerce(v)))  # e.g. channels_last gradients: the solvers need views
        self.num_matvecs += 1
        return self.space.flatten(out) if flat else out

    __call__ = matvec

    def matmat(self, vectors: Sequence[Vector]) -> list[Vector]:
        """Products with several vectors (a loop unless a subclass batches them)."""
        return [self.matvec(list(v)) for v in vectors]


def _check_symmetric(A: Tensor, rows: int = 1024) -> None:
    r"""Raise unless ``A`` is symmetric to within :math:`\sqrt{\varepsilon}\max|A|` (checked in row blocks)."""
    scale = float(A.abs().max()) if A.numel() else 0.0
    if not math.isfinite(scale):
        return  # a NaN/inf entry: the solvers report the non-finite products themselves
    worst = 0.0
    for i in range(0, A.shape[0], rows):
        worst = max(worst, float((A[i : i + rows] - A[:, i : i + rows].T).abs().max()))
    if worst > math.sqrt(torch.finfo(A.dtype).eps) * scale:
        raise ValueError(
            f"Expected a symmetric matrix: max|A - A^T| = {worst:.3g} against max|A| = {scale:.3g}. Pass "
            "(A + A.T) / 2 for its symmetric part."
        )


class DenseOperator(CurvatureOperator):
    r"""A dense symmetric matrix as an operator on flat vectors (one tensor of shape ``(n,)``).

    An integer or boolean matrix is taken in float64.

    Raises:
        ValueError: if ``A`` is not a square matrix, or not symmetric beyond rounding (an entry of :math:`A - A^\top`
            above :math:`\sqrt{\varepsilon}\max|A|` in its dtype).
        TypeError: for a complex matrix.

    Example::

        >>> A = DenseOperator(torch.diag(torch.tensor([3.0, 1.0])))
        >>> A.matvec(torch.tensor([1.0, 1.0]))
        tensor([3., 1.])
    """

    def __init__(self, A: Tensor) -> None:
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"Expected a square matrix, got shape {tuple(A.shape)}.")
        if A.is_complex():
            raise TypeError(f"Expected a real symmetric matrix, got dtype {A.dtype}.")
        if not A.is_floating_point():
            A = A.to(torch.float64)
        _check_symmetric(A)
        self.A = A
        self.space = VectorSpace([torch.empty(A.shape[0], dtype=A.dtype, device=A.device)])
        self.num_matvecs = 0

    def _matvec(self, v: Vector) -> Vector:
        return [self.A @ v[0]]


class CallableOperator(CurvatureOperator):
    """A callable ``v -> Av`` on flat vectors of size ``dim`` as an operator."""

    def __init__(
        self, fn: Callable[[Tensor], Tensor], dim: int, dtype: torch.dtype, device: torch.device | str | None
    ) -> None:
        self.fn = fn
        self.space = VectorSpace([torch.empty(int(dim), dtype=dtype, device=device)])
        self.num_matvecs = 0

    def _matvec(self, v: Vector) -> Vector:
        return [self.fn(v[0]).reshape(-1).to(v[0].dtype)]


class ScaledOperator(CurvatureOperator):
    r""":math:`v \mapsto D A D v` for a positive diagonal :math:`D` given as a vector of ``A``'s space.

    With :math:`D = P^{-1/2}` this is the preconditioned Hessian whose top eigenvalue is the sharpness of an
    adaptive optimizer (Cohen et al. 2022, arXiv 2207.14484).
    """

    def __init__(self, A: CurvatureOperator, scale: Vector) -> None:
        self.A = A
        self.space = A.space
        self.scale = self.space.coerce(scale)
        self.num_matvecs = 0

    @property
    def product_error(self) -> float:  # type: ignore[override]
        """The inner operator's, measured in this operator's output (see :meth:`_matvec`)."""
        return float(getattr(self.A, "product_error", 0.0))

    @property
    def last_product_error(self) -> float:  # type: ignore[override]
        """The inner operator's for the last product, measured in this operator's output."""
        return float(getattr(self.A, "last_product_error", 0.0))

    @property
    def form_error(self) -> float:  # type: ignore[override]
        """The inner operator's: :math:`v^\top DADv = (Dv)^\top A(Dv)`, the form ``A`` estimated for ``Dv``."""
        return float(getattr(self.A, "form_error", 0.0))

    def _matvec(self, v: Vector) -> Vector:
        scaled = [d * t for d, t in zip(self.scale, v)]
        weighted = getattr(self.A, "error_weight", None)  # finite differences judge their accuracy in D A D's norm
        with weighted(self.scale) if callable(weighted) else nullcontext():
            out = self.A.matvec(scaled)
        return [d * t for d, t in zip(self.scale, out)]


def as_operator(
    A: CurvatureOperator | Tensor | Callable[[Tensor], Tensor],
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CurvatureOperator:
    """An operator for ``A``: itself, a :class:`DenseOperator` for a matrix, a :class:`CallableOperator` for a callable.

    Raises:
        ValueError: for a callable without ``dim``.
        TypeError: for anything else.
    """
    if isinstance(A, CurvatureOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    if callable(A):
        if dim is None:
            raise ValueError("`dim` is required when `A` is a callable and no `v0` is given.")
        return CallableOperator(A, dim, dtype or torch.float32, device)
    raise TypeError(f"Expected an operator, a Tensor or a callable v -> Av, got {type(A).__name__}.")
