r"""Top (or bottom) Hessian eigenvalues of ``loss_fn(model, batch)``: sharpness and the top-k spectrum.

A thin wrapper: a :class:`~lightning_curvature.core.hvp.HessianOperator` (optionally scaled to the preconditioned
Hessian :math:`P^{-1/2} H P^{-1/2}` of an adaptive optimizer, :mod:`.preconditioner`) handed to
:func:`~lightning_curvature.core.lanczos.lanczos`.

References:
    J. Gilmer et al., "A Loss Curvature Perspective on Training Instability in Deep Learning",
    arXiv 2110.04369 (Lanczos on a fixed batch throughout training).
    J. Cohen et al., arXiv 2103.00065 and 2207.14484 (sharpness and preconditioned sharpness).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_curvature.core._basis import as_basis_device
from lightning_curvature.core._batch import as_batch_first
from lightning_curvature.core._validation import is_integer
from lightning_curvature.core.hvp import HessianOperator, HVPMethod, LossFn, ReduceFn
from lightning_curvature.core.lanczos import Handoff, Which, lanczos
from lightning_curvature.core.operators import CurvatureOperator, ScaledOperator
from lightning_curvature.core.power import power_iteration
from lightning_curvature.core.preconditioner import adaptive_preconditioner
from lightning_curvature.core.vectors import Vector, VectorSpace

__all__ = [
    "EigenResult",
    "StartVector",
    "gradient_start_vector",
    "hessian_eigenvalues",
    "preconditioned_sharpness",
    "warm_start_vector",
]

StartVector = Literal["auto", "gradient", "random"]
_STARTS = ("auto", "gradient", "random")


@dataclass
class EigenResult:
    """Extreme eigenpairs of the (possibly preconditioned) Hessian.

    Attributes:
        eigenvalues: float64 CPU tensor of length ``k``; largest first, or most negative first for
            ``which="smallest"``.
        eigenvector_list: the ``k`` orthonormal eigenvectors shaped like the parameters (lists of tensors on the
            parameters' devices), or ``None``. For a preconditioned measurement they are eigenvectors of
            ``P^{-1/2} H P^{-1/2}``.
        residuals: ``‖Hv − λv‖`` per pair (float64).
        error_bounds: error estimate of each eigenvalue (``min(r, r²/gap)`` with a gap estimated from Ritz values,
            never below the accuracy of the products in their dtype).
        num_hvp: Hessian-vector products used by the solver (the validity check of ``method="auto"``, once per model
            and loss, is not counted).
        converged: every eigenvalue met the tolerance within ``max_iter`` products.
        preconditioned: the spectrum is that of ``P^{-1/2} H P^{-1/2}``.
        warm_start: the top ``k + 1`` Ritz vectors for the next measurement (``return_warm_start=True``), as a list
            of parameter-shaped vectors; pass it as ``v0``.
        method: how the products were computed (``"double_backward"``, ``"finite_difference"`` or
            ``"forward_over_reverse"``).
        peak_vectors: the most parameter-sized vectors the solver held at once.
    """

    eigenvalues: Tensor
    eigenvector_list: list[Vector] | None
    residuals: Tensor
    error_bounds: Tensor
    num_hvp: int
    converged: bool
    preconditioned: bool = False
    warm_start: list[Vector] | None = None
    method: str = "double_backward"
    peak_vectors: int = 0

    @property
    def sharpness(self) -> float:
        """The first eigenvalue as a float."""
        return float(self.eigenvalues[0])

    @property
    def num_matvecs(self) -> int:
        """Products used (the name :class:`~lightning_curvature.core.lanczos.LanczosResult` uses)."""
        return self.num_hvp

    @property
    def eigenvectors(self) -> Tensor | None:
        """The eigenvectors as a flat ``(k, P)`` tensor (concatenated in parameter order; a copy), or ``None``."""
        if self.eigenvector_list is None:
            return None
        return torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in self.eigenvector_list])


def _space_of(vector: Vector) -> VectorSpace:
    return VectorSpace(vector)


def warm_start_vector(eigenvectors: Tensor, seed: int = 0, noise: float = 0.01) -> Tensor:
    """Deprecated: pass a previous result's ``warm_start`` block as ``v0`` instead (a block warm start).

    The sum of previous eigenvectors plus a little seeded noise, as one flat start vector.

    Raises:
        ValueError: if ``eigenvectors`` is not a non-empty 1-D or 2-D tensor.
    """
    warnings.warn(
        "warm_start_vector is deprecated: pass `result.warm_start` (from return_warm_start=True) as `v0`.",
        DeprecationWarning,
        stacklevel=2,
    )
    if eigenvectors.dim() == 1:
        eigenvectors = eigenvectors.unsqueeze(0)
    if eigenvectors.dim() != 2 or eigenvectors.shape[0] == 0:
        raise ValueError(f"Expected (k, n) eigenvectors, got shape {tuple(eigenvectors.shape)}.")
    v = eigenvectors.sum(0)
    v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.randn(v.numel(), generator=gen, dtype=torch.float64).to(device=v.device, dtype=v.dtype)
    return v + noise * r / torch.linalg.vector_norm(r)


#: Norm of :math:`g/\|g\| + z/\|z\|` below which the two halves of a gradient start cancelled (the sum of two unit
#: vectors; about :math:`\sqrt 2` for many parameters, 0 or 2 for one); the gradient alone is then the start.
CANCELLED = 1e-3


def gradient_start_vector(gradient: Tensor | Vector, seed: int = 0) -> Tensor | Vector:
    r"""Lanczos start vector :math:`v_0 = g/\|g\| + z/\|z\|`: the gradient mixed with a seeded Gaussian ``z``.

    The gradient of a network's loss lies mostly in the span of the top Hessian eigenvectors (Gur-Ari, Roberts and
    Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv 1812.04754), so a Krylov space started from it
    resolves the largest eigenvalues in fewer products. The Gaussian half keeps a component along every
    eigenvector at least :math:`1/\sqrt{2}` of a purely random start's, so nothing becomes unreachable; a zero or
    non-finite gradient gives the random vector alone, and the gradient alone is used where the two cancel
    (:data:`CANCELLED`: possible with a single parameter). For several eigenvalues it speeds up exactly the directions
    the gradient contains, so an eigenvector the gradient lacks can be missed systematically (the same for every
    seed): :func:`hessian_eigenvalues` uses it for ``k = 1`` only (``start="auto"``). The evidence is in
    ``benchmarks/bench_start_vector.py``.

    Args:
        gradient: a flat tensor, or a list of tensors shaped like the parameters.
        seed: seed of ``z`` (a CPU generator; the global RNG is not touched).

    Returns:
        A start vector in the same format as ``gradient``.

    Raises:
        ValueError: if a flat ``gradient`` is not 1-D.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if isinstance(gradient, Tensor):
        if gradient.dim() != 1:
            raise ValueError(f"Expected a flat gradient, got shape {tuple(gradient.shape)}.")
        space = VectorSpace([gradient])
        g: Vector = [gradient]
    else:
        g = list(gradient)
        space = _space_of(g)
    z = space.randn(gen)
    z_norm, g_norm = (float(x) for x in torch.stack([space.norm(z), space.norm(g)]).cpu())
    if not math.isfinite(g_norm) or g_norm == 0.0:
        out = [t / z_norm for t in z]
    else:
        out = [gi / g_norm + zi / z_norm for gi, zi in zip(g, z)]
        if not float(space.norm(out)) > CANCELLED:  # z ≈ −g/‖g‖·‖z‖ (one parameter: half of all seeds)
            out = [gi / g_norm for gi in g]
    return out[0] if isinstance(gradient, Tensor) else out


def preconditioned_operator(H: HessianOperator, preconditioner: Tensor | Vector | None) -> CurvatureOperator:
    r"""``P^{-1/2} H P^{-1/2}`` as an operator (``H`` itself without ``P``); ``P`` flat or parameter-shaped."""
    if preconditioner is None:
        return H
    P = H.space.coerce(preconditioner)
    return ScaledOperator(H, [p.rsqrt() for p in P])


def cold_start_vector(
    H: HessianOperator,
    k: int,
    *,
    start: StartVector = "auto",
    which: Which = "largest",
    scale: Vector | None = None,
    seed: int = 0,
) -> Vector | None:
    """The start vector ``start`` asks for (see :func:`hessian_eigenvalues`), or ``None`` for the seeded Gaussian
    :func:`~.lanczos.lanczos` draws itself. ``scale`` is :math:`P^{-1/2}` for a preconditioned operator, whose
    gradient in the scaled coordinates is :math:`P^{-1/2} g`.
    """
    if which != "largest" or not (start == "gradient" or (start == "auto" and k == 1)):
        return None
    g = H.gradient()
    if scale is not None:
        g = [d * t for d, t in zip(scale, g)]
    out = gradient_start_vector(g, seed=seed)
    assert isinstance(out, list)
    return out


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    *,
    which: Which = "largest",
    return_eigenvectors: bool = False,
    return_warm_start: bool = False,
    v0: Any = None,
    start: StartVector = "auto",
    abs_tol: float = 1e-6,
    algorithm: Literal["lanczos", "power"] = "lanczos",
    preconditioner: Tensor | Vector | None = None,
    params: Sequence[Tensor] | None = None,
    method: HVPMethod = "auto",
    mode: Literal["train", "eval"] = "train",
    reduce_fn: ReduceFn | None = None,
    seed: int = 0,
    max_vectors: int | None = None,
    block_size: int = 1,
    reuse_graph: bool | None = None,
    batch_dim: Any = None,
    dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
) -> EigenResult:
    r"""The ``k`` largest (or smallest) eigenvalues of the Hessian of ``loss_fn(model, batch)``.

    Args:
        model: the model; parameters decide device and dtype (half precision is computed in float32).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss.
        batch: one batch (tensor, tuple/list, dict or dataclass of tensors), a ``MultiBatch``, or any re-iterable
            of batches such as a ``DataLoader``: the Hessian of the loss averaged over all their examples.
        k: number of eigenvalues.
        tol: relative tolerance on each eigenvalue (error estimate ``≤ tol · max(|λ|, abs_tol)``).
        max_iter: maximum number of Hessian-vector products.
        which: ``"largest"`` or ``"smallest"`` (the most negative).
        return_eigenvectors: keep the ``k`` eigenvectors (``result.eigenvector_list``; ``result.eigenvectors`` is
            the flat ``(k, P)`` form).
        return_warm_start: keep the top ``k + 1`` Ritz vectors to warm-start the next measurement
            (``result.warm_start``); a re-measurement after a few training steps then needs far fewer products.
        v0: start vector (flat, or shaped like the parameters), or a block of them (an ``(m, P)`` tensor or a list
            of vectors, such as the previous ``result.warm_start``).
        start: start vector when ``v0`` is not given: ``"gradient"`` (the gradient mixed with a seeded Gaussian,
            :func:`gradient_start_vector`; ``which="largest"`` only), ``"random"`` (a seeded Gaussian), or
            ``"auto"`` (default): ``"gradient"`` for ``k=1``, where it saves products, ``"random"`` for ``k > 1``,
            where it can hide an eigenvalue the gradient lacks.
        abs_tol: absolute floor of the tolerance scale (spectra can be ~0 at initialisation).
        algorithm: ``"lanczos"`` or ``"power"`` (power iteration, ``k=1`` only, largest magnitude).
        preconditioner: positive diagonal ``P`` (flat or shaped like the parameters); the spectrum of
            :math:`P^{-1/2}HP^{-1/2}` is returned.
        params: parameters to differentiate with respect to (default: all trainable).
        method: how products are computed: ``"auto"`` (default: double backward where it exists and agrees with
            finite differences, else finite differences), ``"double_backward"``, ``"finite_difference"`` or
            ``"forward_over_reverse"`` (see :class:`HessianOperator`).
        mode: ``"train"`` or ``"eval"`` (see :class:`HessianOperator`).
        reduce_fn: SUM all-reduce for distributed measurements.
        seed: seed of the random start vector and of the measurement's dropout mask.
        max_vectors: the most parameter-sized vectors the solver holds at once (thick restarts keep it there; the
            answer still meets ``tol``); ``None``: no bound.
        block_size: vectors per Krylov block; ``b > 1`` finds eigenvalues of multiplicity up to ``b`` that a single
            vector skips (at more products).
        reuse_graph: see :class:`HessianOperator`.
        batch_dim: where the examples are in each tensor of the batch (an int, or one entry per element, ``None``
            for tensors not split into examples; see :func:`~lightning_curvature.core._batch.infer_batch_layout`);
            ``None``: the leading dimension, checked for consistency.
        dtype: the dtype of the products (see :class:`HessianOperator`); ``torch.float64`` for finite differences
            on large float32 models whose float32 products are too inaccurate.
        basis_device: where the Lanczos basis is stored: ``"cpu"`` keeps it in host memory while the model trains
            on an accelerator (see :func:`~lightning_curvature.core.lanczos.lanczos`); ``None``: beside the
            parameters.

    Returns:
        :class:`EigenResult`.

    Raises:
        ValueError: for bad ``k``, ``tol``, ``max_iter``, ``which``, ``algorithm``, ``start``, ``max_vectors``,
            ``basis_device``, ``block_size`` or a wrongly sized ``v0`` or ``preconditioner``; for a loss that does not
            depend on the parameters.
        TypeError: for a non-scalar or non-floating loss.
        NonFiniteCurvatureError: if the loss or a product is NaN or infinite.

    Example::

        >>> lin = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_fn = lambda m, b: (m(b) ** 2).mean()  # H = XᵀX, eigenvalues 4 and 1
        >>> [round(v, 5) for v in hessian_eigenvalues(lin, loss_fn, x, k=2).eigenvalues.tolist()]
        [4.0, 1.0]
    """
    if algorithm not in ("lanczos", "power"):
        raise ValueError(f"`algorithm` must be 'lanczos' or 'power', got {algorithm!r}.")
    if start not in _STARTS:
        raise ValueError(f"`start` must be one of {_STARTS}, got {start!r}.")
    if algorithm == "power" and (k != 1 or which != "largest"):
        raise ValueError(f"Power iteration finds only the dominant eigenvalue; got k={k}, which={which!r}.")
    basis_device = as_basis_device(basis_device)
    if batch_dim is not None:
        batch, loss_fn = as_batch_first(batch, loss_fn, batch_dim)
    with HessianOperator(
        model, loss_fn, batch, params=params, method=method, mode=mode, reduce_fn=reduce_fn, seed=seed,
        reuse_graph=reuse_graph, dtype=dtype,
    ) as H:  # fmt: skip
        if preconditioner is not None:
            P = H.space.coerce(preconditioner)
            if not all(bool((p > 0).all()) for p in P):
                raise ValueError("`preconditioner` must be positive.")
        op = preconditioned_operator(H, preconditioner)
        scale = op.scale if isinstance(op, ScaledOperator) else None
        if is_integer(k) and k > H.dim:
            raise ValueError(f"`k`={k} exceeds the number of parameters {H.dim}.")
        if v0 is None:
            cold = cold_start_vector(H, k, start=start, which=which, scale=scale, seed=seed)
            v0 = None if cold is None else Handoff([cold])  # the solver owns it: no copy of the start vector
        if algorithm == "power":
            res = power_iteration(op, tol=tol, max_iter=max_iter, v0=v0, seed=seed)
        else:
            res = lanczos(
                op, k=k, which=which, tol=tol, abs_tol=abs_tol, max_iter=max_iter, v0=v0,
                return_eigenvectors=return_eigenvectors, return_warm_start=return_warm_start, seed=seed,
                max_vectors=max_vectors, block_size=block_size, basis_device=basis_device,
            )  # fmt: skip
        return EigenResult(
            eigenvalues=res.eigenvalues,
            eigenvector_list=res.eigenvectors if return_eigenvectors else None,
            residuals=res.residuals,
            error_bounds=res.error_bounds,
            num_hvp=H.num_hvp,
            converged=res.converged,
            preconditioned=preconditioner is not None,
            warm_start=res.warm_start,
            method=H.method,
            peak_vectors=res.peak_vectors,
        )


def preconditioned_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    k: int = 1,
    **kwargs: Any,
) -> EigenResult:
    r"""Top eigenvalues of :math:`P^{-1/2} H P^{-1/2}` with ``P`` from an Adam/AdamW/RMSprop optimizer's state.

    Compare with :func:`~lightning_curvature.core.stability.stability_threshold` (``38/η`` for Adam, β₁=0.9).
    Before the optimizer's first step there is no ``P``; the plain Hessian is measured then and
    ``preconditioned`` is ``False`` in the result.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batch: the curvature batch.
        optimizer: an adaptive optimizer managing the measured parameters.
        k: number of eigenvalues.
        **kwargs: passed to :func:`hessian_eigenvalues` (``params`` too).

    Returns:
        :class:`EigenResult`.

    Raises:
        TypeError: for a non-adaptive optimizer.
    """
    params = kwargs.pop("params", None)
    from lightning_curvature.core.hvp import select_parameters

    chosen = [p for _, p in select_parameters(model, params)]
    P = adaptive_preconditioner(optimizer, chosen)
    return hessian_eigenvalues(model, loss_fn, batch, k=k, preconditioner=P, params=chosen, **kwargs)
