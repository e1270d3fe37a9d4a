"""Orthonormal bases of parameter-shaped vectors, stored per parameter in row blocks.

Each parameter ``i`` gets row blocks of shape ``(BLOCK_ROWS, numel_i)``: a basis of ``m`` vectors holds ``m`` vectors'
worth of memory (blocks grow with the steps taken, no ``max_iter`` preallocation), products with the whole basis are
one matrix product per block and parameter, and a thick restart rewrites the basis in place column chunk by column
chunk, never holding a second copy.

**Host storage.** ``storage="cpu"`` keeps the blocks in host memory (pinned when the vectors are on CUDA) while the
vectors the solver works on stay on their parameters' devices: the accelerator then holds a few vectors instead
of the basis. Each product with the basis moves one vector across (``w`` to the host for :meth:`Basis.dots`, the
correction back for :meth:`Basis.subtract`); the basis itself never moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_curvature.core.vectors import COLUMN_CHUNK, Vector, VectorSpace, matvec64

__all__ = ["BLOCK_ROWS", "Basis", "as_basis_device"]

#: Rows per storage block.
BLOCK_ROWS = 16


def as_basis_device(value: torch.device | str | None) -> torch.device | None:
    """``value`` as a ``torch.device`` (``None`` stays ``None``).

    Raises:
        ValueError: naming ``basis_device`` and the value if it is not a device, or is the data-less ``meta``.
    """
    device: torch.device | None = value if value is None or isinstance(value, torch.device) else None
    if isinstance(value, str):
        try:
            device = torch.device(value)
        except RuntimeError:
            pass
    if (value is not None and device is None) or (device is not None and device.type == "meta"):
        raise ValueError(
            f"`basis_device` must be a torch.device, a device string such as 'cpu', or None (not 'meta': the basis "
            f"holds data), got {value!r}."
        )
    return device


class Basis:
    """A list of vectors of ``space`` with fast products against all of them.

    Args:
        space: the vector space.
        block_rows: rows per storage block.
        capacity: the most vectors it will ever hold (blocks are then never allocated beyond it).
        storage: device of the stored blocks (``"cpu"``: host memory for a model on an accelerator); ``None``: each
            parameter's own device.
    """

    def __init__(
        self,
        space: VectorSpace,
        block_rows: int = BLOCK_ROWS,
        capacity: int | None = None,
        storage: torch.device | str | None = None,
    ) -> None:
        self.space = space
        self.block_rows = block_rows
        self.capacity = capacity
        self.storage = None if storage is None else torch.device(storage)
        # page-locked host blocks make the transfers to and from an accelerator faster (CUDA only)
        self._pin = (
            self.storage is not None
            and self.storage.type == "cpu"
            and any(d.type == "cuda" for d in space.devices)
            and torch.cuda.is_available()
        )
        self._blocks: list[list[Tensor]] = [[] for _ in range(len(space))]  # per parameter: (rows, numel) blocks
        self._count = 0

    def __len__(self) -> int:
        return self._count

    # -- storage ------------------------------------------------------------------------------------------------
    def append(self, v: Vector) -> None:
        """Copy ``v`` in as the next vector."""
        if self.capacity is not None and self._count >= self.capacity:
            raise RuntimeError(f"the basis is full ({self.capacity} vectors)")
        row = self._count % self.block_rows
        rows = self.block_rows
        if self.capacity is not None:
            rows = min(rows, self.capacity - self._count)  # never allocate beyond the capacity
        for i, t in enumerate(v):
            if row == 0:
                sp = self.space
                self._blocks[i].append(
                    torch.empty(rows, sp.numels[i], dtype=sp.dtypes[i], device=self._device(i), pin_memory=self._pin)
                )
            self._blocks[i][-1][row].copy_(t.reshape(-1))
        self._count += 1

    def _device(self, i: int) -> torch.device:
        return self.storage if self.storage is not None else self.space.devices[i]

    def vector(self, j: int) -> Vector:
        """Vector ``j`` as views into the storage (do not modify)."""
        if not 0 <= j < self._count:
            raise IndexError(f"basis vector {j} of {self._count}")
        b, r = divmod(j, self.block_rows)
        return [blocks[b][r].view(s) for blocks, s in zip(self._blocks, self.space.shapes)]

    def local(self, j: int) -> Vector:
        """Vector ``j`` on the parameters' devices: views into the storage, or copies from host storage."""
        return [t.to(dev) for t, dev in zip(self.vector(j), self.space.devices)]

    def _filled(self, i: int) -> list[Tensor]:
        full, rest = divmod(self._count, self.block_rows)
        blocks = self._blocks[i][:full]
        if rest:
            blocks = [*blocks, self._blocks[i][full][:rest]]
        return blocks

    def truncate(self, m: int) -> None:
        """Keep the first ``m`` vectors (storage of the dropped blocks is freed)."""
        if not 0 <= m <= self._count:
            raise ValueError(f"cannot truncate a basis of {self._count} vectors to {m}")
        self._count = m
        needed = -(-m // self.block_rows)
        for i in range(len(self._blocks)):
            del self._blocks[i][needed:]

    # -- products -----------------------------------------------------------------------------------------------
    def dots(self, w: Vector) -> Tensor:
        """``V w``: float64 ``(m,)`` inner products with every vector (on the first device; reduced across shards)."""
        sp = self.space
        out = torch.zeros(self._count, dtype=torch.float64, device=sp.device)
        if self._count == 0:
            return out
        for i, wi in enumerate(w):
            wi = wi.to(self._device(i))  # one transfer of w, not of the basis
            start = 0
            for B in self._filled(i):
                r = B.shape[0]
                out[start : start + r] += matvec64(B, wi).to(sp.device)
                start += r
        return sp.reduce_fn(out) if sp.reduce_fn is not None else out

    def subtract(self, w: Vector, coeffs: Tensor) -> None:
        """``w ← w − Vᵀ coeffs`` in place (``coeffs`` of length ``m``, any dtype/device)."""
        if self._count == 0:
            return
        for i, wi in enumerate(w):
            flat = wi.view(-1)
            # host storage: the correction Vᵀc is formed where the basis lives and moved across once
            acc = flat if self.storage is None else torch.zeros(flat.shape, dtype=flat.dtype, device=self._device(i))
            start = 0
            for B in self._filled(i):
                r = B.shape[0]
                c = coeffs[start : start + r].to(device=B.device, dtype=B.dtype)
                acc.addmv_(B.t(), c, alpha=-1.0)
                start += r
            if acc is not flat:
                flat.add_(acc.to(flat.device))

    def combine(self, coeffs: Tensor) -> list[Vector]:
        """``coeffs @ V`` for an ``(r, m)`` coefficient matrix: ``r`` new vectors (Ritz vectors)."""
        sp = self.space
        r = coeffs.shape[0]
        outs: list[Vector] = [[] for _ in range(r)]
        for i in range(len(sp)):
            acc = torch.zeros(r, sp.numels[i], dtype=sp.dtypes[i], device=self._device(i))
            start = 0
            for B in self._filled(i):
                rows = B.shape[0]
                acc.addmm_(coeffs[:, start : start + rows].to(device=B.device, dtype=B.dtype), B)
                start += rows
            acc = acc.to(sp.devices[i])
            for j in range(r):
                outs[j].append(acc[j].view(sp.shapes[i]))
        return outs

    def rotate_(self, coeffs: Tensor) -> None:
        """Replace the basis by ``coeffs @ V`` in place for an ``(r, m)`` matrix, ``r ≤ m`` (a thick restart).

        Works column chunk by column chunk, so no second copy of the basis is ever held.
        """
        r, m = coeffs.shape
        if m != self._count or r > m:
            raise ValueError(f"rotate_ needs an (r, {self._count}) matrix with r <= {self._count}, got {(r, m)}.")
        sp = self.space
        for i in range(len(sp)):
            blocks = self._filled(i)
            c = coeffs.to(device=self._device(i), dtype=sp.dtypes[i])
            for s in range(0, sp.numels[i], COLUMN_CHUNK):
                cols = torch.cat([B[:, s : s + COLUMN_CHUNK] for B in blocks])  # (m, chunk)
                new = c @ cols  # (r, chunk)
                for j in range(r):
                    b, row = divmod(j, self.block_rows)
                    blocks[b][row, s : s + COLUMN_CHUNK] = new[j]
        self.truncate(r)

    def matrix(self) -> Tensor:
        """The ``(m, n)`` basis of a one-tensor (flat) space as one tensor (a copy; for tests)."""
        if len(self.space) != 1:
            raise ValueError("matrix() is only defined for a space of flat vectors.")
        if self._count == 0:
            return torch.empty(0, self.space.numels[0], dtype=self.space.dtypes[0], device=self.space.devices[0])
        return torch.cat(self._filled(0))

    @classmethod
    def from_vectors(
        cls, space: VectorSpace, vectors: Sequence[Vector], storage: torch.device | str | None = None
    ) -> Basis:
        """A basis holding copies of ``vectors`` (not orthonormalised)."""
        basis = cls(space, storage=storage)
        for v in vectors:
            basis.append(v)
        return basis
