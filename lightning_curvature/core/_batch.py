"""Batches: tensors, tuples/lists or dicts of tensors; sizes, dtype casts, splitting, averaging."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["MultiBatch", "batch_size", "iter_batches", "slice_batch", "to_compute"]


class MultiBatch(list):  # type: ignore[type-arg]
    """Several physical batches that together form one curvature batch.

    Curvature quantities of a :class:`MultiBatch` are those of the loss averaged over all its examples: each
    batch's contribution is weighted by its size, so the curvature batch may exceed memory.

    Example::

        >>> mb = MultiBatch([torch.zeros(3, 2), torch.zeros(5, 2)])
        >>> [batch_size(b) for b in mb]
        [3, 5]
    """


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for v in batch.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def batch_size(batch: Any) -> int:
    """Number of examples in ``batch``: the leading dimension of its first tensor.

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
    return n


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


def _map_tensors(batch: Any, fn: Any) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: _map_tensors(v, fn) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


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
