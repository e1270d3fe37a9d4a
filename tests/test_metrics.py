"""GradientNoiseScale against direct formulas, across updates and merged (rank-like) states."""

from __future__ import annotations

import pickle

import pytest
import torch
from _reference import ce_loss, digits, mlp, per_example_grads

from lightning_curvature import gradient_covariance, per_example_gradient_chunks
from lightning_curvature.metrics import GradientNoiseScale


def test_pooled_over_batches_equals_one_big_batch() -> None:
    model = mlp(hidden=6)
    x, y = digits(60)
    G = per_example_grads(model, ce_loss, x, y)
    metric = GradientNoiseScale(num_params=G.shape[1])
    for start in range(0, 60, 17):  # uneven batches
        metric.update(G[start : start + 17])
    out = metric.compute()
    gbar = G.mean(0)
    trace = ((G - gbar) ** 2).sum(1).mean()
    torch.testing.assert_close(out["trace"], trace)
    torch.testing.assert_close(out["noise_scale"], trace / gbar.dot(gbar))
    assert out["num_examples"].item() == 60
    # agrees with the one-shot Gram computation
    cov = gradient_covariance(model, ce_loss, (x, y), k=1)
    assert cov.trace == pytest.approx(out["trace"].item(), rel=1e-10)


def test_merge_state_acts_like_a_cross_rank_sum() -> None:
    model = mlp(hidden=6)
    x, y = digits(40)
    with torch.enable_grad():
        from lightning_curvature import preserved_model_state

        with preserved_model_state(model):
            G = torch.cat(list(per_example_gradient_chunks(model, ce_loss, (x, y))))
    rank0, rank1, whole = (GradientNoiseScale(num_params=G.shape[1]) for _ in range(3))
    rank0.update(G[:25])
    rank1.update(G[25:])
    whole.update(G)
    rank0.merge_state(rank1)
    for key, value in whole.compute().items():
        torch.testing.assert_close(rank0.compute()[key], value)
    assert pickle.loads(pickle.dumps(whole)).compute()["num_examples"].item() == 40


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="num_params"):
        GradientNoiseScale(num_params=0)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        GradientNoiseScale(num_params=3).update(torch.zeros(2, 4))
