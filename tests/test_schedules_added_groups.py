"""Curvature-fed schedulers in Lightning's fine-tuning and tuning workflows: parameter groups added to the optimizer
after the scheduler was built (``add_param_group``, as ``BackboneFinetuning`` does when it unfreezes a backbone), and
the batch-size finder's trial steps, which run without callbacks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import (
    CurvatureDynamicsAwareLR,
    DirectionalCurvatureMonitor,
    GradientCovarianceMonitor,
    HessianEigenvalueMonitor,
    SharpnessAwareLR,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _two_layers() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    return nn.Linear(3, 3), nn.Linear(3, 1)


def test_sharpness_aware_lr_adopts_a_group_added_later() -> None:
    """It failed at its next step: "zip() argument 2 is shorter than argument 1"."""
    head, backbone = _two_layers()
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    sched = SharpnessAwareLR(opt)  # edge rule, SGD: start at 0.9 of the edge 2/λ, rise by at most e per step
    sched.observe_sharpness(4.0, step=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.45)
    opt.step()
    sched.step()
    opt.add_param_group({"params": backbone.parameters(), "lr": 0.1})
    sched.observe_sharpness(4.0, step=1)
    assert sched.edge_ratios() == pytest.approx([0.45 * 4 / 2, 0.1 * 4 / 2])
    for _ in range(3):
        opt.step()
        sched.step()
    # group 0 held at 0.9 of its edge; the added group keeps its own base lr 0.1 (below its edge 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.45, 0.1])
    assert opt.param_groups[1]["initial_lr"] == 0.1 and len(sched.base_lrs) == 2
    sched.observe_sharpness(40.0, step=4)  # sharper: past the edge of both groups, both reset below it
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.9 * 2 / 40, 0.9 * 2 / 40])
    state = sched.state_dict()
    fresh_opt = torch.optim.SGD([{"params": head.parameters()}, {"params": backbone.parameters()}], lr=1.0)
    fresh = SharpnessAwareLR(fresh_opt)
    fresh.load_state_dict(state)
    assert fresh.base_lrs == sched.base_lrs and fresh.min_lrs == [0.0, 0.0]


def test_an_added_group_gets_a_scalar_min_lr_and_none_of_a_per_group_list() -> None:
    head, backbone = _two_layers()
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    scalar = SharpnessAwareLR(opt, min_lr=0.3)
    opt.add_param_group({"params": backbone.parameters(), "lr": 0.1})
    scalar.observe_sharpness(400.0, step=0)  # the edge is 0.005: both groups held at their floor
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.3])
    head, backbone = _two_layers()
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    per_group = SharpnessAwareLR(opt, min_lr=[0.3])
    opt.add_param_group({"params": backbone.parameters(), "lr": 0.1})
    per_group.observe_sharpness(400.0, step=0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.9 * 2 / 400])


def test_cdat_keeps_the_ratio_an_added_group_joins_with() -> None:
    """It could not make any measurement after the group was added ("`group_scales` needs one entry per
    parameter group (2), got 1")."""
    head, backbone = _two_layers()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    sched = CurvatureDynamicsAwareLR(opt, ema_beta=0.0, lr_max=None)
    sched.observe_direction(numerator=1.0, denominator=4.0, step=0)  # η = σ·num/den = 2·1/4 = 0.5
    opt.step()
    sched.step()
    opt.add_param_group({"params": backbone.parameters(), "lr": 0.05})  # a tenth of group 0's lr
    assert sched.group_scales() == pytest.approx([1.0, 0.1])
    sched.observe_direction(numerator=1.0, denominator=1.0, step=1)  # η = 2
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.0, 0.2])


class _Finetuned(pl.LightningModule):
    def __init__(self, scheduler: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)
        self.scheduler = scheduler

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self.head(self.backbone(batch[0])), batch[1])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)
        sched = SharpnessAwareLR(opt) if self.scheduler == "sharpness" else CurvatureDynamicsAwareLR(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("scheduler", ["sharpness", "cdat"])
def test_backbone_finetuning_unfreezes_into_a_fed_scheduler(tmp_path: Path, scheduler: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=16)
    monitors: list[pl.Callback] = [HessianEigenvalueMonitor(every_n_steps=1, k=1)]
    if scheduler == "cdat":
        monitors.append(DirectionalCurvatureMonitor())
    trainer = make_trainer(
        tmp_path, max_epochs=3, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), *monitors]
    )
    module = _Finetuned(scheduler)
    trainer.fit(module, loader)
    sched = trainer.lr_scheduler_configs[0].scheduler
    opt = trainer.optimizers[0]
    assert trainer.global_step == 12 and len(opt.param_groups) == 2 and len(sched.base_lrs) == 2
    assert all(math.isfinite(float(g["lr"])) and float(g["lr"]) > 0 for g in opt.param_groups)
    if scheduler == "cdat":
        assert sched.num_skipped == 0 and sched.num_accepted == 12  # every step's measurement fed it
        ratio = float(opt.param_groups[1]["lr"]) / float(opt.param_groups[0]["lr"])
        assert ratio == pytest.approx(sched.group_scales()[1])
    else:
        assert sched.num_rejected == 0 and len(sched.lrs_in_use) == 2


class _Tunable(pl.LightningModule):
    def __init__(self, scheduler: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.scheduler = scheduler
        self.batch_size = 8

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def train_dataloader(self) -> DataLoader:
        torch.manual_seed(1)
        x = torch.randn(128, 4)
        return DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=self.batch_size)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = SharpnessAwareLR(opt) if self.scheduler == "sharpness" else CurvatureDynamicsAwareLR(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("scheduler", ["sharpness", "cdat"])
def test_the_batch_size_finder_steps_a_fed_scheduler_before_its_monitor_attaches(
    tmp_path: Path, scheduler: str
) -> None:
    """Lightning's batch-size finder runs trial steps with every callback removed: the scheduler raised "stepped
    but no sharpness was ever observed and no monitor is attached" although the run has its monitor."""
    from lightning.pytorch.tuner import Tuner

    monitor: pl.Callback = (
        HessianEigenvalueMonitor(every_n_steps=2, k=1) if scheduler == "sharpness" else DirectionalCurvatureMonitor()
    )
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[monitor])
    module = _Tunable(scheduler)
    Tuner(trainer).scale_batch_size(module, max_trials=2, steps_per_trial=2)
    trainer.fit(module)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 4 and sched.monitor_attached and sched.num_observations > 0
    # without a monitor that feeds it, the missing feed is still an error at the first step
    unfed = make_trainer(tmp_path, max_steps=2, callbacks=[GradientCovarianceMonitor(every_n_steps=1)])
    with pytest.raises(RuntimeError, match="no monitor is attached|never received a measurement"):
        unfed.fit(_Tunable(scheduler))
