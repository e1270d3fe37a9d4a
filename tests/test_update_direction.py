"""`update_direction` against the real optimizers: one step at lr=1 must move the parameters by exactly u."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_curvature.core.update_direction import (
    directional_terms,
    supports_update_direction,
    update_direction,
    weight_decay_terms,
)

OptFactory = Callable[[list], torch.optim.Optimizer]

# cases as data: (id, factory taking the parameter list, lr used for the warm-up steps)
CASES: list[tuple[str, OptFactory]] = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
    ("sgd-wd", lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05)),
    ("sgd-momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    ("sgd-momentum-dampening", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.3)),
    ("sgd-nesterov-wd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd-maximize", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, maximize=True)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01)),
    ("adam-wd", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)),
    ("adam-amsgrad", lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True)),
    ("adam-maximize", lambda p: torch.optim.Adam(p, lr=0.01, maximize=True)),
    ("adam-decoupled", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
    ("adamw-amsgrad", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01)),
    (
        "rmsprop-centered-momentum-wd",
        lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.9, weight_decay=0.01),
    ),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def _twin(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Deep copies of model and optimizer sharing nothing, gradients included (deepcopy drops ``.grad``)."""
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin_model, twin_opt


def _set_random_grads(model: nn.Module, gen: torch.Generator) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("warmup_steps", [0, 1, 3], ids=lambda k: f"steps={k}")
@pytest.mark.parametrize("factory", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_direction_equals_unit_lr_step(factory: OptFactory, warmup_steps: int) -> None:
    model = _model()
    opt = factory(list(model.parameters()))
    gen = torch.Generator().manual_seed(1)
    for _ in range(warmup_steps):
        _set_random_grads(model, gen)
        opt.step()
    _set_random_grads(model, gen)
    state_before = copy.deepcopy(opt.state_dict())
    params_before = [p.detach().clone() for p in model.parameters()]

    u = update_direction(opt, dtype=torch.float64)

    # nothing was changed
    after = opt.state_dict()
    for k, st in state_before["state"].items():
        for name, val in st.items():
            torch.testing.assert_close(after["state"][k][name], val, rtol=0, atol=0)
    for p, p0 in zip(model.parameters(), params_before):
        assert torch.equal(p, p0)

    twin_model, twin_opt = _twin(model, opt)
    for g in twin_opt.param_groups:
        g["lr"] = 1.0
    twin_opt.step()
    for p_new, p_old, ui in zip(twin_model.parameters(), params_before, u):
        torch.testing.assert_close(p_new - p_old, ui, rtol=1e-10, atol=1e-12)


def test_group_scales_and_missing_grad() -> None:
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = torch.optim.SGD([{"params": first, "lr": 0.2}, {"params": second, "lr": 0.05}], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    _set_random_grads(model, gen)
    model[2].bias.grad = None
    u = update_direction(opt, group_scales=[1.0, 0.25])
    torch.testing.assert_close(u[0], -first[0].grad)
    torch.testing.assert_close(u[2], -0.25 * second[0].grad)
    assert torch.count_nonzero(u[3]) == 0
    # with lr_i = eta * scale_i the real step is eta * u
    eta = 0.4
    twin_model, twin_opt = _twin(model, opt)
    twin_opt.param_groups[0]["lr"], twin_opt.param_groups[1]["lr"] = eta * 1.0, eta * 0.25
    before = [p.detach().clone() for p in twin_model.parameters()]
    twin_opt.step()
    for p, p0, ui in zip(twin_model.parameters(), before, u):
        torch.testing.assert_close(p - p0, eta * ui)


@pytest.mark.parametrize(
    ("momentum", "nesterov", "dampening"), [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0), (0.9, False, 0.3)]
)
def test_sparse_embedding_gradients_give_sgds_own_step(momentum: float, nesterov: bool, dampening: float) -> None:
    """``nn.Embedding(sparse=True)`` trains with SGD (sparse gradients, and a sparse momentum buffer); the direction
    was refused ("Sparse gradients are not supported"), so CDAT had no measurement all run."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True).double()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, dampening=dampening)
    for step in range(4):
        opt.zero_grad()
        (emb(torch.tensor([1, 2, step])) ** 2).sum().backward()
        direction = update_direction(opt)[0]
        before = emb.weight.detach().clone()
        opt.step()
        torch.testing.assert_close(emb.weight.detach() - before, 0.1 * direction, rtol=0, atol=1e-15)


def test_errors() -> None:
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adagrad([w])
    assert not supports_update_direction(opt)
    with pytest.raises(TypeError, match="Adagrad"):
        update_direction(opt)
    sgd = torch.optim.SGD([w], lr=0.1)
    with pytest.raises(ValueError, match="not managed"):
        update_direction(sgd, params=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="group_scales"):
        update_direction(sgd, group_scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="gradients"):
        update_direction(sgd, grads=[])


def test_directional_terms_closed_form() -> None:
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    H = A @ A.T
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    theta = torch.randn(5, generator=gen, dtype=torch.float64)
    u = -g
    n, d = directional_terms(g, u, H @ u)
    assert n == pytest.approx(float(g @ g))
    assert d == pytest.approx(float(g @ H @ g))
    # weight decay: objective L + wd/2 |θ|²
    wd = torch.full((5,), 0.1, dtype=torch.float64)
    n, d = directional_terms(g, u, H @ u, params=theta, weight_decay=wd)
    assert n == pytest.approx(float(-(g + 0.1 * theta) @ u))
    assert d == pytest.approx(float(u @ (H + 0.1 * torch.eye(5, dtype=torch.float64)) @ u))
    # ascent direction: n clipped at 0; negative curvature: |.|
    n, d = directional_terms(g, g, -(H @ g))
    assert n == 0.0 and d == pytest.approx(float(g @ H @ g))
    nan = torch.full((5,), float("nan"), dtype=torch.float64)
    n, d = directional_terms(g, u, nan)
    assert n != n and d != d
    with pytest.raises(ValueError, match="flat"):
        directional_terms(g, u[:3], H @ u)
    with pytest.raises(ValueError, match="params"):
        directional_terms(g, u, H @ u, weight_decay=wd)


def test_directional_terms_take_parameter_shaped_lists() -> None:
    """What ``update_direction`` and ``HessianOperator.matvec`` return (lists shaped like the parameters) gives the
    same (n, d) as the flat vectors, weight decay and maximize masks included; it failed with AttributeError."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(2, 3), (3,)]
    A = torch.randn(9, 9, generator=gen, dtype=torch.float64)
    H = A @ A.T
    g, theta = torch.randn(9, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    u = -g
    wd = torch.cat([torch.full((6,), 0.1), torch.zeros(3)]).double()
    mask = torch.cat([torch.zeros(6), torch.ones(3)]).bool()

    def split(x: torch.Tensor) -> list[torch.Tensor]:
        return [t.reshape(s) for t, s in zip(torch.split(x, [6, 3]), shapes)]

    flat = directional_terms(g, u, H @ u, params=theta, weight_decay=wd, maximize=mask)
    shaped = directional_terms(
        split(g), split(u), split(H @ u), params=split(theta), weight_decay=split(wd), maximize=split(mask)
    )
    assert shaped == pytest.approx(flat, rel=1e-14)
    sign = torch.where(mask, -1.0, 1.0).double()
    assert flat[0] == pytest.approx(max(float(-(sign * g + wd * theta) @ u), 0.0))
    assert flat[1] == pytest.approx(abs(float(u @ (sign[:, None] * H) @ u + (wd * u * u).sum())))
    with pytest.raises(TypeError, match="list of tensors"):
        directional_terms(g, [1.0, 2.0], H @ u)  # type: ignore[arg-type]


def test_weight_decay_terms() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], weight_decay=0.3)
    assert weight_decay_terms(opt, [a, b]) == [0.3, 0.0]
    with pytest.raises(ValueError, match="not managed"):
        weight_decay_terms(opt, [nn.Parameter(torch.zeros(1))])
