"""Convolutions on data inputs: the same gradients and Hessian-vector products as PyTorch's own double backward."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_curvature.core._frozen_input_conv import FrozenInputConvolutions
from lightning_curvature.core.hvp import HessianOperator

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _two_layer(dim: int, stride: int, padding: int | tuple, dilation: int, groups: int, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    Conv = _CONV[dim]
    return nn.Sequential(
        Conv(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias),
        nn.Tanh(),
        Conv(6, 4, 3, padding=1, groups=groups, bias=bias),
    ).double()


def _grad_and_hvp(model: nn.Module, x: Tensor, vs: list[Tensor], fast: bool) -> tuple[list[Tensor], list[Tensor]]:
    params = list(model.parameters())
    with FrozenInputConvolutions() if fast else contextlib.nullcontext():
        loss = (model(x).tanh() ** 2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(grads, params, vs)
    return [g.detach() for g in grads], list(hvp)


CASES = [
    (dim, stride, padding, dilation, groups, bias)
    for dim, stride, padding, dilation, groups, bias in itertools.product(
        (1, 2, 3), (1, 2), (0, 1, "tuple"), (1, 2), (1, 2), (True, False)
    )
]


@pytest.mark.parametrize(("dim", "stride", "padding", "dilation", "groups", "bias"), CASES)
def test_gradient_and_product_equal_pytorch(dim, stride, padding, dilation, groups, bias):
    if padding == "tuple":
        padding = (2, 1, 0)[:dim]
    model = _two_layer(dim, stride, padding, dilation, groups, bias)
    x = torch.randn(3, 4, *([9] * dim), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vs = [
        torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
        for i, p in enumerate(model.parameters())
    ]
    g_ref, h_ref = _grad_and_hvp(model, x, vs, fast=False)
    g, h = _grad_and_hvp(model, x, vs, fast=True)
    for a, b in zip(g + h, g_ref + h_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _first_conv_node(model: nn.Module, x: Tensor) -> str:
    with FrozenInputConvolutions():
        out = model[0](x)
    assert out.grad_fn is not None
    return type(out.grad_fn).__name__


def test_routes_only_data_input_convolutions():
    model = _two_layer(2, 1, 1, 1, 1, True)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert "FrozenInputConv" in _first_conv_node(model, x)
    # an input that needs its gradient (a hidden layer) goes to PyTorch
    assert _first_conv_node(model, x.clone().requires_grad_(True)) == "ConvolutionBackward0"
    # string padding, an unbatched input, and autocast go to PyTorch too
    same = nn.Sequential(nn.Conv2d(4, 6, 3, padding="same")).double()
    assert _first_conv_node(same, x) == "ConvolutionBackward0"
    assert "FrozenInputConv" not in _first_conv_node(model, x[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "FrozenInputConv" not in _first_conv_node(model.float(), x.float())


def test_frozen_weight_passes_through():
    conv = nn.Conv2d(4, 6, 3).double().requires_grad_(False)
    with FrozenInputConvolutions():
        out = conv(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert out.grad_fn is None


def test_keyword_arguments_are_honoured():
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    kwargs = {"bias": b, "stride": 2, "padding": 1, "dilation": 2, "groups": 2}
    ref = F.conv2d(x, w, **kwargs)
    with FrozenInputConvolutions():
        out = F.conv2d(x, w, **kwargs)
    assert "FrozenInputConv" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g_ref = torch.autograd.grad(ref.square().sum(), (w, b))
    g = torch.autograd.grad(out.square().sum(), (w, b))
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_hessian_operator_product_equals_plain_double_backward():
    """A CNN whose first layer sees the data: the operator's products equal autograd's without the routing."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    ).double()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(loss_fn(model, (x, y)), params, create_graph=True)
    expected = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, v)])
    with HessianOperator(model, loss_fn, (x, y)) as H:
        got = H.matvec(H.flatten(v))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params)
