r"""Deprecated: gradient-noise statistics accumulated across steps and ranks as a torchmetrics ``Metric``.

.. deprecated:: 0.1
    Nothing in the library uses :class:`GradientNoiseScale`, and its ratio takes the biased
    :math:`\|\bar g\|^2` (it adds :math:`\mathrm{tr}\Sigma/N`, so it saturates near the batch size). Log the
    noise scale with :class:`~lightning_curvature.GradientCovarianceMonitor` (``grad_cov/noise_scale``) instead.
    Constructing one warns (``DeprecationWarning``); the name stays importable from ``lightning_curvature`` and
    ``lightning_curvature.metrics`` until it is removed.

One batch gives a noisy :math:`\mathrm{tr}K` and :math:`\|\bar g\|^2`; summing the sufficient statistics
:math:`N`, :math:`\sum_i\|g_i\|^2` and :math:`\sum_i g_i` over many batches (and, through torchmetrics'
``dist_reduce_fx="sum"``, over every rank) gives the pooled estimate

.. math:: \mathrm{tr}K = \frac{1}{N}\sum_i \|g_i\|^2 - \|\bar g\|^2, \qquad
          B_{\text{simple}} = \frac{\mathrm{tr}K}{\|\bar g\|^2}, \qquad \bar g = \frac1N \sum_i g_i .

Reference: S. McCandlish, J. Kaplan, D. Amodei, "An Empirical Model of Large-Batch Training",
arXiv 1812.06162 (2018).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["GradientNoiseScale"]


class GradientNoiseScale(Metric):
    """Deprecated (see the module docstring): pooled covariance trace and simple noise scale.

    Args:
        num_params: length of the flat per-example gradients.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Raises:
        ValueError: if ``num_params`` is not a positive integer.

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     metric = GradientNoiseScale(num_params=2)
        >>> metric.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> {k: round(float(v), 6) for k, v in metric.compute().items()}
        {'trace': 1.0, 'mean_gradient_norm_sq': 4.0, 'noise_scale': 0.25, 'num_examples': 2.0}
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    count: Tensor
    sum_sq_norms: Tensor
    grad_sum: Tensor

    def __init__(self, num_params: int, **kwargs: Any) -> None:
        warnings.warn(
            "GradientNoiseScale is deprecated and will be removed: nothing in lightning_curvature uses it and its "
            "ratio takes the biased squared norm of the mean gradient. Log the noise scale with "
            "GradientCovarianceMonitor (`grad_cov/noise_scale`) instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(**kwargs)
        if not isinstance(num_params, int) or num_params < 1:
            raise ValueError(f"`num_params` must be a positive integer, got {num_params!r}.")
        self.num_params = num_params
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq_norms", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("grad_sum", default=torch.zeros(num_params, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, per_example_gradients: Tensor) -> None:
        """Add a ``(n, num_params)`` chunk of per-example gradients.

        Raises:
            ValueError: on a wrongly shaped chunk.
        """
        g = per_example_gradients
        if g.dim() != 2 or g.shape[1] != self.num_params:
            raise ValueError(f"Expected per-example gradients of shape (n, {self.num_params}), got {tuple(g.shape)}.")
        g = g.detach().to(torch.float64)
        self.count += g.shape[0]
        self.sum_sq_norms += (g * g).sum()
        self.grad_sum += g.sum(0)

    def compute(self) -> dict[str, Tensor]:
        """``trace``, ``mean_gradient_norm_sq``, ``noise_scale`` and ``num_examples`` of everything seen."""
        n = self.count
        gbar = self.grad_sum / n
        mean_sq = torch.dot(gbar, gbar)
        trace = self.sum_sq_norms / n - mean_sq
        return {"trace": trace, "mean_gradient_norm_sq": mean_sq, "noise_scale": trace / mean_sq, "num_examples": n}
