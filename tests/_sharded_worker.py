"""A ModelParallelStrategy (FSDP2) run on CPU with two processes, launched by ``tests/test_sharded.py``.

``ModelParallelStrategy`` re-runs this script in subprocesses (like ``ddp``), so the work is guarded by
``__main__`` and the results are written by rank 0 to the JSON path given on the command line: the monitor's logged
values at step 0 and step 2, the global curvature batch (gathered from both ranks), the initial parameters, the
learning rates the scheduler set, and the state restored from a sharded checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import HessianEigenvalueMonitor, SharpnessAwareLR


def make_data(n: int = 256) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    w = torch.randn(12, 4, generator=g)
    return x, (x @ w).argmax(1)


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def loss_fn(module: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(module.net(x), y)


class Sharded(pl.LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.net = make_net()
        self.optimizer_name = optimizer

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return loss_fn(self, batch)

    def curvature_loss(self, batch: Any) -> Tensor:
        return loss_fn(self, batch)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": SharpnessAwareLR(opt), "interval": "step"}}


class Record(pl.Callback):
    """Collects, on every rank, what the checks need."""

    def __init__(self, monitor: HessianEigenvalueMonitor) -> None:
        self.monitor = monitor
        self.values: dict[int, dict[str, float]] = {}
        self.lrs: list[float] = []
        self.batch: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if self.batch is None:
            self.batch = self.monitor._source.get(None)  # this rank's shard of the fixed curvature batch
        step = self.monitor.last_step
        if step >= 0 and step not in self.values:
            self.values[step] = dict(self.monitor.last_metrics)


def main(out: Path, optimizer: str) -> None:
    x, y = make_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    monitor = HessianEigenvalueMonitor(every_n_steps=2, k=2, tol=1e-5, num_examples=64, log_histogram=False)
    record = Record(monitor)
    ckpt_dir = out.parent / f"ckpt-{optimizer}"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[monitor, record],
    )
    trainer.fit(Sharded(optimizer), loader)
    ckpt = ckpt_dir / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    # the global curvature batch: each rank drew its shard of the fixed batch
    local = record.batch
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, (local[0].tolist(), local[1].tolist()))
    # resume: a fresh trainer restores the scheduler and the monitor from the sharded checkpoint
    monitor2 = HessianEigenvalueMonitor(every_n_steps=2, k=2, tol=1e-5, num_examples=64, log_histogram=False)
    trainer2 = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[monitor2],
    )
    module2 = Sharded(optimizer)
    trainer2.fit(module2, loader, ckpt_path=ckpt)
    sched_state = trainer2.lr_scheduler_configs[0].scheduler.state_dict()
    if trainer.global_rank == 0:
        out.write_text(
            json.dumps(
                {
                    "values": {str(k): v for k, v in record.values.items()},
                    "batch": gathered,
                    "lrs": record.lrs,
                    "restored_sharpness": sched_state.get("sharpness"),
                    "restored_num_measurements": monitor2.num_measurements,
                    "history_before": monitor.history,
                    "history_after": monitor2.history,
                }
            )
        )


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2])
    finally:
        # Lightning leaves the gloo process group alive; its threads are still joinable when the interpreter exits,
        # which aborts the process ("terminate called without an active exception") in about one run in three.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
