"""Under DDP (``ddp_spawn`` on CPU, 2 processes) every rank sets the same CDAT learning rate.

Each rank measures n and d on its own shard; the monitor averages them over ranks before feeding the scheduler,
so the lr is ``σ·mean(n)/mean(d)`` everywhere although the local measurements differ.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import DestroyProcessGroup
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature.callbacks import DirectionalCurvatureMonitor
from lightning_curvature.schedules import CurvatureDynamicsAwareLR

pytestmark = [pytest.mark.integration, pytest.mark.distributed]


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def curvature_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.curvature_loss(batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)
        sched = CurvatureDynamicsAwareLR(opt, sigma=2.0, ema_beta=0.0, eps=0.0, lr_max=None)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RecordingMonitor(DirectionalCurvatureMonitor):
    """Keeps each step's local (pre-reduction) measurement."""

    def __init__(self) -> None:
        super().__init__()
        self.local: list[tuple[float, float]] = []

    def _measure(self, *args: Any) -> tuple[float, float, float]:
        n, d, loss = super()._measure(*args)
        self.local.append((n, d))
        return n, d, loss


class RankCheck(pl.Callback):
    """After the monitor: the lr is σ·mean(n)/mean(d) over ranks, identical on every rank."""

    def __init__(self, monitor: RecordingMonitor) -> None:
        self.monitor = monitor

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        n, d = self.monitor.local[-1]
        lr = optimizer.param_groups[0]["lr"]
        gathered = pl_module.all_gather(torch.tensor([n, d, lr], dtype=torch.float64))
        n_all, d_all, lr_all = gathered[:, 0], gathered[:, 1], gathered[:, 2]
        assert bool((lr_all == lr_all[0]).all()), lr_all
        assert float(d_all[0]) != pytest.approx(float(d_all[1]), rel=1e-6)  # the shards differ
        assert lr == pytest.approx(2.0 * float(n_all.mean()) / float(d_all.mean()), rel=1e-6)


def test_ddp_spawn_ranks_share_the_lr(tmp_path: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    monitor = RecordingMonitor()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_steps=3,
        callbacks=[monitor, RankCheck(monitor), DestroyProcessGroup()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), loader)
