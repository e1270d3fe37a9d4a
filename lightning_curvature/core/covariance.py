r"""Spectrum and conditioning of the per-example gradient covariance.

.. math:: K = \frac{1}{N}\sum_{i=1}^N (g_i - \bar g)(g_i - \bar g)^\top

Every per-example gradient is computed once, chunk by chunk (time linear in :math:`N`). Two ways to the spectrum:

* **Gram** (single process, when the :math:`N \times P` gradients fit in ``max_memory_bytes``): they are stored in
  float32, and the non-zero spectrum of :math:`K` is that of the :math:`N \times N` matrix
  :math:`\frac1N CMC`, :math:`M = GG^\top`, :math:`C = I - \frac1N \mathbf 1 \mathbf 1^\top`: exact, with
  :math:`\|K\|_F` (:math:`M` accumulated column chunk by column chunk in float64, no float64 copy of :math:`G`).
* **Operator** (otherwise, and under ``torch.distributed``): Lanczos on
  :math:`Kv = \frac1N \sum_i g_i (g_i^\top v) - \bar g (\bar g^\top v)`, each product one pass over the
  examples with one chunk of gradients in memory (the gradients are kept instead when they fit); under DDP the
  sums are all-reduced. :math:`\|K\|_F` needs all pairs and is then ``None``.

Reported: top-k eigenvalues, :math:`\mathrm{tr}K`, :math:`\|K\|_F`, :math:`\lambda_1/\lambda_k`, and the
gradient noise scale :math:`B_{\text{simple}} = \mathrm{tr}\Sigma / |G|^2` (McCandlish et al. 2018,
arXiv 1812.06162, appendix A) from *unbiased* estimates of both: with :math:`S = \frac1N\sum_i\|g_i\|^2`,
:math:`|G|^2 \approx (N\|\bar g\|^2 - S)/(N-1)` and :math:`\mathrm{tr}\Sigma \approx N(S - \|\bar g\|^2)/(N-1)`.
The biased :math:`\mathrm{tr}K/\|\bar g\|^2` saturates near :math:`N` (:math:`\|\bar g\|^2` carries
:math:`\mathrm{tr}\Sigma/N`) exactly where the noise scale matters; pool the two estimates over several batches
before taking the ratio (:class:`NoiseScaleEstimate`).

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

from lightning_curvature.core._batch import (
    MultiBatch,
    as_batch_first,
    batch_size,
    is_batch_iterable,
    iter_batches,
    read_if_one_pass,
)
from lightning_curvature.core._state import MeasurementMode, math_attention, preserved_model_state, unwrap_compiled
from lightning_curvature.core._validation import is_integer
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.hvp import LossFn, ReduceFn, select_parameters
from lightning_curvature.core.lanczos import lanczos
from lightning_curvature.core.per_example import (
    PerExampleStrategy,
    default_chunk_size,
    per_example_gradient_chunks,
)
from lightning_curvature.core.vectors import COLUMN_CHUNK

__all__ = ["CovarianceResult", "NoiseScaleEstimate", "gradient_covariance", "unbiased_noise_terms"]


@dataclass
class CovarianceResult:
    """Gradient-covariance statistics of one batch.

    Attributes:
        eigenvalues: float64 top-k eigenvalues of ``K``, largest first (``k`` is capped at ``N − 1``).
        trace: ``tr K`` (the covariance of this batch's examples, ``1/N`` normalised).
        frobenius_norm: ``‖K‖_F`` (``None`` when computed without the Gram matrix: distributed or too large).
        condition_number: ``λ_1/λ_k`` over the computed top-k (``inf`` if ``λ_k`` is 0).
        noise_scale: ``tr Σ / |G|²`` from the unbiased estimates below (``inf`` when ``|G|²`` is not positive).
        mean_gradient_norm_sq: ``‖ḡ‖²`` of this batch (biased for ``|G|²``: it carries ``tr Σ / N``).
        num_examples: ``N``.
        gradient_norm_sq_unbiased: ``(N‖ḡ‖² − S)/(N − 1)``, an unbiased estimate of ``|G|²`` (may be negative).
        trace_sigma_unbiased: ``N(S − ‖ḡ‖²)/(N − 1)``, an unbiased estimate of the per-example ``tr Σ``.
        method: ``"gram"`` or ``"operator"`` (see the module docstring).
    """

    eigenvalues: Tensor
    trace: float
    frobenius_norm: float | None
    condition_number: float
    noise_scale: float
    mean_gradient_norm_sq: float
    num_examples: int
    gradient_norm_sq_unbiased: float = math.nan
    trace_sigma_unbiased: float = math.nan
    method: str = "gram"


def unbiased_noise_terms(mean_sq_norm: float, mean_grad_norm_sq: float, n: int) -> tuple[float, float]:
    r"""Unbiased ``(|G|², tr Σ)`` from ``S = mean ‖g_i‖²`` and ``‖ḡ‖²`` of ``n`` examples (McCandlish et al., A.1).

    Example::

        >>> unbiased_noise_terms(mean_sq_norm=5.0, mean_grad_norm_sq=2.0, n=4)  # (4·2 − 5)/3, 4·(5 − 2)/3
        (1.0, 4.0)
    """
    if n < 2:
        return math.nan, math.nan
    g2 = (n * mean_grad_norm_sq - mean_sq_norm) / (n - 1)
    tr_sigma = n * (mean_sq_norm - mean_grad_norm_sq) / (n - 1)
    return g2, tr_sigma


class NoiseScaleEstimate:
    r"""The simple noise scale pooled over measurements: ratio of averaged unbiased estimates.

    :math:`B_\text{simple} = \overline{\mathrm{tr}\Sigma} / \overline{|G|^2}` with exponential moving averages of
    both (McCandlish et al. 2018, appendix A: average numerator and denominator separately; an average of ratios, or
    a ratio of one batch's estimates, is dominated by the noise in :math:`|G|^2`).

    Args:
        beta: weight of the past in the moving averages, in ``[0, 1)`` (0: the latest batch alone).

    Example::

        >>> est = NoiseScaleEstimate(beta=0.0)
        >>> est.update(gradient_norm_sq=2.0, trace_sigma=10.0)
        5.0
    """

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Expected 0 <= beta < 1, got beta={beta!r}.")
        self.beta = beta
        self.g2 = 0.0
        self.tr = 0.0
        self.count = 0

    def update(self, gradient_norm_sq: float, trace_sigma: float) -> float:
        """Fold in one batch's unbiased estimates; return the pooled noise scale (``inf`` if ``|G|² ≤ 0``)."""
        if math.isfinite(gradient_norm_sq) and math.isfinite(trace_sigma):
            self.g2 = self.beta * self.g2 + (1 - self.beta) * gradient_norm_sq
            self.tr = self.beta * self.tr + (1 - self.beta) * trace_sigma
            self.count += 1
        return self.value

    @property
    def value(self) -> float:
        """The pooled ``tr Σ / |G|²`` (bias corrections cancel in the ratio)."""
        if self.count == 0:
            return math.nan
        return self.tr / self.g2 if self.g2 > 0 else math.inf

    def state_dict(self) -> dict[str, float]:
        """Plain values for checkpoints."""
        return {"g2": self.g2, "tr": self.tr, "count": self.count, "beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict` output."""
        self.g2, self.tr = float(state.get("g2", 0.0)), float(state.get("tr", 0.0))
        self.count = int(state.get("count", 0))


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
    batch_dim: Any = None,
) -> CovarianceResult:
    """Top-k spectrum, trace, Frobenius norm, conditioning and noise scale of the gradient covariance.

    Args:
        model: the model (per-example gradients need BatchNorm in eval mode: use ``mode="eval"``).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; called on batches of one example.
        batch: tensor, tuple/list or dict of tensors, a ``MultiBatch``, or any iterable of batches (a ``DataLoader``,
            read once); at least 2 examples.
        k: number of eigenvalues (capped at ``N − 1``, the rank of ``K``).
        params: parameters (default: all trainable).
        chunk_size: examples per chunk of per-example gradients (default: as many as fit in ``max_memory_bytes``).
        max_memory_bytes: memory budget for per-example gradients: all of them are kept (the exact Gram path) when
            they fit, else one chunk at a time (the operator path).
        strategy: ``"auto"`` (vmap, falling back to a per-example loop where vmap cannot trace the model, with a
            warning), ``"vmap"`` or ``"loop"``.
        mode: ``"train"`` or ``"eval"``.
        reduce_fn: SUM all-reduce across processes (distributed measurement).
        seed: seed of the forked RNG (dropout masks).
        tol: Lanczos tolerance of the operator path.
        batch_dim: where the examples are in the batch's tensors (see
            :func:`~lightning_curvature.core.eigen.hessian_eigenvalues`).

    Returns:
        :class:`CovarianceResult`.

    Raises:
        ValueError: for ``k < 1``, a bad ``chunk_size``/``strategy``/``max_memory_bytes``, fewer than 2 examples,
            BatchNorm in train mode, or a loss that does not depend on the parameters.
        NonFiniteCurvatureError: if a per-example gradient is NaN or infinite.

    Example::

        >>> lin = nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(0.0)
        >>> x = torch.tensor([[1.0], [2.0], [3.0]])
        >>> # loss (w·x − 1)²/2 at w = 0 has g_i = −x_i: K = Var(x) = 2/3, |G|² ≈ (3·4 − 14/3)/2 = 11/3
        >>> cov = gradient_covariance(lin, lambda m, b: 0.5 * ((m(b) - 1) ** 2).mean(), x, k=1)
        >>> round(cov.trace, 6), round(cov.noise_scale, 6)
        (0.666667, 0.272727)
    """
    if not is_integer(k) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    k = int(k)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}.")
    if strategy not in ("auto", "vmap", "loop"):
        raise ValueError(f"`strategy` must be 'auto', 'vmap' or 'loop', got {strategy!r}.")
    if not max_memory_bytes > 0:
        raise ValueError(f"`max_memory_bytes` must be > 0, got {max_memory_bytes!r}.")
    if is_batch_iterable(batch) and not isinstance(batch, MultiBatch):
        # a DataLoader or generator of batches: read once (every per-example gradient is needed anyway)
        batch = read_if_one_pass(iter(batch))
    if batch_dim is not None:
        batch, loss_fn = as_batch_first(batch, loss_fn, batch_dim)
    model = unwrap_compiled(model)  # vmap needs the eager module
    n_local = sum(batch_size(b) for b in iter_batches(batch))
    named = select_parameters(model, params)
    num_params = sum(p.numel() for _, p in named)
    itemsize = 8 if any(p.dtype == torch.float64 for _, p in named) else 4  # per-example rows in the widest dtype
    chunk = chunk_size or default_chunk_size(num_params, n_local, max_memory_bytes, itemsize)
    kwargs = dict(params=params, chunk_size=chunk, max_memory_bytes=max_memory_bytes, strategy=strategy)
    with (
        preserved_model_state(model, mode, seed),
        math_attention(),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        if reduce_fn is None and n_local < 2:
            raise ValueError(f"The gradient covariance needs at least 2 examples, got {n_local}.")
        fits = n_local * num_params * itemsize <= max_memory_bytes
        stored = _store(model, loss_fn, batch, n_local, num_params, kwargs) if fits else None
        if reduce_fn is None and stored is not None:
            return _gram(stored, k)
        return _operator(model, loss_fn, batch, k, n_local, num_params, reduce_fn, tol, kwargs, stored)


def _checked(G: Tensor) -> Tensor:
    if not bool(torch.isfinite(G).all()):
        raise NonFiniteCurvatureError("A per-example gradient is NaN or infinite.")
    return G


def _store(model: nn.Module, loss_fn: LossFn, batch: Any, n: int, num_params: int, kwargs: dict[str, Any]) -> Tensor:
    """All per-example gradients, each computed once, in one ``(N, P)`` buffer (the caller checked it fits)."""
    G: Tensor | None = None
    row = 0
    for chunk in per_example_gradient_chunks(model, loss_fn, batch, **kwargs):
        if G is None:
            G = torch.empty(n, num_params, dtype=chunk.dtype, device=chunk.device)
        G[row : row + chunk.shape[0]] = chunk
        row += chunk.shape[0]
    assert G is not None
    return G


def _gram_matrix(G: Tensor) -> Tensor:
    """``G Gᵀ`` in float64 from float32 products over column chunks (no float64 copy of ``G``)."""
    if G.dtype == torch.float64:
        return (G @ G.T).cpu()
    M = torch.zeros(G.shape[0], G.shape[0], dtype=torch.float64, device=G.device)
    for s in range(0, G.shape[1], COLUMN_CHUNK):
        block = G[:, s : s + COLUMN_CHUNK]
        M += (block @ block.T).to(torch.float64)
    return M.cpu()


def _gram(G: Tensor, k: int) -> CovarianceResult:
    n = G.shape[0]
    M = _gram_matrix(_checked(G))
    ones = torch.full((n,), 1.0 / n, dtype=torch.float64)
    mean_norm_sq = float(ones @ M @ ones)
    mean_sq = float(torch.diagonal(M).mean())
    Mc = M - M.mean(0, keepdim=True) - M.mean(1, keepdim=True) + M.mean()
    evals = torch.linalg.eigvalsh(Mc / n).flip(0).clamp_min(0.0)
    kk = min(k, n - 1)
    trace = float(torch.diagonal(Mc).sum() / n)
    frob = float(torch.linalg.vector_norm(evals))
    return _result(evals[:kk], trace, frob, mean_norm_sq, mean_sq, n, "gram")


def _result(
    top: Tensor, trace: float, frob: float | None, mean_norm_sq: float, mean_sq: float, n: int, method: str
) -> CovarianceResult:
    lam_k = float(top[-1])
    cond = float(top[0]) / lam_k if lam_k > 0 else math.inf
    g2, tr_sigma = unbiased_noise_terms(mean_sq, mean_norm_sq, n)
    noise = tr_sigma / g2 if g2 > 0 else math.inf
    return CovarianceResult(top.clone(), trace, frob, cond, noise, mean_norm_sq, n, g2, tr_sigma, method)


def _operator(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int,
    n_local: int,
    num_params: int,
    reduce_fn: ReduceFn | None,
    tol: float,
    kwargs: dict[str, Any],
    stored: Tensor | None,
) -> CovarianceResult:
    """Lanczos on ``v ↦ Kv``, one pass over the examples per product (or the stored gradients)."""
    reduce = reduce_fn or (lambda t: t)

    def chunks() -> Any:
        if stored is not None:
            yield stored
        else:
            yield from per_example_gradient_chunks(model, loss_fn, batch, **kwargs)

    # one pass: Σ g_i, Σ ‖g_i‖² and N (no local raise before the all-reduce: NaN propagates instead)
    first = None
    total = None
    sq = 0.0
    for G in chunks():
        if first is None:
            first = G
            total = torch.zeros(num_params, dtype=G.dtype, device=G.device)
        total += G.sum(0)
        sq += float((G.double() ** 2).sum()) if G.dtype != torch.float64 else float((G * G).sum())
    assert total is not None and first is not None
    stats = torch.cat([torch.tensor([float(n_local), sq], device=total.device, dtype=total.dtype), total])
    stats = reduce(stats)
    if not bool(torch.isfinite(stats).all()):
        raise NonFiniteCurvatureError("A per-example gradient is NaN or infinite on some process.")
    n = round(float(stats[0]))
    if n < 2:
        raise ValueError(f"The gradient covariance needs at least 2 examples, got {n}.")
    gbar = stats[2:] / n
    mean_norm_sq = float(torch.dot(gbar.double(), gbar.double()))
    mean_sq = float(stats[1]) / n
    trace = mean_sq - mean_norm_sq

    def matvec(v: Tensor) -> Tensor:
        acc = torch.zeros_like(v)
        for G in chunks():
            acc += G.T @ (G @ v)
        return reduce(acc) / n - gbar * torch.dot(gbar, v)

    kk = min(k, n - 1, num_params)
    res = lanczos(
        matvec, num_params, k=kk, tol=tol, max_iter=max(3 * kk + 20, 50), dtype=gbar.dtype, device=gbar.device
    )
    return _result(res.eigenvalues.clamp_min(0.0), trace, None, mean_norm_sq, mean_sq, n, "operator")
