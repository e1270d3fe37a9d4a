"""``callbacks._clipping.clipped_gradients`` against torch's own clipping functions, and when it must not guess."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_curvature.callbacks._clipping import clipped_gradients


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)


class _OwnClipping(_Module):
    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, algorithm: Any = None) -> None:
        pass  # its own rule: nothing to anticipate


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _grads() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, generator=g), torch.randn(2, generator=g) * 5]


@pytest.mark.parametrize(("algorithm", "clip"), [("norm", 0.5), ("norm", 100.0), ("value", 0.3)])
def test_equals_torchs_clipping_of_the_same_gradients(algorithm: str, clip: float) -> None:
    grads = _grads()
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        torch.nn.utils.clip_grad_value_(params, clip)
    out = clipped_gradients(_trainer(gradient_clip_val=clip, gradient_clip_algorithm=algorithm), _Module(), grads)
    assert out is not None
    for got, p in zip(out, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=0)


def test_no_clipping_manual_optimization_or_a_modules_own_rule_give_none() -> None:
    assert clipped_gradients(_trainer(), _Module(), _grads()) is None
    manual = _Module()
    manual.automatic_optimization = False
    assert clipped_gradients(_trainer(gradient_clip_val=0.5), manual, _grads()) is None
    assert clipped_gradients(_trainer(gradient_clip_val=0.5), _OwnClipping(), _grads()) is None
