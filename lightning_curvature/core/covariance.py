r"""Spectrum and conditioning of the per-example gradient covariance.

.. math:: K = \frac{1}{N}\sum_{i=1}^N (g_i - \bar g)(g_i - \bar g)^\top

Its non-zero spectrum equals that of the :math:`N \times N` matrix :math:`\frac1N \tilde G \tilde G^\top`,
:math:`\tilde G = C G`, :math:`C = I - \frac1N \mathbf 1 \mathbf 1^\top` (rows of :math:`G` are the
:math:`g_i`), so :math:`K` is never formed: the Gram matrix :math:`M = GG^\top` is accumulated chunk by chunk
and :math:`\frac1N CMC` is diagonalised in float64. When the per-example gradients do not fit in one chunk,
off-diagonal blocks are recomputed, so memory stays at two chunks plus :math:`N^2`.

Reported: top-k eigenvalues, :math:`\mathrm{tr}K`, :math:`\|K\|_F`, :math:`\lambda_1/\lambda_k`, and the
gradient noise scale :math:`B_{\text{simple}} = \mathrm{tr}K / \|\bar g\|^2` (McCandlish et al. 2018,
arXiv 1812.06162).

Under ``torch.distributed`` (``reduce_fn``) the examples of all ranks form the batch: each rank keeps its
chunked gradients, :math:`Kv` is all-reduced, and Lanczos finds the top-k in parameter space;
:math:`\|K\|_F` needs cross-rank pairs and is then ``None``.

Reference: S. Jastrzebski et al., "The Break-Even Point on Optimization Trajectories of Deep Neural
Networks", ICLR 2020 (arXiv 2002.09572).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvature.core._batch import MultiBatch, batch_size, iter_batches, slice_batch
from lightning_curvature.core._state import MeasurementMode, math_attention, preserved_model_state, unwrap_compiled
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.hvp import LossFn, ReduceFn, select_parameters
from lightning_curvature.core.lanczos import lanczos
from lightning_curvature.core.per_example import (
    PerExampleStrategy,
    default_chunk_size,
    per_example_gradient_chunks,
)

__all__ = ["CovarianceResult", "gradient_covariance"]


@dataclass
class CovarianceResult:
    """Gradient-covariance statistics of one batch.

    Attributes:
        eigenvalues: float64 top-k eigenvalues of ``K``, largest first (``k`` is capped at ``N − 1``).
        trace: ``tr K``.
        frobenius_norm: ``‖K‖_F`` (``None`` for distributed measurements).
        condition_number: ``λ_1/λ_k`` over the computed top-k (``inf`` if ``λ_k`` is 0).
        noise_scale: ``tr K / ‖ḡ‖²``.
        mean_gradient_norm_sq: ``‖ḡ‖²``.
        num_examples: ``N``.
    """

    eigenvalues: Tensor
    trace: float
    frobenius_norm: float | None
    condition_number: float
    noise_scale: float
    mean_gradient_norm_sq: float
    num_examples: int


def gradient_covariance(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 10,
    *,
    params: Sequence[Tensor] | None = None,
    chunk_size: int | None = None,
    max_memory_bytes: float = 512e6,
    strategy: PerExampleStrategy = "auto",
    mode: MeasurementMode = "train",
    reduce_fn: ReduceFn | None = None,
    seed: int = 0,
    tol: float = 1e-4,
) -> CovarianceResult:
    """Top-k spectrum, trace, Frobenius norm, conditioning and noise scale of the gradient covariance.

    Args:
        model: the model (per-example gradients need BatchNorm in eval mode: use ``mode="eval"``).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; called on batches of one example.
        batch: tensor, tuple/list or dict of tensors, or a ``MultiBatch``; at least 2 examples.
        k: number of eigenvalues (capped at ``N − 1``, the rank of ``K``).
        params: parameters (default: all trainable).
        chunk_size: examples per chunk (default: as many as fit in ``max_memory_bytes``).
        max_memory_bytes: memory budget of one chunk of per-example gradients.
        strategy: ``"auto"`` (vmap, falling back to a loop), ``"vmap"`` or ``"loop"``.
        mode: ``"train"`` or ``"eval"``.
        reduce_fn: SUM all-reduce across processes (distributed measurement).
        seed: seed of the forked RNG (dropout masks).
        tol: Lanczos tolerance of the distributed path.

    Returns:
        :class:`CovarianceResult`.

    Raises:
        ValueError: for ``k < 1``, a bad ``chunk_size``/``strategy``/``max_memory_bytes``, fewer than 2 examples,
            or BatchNorm in train mode.
        NonFiniteCurvatureError: if a per-example gradient is NaN or infinite.

    Example::

        >>> lin = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(0.0)
        >>> x = torch.tensor([[1.0], [2.0], [3.0]])
        >>> # loss (w·x − 1)²/2 at w = 0 has g_i = −x_i: K = Var(x) = 2/3
        >>> cov = gradient_covariance(lin, lambda m, b: 0.5 * ((m(b) - 1) ** 2).mean(), x, k=1)
        >>> round(cov.trace, 6), round(cov.noise_scale, 6)
        (0.666667, 0.166667)
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}.")
    if strategy not in ("auto", "vmap", "loop"):
        raise ValueError(f"`strategy` must be 'auto', 'vmap' or 'loop', got {strategy!r}.")
    if not max_memory_bytes > 0:
        raise ValueError(f"`max_memory_bytes` must be > 0, got {max_memory_bytes!r}.")
    model = unwrap_compiled(model)  # vmap and double backward need the eager module
    n_local = sum(batch_size(b) for b in iter_batches(batch))
    kwargs = dict(params=params, chunk_size=chunk_size, max_memory_bytes=max_memory_bytes, strategy=strategy)
    with (
        preserved_model_state(model, mode, seed),
        math_attention(),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        if reduce_fn is not None:
            return _distributed(model, loss_fn, batch, k, n_local, reduce_fn, tol, kwargs)
        if n_local < 2:
            raise ValueError(f"The gradient covariance needs at least 2 examples, got {n_local}.")
        return _gram(model, loss_fn, batch, k, n_local, kwargs)


def _chunks_of(batch: Any, size: int) -> list[Any]:
    out: list[Any] = []
    for b in iter_batches(batch):
        n = batch_size(b)
        out.extend(slice_batch(b, s, min(n, s + size)) for s in range(0, n, size))
    return out


def _gram(model: nn.Module, loss_fn: LossFn, batch: Any, k: int, n: int, kwargs: dict[str, Any]) -> CovarianceResult:
    named = select_parameters(model, kwargs["params"])
    num_params = sum(p.numel() for _, p in named)
    itemsize = 8 if named[0][1].dtype == torch.float64 else 4
    c = kwargs["chunk_size"] or default_chunk_size(num_params, n, kwargs["max_memory_bytes"], itemsize)
    pieces = _chunks_of(batch, c)

    def grads_of(piece: Any) -> Tensor:
        g = torch.cat(
            list(per_example_gradient_chunks(model, loss_fn, MultiBatch([piece]), **{**kwargs, "chunk_size": c}))
        )
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteCurvatureError("A per-example gradient is NaN or infinite.")
        return g.to(torch.float64)

    M = torch.empty(n, n, dtype=torch.float64)
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + batch_size(p))
    for i, pi in enumerate(pieces):
        Gi = grads_of(pi)
        si = slice(offsets[i], offsets[i + 1])
        M[si, si] = (Gi @ Gi.T).cpu()
        for j in range(i + 1, len(pieces)):
            Gj = grads_of(pieces[j])
            sj = slice(offsets[j], offsets[j + 1])
            block = (Gi @ Gj.T).cpu()
            M[si, sj] = block
            M[sj, si] = block.T
    ones = torch.full((n,), 1.0 / n, dtype=torch.float64)
    mean_norm_sq = float(ones @ M @ ones)
    Mc = M - M.mean(0, keepdim=True) - M.mean(1, keepdim=True) + M.mean()
    evals = torch.linalg.eigvalsh(Mc / n).flip(0).clamp_min(0.0)
    kk = min(k, n - 1)
    top = evals[:kk]
    trace = float(torch.diagonal(Mc).sum() / n)
    frob = float(torch.linalg.vector_norm(evals))
    return _result(top, trace, frob, mean_norm_sq, n)


def _result(top: Tensor, trace: float, frob: float | None, mean_norm_sq: float, n: int) -> CovarianceResult:
    lam_k = float(top[-1])
    cond = float(top[0]) / lam_k if lam_k > 0 else math.inf
    noise = trace / mean_norm_sq if mean_norm_sq > 0 else math.inf
    return CovarianceResult(top.clone(), trace, frob, cond, noise, mean_norm_sq, n)


def _distributed(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int,
    n_local: int,
    reduce_fn: ReduceFn,
    tol: float,
    kwargs: dict[str, Any],
) -> CovarianceResult:
    G = torch.cat(list(per_example_gradient_chunks(model, loss_fn, batch, **kwargs)))
    # no local raise before the all-reduce (the other ranks would hang): NaN propagates into the reduced stats
    stats = torch.cat([torch.tensor([float(n_local), float((G * G).sum())], device=G.device, dtype=G.dtype), G.sum(0)])
    stats = reduce_fn(stats)
    if not bool(torch.isfinite(stats).all()):
        raise NonFiniteCurvatureError("A per-example gradient is NaN or infinite on some process.")
    n = round(float(stats[0]))
    if n < 2:
        raise ValueError(f"The gradient covariance needs at least 2 examples, got {n}.")
    gbar = stats[2:] / n
    mean_norm_sq = float(torch.dot(gbar, gbar))
    trace = float(stats[1]) / n - mean_norm_sq

    def matvec(v: Tensor) -> Tensor:
        return reduce_fn(G.T @ (G @ v)) / n - gbar * torch.dot(gbar, v)

    kk = min(k, n - 1, G.shape[1])
    res = lanczos(matvec, G.shape[1], k=kk, tol=tol, max_iter=max(3 * kk + 20, 50), dtype=G.dtype, device=G.device)
    return _result(res.eigenvalues.clamp_min(0.0), trace, None, mean_norm_sq, n)
