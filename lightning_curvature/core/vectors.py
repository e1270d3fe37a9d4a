r"""Parameter-shaped vectors: lists of tensors, one per parameter, and the arithmetic the solvers need.

A curvature operator acts on vectors shaped like the parameters it differentiates: a ``list[Tensor]`` with one
tensor per parameter, on that parameter's device and in the compute dtype (float32 for half-precision models).
When the parameters are shards (FSDP), each tensor is this process's local shard; inner products then sum the
local partial sums across processes with :attr:`VectorSpace.reduce_fn`, so every process gets the same scalars and
the vectors never leave their shards. Nothing here concatenates parameters.

**Accurate reductions.** ``torch.dot`` and ``torch.linalg.vector_norm`` accumulate long float32 sums in float32;
over tens of millions of entries that error is enough to break the orthogonality of a Lanczos basis and make its
tridiagonal disagree with :math:`V^\top A V`. Every inner product here is computed in short rows of :data:`ROW`
entries (one batched matrix product) whose sums are added in float64, so the error stays about that of the float32
products of the entries, even when a vector's mass sits in a few entries (an eigenvector converging to a few
coordinates). Products with a whole basis are float32 matrix-vector products over column chunks of
:data:`COLUMN_CHUNK` entries added in float64. The measurements behind both sizes are in ``benchmarks/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "COLUMN_CHUNK",
    "ROW",
    "Vector",
    "VectorSpace",
    "add_",
    "as_scalar",
    "clone",
    "contiguous",
    "dot64",
    "flat_pieces",
    "scale_",
]

Vector = list[Tensor]
ReduceFn = Callable[[Tensor], Tensor]

#: Entries summed in the input dtype before the float64 accumulation of an inner product.
ROW = 64
#: Columns of a basis block multiplied at once (float32 partials, added in float64).
COLUMN_CHUNK = 1 << 13


def dot64(x: Tensor, y: Tensor) -> Tensor:
    """Inner product of two same-shaped tensors as a float64 0-dim tensor on their device (no host sync).

    Float64 inputs use ``torch.dot`` directly; smaller dtypes are multiplied in rows of :data:`ROW` entries and the
    row sums added in float64.
    """
    x, y = x.reshape(-1), y.reshape(-1)
    n = x.numel()
    if x.dtype == torch.float64 or n <= ROW:
        return torch.dot(x.to(torch.float64), y.to(torch.float64))
    m = n - n % ROW
    rows = torch.bmm(x[:m].view(-1, 1, ROW), y[:m].view(-1, ROW, 1)).view(-1)
    out = rows.sum(dtype=torch.float64)
    if m < n:
        out = out + torch.dot(x[m:].to(torch.float64), y[m:].to(torch.float64))
    return out


def matvec64(B: Tensor, w: Tensor) -> Tensor:
    """``B @ w`` for a ``(r, n)`` block and an ``n``-vector as float64 ``(r,)``, column chunk by column chunk."""
    n = B.shape[1]
    w = w.reshape(-1)
    if B.dtype == torch.float64:
        return B @ w.to(torch.float64)
    if n <= COLUMN_CHUNK:
        return (B @ w.to(B.dtype)).to(torch.float64)
    out = torch.zeros(B.shape[0], dtype=torch.float64, device=B.device)
    for s in range(0, n, COLUMN_CHUNK):
        out += (B[:, s : s + COLUMN_CHUNK] @ w[s : s + COLUMN_CHUNK].to(B.dtype)).to(torch.float64)
    return out


def as_scalar(a: float | Tensor, like: Tensor) -> float | Tensor:
    """``a`` as a Python float or a 0-dim tensor in ``like``'s dtype and device (no host sync)."""
    if isinstance(a, Tensor):
        return a.to(device=like.device, dtype=like.dtype)
    return float(a)


def add_(y: Vector, x: Vector, alpha: float | Tensor = 1.0) -> Vector:
    """``y += alpha * x`` in place (``alpha`` a float or a 0-dim tensor)."""
    for yi, xi in zip(y, x):
        a = as_scalar(alpha, yi)
        if isinstance(a, Tensor):
            yi.add_(xi * a)
        else:
            yi.add_(xi, alpha=a)
    return y


def scale_(x: Vector, alpha: float | Tensor) -> Vector:
    """``x *= alpha`` in place."""
    for xi in x:
        xi.mul_(as_scalar(alpha, xi))
    return x


def flat_pieces(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """``x`` as flat tensors: a tensor as one piece, a list of tensors (a parameter-shaped vector) piece by piece.

    Raises:
        TypeError: for an empty list or one holding something other than tensors.
    """
    if isinstance(x, Tensor):
        return [x.reshape(-1)]
    parts = list(x)
    if not parts or not all(isinstance(t, Tensor) for t in parts):
        raise TypeError("Expected a tensor or a non-empty list of tensors shaped like the parameters.")
    return [t.reshape(-1) for t in parts]


def contiguous(x: Vector) -> Vector:
    """``x`` with every tensor in the standard contiguous layout (a copy only of those that are not: gradients of
    non-contiguous or ``channels_last`` parameters and inputs), so that ``view(-1)`` works in place."""
    return [t if t.is_contiguous() else t.contiguous() for t in x]


def clone(x: Vector) -> Vector:
    """A copy of ``x``."""
    return [t.clone() for t in x]


class VectorSpace:
    r"""The vectors shaped like a list of tensors: creation, inner products and norms (accumulated in float64).

    Args:
        templates: one tensor per parameter (shards for sharded parameters); only shapes, devices and, unless
            ``dtype`` is given, dtypes are read.
        dtype: dtype of the vectors (default: each template's own).
        reduce_fn: SUM all-reduce applied to partial inner products when the tensors are shards of vectors
            distributed over processes (FSDP); ``None`` when every process holds whole vectors.
        localize: for sharded spaces, maps a full parameter-shaped tensor ``i`` to this process's shard, so random
            vectors are the same global vector whatever the layout: ``localize(i, full) -> shard``.
        global_dim: number of entries of the full vectors (default: the local count).
        dtypes: one dtype per tensor (overrides ``dtype``): a model whose parameters have different dtypes.

    Example::

        >>> space = VectorSpace([torch.zeros(2, 3), torch.zeros(4)])
        >>> x = space.ones()
        >>> float(space.dot(x, x)), space.dim
        (10.0, 10)
    """

    def __init__(
        self,
        templates: Sequence[Tensor],
        *,
        dtype: torch.dtype | None = None,
        reduce_fn: ReduceFn | None = None,
        localize: Callable[[int, Tensor], Tensor] | None = None,
        global_dim: int | None = None,
        global_shapes: Sequence[torch.Size] | None = None,
        dtypes: Sequence[torch.dtype] | None = None,
    ) -> None:
        if not templates:
            raise ValueError("A vector space needs at least one tensor.")
        if dtypes is not None and len(dtypes) != len(templates):
            raise ValueError(f"Expected {len(templates)} dtypes (one per tensor), got {len(dtypes)}.")
        self.shapes = [t.shape for t in templates]
        self.devices = [t.device for t in templates]
        self.dtypes = list(dtypes) if dtypes is not None else [dtype or t.dtype for t in templates]
        self.numels = [t.numel() for t in templates]
        self.reduce_fn = reduce_fn
        self.localize = localize
        self.global_shapes = list(global_shapes) if global_shapes is not None else list(self.shapes)
        self.dim = int(global_dim) if global_dim is not None else sum(self.numels)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first tensor (the batch's floating tensors are cast to it; see :attr:`coarsest_dtype`)."""
        return self.dtypes[0]

    @property
    def coarsest_dtype(self) -> torch.dtype:
        """The dtype with the largest rounding unit among the tensors' (what precision floors must assume)."""
        return max(self.dtypes, key=lambda d: torch.finfo(d).eps)

    @property
    def device(self) -> torch.device:
        """The device of the first tensor."""
        return self.devices[0]

    @property
    def sharded(self) -> bool:
        """Whether inner products need a cross-process reduction."""
        return self.reduce_fn is not None

    def __len__(self) -> int:
        return len(self.shapes)

    # -- creation -----------------------------------------------------------------------------------------------
    def zeros(self) -> Vector:
        """The zero vector."""
        return [torch.zeros(s, dtype=d, device=dev) for s, d, dev in zip(self.shapes, self.dtypes, self.devices)]

    def empty(self) -> Vector:
        """An uninitialised vector."""
        return [torch.empty(s, dtype=d, device=dev) for s, d, dev in zip(self.shapes, self.dtypes, self.devices)]

    def ones(self) -> Vector:
        """The all-ones vector."""
        return [torch.ones(s, dtype=d, device=dev) for s, d, dev in zip(self.shapes, self.dtypes, self.devices)]

    def _from_full(self, i: int, full: Tensor) -> Tensor:
        t = self.localize(i, full) if self.localize is not None else full
        return t.to(device=self.devices[i], dtype=self.dtypes[i]).reshape(self.shapes[i]).contiguous()

    def randn(self, generator: torch.Generator) -> Vector:
        """A standard Gaussian vector drawn from a CPU ``generator`` (float64 draws, cast), layout-independent."""
        return [
            self._from_full(i, torch.randn(s, generator=generator, dtype=torch.float64))
            for i, s in enumerate(self.global_shapes)
        ]

    def rademacher(self, generator: torch.Generator) -> Vector:
        """A Rademacher (±1) vector drawn from a CPU ``generator``, layout-independent."""
        out = []
        for i, s in enumerate(self.global_shapes):
            full = torch.randint(0, 2, s, generator=generator, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
            out.append(self._from_full(i, full))
        return out

    # -- reductions ---------------------------------------------------------------------------------------------
    def _reduce(self, t: Tensor) -> Tensor:
        return self.reduce_fn(t) if self.reduce_fn is not None else t

    def dot(self, x: Vector, y: Vector) -> Tensor:
        """:math:`x^\\top y` as a float64 0-dim tensor (device of the first tensor; reduced across shards)."""
        parts = [dot64(a, b).to(self.device) for a, b in zip(x, y)]
        return self._reduce(torch.stack(parts).sum())

    def dots(self, pairs: Sequence[tuple[Vector, Vector]]) -> Tensor:
        """Several inner products in one reduction: a float64 ``(len(pairs),)`` tensor."""
        rows = [torch.stack([dot64(a, b).to(self.device) for a, b in zip(x, y)]).sum() for x, y in pairs]
        return self._reduce(torch.stack(rows))

    def norm(self, x: Vector) -> Tensor:
        """:math:`\\|x\\|` as a float64 0-dim tensor."""
        return self.dot(x, x).clamp_min(0.0).sqrt()

    # -- layout -------------------------------------------------------------------------------------------------
    def flatten(self, x: Vector) -> Tensor:
        """The local entries of ``x`` as one flat tensor (a copy; for users and tests, never for solvers)."""
        return torch.cat([t.reshape(-1).to(self.dtype) for t in x])

    def unflatten(self, flat: Tensor) -> Vector:
        """Split a flat tensor of the local size into parameter-shaped tensors (copies in the space's dtypes).

        Raises:
            ValueError: if ``flat`` has the wrong number of entries.
        """
        flat = flat.reshape(-1)
        if flat.numel() != sum(self.numels):
            raise ValueError(f"Expected a flat vector of {sum(self.numels)} entries, got {flat.numel()}.")
        out = []
        for piece, s, d, dev in zip(torch.split(flat, self.numels), self.shapes, self.dtypes, self.devices):
            out.append(piece.to(device=dev, dtype=d).reshape(s).clone())
        return out

    def coerce(self, v: Vector | Tensor) -> Vector:
        """``v`` as a vector of this space (a flat tensor is split; tensors are cast to the space's dtype/device).

        Raises:
            ValueError: if ``v`` does not match the space.
        """
        if isinstance(v, Tensor):
            return self.unflatten(v)
        if len(v) != len(self.shapes):
            raise ValueError(f"Expected {len(self.shapes)} tensors shaped like the parameters, got {len(v)}.")
        out = []
        for t, s, d, dev in zip(v, self.shapes, self.dtypes, self.devices):
            if t.shape != s:
                raise ValueError(f"Expected a tensor of shape {tuple(s)}, got {tuple(t.shape)}.")
            out.append(t.to(device=dev, dtype=d).contiguous())
        return out
