r"""Share of the gradient in the top Hessian eigenspace.

.. math:: \mathrm{overlap} = \frac{\|P_k g\|^2}{\|g\|^2} = \frac{\sum_{i\le k} (v_i^\top g)^2}{\|g\|^2}

for orthonormal top-k eigenvectors :math:`v_i`. Gur-Ari et al. (2018, arXiv 1812.04754) found it close to 1
for :math:`k` ≈ number of classes; Lowell (2022, arXiv 2201.06964) discusses what that subspace contributes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_curvature.core.vectors import dot64, flat_pieces

__all__ = ["top_subspace_overlap"]


def _parts(x: Tensor | Sequence[Tensor], numels: list[int] | None) -> list[Tensor]:
    """``x`` as flat pieces (:func:`~.vectors.flat_pieces`), a flat tensor split into ``numels`` when given."""
    pieces = flat_pieces(x)
    if not isinstance(x, Tensor) or numels is None:
        return pieces
    if pieces[0].numel() != sum(numels):
        raise ValueError(f"A vector of {pieces[0].numel()} entries does not match parameters of {sum(numels)}.")
    return list(torch.split(pieces[0], numels))


def _eigenvector_rows(eigenvectors: Any) -> list[Tensor] | list[list[Tensor]]:
    """The eigenvectors as a list of vectors: rows of a ``(k, P)`` tensor, or parameter-shaped lists."""
    if hasattr(eigenvectors, "eigenvector_list"):  # an EigenResult
        if eigenvectors.eigenvector_list is None:
            raise ValueError("The result has no eigenvectors: compute it with return_eigenvectors=True.")
        eigenvectors = eigenvectors.eigenvector_list
    if isinstance(eigenvectors, Tensor):
        return list(eigenvectors.unsqueeze(0) if eigenvectors.dim() == 1 else eigenvectors)
    rows = list(eigenvectors)
    if rows and isinstance(rows[0], Tensor):  # one parameter-shaped vector, not a list of them
        return [rows]  # type: ignore[list-item]
    return rows


def top_subspace_overlap(gradient: Tensor | Sequence[Tensor], eigenvectors: Any) -> float:
    """``‖P_k g‖² / ‖g‖²`` for a gradient and ``k`` orthonormal eigenvectors; in ``[0, 1]``.

    Args:
        gradient: a flat tensor, or a list of tensors shaped like the parameters (``HessianOperator.gradient()``).
        eigenvectors: a ``(k, P)`` (or ``(P,)``) tensor, a list of parameter-shaped vectors
            (``EigenResult.eigenvector_list``), or an :class:`~lightning_curvature.core.eigen.EigenResult` computed
            with ``return_eigenvectors=True``. Flat and parameter-shaped forms may be mixed. Inner products are
            accumulated in float64 (one process: sharded vectors are not reduced across ranks).

    Raises:
        ValueError: on mismatched sizes, a zero gradient, or a result without eigenvectors.
        TypeError: for a gradient or eigenvector that is neither a tensor nor a list of tensors.

    Example::

        >>> V = torch.eye(3)[:1]           # the first coordinate axis
        >>> top_subspace_overlap(torch.tensor([3.0, 4.0, 0.0]), V)
        0.36
    """
    rows = _eigenvector_rows(eigenvectors)
    shaped = next((r for r in [gradient, *rows] if not isinstance(r, Tensor)), None)
    numels = None if shaped is None else [t.numel() for t in flat_pieces(shaped)]
    g = _parts(gradient, numels)
    size = sum(t.numel() for t in g)
    device = g[0].device  # the pieces may sit on several devices: their inner products are gathered on one

    def dot(pairs: Any) -> Tensor:
        return torch.stack([dot64(a, b.to(a.dtype)).to(device) for a, b in pairs]).sum()

    sums = [dot(zip(g, g))]
    for row in rows:
        v = _parts(row, numels)
        if len(v) != len(g) or any(a.numel() != b.numel() for a, b in zip(v, g)):
            raise ValueError(f"Eigenvectors have {sum(t.numel() for t in v)} entries, the gradient {size}.")
        sums.append(dot(zip(v, g)))
    gg, *proj = torch.stack(sums).cpu().tolist()  # one host sync
    if gg == 0.0 or not math.isfinite(gg):
        raise ValueError(f"The gradient is {'zero' if gg == 0.0 else 'not finite'}; its overlap is undefined.")
    return round(sum(p * p for p in proj) / gg, 15)
