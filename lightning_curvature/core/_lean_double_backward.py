r"""Convolutions and ReLUs whose double backward does only the work a Hessian-vector product needs.

A Hessian-vector product by double backward differentiates the first-order backward pass once more. For two
common operations PyTorch's formulas for that do avoidable work (the figures are in ``benchmarks/README.md``):

* Convolution :math:`y = x \star W + b`. Its backward gives :math:`g_x = W^\top \star g_y` and
  :math:`g_W = x \star^\top g_y`, each linear in :math:`g_y`, and :math:`g_W` in :math:`x`, :math:`g_x` in
  :math:`W`. Differentiating :math:`\langle u_x, g_x\rangle + \langle u_W, g_W\rangle` gives three terms:

  .. math::
      \partial_{g_y} = u_x \star W + x \star u_W, \qquad
      \partial_W = \mathrm{wgrad}(g_y;\ u_x), \qquad
      \partial_x = \mathrm{igrad}(g_y;\ u_W),

  where ``wgrad``/``igrad`` are the weight- and input-gradient kernels of the convolution
  (``aten.convolution_backward``). PyTorch's ``_convolution_double_backward`` computes :math:`\partial_x` even
  when the input needs no gradient (it checks only that the input is non-empty: on a first layer that is a
  transposed convolution into the input channels), and :math:`\partial_W` as a forward
  convolution over batch-transposed tensors, several times slower than the weight-gradient kernel.
* ReLU. Its backward :math:`g_x = g_y \cdot [y > 0]` has a zero derivative in :math:`x`; PyTorch materialises
  that zero as a full tensor and adds it into the graph (a fill and an add per ReLU per product).

:class:`LeanDoubleBackward` routes ``F.conv{1,2,3}d`` (trainable weight, batched input, numeric padding) and
out-of-place ``relu`` through autograd functions whose backward and double backward are exactly the formulas
above, computed with PyTorch's own kernels. Values are those of PyTorch's double backward up to float rounding
(tested in float64 against it for 1d/2d/3d, stride, padding, dilation, groups, bias); everything else — and
everything under autocast — goes to PyTorch unchanged.

Used by :class:`~lightning_curvature.core.hvp.HessianOperator` while it builds the ``create_graph`` gradient.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["LeanDoubleBackward"]

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_RELUS = (F.relu, torch.relu, Tensor.relu)
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
_threshold_backward = torch.ops.aten.threshold_backward


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))  # type: ignore[call-arg]
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


def _expand(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * n


def _conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, options: tuple, mask: list[bool]) -> Any:
    """``aten.convolution_backward`` for ``F.conv{n}d(x, weight, None, *options)``; ``mask`` picks (g_x, g_W, g_b)."""
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
        mask,
    )


class _ConvWeightGradient(torch.autograd.Function):
    """:math:`g_W(g_y)` for an input that needs no gradient; its backward is :math:`x \\star u_W`."""

    @staticmethod
    def forward(ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor, conv: Any, options: tuple) -> Tensor:  # type: ignore[override]
        ctx.conv, ctx.options = conv, options
        ctx.save_for_backward(x)
        return _conv_backward(grad_out, x, weight, options, [False, True, False])[1]

    @staticmethod
    def backward(ctx: Any, u_weight: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return ctx.conv(x, u_weight, None, *ctx.options), None, None, None, None


class _ConvGradients(torch.autograd.Function):
    """:math:`(g_x, g_W)` from :math:`g_y`, differentiable in :math:`(g_y, x, W)` by the formulas of the module."""

    @staticmethod
    def forward(
        ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor, conv: Any, options: tuple
    ) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.save_for_backward(grad_out, x, weight)
        ctx.conv, ctx.options = conv, options
        grad_x, grad_w, _ = _conv_backward(grad_out, x, weight, options, [True, True, False])
        return grad_x, grad_w

    @staticmethod
    def backward(ctx: Any, u_x: Tensor | None, u_weight: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_out, x, weight = ctx.saved_tensors
        conv, options = ctx.conv, ctx.options
        d_grad_out = d_x = d_weight = None
        if ctx.needs_input_grad[0]:
            if u_x is not None:
                d_grad_out = conv(u_x, weight, None, *options)
            if u_weight is not None:
                term = conv(x, u_weight, None, *options)
                d_grad_out = term if d_grad_out is None else d_grad_out.add_(term)
        if ctx.needs_input_grad[1] and u_weight is not None:
            d_x = _conv_backward(grad_out, x, u_weight, options, [True, False, False])[0]
        if ctx.needs_input_grad[2] and u_x is not None:
            d_weight = _conv_backward(grad_out, u_x, weight, options, [False, True, False])[1]
        return d_grad_out, d_x, d_weight, None, None


class _Conv(torch.autograd.Function):
    """The convolution itself (the very same PyTorch call), with the backward above."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, conv: Any, options: tuple) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.options, ctx.has_bias = conv, options, bias is not None
        return conv(x, weight, bias, *options)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x, grad_weight = _ConvGradients.apply(grad_out, x, weight, ctx.conv, ctx.options)
        else:
            grad_weight = _ConvWeightGradient.apply(grad_out, x, weight, ctx.conv, ctx.options)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != 1])
        return grad_x, grad_weight, grad_bias, None, None


class _ReluGradient(torch.autograd.Function):
    """:math:`g_y \\cdot [y > 0]`, linear in :math:`g_y`; no derivative in :math:`y` (it is zero)."""

    @staticmethod
    def forward(ctx: Any, grad_out: Tensor, out: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(out)
        return _threshold_backward(grad_out, out, 0)

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return _threshold_backward(u, out, 0), None


class _Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return _ReluGradient.apply(grad_out, out)


class LeanDoubleBackward(TorchFunctionMode):
    """Inside this context, trainable convolutions and out-of-place ReLUs on tensors that need a gradient are
    computed by the autograd functions of this module (see the module docstring); all other calls pass through."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONVS:
            bound = _SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            x, weight = a["input"], a["weight"]
            if (
                isinstance(x, Tensor)
                and isinstance(weight, Tensor)
                and weight.requires_grad
                and x.dim() == _CONVS[func] + 2  # batched input only
                and not isinstance(a["padding"], str)
                and not _autocast_enabled(x.device.type)
            ):
                options = (a["stride"], a["padding"], a["dilation"], a["groups"])
                return _Conv.apply(x, weight, a["bias"], func, options)
        elif func in _RELUS and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            if not inplace and len(args) <= 2 and set(kwargs) <= {"inplace"}:
                return _Relu.apply(args[0])
        return func(*args, **kwargs)
