"""Batches: the containers Lightning trains on, their size, dtype casts, splitting, averaging and batch dimension.

A batch is a tensor or any nesting of the containers Lightning's ``apply_to_collection`` walks: mappings (``dict``,
``OrderedDict``, ``defaultdict``, other ``Mapping`` types), named tuples, sequences (``tuple``, ``list``) and
dataclass instances (their ``init`` fields). Other objects (strings, numbers, ``None``) are carried along untouched.

**Batch dimension.** By default the examples are along the leading dimension of every tensor. A sequence-first
batch (``(T, B, ...)``, the layout of ``pad_sequence`` and of ``batch_first=False`` modules) keeps them along
dimension 1. :func:`infer_batch_layout` finds where they are: from an explicit ``batch_dim`` (an int for every tensor,
or one entry per element of the batch, as ``in_dims`` of ``torch.func.vmap``; ``None`` for a tensor that is not split
into examples), else from the leading sizes, cross-checked against the expected number of examples (the
DataLoader's ``batch_size``) when it is known; it raises :class:`BatchLayoutError` rather than guess when the
tensors disagree and nothing settles it. :meth:`BatchLayout.to_engine` turns a batch into the engine's canonical
form (a tuple of its batched tensors, examples along dimension 0, plus an opaque record of the rest) and
:class:`LayoutLoss` hands the user's ``loss_fn`` the batch in its own layout again, so the engine splits, averages
and vectorises over the right dimension whatever the container.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BatchDim",
    "BatchLayout",
    "BatchLayoutError",
    "BatchLayoutWarning",
    "LayoutLoss",
    "MultiBatch",
    "as_batch_first",
    "batch_size",
    "check_batch_dim",
    "explain_several_batches",
    "infer_batch_layout",
    "is_batch_iterable",
    "iter_batches",
    "looks_like_several_batches",
    "read_if_one_pass",
    "restore_batch",
    "slice_batch",
    "tensor_leaves",
    "to_compute",
]

#: ``batch_dim``: an int (every tensor), ``None`` (not split into examples), or a tuple/list/dict of these, nested
#: like the batch (a prefix of it, as ``in_dims`` of ``torch.func.vmap``).
BatchDim = Any


class BatchLayoutError(ValueError):
    """The batch dimension of a batch is ambiguous or inconsistent (the message says how to name it)."""


class BatchLayoutWarning(UserWarning):
    """The tensors of a batch disagree on their leading size; only those of the first tensor's size are split."""


class MultiBatch(list):  # type: ignore[type-arg]
    """Several physical batches that together form one curvature batch.

    Curvature quantities of a :class:`MultiBatch` are those of the loss averaged over all its examples: each
    batch's contribution is weighted by its size, so the curvature batch may exceed memory.

    Example::

        >>> mb = MultiBatch([torch.zeros(3, 2), torch.zeros(5, 2)])
        >>> [batch_size(b) for b in mb]
        [3, 5]
    """


# --- walking containers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Field:
    """A dataclass field or named-tuple attribute on a path (printed ``.name``)."""

    name: str


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields") and hasattr(obj, "_asdict")


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _children(obj: Any) -> list[tuple[Any, Any]] | None:
    """``(key, value)`` pairs of a container, ``None`` for a leaf (a tensor or any other object)."""
    if isinstance(obj, (Tensor, str, bytes, _Template)):
        return None
    if _is_dataclass_instance(obj):
        return [(_Field(f.name), getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init]
    if isinstance(obj, Mapping):
        return list(obj.items())
    if _is_namedtuple(obj):
        return [(_Field(name), value) for name, value in zip(obj._fields, obj)]
    if isinstance(obj, Sequence):
        return list(enumerate(obj))
    return None


def _rebuild(obj: Any, values: list[Any]) -> Any:
    """A container like ``obj`` holding ``values`` (in the order of :func:`_children`)."""
    if _is_dataclass_instance(obj):
        new = copy.copy(obj)  # keeps non-init fields and other attributes; works for frozen dataclasses
        for f, value in zip([f for f in dataclasses.fields(obj) if f.init], values):
            object.__setattr__(new, f.name, value)
        for name, attr in vars(type(obj)).items():  # cached properties were computed from the old fields
            if isinstance(attr, functools.cached_property):
                vars(new).pop(name, None)
        return new
    if isinstance(obj, Mapping):
        items = dict(zip(obj.keys(), values))
        if isinstance(obj, defaultdict):
            return type(obj)(obj.default_factory, items)
        try:
            return type(obj)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if _is_namedtuple(obj):
        return type(obj)(*values)
    try:
        return type(obj)(values)  # type: ignore[call-arg]
    except TypeError:
        return list(values)


def _map_indexed(batch: Any, fn: Callable[[int, Tensor], Any]) -> Any:
    """Apply ``fn(i, t)`` to the ``i``-th tensor leaf (depth-first order), rebuilding every container."""
    counter = [0]

    def visit(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            i = counter[0]
            counter[0] += 1
            return fn(i, obj)
        children = _children(obj)
        if children is None:
            return obj
        return _rebuild(obj, [visit(v) for _, v in children])

    return visit(batch)


def _map_tensors(batch: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor of ``batch``, rebuilding every container."""
    return _map_indexed(batch, lambda i, t: fn(t))


def _format_path(path: Sequence[Any]) -> str:
    out = "batch"
    for key in path:
        out += f".{key.name}" if isinstance(key, _Field) else f"[{key!r}]"
    return out


def tensor_leaves(batch: Any) -> list[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor of ``batch``, depth first (paths such as ``batch['x']``, ``batch.y``).

    Example::

        >>> [(p, tuple(t.shape)) for p, t in tensor_leaves({"x": torch.zeros(2, 3), "y": [torch.zeros(2)]})]
        [("batch['x']", (2, 3)), ("batch['y'][0]", (2,))]
    """
    out: list[tuple[str, Tensor]] = []

    def visit(obj: Any, path: tuple[Any, ...]) -> None:
        if isinstance(obj, Tensor):
            out.append((_format_path(path), obj))
            return
        for key, value in _children(obj) or []:
            visit(value, (*path, key))

    visit(batch, ())
    return out


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    for _, value in _children(batch) or []:
        t = _first_tensor(value)
        if t is not None:
            return t
    return None


# --- sizes, casts, slices (the engine's view: examples along dimension 0) --------------------------------------
def batch_size(batch: Any) -> int:
    """Number of examples in ``batch``: the leading dimension of its first tensor.

    Tensors whose leading size differs from the first tensor's are not split into examples; a
    :class:`BatchLayoutWarning` says so (a sequence-first batch is read this way along time: name its batch
    dimension with ``batch_dim`` in the monitors, or see :func:`infer_batch_layout`).

    Raises:
        TypeError: if ``batch`` holds no tensor.
        ValueError: if the batch is empty.
    """
    t = _first_tensor(batch)
    if t is None:
        raise TypeError(f"Expected a batch holding at least one tensor, got {type(batch).__name__}.")
    n = int(t.shape[0]) if t.dim() > 0 else 1
    if n == 0:
        raise ValueError("Got an empty batch (0 examples); curvature needs at least one example.")
    if not isinstance(batch, Tensor):
        others = [(p, tuple(x.shape)) for p, x in tensor_leaves(batch) if x.dim() > 0 and x.shape[0] != n]
        if others:
            warnings.warn(
                f"The tensors of the batch disagree on their leading size: the batch size is read as {n} from the "
                f"first tensor, and {', '.join(f'{p} of shape {s}' for p, s in others)} are not split into "
                "examples. If the examples are along another dimension (a sequence-first batch (T, B, ...)), pass "
                "`batch_dim=` to the monitor.",
                BatchLayoutWarning,
                stacklevel=2,
            )
    return n


def looks_like_several_batches(batch: Any) -> bool:
    """Whether ``batch`` is a list or tuple of at least two containers of tensors (``[(x1, y1), (x2, y2)]``).

    Such a list is *one* batch to the engine (a batch may be any nesting of containers); several batches are a
    :class:`MultiBatch` or a ``DataLoader``. Used only to explain an error the loss function raised.
    """
    if isinstance(batch, MultiBatch) or not isinstance(batch, (list, tuple)) or _is_namedtuple(batch):
        return False
    return len(batch) >= 2 and all(
        _children(item) is not None and not isinstance(item, Tensor) and _first_tensor(item) is not None
        for item in batch
    )


@contextmanager
def explain_several_batches(batch: Any) -> Iterator[None]:
    """Add a note to an error raised in the block (the user's loss on ``batch``) when ``batch`` looks like a list of
    batches (:func:`looks_like_several_batches`): the error itself comes from the loss reading it as one batch."""
    try:
        yield
    except Exception as error:
        if looks_like_several_batches(batch) and hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(
                f"lightning-curvature: the batch is a {type(batch).__name__} of {len(batch)} containers of tensors, "
                "and a list or tuple is one batch. If these are several batches, pass MultiBatch([...]) or a "
                "DataLoader (their curvature is that of the loss averaged over all their examples)."
            )
        raise


def iter_batches(batch: Any) -> Iterator[Any]:
    """The physical batches of ``batch`` (one unless it is a :class:`MultiBatch`).

    Raises:
        ValueError: if a :class:`MultiBatch` is empty.
    """
    if isinstance(batch, MultiBatch):
        if len(batch) == 0:
            raise ValueError("Got an empty MultiBatch; pass at least one batch.")
        yield from batch
    else:
        yield batch


def to_compute(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move ``batch`` to ``device``; cast its floating tensors to ``dtype``; clone inference tensors.

    Tensors created under ``torch.inference_mode`` cannot take part in autograd; cloning them outside inference
    mode makes them ordinary tensors.
    """

    def fn(t: Tensor) -> Tensor:
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else None, non_blocking=True)
        if t.is_inference():
            t = t.clone()
        return t

    return _map_tensors(batch, fn)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of every tensor with a leading batch dimension."""
    n = batch_size(batch)

    def fn(t: Tensor) -> Tensor:
        return t[start:stop] if t.dim() > 0 and t.shape[0] == n else t

    return _map_tensors(batch, fn)


# --- the batch dimension -----------------------------------------------------------------------------------------
class _Template:
    """The user's batch and its batch dimensions, carried opaquely through the engine (a pytree leaf-less node)."""

    __slots__ = ("batch", "dims")

    def __init__(self, batch: Any, dims: tuple[int | None, ...]) -> None:
        self.batch = batch
        self.dims = dims

    def __repr__(self) -> str:
        return f"_Template(dims={self.dims})"


def _register_template() -> None:
    """Make ``torch.func.vmap`` pass a :class:`_Template` through untouched (a pytree node with no children)."""
    try:
        from torch.utils import _pytree as pytree

        pytree.register_pytree_node(
            _Template,
            lambda t: ([], (t.batch, t.dims)),
            lambda children, ctx: _Template(*ctx),
        )
    except Exception:  # pragma: no cover - a torch without this private API: vmap falls back to a loop
        pass


_register_template()


def check_batch_dim(batch_dim: Any, name: str = "batch_dim") -> BatchDim:
    """``batch_dim`` if it is an int, ``None`` or a tuple/list/dict nesting of these.

    Raises:
        TypeError: naming the offending value.

    Example::

        >>> check_batch_dim((1, 0)), check_batch_dim({"tokens": 1, "lengths": None})
        ((1, 0), {'tokens': 1, 'lengths': None})
    """

    def ok(spec: Any) -> bool:
        if spec is None or (isinstance(spec, int) and not isinstance(spec, bool)):
            return True
        if isinstance(spec, Mapping):
            return all(ok(v) for v in spec.values())
        if isinstance(spec, (tuple, list)):
            return all(ok(v) for v in spec)
        return False

    if not ok(batch_dim):
        raise TypeError(
            f"`{name}` must be an int, None, or a tuple/list/dict of these nested like the batch "
            f"(e.g. (1, 0) for a batch (x of shape (T, B, F), y of shape (B,))), got {batch_dim!r}."
        )
    return batch_dim


def _is_plain(batch: Any) -> bool:
    """Tensors in exact tuples, lists, dicts or named tuples only: what the engine and ``vmap`` take as they are."""
    if isinstance(batch, Tensor):
        return True
    if type(batch) in (tuple, list, dict) or _is_namedtuple(batch):
        values = batch.values() if isinstance(batch, dict) else batch
        return all(_is_plain(v) for v in values)
    return False


def _explicit_dims(batch: Any, spec: BatchDim) -> list[int | None]:
    """The batch dimension of every tensor leaf from a ``batch_dim`` prefix tree (``vmap``'s ``in_dims`` rule)."""
    dims: list[int | None] = []

    def visit(obj: Any, spec: Any, path: tuple[Any, ...]) -> None:
        if spec is None or isinstance(spec, int):
            for p, t in _leaves_under(obj, path):
                if spec is None:
                    dims.append(None)
                    continue
                d = spec + t.dim() if spec < 0 else spec
                if not 0 <= d < t.dim():
                    raise BatchLayoutError(
                        f"{p} has shape {tuple(t.shape)}, which has no dimension {spec} (batch_dim={spec!r}): give "
                        "one entry per element of the batch, e.g. batch_dim=(1, 0), and None for a tensor that is "
                        "not split into examples."
                    )
                dims.append(d)
            return
        children = _children(obj)
        where = _format_path(path)
        if children is None:
            raise BatchLayoutError(f"batch_dim has a container {spec!r} where {where} is a {type(obj).__name__}.")
        if isinstance(spec, Mapping):
            names = [k.name if isinstance(k, _Field) else k for k, _ in children]
            # elements without tensors (strings, numbers) need no entry
            missing = [n for n, (_, v) in zip(names, children) if n not in spec and tensor_leaves(v)]
            extra = [k for k in spec if k not in names]
            if missing or extra:
                raise BatchLayoutError(
                    f"batch_dim for {where} must name each of its elements holding tensors {names}; missing "
                    f"{missing}, unknown {extra}."
                )
            for (key, value), n in zip(children, names):
                visit(value, spec.get(n), (*path, key))
        elif isinstance(spec, (tuple, list)):
            if len(spec) != len(children):
                raise BatchLayoutError(
                    f"batch_dim {spec!r} has {len(spec)} entries but {where} has {len(children)} elements."
                )
            for (key, value), s in zip(children, spec):
                visit(value, s, (*path, key))
        else:
            check_batch_dim(spec)

    visit(batch, batch_dim_checked(spec), ())
    return dims


def batch_dim_checked(spec: Any) -> BatchDim:
    """:func:`check_batch_dim`, raising :class:`BatchLayoutError` (a ``ValueError``) instead of ``TypeError``.

    Raises:
        BatchLayoutError: for a malformed ``batch_dim``.
    """
    try:
        return check_batch_dim(spec)
    except TypeError as err:
        raise BatchLayoutError(str(err)) from err


def _leaves_under(obj: Any, path: tuple[Any, ...]) -> list[tuple[str, Tensor]]:
    return [(_format_path(path) + p[len("batch") :], t) for p, t in tensor_leaves(obj)]


def _describe(leaves: Sequence[tuple[str, Tensor]]) -> str:
    return ", ".join(f"{p} of shape {tuple(t.shape)}" for p, t in leaves)


_HOW_TO_NAME = (
    "Pass `batch_dim=` to the monitor: an int for every tensor, or one entry per element of the batch (e.g. "
    "batch_dim=(1, 0) for x of shape (T, B, F) and y of shape (B,)); None marks a tensor that is not split into "
    "examples."
)


def _auto_dims(leaves: Sequence[tuple[str, Tensor]], expected: int | None) -> tuple[list[int | None], str | None]:
    """Batch dimensions from the leading sizes, cross-checked against ``expected`` examples (see the module doc)."""
    batched = [t.dim() > 0 for _, t in leaves]
    if not any(batched):
        raise BatchLayoutError(f"The batch holds only 0-dimensional tensors ({_describe(leaves)}): no examples.")
    lead = {int(t.shape[0]) for (_, t), b in zip(leaves, batched) if b}
    if expected is None or lead == {expected}:
        if len(lead) == 1:
            return [0 if b else None for b in batched], None
        raise BatchLayoutError(
            f"The tensors of the batch disagree on their leading size ({_describe(leaves)}), so the batch dimension "
            f"is ambiguous (a sequence-first batch (T, B, ...) from pad_sequence or batch_first=False?). "
            + _HOW_TO_NAME
        )
    cands = [[d for d in range(t.dim()) if t.shape[d] == expected] for _, t in leaves]
    if not any(cands):  # no dimension has the expected size: a smaller (last) batch, or `expected` is wrong
        if len(lead) == 1:
            return [0 if b else None for b in batched], None
        raise BatchLayoutError(
            f"The tensors of the batch disagree on their leading size ({_describe(leaves)}) and none has a "
            f"dimension of the expected {expected} examples. " + _HOW_TO_NAME
        )
    if len(lead) == 1:  # every tensor agrees on a leading size n != expected
        n = next(iter(lead))
        confident = n > expected and all(
            len(c) == 1 and c[0] > 0 for (_, t), c, b in zip(leaves, cands, batched) if b
        )  # more examples than a batch holds along dim 0, exactly one other dimension of the expected size
        if confident:
            dims: list[int | None] = [c[0] if b else None for c, b in zip(cands, batched)]
            return dims, _note(leaves, dims, expected, "inferred")
        if n > expected:
            dims = [0 if b else None for b in batched]
            return dims, (
                f"The batch's leading size {n} differs from the {expected} examples a batch of the DataLoader holds "
                f"({_describe(leaves)}); reading {n} examples along dimension 0. " + _HOW_TO_NAME
            )
        raise BatchLayoutError(
            f"The batch ({_describe(leaves)}) has {n} along its leading dimension, fewer than the {expected} examples "
            f"a batch of the DataLoader holds, and another dimension of size {expected}: a smaller last batch, or a "
            "sequence-first one? " + _HOW_TO_NAME
        )
    dims = []
    for (p, t), c, b in zip(leaves, cands, batched):
        if not b:
            dims.append(None)
        elif t.shape[0] == expected:
            dims.append(0)
        elif len(c) == 1:
            dims.append(c[0])
        elif not c:
            dims.append(None)
        else:
            raise BatchLayoutError(
                f"{p} of shape {tuple(t.shape)} has several dimensions of the {expected} examples of a batch "
                f"({c}), so its batch dimension is ambiguous. " + _HOW_TO_NAME
            )
    return dims, _note(leaves, dims, expected, "inferred")


def _note(leaves: Sequence[tuple[str, Tensor]], dims: Sequence[int | None], expected: int, how: str) -> str:
    parts = [
        f"{p} of shape {tuple(t.shape)}: " + ("not split into examples" if d is None else f"dimension {d}")
        for (p, t), d in zip(leaves, dims)
    ]
    return (
        f"The batch dimension was {how} from the {expected} examples a batch of the DataLoader holds: "
        + "; ".join(parts)
        + ". Pass `batch_dim=` to the monitor to set it explicitly (and silence this message)."
    )


@dataclass(frozen=True)
class BatchLayout:
    """Where the examples are in each tensor of a batch.

    Attributes:
        dims: batch dimension of every tensor leaf (depth-first order), ``None`` for tensors not split into
            examples.
        signature: ``(path, ndim)`` of every tensor leaf: batches of the same structure share a layout.
        plain: the batch is already in the engine's form (exact tuples, lists, dicts or named tuples of tensors, all
            batched along dimension 0): :meth:`to_engine` returns it unchanged.
    """

    dims: tuple[int | None, ...]
    signature: tuple[tuple[str, int], ...]
    plain: bool

    def fits(self, batch: Any) -> bool:
        """Whether ``batch`` has this structure and its batched tensors agree on the number of examples."""
        leaves = tensor_leaves(batch)
        if tuple((p, t.dim()) for p, t in leaves) != self.signature:
            return False
        return len({int(t.shape[d]) for (_, t), d in zip(leaves, self.dims) if d is not None}) == 1

    def size(self, batch: Any) -> int:
        """Number of examples of ``batch``."""
        for (_, t), d in zip(tensor_leaves(batch), self.dims):
            if d is not None:
                return int(t.shape[d])
        raise BatchLayoutError("The batch has no batched tensor.")  # pragma: no cover - excluded at inference

    def slice(self, batch: Any, start: int, stop: int) -> Any:
        """Examples ``start:stop`` of ``batch``, in its own layout."""

        def fn(i: int, t: Tensor) -> Tensor:
            d = self.dims[i]
            return t if d is None else t.narrow(d, start, max(0, min(stop, t.shape[d]) - start))

        return _map_indexed(batch, fn)

    def to_engine(self, batch: Any) -> Any:
        """The engine's form of ``batch``: a tuple of its batched tensors with the examples along dimension 0, plus
        a record of the rest for :func:`restore_batch` (``batch`` itself when :attr:`plain`)."""
        if self.plain:
            return batch
        moved = tuple(t.movedim(d, 0) for (_, t), d in zip(tensor_leaves(batch), self.dims) if d is not None)
        return (*moved, _Template(batch, self.dims))


def infer_batch_layout(
    batch: Any, batch_dim: BatchDim = None, expected_size: int | None = None
) -> tuple[BatchLayout, str | None]:
    """Find the batch dimension of every tensor of ``batch``.

    With ``batch_dim`` given it is applied as ``in_dims`` of ``torch.func.vmap`` (an int for every tensor, or a
    tuple/list/dict nested like the batch, ``None`` for tensors not split into examples). Without it: the leading
    dimension when every tensor agrees on its size and nothing contradicts it. ``expected_size`` (the examples a
    batch of the DataLoader holds) settles the other cases: a tensor with a dimension of that size other than the
    leading one is read along it when that is the only such dimension (sequence-first batches), and tensors with no
    dimension of that size are not split (constants carried in the batch).

    Args:
        batch: one physical batch.
        batch_dim: the user's choice, or ``None`` to infer it.
        expected_size: examples a batch is expected to hold (``None``: unknown).

    Returns:
        The layout, and a note explaining an inferred layout that is not the plain leading dimension (``None``
        otherwise): callers show it once.

    Raises:
        BatchLayoutError: if the batch dimension is ambiguous, inconsistent with ``batch_dim``, or the batched
            tensors disagree on the number of examples; the message says how to pass ``batch_dim``.
        TypeError: if ``batch`` holds no tensor.

    Example::

        >>> x, y = torch.zeros(35, 8, 4), torch.zeros(8)  # (T, B, F) features, (B,) targets
        >>> layout, note = infer_batch_layout((x, y), batch_dim=(1, 0))
        >>> layout.dims, layout.size((x, y)), note
        ((1, 0), 8, None)
        >>> infer_batch_layout((x, y), expected_size=8)[0].dims
        (1, 0)
        >>> infer_batch_layout((x, y))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_curvature.core._batch.BatchLayoutError: The tensors of the batch disagree on their leading size ...
    """
    leaves = tensor_leaves(batch)
    if not leaves:
        raise TypeError(f"Expected a batch holding at least one tensor, got {type(batch).__name__}.")
    note: str | None = None
    if batch_dim is not None:
        dims = _explicit_dims(batch, batch_dim)
    else:
        dims, note = _auto_dims(leaves, expected_size)
    batched = [(p, t, d) for (p, t), d in zip(leaves, dims) if d is not None]
    if not batched:
        raise BatchLayoutError(f"batch_dim={batch_dim!r} marks no tensor of the batch as batched.")
    sizes = {int(t.shape[d]) for _, t, d in batched}
    if len(sizes) > 1:
        desc = ", ".join(f"{p}: {int(t.shape[d])} along dimension {d}" for p, t, d in batched)
        raise BatchLayoutError(f"The batched tensors disagree on the number of examples ({desc}). " + _HOW_TO_NAME)
    if 0 in sizes:
        raise BatchLayoutError("Got an empty batch (0 examples); curvature needs at least one example.")
    plain = _is_plain(batch) and all(d == 0 for d in dims)
    layout = BatchLayout(dims=tuple(dims), signature=tuple((p, t.dim()) for p, t in leaves), plain=plain)
    return layout, note


def restore_batch(batch: Any) -> Any:
    """The user's batch from the engine's form made by :meth:`BatchLayout.to_engine` (other batches unchanged).

    Works on slices of it too (a few examples, or one example with its batch dimension of size 1): each batched
    tensor gets its batch dimension back in place; tensors not split into examples are moved to the batched
    tensors' device, and floating ones cast to their floating dtype (the engine computes in float32 for
    half-precision models).
    """
    if not (isinstance(batch, tuple) and batch and isinstance(batch[-1], _Template)):
        return batch
    template: _Template = batch[-1]
    moved = batch[:-1]
    ref_float = next((t for t in moved if t.is_floating_point()), None)
    device = moved[0].device if moved else None
    it = iter(moved)

    def fn(i: int, t: Tensor) -> Tensor:
        d = template.dims[i]
        if d is not None:
            return next(it).movedim(0, d)
        if ref_float is not None and t.is_floating_point():
            return t.to(device=ref_float.device, dtype=ref_float.dtype)
        return t if device is None else t.to(device=device)

    return _map_indexed(template.batch, fn)


class LayoutLoss:
    """``loss_fn(model, batch)`` called with the user's batch restored from the engine's form (:func:`restore_batch`).

    Args:
        loss_fn: the user's ``loss_fn(model, batch) -> scalar``.
    """

    def __init__(self, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        return self.loss_fn(model, restore_batch(batch))

    def __repr__(self) -> str:
        return f"LayoutLoss({self.loss_fn!r})"


def is_batch_iterable(batch: Any) -> bool:
    """A re-iterable of batches (a DataLoader, a generator...) or a :class:`MultiBatch` rather than one batch."""
    if isinstance(batch, MultiBatch):
        return True
    if isinstance(batch, (Tensor, tuple, list, dict, str, bytes)) or hasattr(batch, "__dataclass_fields__"):
        return False
    return isinstance(batch, Iterable)


def read_if_one_pass(batch: Any) -> Any:
    """A one-pass iterator of batches (a generator) read into a :class:`MultiBatch`, once; anything else (one batch, a
    ``MultiBatch``, a re-iterable ``DataLoader``) as it is.

    Raises:
        ValueError: if the iterator yields no batch.
    """
    if not isinstance(batch, Iterator) or not is_batch_iterable(batch):
        return batch
    batches = list(batch)
    if not batches:
        raise ValueError("The curvature batch iterable is empty.")
    return MultiBatch(batches)


class _BatchFirstBatches:
    """A re-iterable of batches (a DataLoader) read in the engine's form, batch by batch, as it is iterated."""

    def __init__(self, source: Any, batch_dim: BatchDim, expected_size: int | None) -> None:
        self.source, self.batch_dim, self.expected_size = source, batch_dim, expected_size

    def __iter__(self) -> Iterator[Any]:
        layout = None
        for b in self.source:
            if layout is None or not layout.fits(b):
                layout, _ = infer_batch_layout(b, self.batch_dim, self.expected_size)
            yield layout.to_engine(b)


def as_batch_first(
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch_dim: BatchDim,
    expected_size: int | None = None,
) -> tuple[Any, Callable[[nn.Module, Any], Tensor]]:
    """``(batch, loss_fn)`` in the engine's form for a batch whose examples are along ``batch_dim``.

    The entry point for the engine's functions: ``batch, loss_fn = as_batch_first(batch, loss_fn, batch_dim)`` makes
    every later step (sizes, splitting, per-example ``vmap``, averaging a :class:`MultiBatch`) work on dimension 0
    while ``loss_fn`` still sees the batch in its own layout. Plain batches along dimension 0 come back unchanged.

    Args:
        batch: a batch, a :class:`MultiBatch`, or an iterable of batches (a generator is read once into a
            :class:`MultiBatch`; a re-iterable such as a ``DataLoader`` is converted batch by batch as it is read).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batch_dim: see :func:`infer_batch_layout` (``None``: inferred).
        expected_size: see :func:`infer_batch_layout`.

    Returns:
        The batch (a :class:`MultiBatch` stays one) and the loss to use with it.

    Raises:
        BatchLayoutError: see :func:`infer_batch_layout`.

    Example::

        >>> rnn = nn.RNN(4, 3)  # batch_first=False: input (T, B, 4)
        >>> x, y = torch.randn(6, 5, 4), torch.randn(5, 3)
        >>> loss = lambda m, b: ((m(b[0])[0][-1] - b[1]) ** 2).mean()
        >>> fb, fl = as_batch_first((x, y), loss, batch_dim=(1, 0))
        >>> batch_size(fb), torch.allclose(fl(rnn, fb), loss(rnn, (x, y)))
        (5, True)
    """
    batch = read_if_one_pass(batch)  # a generator: read once, as the operators would
    if is_batch_iterable(batch) and not isinstance(batch, MultiBatch):
        # a DataLoader: its batches are put in the engine's form as they are read, every time
        first = next(iter(batch), None)
        if first is None:
            raise ValueError("The curvature batch iterable is empty.")
        layout, _ = infer_batch_layout(first, batch_dim, expected_size)
        if layout.to_engine(first) is first:
            return batch, loss_fn
        return _BatchFirstBatches(batch, batch_dim, expected_size), LayoutLoss(loss_fn)
    physical = list(iter_batches(batch))
    out = list(_BatchFirstBatches(physical, batch_dim, expected_size))
    if all(o is b for o, b in zip(out, physical)):
        return batch, loss_fn
    return (MultiBatch(out) if isinstance(batch, MultiBatch) else out[0]), LayoutLoss(loss_fn)
