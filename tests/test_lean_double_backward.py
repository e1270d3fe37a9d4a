"""Lean conv/ReLU double backward: the same gradients and Hessian-vector products as PyTorch's own formulas."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from _reference import ce_loss, plain_hvp
from torch import Tensor, nn

from lightning_curvature.core._lean_double_backward import LeanDoubleBackward
from lightning_curvature.core.hvp import HessianOperator

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class _Relu(nn.Module):
    """Each way of calling an out-of-place ReLU."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "module":
            return F.relu(x)
        if self.how == "torch":
            return torch.relu(x)
        return x.relu()


def _three_layer(dim: int, stride: int, padding: int | tuple, dilation: int, groups: int, bias: bool) -> nn.Module:
    """Conv on the data (input without gradient), a ReLU, a conv whose input needs its gradient, tanh."""
    torch.manual_seed(0)
    Conv = _CONV[dim]
    return nn.Sequential(
        Conv(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias),
        _Relu(("module", "torch", "method")[dim - 1]),
        Conv(6, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias),
        nn.Tanh(),
    ).double()


def _grad_and_hvp(model: nn.Module, x: Tensor, vs: list[Tensor], lean: bool) -> tuple[list[Tensor], list[Tensor]]:
    params = list(model.parameters())
    with LeanDoubleBackward() if lean else contextlib.nullcontext():
        loss = (model(x) ** 2).mean() + model(x).mean()  # two uses: gradients accumulate through the routing
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(grads, params, vs)
    return [g.detach() for g in grads], list(hvp)


CASES = list(itertools.product((1, 2, 3), (1, 2), (0, 1, "tuple"), (1, 2), (1, 2), (True, False)))


@pytest.mark.parametrize(("dim", "stride", "padding", "dilation", "groups", "bias"), CASES)
def test_gradient_and_product_equal_pytorch(dim, stride, padding, dilation, groups, bias):
    if padding == "tuple":
        padding = (2, 1, 0)[:dim]
    model = _three_layer(dim, stride, padding, dilation, groups, bias)
    x = torch.randn(3, 4, *([13] * dim), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vs = [
        torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
        for i, p in enumerate(model.parameters())
    ]
    g_ref, h_ref = _grad_and_hvp(model, x, vs, lean=False)
    g, h = _grad_and_hvp(model, x, vs, lean=True)
    for a, b in zip(g + h, g_ref + h_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _node(fn, *args) -> str:
    with LeanDoubleBackward():
        out = fn(*args)
    return type(out.grad_fn).__name__ if out.grad_fn is not None else "None"


def test_routes_trainable_convolutions_and_out_of_place_relus_only():
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert _node(conv, x) == "_ConvBackward"
    assert _node(conv, x.clone().requires_grad_(True)) == "_ConvBackward"
    # string padding, an unbatched input, a frozen weight and autocast go to PyTorch
    assert _node(nn.Conv2d(4, 6, 3, padding="same").double(), x) == "ConvolutionBackward0"
    assert "_Conv" not in _node(conv, x[0])
    assert _node(nn.Conv2d(4, 6, 3).double().requires_grad_(False), x) == "None"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_Conv" not in _node(conv.float(), x.float())
    h = torch.randn(5, requires_grad=True)
    assert _node(F.relu, h) == "_ReluBackward"
    assert _node(torch.relu, h) == "_ReluBackward"
    assert _node(Tensor.relu, h) == "_ReluBackward"
    assert _node(lambda t: F.relu(t.clone(), inplace=True), h) != "_ReluBackward"
    assert _node(F.relu, torch.randn(5)) == "None"


def test_keyword_arguments_are_honoured():
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    kwargs = {"bias": b, "stride": 2, "padding": 1, "dilation": 2, "groups": 2}
    ref = F.conv2d(x, w, **kwargs)
    with LeanDoubleBackward():
        out = F.conv2d(x, w, **kwargs)
    assert type(out.grad_fn).__name__ == "_ConvBackward"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g_ref = torch.autograd.grad(ref.square().sum(), (x, w, b))
    g = torch.autograd.grad(out.square().sum(), (x, w, b))
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_hessian_operator_product_equals_plain_double_backward():
    """A small CNN (ReLU, max-pool, two convs): the operator's products equal autograd's without the routing."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    ).double()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    v = [torch.randn_like(p) for p in model.parameters()]
    with HessianOperator(model, ce_loss, (x, y)) as H:
        got = H.matvec(H.flatten(v))
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(got, plain_hvp(model, ce_loss, (x, y), v), rtol=1e-10, atol=1e-12)


def test_the_lean_double_backward_is_an_explicit_choice_with_the_same_values() -> None:
    """On by default on CPU; off gives PyTorch's own double backward: the same products to rounding."""
    from lightning_curvature import HessianOperator

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    v = torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    with HessianOperator(net, loss_fn, x, method="double_backward") as lean:
        assert lean.lean_double_backward
        a = lean.matvec(v)
    with HessianOperator(net, loss_fn, x, method="double_backward", lean_double_backward=False) as plain:
        b = plain.matvec(v)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
