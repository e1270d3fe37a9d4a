r"""Top (or bottom) Hessian eigenvalues of ``loss_fn(model, batch)``: sharpness and the top-k spectrum.

Lanczos with full reorthogonalisation on Hessian-vector products (:mod:`.lanczos`, :mod:`.hvp`); optionally
on the preconditioned Hessian :math:`P^{-1/2} H P^{-1/2}` of an adaptive optimizer (:mod:`.preconditioner`).

References:
    J. Gilmer et al., "A Loss Curvature Perspective on Training Instability in Deep Learning",
    arXiv 2110.04369 (Lanczos on a fixed batch throughout training).
    J. Cohen et al., arXiv 2103.00065 and 2207.14484 (sharpness and preconditioned sharpness).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_curvature.core.hvp import HessianOperator, HVPMethod, LossFn, ReduceFn
from lightning_curvature.core.lanczos import Which, lanczos, power_iteration
from lightning_curvature.core.preconditioner import adaptive_preconditioner

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
        eigenvectors: ``(k, num_params)`` flat orthonormal vectors on the model's device, or ``None``. For a
            preconditioned measurement these are eigenvectors of ``P^{-1/2} H P^{-1/2}``.
        residuals: ``‖Hv − λv‖`` per pair (float64).
        error_bounds: certified bound on each eigenvalue's absolute error (``min(r, r²/gap)``).
        num_hvp: Hessian-vector products used.
        converged: every eigenvalue met the tolerance within ``max_iter`` products.
        preconditioned: the spectrum is that of ``P^{-1/2} H P^{-1/2}``.
        warm_start: ``(k + 1, P)`` Ritz vectors for the next measurement (``return_warm_start=True``); pass them as
            ``v0``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    error_bounds: Tensor
    num_hvp: int
    converged: bool
    preconditioned: bool = False
    warm_start: Tensor | None = None

    @property
    def sharpness(self) -> float:
        """The first eigenvalue as a float."""
        return float(self.eigenvalues[0])


def warm_start_vector(eigenvectors: Tensor, seed: int = 0, noise: float = 0.01) -> Tensor:
    """Start vector for a re-measurement: the sum of previous eigenvectors plus a little seeded noise.

    The Krylov space of this vector contains every previous eigenvector, so slowly moving eigenpairs are found
    again in a few products; the noise keeps directions that became dominant since then reachable.

    Raises:
        ValueError: if ``eigenvectors`` is not a non-empty 1-D or 2-D tensor.
    """
    if eigenvectors.dim() == 1:
        eigenvectors = eigenvectors.unsqueeze(0)
    if eigenvectors.dim() != 2 or eigenvectors.shape[0] == 0:
        raise ValueError(f"Expected (k, n) eigenvectors, got shape {tuple(eigenvectors.shape)}.")
    v = eigenvectors.sum(0)
    v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.randn(v.numel(), generator=gen, dtype=torch.float64).to(device=v.device, dtype=v.dtype)
    return v + noise * r / torch.linalg.vector_norm(r)


def gradient_start_vector(gradient: Tensor, seed: int = 0) -> Tensor:
    r"""Lanczos start vector :math:`v_0 = g/\|g\| + z/\|z\|`: the gradient mixed with a seeded Gaussian ``z``.

    The gradient of a network's loss lies mostly in the span of the top Hessian eigenvectors (Gur-Ari, Roberts and
    Dyer, "Gradient Descent Happens in a Tiny Subspace", arXiv 1812.04754), so a Krylov space started from it
    resolves the largest eigenvalues in fewer products. The Gaussian half keeps a component along every
    eigenvector at least :math:`1/\sqrt{2}` of a purely random start's, so nothing becomes unreachable; a zero or
    non-finite gradient gives the random vector alone. ``z`` is the same vector :func:`~.lanczos.lanczos` draws
    for ``seed``.

    For the top eigenvalue alone it helps. ``benchmarks/bench_start_vector.py`` (the three benchmark cases along
    short SGD runs, 0–60 steps, seeds 0–2, ``tol=1e-3``, against a tight reference): no run off by more than
    ``tol`` from either start; on the ~1M-parameter CNN 10.1 products on average against 12.4 from the Gaussian
    alone (9 against 13–14 at initialisation), on the digits MLP 11.3 against 12.2, on the small transformer 9.8
    against 9.6. On four small test networks (dense float64 references, 160 runs) it never missed ``tol`` either.

    For several eigenvalues it is no better and fails worse: it speeds up exactly the directions the gradient
    contains, so Lanczos can settle before an eigenvector the gradient lacks has emerged (see :mod:`.lanczos`,
    "What no stopping rule can see"). At k=5 on the CNN both starts missed ``tol`` in 2–3 runs of 30, but the
    gradient start's misses are systematic: after 3 SGD steps at lr 0.01 it returned λ₆ in place of λ₅ (7.8e-3
    off) for every seed, since the gradient half is the same, so comparing seeds cannot reveal it; a Gaussian
    start's misses are independent across seeds. :func:`hessian_eigenvalues` therefore uses it for ``k = 1``
    only (``start="auto"``).

    Raises:
        ValueError: if ``gradient`` is not a 1-D tensor.
    """
    if gradient.dim() != 1:
        raise ValueError(f"Expected a flat gradient, got shape {tuple(gradient.shape)}.")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(gradient.numel(), generator=gen, dtype=torch.float64)
    z = z.to(device=gradient.device, dtype=gradient.dtype)
    z = z / torch.linalg.vector_norm(z)
    g_norm = torch.linalg.vector_norm(gradient)
    if not bool(torch.isfinite(g_norm)) or float(g_norm) == 0.0:
        return z
    return gradient / g_norm + z


def preconditioned_operator(
    H: HessianOperator, preconditioner: Tensor | None
) -> tuple[Callable[[Tensor], Tensor], Tensor | None]:
    r"""``v -> P^{-1/2} H P^{-1/2} v`` and the scaling :math:`d = P^{-1/2}`; ``(H.matvec, None)`` without ``P``."""
    if preconditioner is None:
        return H.matvec, None
    d = preconditioner.reshape(-1).to(device=H.device, dtype=H.dtype).rsqrt()

    def matvec(v: Tensor) -> Tensor:
        return d * H.matvec(d * v)

    return matvec, d


def cold_start_vector(
    H: HessianOperator,
    k: int,
    *,
    start: StartVector = "auto",
    which: Which = "largest",
    scale: Tensor | None = None,
    seed: int = 0,
) -> Tensor | None:
    """The start vector ``start`` asks for (see :func:`hessian_eigenvalues`), or ``None`` for the seeded Gaussian
    :func:`~.lanczos.lanczos` draws itself. ``scale`` is :math:`P^{-1/2}` for a preconditioned operator, whose
    gradient in the scaled coordinates is :math:`P^{-1/2} g`.
    """
    if which != "largest" or not (start == "gradient" or (start == "auto" and k == 1)):
        return None
    g = H.gradient()
    return gradient_start_vector(g if scale is None else scale * g, seed=seed)


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
    v0: Tensor | None = None,
    start: StartVector = "auto",
    abs_tol: float = 1e-6,
    algorithm: Literal["lanczos", "power"] = "lanczos",
    preconditioner: Tensor | None = None,
    params: Sequence[Tensor] | None = None,
    method: HVPMethod = "double_backward",
    mode: Literal["train", "eval"] = "train",
    reduce_fn: ReduceFn | None = None,
    seed: int = 0,
) -> EigenResult:
    r"""The ``k`` largest (or smallest) eigenvalues of the Hessian of ``loss_fn(model, batch)``.

    Args:
        model: the model; parameters decide device and dtype (half precision is computed in float32).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss.
        batch: tensor, tuple/list or dict of tensors, or a ``MultiBatch``.
        k: number of eigenvalues.
        tol: relative tolerance on each eigenvalue (certified bound ``≤ tol · max(|λ|, abs_tol)``).
        max_iter: maximum number of Hessian-vector products.
        which: ``"largest"`` or ``"smallest"`` (the most negative).
        return_eigenvectors: keep the ``(k, P)`` eigenvectors (for subspace overlap, deflation).
        return_warm_start: keep the top ``k + 1`` Ritz vectors to warm-start the next measurement
            (``result.warm_start``); a re-measurement after a few training steps then needs far fewer products.
        v0: start vector (flat, length P), or a ``(m, P)`` block such as the previous ``result.warm_start``.
        start: start vector when ``v0`` is not given: ``"gradient"`` (the gradient mixed with a seeded Gaussian,
            :func:`gradient_start_vector`; free, the ``create_graph`` gradient is built anyway; ``which="largest"``
            only), ``"random"`` (a seeded Gaussian), or ``"auto"`` (default): ``"gradient"`` for ``k=1``, where it
            saves products, ``"random"`` for ``k > 1``, where it can hide an eigenvalue the gradient lacks.
        abs_tol: absolute floor of the tolerance scale (spectra can be ~0 at initialisation).
        algorithm: ``"lanczos"`` or ``"power"`` (power iteration, ``k=1`` only, largest magnitude).
        preconditioner: flat positive diagonal ``P``; the spectrum of :math:`P^{-1/2}HP^{-1/2}` is returned.
        params: parameters to differentiate with respect to (default: all trainable).
        method: Hessian-vector product implementation (see :class:`HessianOperator`).
        mode: ``"train"`` or ``"eval"`` (see :class:`HessianOperator`).
        reduce_fn: SUM all-reduce for distributed measurements.
        seed: seed of the random start vector and of the measurement's dropout mask.

    Returns:
        :class:`EigenResult`.

    Raises:
        ValueError: for bad ``k``, ``tol``, ``max_iter``, ``which``, ``algorithm``, ``start`` or a wrongly sized
            ``v0`` or ``preconditioner``.
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
    with HessianOperator(
        model, loss_fn, batch, params=params, method=method, mode=mode, reduce_fn=reduce_fn, seed=seed
    ) as H:
        if preconditioner is not None:
            if preconditioner.numel() != H.dim:
                raise ValueError(f"`preconditioner` has {preconditioner.numel()} entries, expected {H.dim}.")
            if not bool((preconditioner > 0).all()):
                raise ValueError("`preconditioner` must be positive.")
        matvec, d = preconditioned_operator(H, preconditioner)
        if v0 is not None and v0.shape[-1] != H.dim:
            raise ValueError(f"`v0` has shape {tuple(v0.shape)}, expected vectors of {H.dim} entries.")
        if k > H.dim:
            raise ValueError(f"`k`={k} exceeds the number of parameters {H.dim}.")
        if v0 is None:
            v0 = cold_start_vector(H, k, start=start, which=which, scale=d, seed=seed)
        if algorithm == "power":
            res = power_iteration(
                matvec, H.dim, tol=tol, max_iter=max_iter, v0=v0, seed=seed, dtype=H.dtype, device=H.device
            )
        else:
            res = lanczos(
                matvec,
                H.dim,
                k=k,
                which=which,
                tol=tol,
                abs_floor=abs_tol,
                max_iter=max_iter,
                v0=v0,
                return_eigenvectors=return_eigenvectors,
                return_warm_start=return_warm_start,
                seed=seed,
                dtype=H.dtype,
                device=H.device,
            )
        return EigenResult(
            eigenvalues=res.eigenvalues,
            eigenvectors=res.eigenvectors if return_eigenvectors else None,
            residuals=res.residuals,
            error_bounds=res.error_bounds,
            num_hvp=H.num_hvp,
            converged=res.converged,
            preconditioned=preconditioner is not None,
            warm_start=res.warm_start,
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
