"""Evidence on real data at a reduced scale for the claims of ``examples/warmup_emerges.py`` and
``examples/cdat_vs_constant.py`` (digits, half squared error on one-hot targets, tanh MLP, one CPU thread).

The training loops come from ``examples/_training.py`` (the examples folder is put on ``sys.path``), so the tests
check the code the examples run.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
pytest.importorskip("sklearn")

from _digits import load_digits_data, make_mlp, minibatches
from _training import train_cdat, train_constant, train_sharpness_aware


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_constant_above_threshold_blows_up_while_sharpness_aware_trains() -> None:
    """300 digits (pixels in [0, 1]), tanh MLP 64-32-32-10 with the read-out initialised 10x too large (initial
    λ_max in the hundreds), full-batch GD at lr 0.02, about 5x the initial 2/λ_max, for 300 steps."""
    data = load_digits_data(300, seed=0, standardise=False).train_batch()
    lr = 0.02

    def model() -> torch.nn.Module:
        return make_mlp(depth=2, width=32, output_scale=10.0, seed=0)

    const = train_constant(model(), data, lr, steps=300)
    capped = train_sharpness_aware(model(), data, lr, steps=300, every=10)
    initial = capped.losses[0]
    first_sharpness = capped.sharpness[0][1]
    assert 2.0 / first_sharpness < lr / 3  # the base lr really is well above the threshold at the start
    # constant lr: the loss blows up by more than 10x before (maybe) settling in a worse place
    assert const.diverged or max(const.losses) > 10 * initial
    # SharpnessAwareLR: no blow-up, and a lower final loss
    assert not capped.diverged
    assert max(capped.losses) <= initial * (1 + 1e-6)
    assert capped.final_loss < 0.05 * initial
    assert capped.final_loss < const.final_loss
    # the cap applied from the first step and relaxed as the sharpness fell
    assert capped.lrs[0] == pytest.approx(0.9 * 2.0 / first_sharpness, rel=1e-6)
    assert capped.lrs[-1] > capped.lrs[0]


@pytest.mark.slow
def test_cdat_edge_beats_the_best_constant_lr_with_minibatches() -> None:
    """1,000 digits (standardised), tanh MLP 64-64-64-10 at PyTorch's default initialisation, batches of 128, 1500
    steps: CDAT σ = 2 (EMA 0.9) against the constant learning rates around the best one (1.6 diverges), scored by
    the mean full-batch loss over the last 20% of steps. About 4 s on one thread."""
    data = load_digits_data(1000, seed=0)
    batch = data.train_batch()

    def model() -> torch.nn.Module:
        return make_mlp(depth=2, width=64, seed=0)

    grid = {}
    for lr in (0.8, 1.0, 1.2, 1.4):
        const = train_constant(model(), batch, lr, 1500, batch_fn=minibatches(data, 128, seed=0))
        grid[lr] = const.late_loss()
    cdat = train_cdat(
        model(), batch, 1500, sigma=2.0, ema_beta=0.9, lr_max=10.0, batch_fn=minibatches(data, 128, seed=0)
    )
    best = min(grid, key=grid.__getitem__)
    assert 0.8 < best < 1.4, grid  # the grid brackets the best constant learning rate
    assert not cdat.diverged
    assert cdat.late_loss() < 0.8 * grid[best], (cdat.late_loss(), grid)
    # the tuned learning rate sits above the best constant one most of the time (where constants diverge)
    assert statistics.median(cdat.lrs) > best
