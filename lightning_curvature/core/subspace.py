r"""Share of the gradient in the top Hessian eigenspace.

.. math:: \mathrm{overlap} = \frac{\|P_k g\|^2}{\|g\|^2} = \frac{\sum_{i\le k} (v_i^\top g)^2}{\|g\|^2}

for orthonormal top-k eigenvectors :math:`v_i`. Gur-Ari et al. (2018, arXiv 1812.04754) found it close to 1
for :math:`k` ≈ number of classes; Lowell (2022, arXiv 2201.06964) discusses what that subspace contributes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["top_subspace_overlap"]


def top_subspace_overlap(gradient: Tensor, eigenvectors: Tensor) -> float:
    """``‖P_k g‖² / ‖g‖²`` for a flat gradient and ``(k, P)`` orthonormal eigenvectors; in ``[0, 1]``.

    Raises:
        ValueError: on mismatched sizes or a zero gradient.

    Example::

        >>> V = torch.eye(3)[:1]           # the first coordinate axis
        >>> top_subspace_overlap(torch.tensor([3.0, 4.0, 0.0]), V)
        0.36
    """
    if eigenvectors.dim() == 1:
        eigenvectors = eigenvectors.unsqueeze(0)
    g = gradient.reshape(-1).to(eigenvectors.dtype)
    if eigenvectors.shape[1] != g.numel():
        raise ValueError(f"Eigenvectors have {eigenvectors.shape[1]} entries, the gradient {g.numel()}.")
    gg = float(torch.dot(g, g))
    if gg == 0.0:
        raise ValueError("The gradient is zero; its overlap with a subspace is undefined.")
    proj = eigenvectors @ g
    return round(float(torch.dot(proj, proj)) / gg, 15)
