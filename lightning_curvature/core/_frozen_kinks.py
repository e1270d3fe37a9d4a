r"""Evaluate a network with the on/off pattern of its piecewise-linear ops frozen at a reference point.

The gradient of a ReLU or max-pool network jumps where a pre-activation crosses zero (or a pool's argmax switches).
A central difference :math:`(\nabla L(\theta+\varepsilon v) - \nabla L(\theta-\varepsilon v))/2\varepsilon` then
picks up those jumps: the fraction of units that flip grows like :math:`\varepsilon`, each jump is divided by
:math:`\varepsilon`, and the error does not vanish as :math:`\varepsilon \to 0`. The Hessian that double backward
computes is the almost-everywhere one
(:math:`\sigma'' = 0` away from the kinks). With the pattern recorded at :math:`\theta` and replayed at
:math:`\theta \pm \varepsilon v`, the perturbed networks are smooth functions that agree with the network to first
order at :math:`\theta`, and their central difference converges to that Hessian.

:class:`FrozenKinks` records in a first pass (``record=True``) and replays in later ones, matching calls by their
order: ``relu`` in all its forms (``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not, ``nn.ReLU``),
``leaky_relu``, ``relu6``/``hardtanh`` and ``max_pool{1,2,3}d``/``adaptive_max_pool{1,2}d``. Other
non-smooth ops (``abs``, ``torch.max`` over a dimension, user-written clamps) are evaluated as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["FrozenKinks", "KinkReplayError"]


class KinkReplayError(RuntimeError):
    """The replayed forward pass did not call the recorded ops in the same order with the same shapes."""


_RELU = {F.relu, torch.relu, Tensor.relu, torch.relu_, Tensor.relu_}
_LEAKY = {F.leaky_relu, F.leaky_relu_}
_CLAMP = {F.hardtanh, F.hardtanh_, F.relu6}
_POOLS = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.max_pool1d_with_indices: 1,
    F.max_pool2d_with_indices: 2,
    F.max_pool3d_with_indices: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool1d_with_indices: 1,
    F.adaptive_max_pool2d_with_indices: 2,
}
_WITH_INDICES = {
    F.max_pool1d: F.max_pool1d_with_indices,
    F.max_pool2d: F.max_pool2d_with_indices,
    F.max_pool3d: F.max_pool3d_with_indices,
    F.adaptive_max_pool1d: F.adaptive_max_pool1d_with_indices,
    F.adaptive_max_pool2d: F.adaptive_max_pool2d_with_indices,
}


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class FrozenKinks(TorchFunctionMode):
    """Record the pattern of piecewise-linear ops in one forward pass; replay it in later ones.

    Args:
        records: the list the pattern is stored in (filled when ``record=True``, read in order otherwise).
        record: record (the reference point) or replay (a perturbed point).

    Raises:
        KinkReplayError: in replay, if the ops or shapes differ from the recorded pass.
    """

    def __init__(self, records: list[Any], record: bool) -> None:
        super().__init__()
        self.records = records
        self.record = record
        self._next = 0

    def _take(self, kind: str, shape: torch.Size) -> Any:
        if self._next >= len(self.records):
            raise KinkReplayError("The forward pass called more piecewise-linear ops than were recorded.")
        entry = self.records[self._next]
        self._next += 1
        if entry[0] != kind or entry[1] != shape:
            raise KinkReplayError(f"Recorded {entry[0]} of shape {tuple(entry[1])}, replayed {kind} {tuple(shape)}.")
        return entry[2]

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _RELU:
            return self._relu(func, args, kwargs)
        if func in _LEAKY:
            return self._leaky(func, args, kwargs)
        if func in _CLAMP:
            return self._clamp(func, args, kwargs)
        if func in _POOLS:
            return self._pool(func, args, kwargs)
        return func(*args, **kwargs)

    def _relu(self, func: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        inplace = func in (torch.relu_, Tensor.relu_) or (func is F.relu and _arg(args, kwargs, 1, "inplace", False))
        if self.record:
            self.records.append(("relu", x.shape, (x > 0).detach()))
            return func(*args, **kwargs)
        mask = self._take("relu", x.shape)
        return x.mul_(mask) if inplace else x * mask

    def _leaky(self, func: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        slope = float(_arg(args, kwargs, 1, "negative_slope", 0.01))
        if self.record:
            self.records.append(("leaky_relu", x.shape, (x > 0).detach()))
            return func(*args, **kwargs)
        mask = self._take("leaky_relu", x.shape)
        return torch.where(mask, x, slope * x)

    def _clamp(self, func: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        if func is F.relu6:
            lo, hi = 0.0, 6.0
        else:
            lo, hi = float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0))
        if self.record:
            self.records.append(("clamp", x.shape, ((x <= lo).detach(), (x >= hi).detach())))
            return func(*args, **kwargs)
        low, high = self._take("clamp", x.shape)
        return torch.where(low, torch.full_like(x, lo), torch.where(high, torch.full_like(x, hi), x))

    def _pool(self, func: Any, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        dims = _POOLS[func]
        with_indices = func not in _WITH_INDICES or bool(kwargs.get("return_indices", False))
        indexed: Any
        if func in _WITH_INDICES:
            kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
            # positional return_indices sits after the pooling arguments; those variants take it as keyword only
            indexed = _WITH_INDICES[func]
        else:
            indexed = func
        if self.record:
            out, idx = indexed(*args, **kwargs)
            self.records.append(("max_pool", x.shape, idx.detach()))
            return (out, idx) if with_indices else out
        idx = self._take("max_pool", x.shape)
        out = x.flatten(-dims).gather(-1, idx.flatten(-dims)).view(idx.shape)
        return (out, idx) if with_indices else out
