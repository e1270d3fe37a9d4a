"""Under DDP (``ddp_spawn`` on CPU, 2 processes) the monitors measure the global curvature batch.

Each process draws its shard of the fixed batch from the distributed sampler; every Hessian-vector product
(and the covariance statistics) is all-reduced, so both processes compute the single-process values of the
union of the shards, and only rank 0 writes.
"""

from __future__ import annotations

import copy
import csv
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _reference import ce_loss, dense_eigvalsh, per_example_grads
from conftest import DestroyProcessGroup, TinyClassifier, classification_loader, make_trainer, random_tensors
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DistributedSampler, TensorDataset

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor
from lightning_curvature.callbacks.cadence import CadencePlanner

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.usefixtures("torch_single_thread")]


class RankAgreement(pl.Callback):
    """Fails in a worker if the processes' latest measurements differ (module level: spawned workers import it)."""

    def __init__(self, *monitors: Any) -> None:
        self.monitors = monitors

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        for monitor in self.monitors:
            values = torch.tensor([v for _, v in monitor.history], dtype=torch.float64)
            gathered = pl_module.all_gather(values)
            assert torch.equal(gathered[0], gathered[1]), gathered


class RankSkewedPlanner(CadencePlanner):
    """Adaptive plans that disagree: rank 0 asks for a gap of 3 steps, rank 1 for 2."""

    def gap(self, t_measure: float, t_step: float) -> int:
        return 3 if torch.distributed.get_rank() == 0 else 2


class RankSkewedHessian(HessianEigenvalueMonitor):
    """A Hessian monitor whose processes plan differently (the broadcast must make them agree)."""

    min_gap = 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.planner = RankSkewedPlanner(self.every_n_steps, self.max_overhead, self.min_gap, self.max_gap)


class StepAgreement(pl.Callback):
    """Fails in a worker if the processes measured at different steps or hold different plans."""

    def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
        self.monitor = monitor

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        steps = torch.tensor([s for s, _ in self.monitor.history] + [self.monitor.next_step], dtype=torch.float64)
        gathered = pl_module.all_gather(steps)
        assert torch.equal(gathered[0], gathered[1]), gathered


def _shard(rank: int) -> Any:
    return iter(DistributedSampler(TensorDataset(torch.zeros(64)), num_replicas=2, rank=rank, shuffle=True, seed=0))


def test_ddp_spawn_measures_the_global_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyClassifier()
    initial = copy.deepcopy(model)
    x, y = random_tensors(n=64)
    hess = HessianEigenvalueMonitor(every_n_steps=2, k=2, tol=1e-6, num_examples=32)
    cov = GradientCovarianceMonitor(every_n_steps=2, k=2, num_examples=32)
    logger = CSVLogger(tmp_path, name="ddp")
    trainer = make_trainer(
        tmp_path, strategy="ddp_spawn", devices=2, max_steps=3, logger=logger,
        callbacks=[hess, cov, RankAgreement(hess, cov), DestroyProcessGroup()],
    )  # fmt: skip
    trainer.fit(model, classification_loader(x, y, batch_size=8, shuffle=False))
    (path,) = (tmp_path / "ddp").glob("version_*/metrics.csv")  # written by rank 0 only
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if r["step"] == "0"]
    logged = {k: float(v) for r in rows for k, v in r.items() if v and k != "step"}

    # Lightning gives the training loader a shuffling DistributedSampler (seed 0); the fixed batch is drawn at
    # epoch 0: rank r's first 16 examples. Their union is the global batch.
    idx = torch.cat([torch.tensor(list(_shard(r)))[:16] for r in range(2)])
    batch = (x[idx], y[idx])
    eig = dense_eigvalsh(initial.net, batch)  # dense float64 Hessian of the 32-example global batch
    assert logged["curvature/sharpness"] == pytest.approx(float(eig[0]), rel=1e-4)
    assert logged["curvature/eig_2"] == pytest.approx(float(eig[1]), rel=1e-4)
    # per-example loop: K = (1/N) Σ (g_i − ḡ)(g_i − ḡ)ᵀ; noise scale tr Σ / |G|² from the unbiased estimators
    # (McCandlish et al. 2018, A.1)
    G = per_example_grads(copy.deepcopy(initial.net).double(), ce_loss, batch[0].double(), batch[1])
    n, gbar = G.shape[0], G.mean(0)
    K = (G - gbar).T @ (G - gbar) / n
    small, big = float((G * G).sum(1).mean()), float(gbar @ gbar)
    noise_scale = (n * (small - big) / (n - 1)) / ((n * big - small) / (n - 1))
    assert logged["grad_cov/trace"] == pytest.approx(float(torch.trace(K)), rel=1e-4)
    assert logged["grad_cov/eig_1"] == pytest.approx(float(torch.linalg.eigvalsh(K)[-1]), rel=1e-3)
    assert logged["grad_cov/noise_scale"] == pytest.approx(noise_scale, rel=1e-4)
    assert "grad_cov/frobenius_norm" not in logged  # needs cross-process pairs
    # the progress-bar value comes back from rank 0 with the callback metrics
    assert "curvature/sharpness" in trainer.callback_metrics


def test_ddp_spawn_adaptive_cadence_follows_rank_zero(tmp_path: Path) -> None:
    """Local plans differ per rank; rank 0's is broadcast, so both measure (and all-reduce) at the same steps."""
    torch.manual_seed(0)
    hess = RankSkewedHessian(k=1, num_examples=32)
    logger = CSVLogger(tmp_path, name="ddp_adaptive")
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120))  # a disagreement would hang
    trainer = make_trainer(
        tmp_path,
        strategy=strategy,
        devices=2,
        max_steps=8,
        logger=logger,
        callbacks=[hess, StepAgreement(hess), DestroyProcessGroup()],
    )
    x, y = random_tensors(n=64)
    trainer.fit(TinyClassifier(), classification_loader(x, y, batch_size=8, shuffle=False))
    (path,) = (tmp_path / "ddp_adaptive").glob("version_*/metrics.csv")
    with open(path) as fh:
        steps = sorted(int(r["step"]) for r in csv.DictReader(fh) if r.get("curvature/sharpness"))
    # step 0; provisional re-plan at step 1 (min_gap) with rank 0's gap of 3; then every 3 steps
    assert steps == [0, 3, 6]
