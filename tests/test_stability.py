"""Stability thresholds against simulations of the optimizers on one-dimensional quadratics."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_curvature import (
    adam_stability_threshold,
    max_stable_lr,
    sgd_stability_threshold,
    stability_threshold,
)


def _diverges(opt_factory, curvature: float, steps: int = 3000) -> bool:
    """Run the real torch optimizer on L(w) = curvature·w²/2 from w=1 and see whether |w| blows up."""
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = opt_factory([w])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * w.pow(2)).sum().backward()
        opt.step()
        if not math.isfinite(w.item()) or abs(w.item()) > 1e6:
            return True
    return abs(w.item()) > 1.0


SGD_CASES = [
    {"id": "gd", "momentum": 0.0, "nesterov": False, "dampening": 0.0},
    {"id": "heavy-ball-0.9", "momentum": 0.9, "nesterov": False, "dampening": 0.0},
    {"id": "heavy-ball-0.5-damp-0.3", "momentum": 0.5, "nesterov": False, "dampening": 0.3},
    {"id": "nesterov-0.9", "momentum": 0.9, "nesterov": True, "dampening": 0.0},
]


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: c["id"])
def test_sgd_threshold_separates_stable_from_divergent(case: dict) -> None:
    lr = 0.1
    kwargs = {k: case[k] for k in ("momentum", "nesterov", "dampening")}
    thr = sgd_stability_threshold(lr, **kwargs)

    def factory(params: list) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, **kwargs)

    assert not _diverges(factory, 0.97 * thr)
    assert _diverges(factory, 1.03 * thr)
    assert stability_threshold(factory([torch.zeros(1, requires_grad=True)])) == pytest.approx(thr)


def test_closed_forms() -> None:
    assert sgd_stability_threshold(0.01) == pytest.approx(200.0)
    assert sgd_stability_threshold(0.01, momentum=0.9) == pytest.approx(380.0)
    assert sgd_stability_threshold(0.01, momentum=0.9, nesterov=True) == pytest.approx(3.8 / (2.8 * 0.01))
    assert adam_stability_threshold(0.01, 0.9) == pytest.approx(3800.0)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3, betas=(0.8, 0.99))
    assert stability_threshold(opt) == pytest.approx(3.6 / (0.2 * 1e-3))
    rms = torch.optim.RMSprop([torch.zeros(1, requires_grad=True)], lr=1e-2, momentum=0.5)
    assert stability_threshold(rms) == pytest.approx(300.0)
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3, momentum=0.9)
    assert max_stable_lr(sgd, 50.0) * 50.0 == pytest.approx(3.8)


def test_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="-0.1"):
        sgd_stability_threshold(-0.1)
    with pytest.raises(ValueError, match="momentum.*1.5"):
        sgd_stability_threshold(0.1, momentum=1.5)
    with pytest.raises(TypeError, match="Adagrad"):
        stability_threshold(torch.optim.Adagrad([torch.zeros(1, requires_grad=True)]))
    with pytest.raises(IndexError, match="group=3"):
        stability_threshold(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), group=3)
    with pytest.raises(ValueError, match="nan"):
        max_stable_lr(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), float("nan"))
