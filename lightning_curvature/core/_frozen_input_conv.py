r"""Convolutions on inputs that need no gradient, with a double backward that skips the input gradient.

For :math:`y = x \star W + b`, the weight gradient :math:`g_W = \partial L/\partial W` is linear in the output
gradient :math:`g_y` and does not depend on :math:`W`. Its derivative along a direction :math:`u_W` (what a
Hessian-vector product asks of it) is therefore the convolution :math:`x \star u_W`, fed back into :math:`g_y`:

.. math:: \langle g_W(g_y), u_W \rangle = \langle g_y, x \star u_W \rangle .

PyTorch's conv double backward (``_convolution_double_backward``) also evaluates the input gradient
:math:`\mathrm{conv}^\top(g_y, u_W)` whether or not anything needs it: it checks only that ``input`` is non-empty.
On the first layer of a network the input is the data, which needs no gradient, and that transposed convolution
into a few channels is slow (on the benchmark CNN, 3x32x32 inputs, 8–10 ms of an 80 ms product on one CPU
thread). :class:`FrozenInputConvolutions` routes exactly those convolutions (data input, trainable weight)
through an autograd function whose backward computes :math:`g_W` with PyTorch's own ``convolution_backward``
kernel and whose double backward is the single convolution above. Values are unchanged; every other convolution
(and every call under autocast or with string padding) goes to PyTorch as usual.

Used by :class:`~lightning_curvature.core.hvp.HessianOperator` while it builds the ``create_graph`` gradient.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["FrozenInputConvolutions"]

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (
            ("input", inspect.Parameter.empty),
            ("weight", inspect.Parameter.empty),
            ("bias", None),
            ("stride", 1),
            ("padding", 0),
            ("dilation", 1),
            ("groups", 1),
        )
    ]
)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))  # type: ignore[call-arg]
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


def _expand(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * n


class _WeightGradient(torch.autograd.Function):
    """:math:`g_W(g_y)` for a fixed input; its backward is the convolution :math:`x \\star u_W`."""

    @staticmethod
    def forward(ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor, conv: Any, options: tuple) -> Tensor:  # type: ignore[override]
        ctx.conv, ctx.options = conv, options
        ctx.save_for_backward(x)
        stride, padding, dilation, groups = options
        n = x.dim() - 2
        return torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            None,
            _expand(stride, n),
            _expand(padding, n),
            _expand(dilation, n),
            False,
            [0] * n,
            groups,
            [False, True, False],
        )[1]

    @staticmethod
    def backward(ctx: Any, grad_grad_weight: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return ctx.conv(x, grad_grad_weight, None, *ctx.options), None, None, None, None


class _FrozenInputConv(torch.autograd.Function):
    """The convolution itself (the very same PyTorch call), with a backward for the weight and bias only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, conv: Any, options: tuple) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.options, ctx.has_bias = conv, options, bias is not None
        return conv(x, weight, bias, *options)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_weight = _WeightGradient.apply(grad_out, x, weight, ctx.conv, ctx.options)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != 1])
        return None, grad_weight, grad_bias, None, None


class FrozenInputConvolutions(TorchFunctionMode):
    """Inside this context, ``F.conv{1,2,3}d`` calls whose input needs no gradient and whose weight does are
    computed by :class:`_FrozenInputConv` (see the module docstring); all other calls pass through unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONVS:
            bound = _SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            x, weight, bias = a["input"], a["weight"], a["bias"]
            if (
                isinstance(x, Tensor)
                and isinstance(weight, Tensor)
                and not x.requires_grad
                and weight.requires_grad
                and x.dim() == _CONVS[func] + 2  # batched input only
                and not isinstance(a["padding"], str)
                and not _autocast_enabled(x.device.type)
            ):
                options = (a["stride"], a["padding"], a["dilation"], a["groups"])
                return _FrozenInputConv.apply(x, weight, bias, func, options)
        return func(*args, **kwargs)
