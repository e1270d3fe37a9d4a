r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

For normalised Rademacher probes :math:`z_l` and :math:`m` Lanczos steps, the tridiagonal
:math:`T^{(l)} = S\,\mathrm{diag}(\theta)\,S^\top` gives nodes :math:`\theta^{(l)}_j` and weights
:math:`\tau^{(l)}_j = (S_{1j})^2`; the smoothed density is

.. math:: \phi_\sigma(t) = \frac{1}{n_v}\sum_{l=1}^{n_v}\sum_{j=1}^{m} \tau^{(l)}_j\,
          \frac{1}{\sigma\sqrt{2\pi}} e^{-(t-\theta^{(l)}_j)^2/(2\sigma^2)},

which integrates to 1 (the normalised spectral measure of :math:`H`). ``P · Σ τθ`` is an SLQ trace estimate.

References:
    L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices", SIAM Review 2016.
    B. Ghorbani, S. Krishnan, Y. Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
    Density", ICML 2019 (arXiv 1901.10159).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_curvature.core._basis import as_basis_device
from lightning_curvature.core._batch import as_batch_first
from lightning_curvature.core._validation import is_integer
from lightning_curvature.core.hvp import HessianOperator, HVPMethod, LossFn, ReduceFn
from lightning_curvature.core.lanczos import Operator, lanczos_tridiagonal
from lightning_curvature.core.operators import as_operator

__all__ = ["DensityResult", "hessian_spectral_density", "slq_density"]


@dataclass
class DensityResult:
    """A smoothed spectral density.

    Attributes:
        grid: float64 points ``t``.
        density: float64 ``φ_σ(t)`` on ``grid``; integrates to about 1.
        nodes: ``(num_probes, m)`` Ritz values per probe.
        weights: ``(num_probes, m)`` quadrature weights per probe (each row sums to 1).
        sigma: Gaussian smoothing width.
        trace: the SLQ estimate ``P · mean_l Σ_j τ_j θ_j``.
        num_hvp: products used.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    trace: float
    num_hvp: int


def _smooth(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    d = (grid[:, None, None] - nodes[None]) / sigma
    return (weights[None] * torch.exp(-0.5 * d**2)).sum((1, 2)) / (nodes.shape[0] * sigma * math.sqrt(2 * math.pi))


def slq_density(
    A: Operator,
    dim: int | None = None,
    *,
    num_probes: int = 3,
    num_iters: int = 80,
    grid_size: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reorthogonalize: bool = True,
    basis_device: torch.device | str | None = None,
) -> DensityResult:
    """Stochastic Lanczos quadrature on a symmetric matrix or callable.

    Args:
        A: an operator, a symmetric matrix or a callable ``v -> Av`` on flat vectors.
        dim: vector size (inferred from a matrix).
        num_probes: number of random probes.
        num_iters: Lanczos steps per probe.
        grid_size: number of grid points.
        sigma: smoothing width; default 1% of the node range.
        seed: probe seed.
        dtype: probe dtype for a callable.
        device: probe device for a callable.
        reorthogonalize: full reorthogonalisation (default; keeps ``num_iters`` vectors of the operator's size).
            ``False`` keeps two vectors: the basis then loses orthogonality and converged Ritz values repeat as
            "ghosts", but Gauss quadrature in finite precision still integrates the spectral measure (Greenbaum
            1989; Ubaru, Chen and Saad, SIAM J. Matrix Anal. Appl. 2017), so the density is nearly unchanged for a
            fraction of the memory and no Gram–Schmidt cost.
        basis_device: where the reorthogonalisation basis is stored (``"cpu"``: host memory for a model on an
            accelerator; see :func:`~lightning_curvature.core.lanczos.lanczos`).

    Returns:
        :class:`DensityResult` (``num_hvp`` = products used).

    Raises:
        ValueError: for ``num_probes``, ``num_iters`` or ``grid_size`` not a positive integer, a non-positive
            ``sigma``, or a bad ``basis_device``.

    Example::

        >>> A = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64))
        >>> r = slq_density(A, num_probes=4, num_iters=4)
        >>> round(r.trace, 6)
        8.0
    """
    for name, val in (("num_probes", num_probes), ("num_iters", num_iters), ("grid_size", grid_size)):
        if not is_integer(val) or val < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {val!r}.")
    num_probes, num_iters, grid_size = int(num_probes), int(num_iters), int(grid_size)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"`sigma` must be > 0, got {sigma!r}.")
    storage = as_basis_device(basis_device)
    op = as_operator(A, dim, dtype, device)
    dim = op.dim
    gen = torch.Generator(device="cpu").manual_seed(seed)
    all_nodes, all_weights = [], []
    used = 0
    for _ in range(num_probes):
        z = op.space.rademacher(gen)
        alpha, beta, _ = lanczos_tridiagonal(op, z, num_iters, reorthogonalize=reorthogonalize, basis_device=storage)
        used += alpha.numel()
        T = torch.diag(alpha)
        if alpha.numel() > 1:
            T = T + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
        theta, S = torch.linalg.eigh(T)
        all_nodes.append(theta)
        all_weights.append(S[0] ** 2)
    m = max(t.numel() for t in all_nodes)
    nodes = torch.stack([torch.nn.functional.pad(t, (0, m - t.numel()), value=float(t[-1])) for t in all_nodes])
    weights = torch.stack([torch.nn.functional.pad(w, (0, m - w.numel())) for w in all_weights])
    lo, hi = float(nodes.min()), float(nodes.max())
    span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    sig = sigma if sigma is not None else 0.01 * span
    grid = torch.linspace(lo - 4 * sig, hi + 4 * sig, grid_size, dtype=torch.float64)
    density = _smooth(nodes, weights, grid, sig)
    trace = dim * float((weights * nodes).sum(1).mean())
    return DensityResult(grid, density, nodes, weights, sig, trace, used)


def hessian_spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_probes: int = 3,
    num_iters: int = 80,
    grid_size: int = 1000,
    sigma: float | None = None,
    params: Sequence[Tensor] | None = None,
    method: HVPMethod = "auto",
    mode: Literal["train", "eval"] = "train",
    reduce_fn: ReduceFn | None = None,
    seed: int = 0,
    reorthogonalize: bool = True,
    batch_dim: Any = None,
    basis_device: torch.device | str | None = None,
) -> DensityResult:
    """Smoothed Hessian eigenvalue density of ``loss_fn(model, batch)`` by SLQ (see :func:`slq_density`).

    Raises:
        ValueError: for invalid SLQ settings.
        NonFiniteCurvatureError: if the loss or a product is NaN or infinite.
    """
    if batch_dim is not None:  # where the examples are (see hessian_eigenvalues)
        batch, loss_fn = as_batch_first(batch, loss_fn, batch_dim)
    with HessianOperator(
        model, loss_fn, batch, params=params, method=method, mode=mode, reduce_fn=reduce_fn, seed=seed
    ) as H:
        res = slq_density(
            H,
            num_probes=num_probes,
            num_iters=num_iters,
            grid_size=grid_size,
            sigma=sigma,
            seed=seed,
            reorthogonalize=reorthogonalize,
            basis_device=basis_device,
        )
        res.num_hvp = H.num_hvp
        return res
