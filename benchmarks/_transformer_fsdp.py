"""Part ``fsdp`` of ``bench_transformer.py``: the 3M GPT under ``ModelParallelStrategy`` (FSDP2) with 2 processes.

``ModelParallelStrategy`` re-runs this script in its processes (like ``ddp``), so the work is guarded by
``__main__``; rank 0 writes the gathered per-rank figures to the JSON path given on the command line::

    python benchmarks/_transformer_fsdp.py OUT.json STEPS CURVATURE_EXAMPLES   # two 100-step fits, 2 processes
    python benchmarks/_transformer_fsdp.py --unsharded CURVATURE_EXAMPLES     # one process, prints JSON

Each process runs one thread. The global training batch is 16 windows (8 per rank); the monitor's fixed curvature
batch has ``CURVATURE_EXAMPLES`` windows in total (half per rank). The unsharded run measures once (step 0) with the
same monitor and ``method="finite_difference"``, the method FSDP2 forces, on the same first windows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _transformer_common import (
    SIZES,
    FitClock,
    GPTModule,
    MemoryProbedMonitor,
    curvature_loss,
    num_params,
    text_windows,
    threads,
)
from torch.utils.data import DataLoader, TensorDataset

SIZE = "3M"
GLOBAL_BATCH = 16


class ShardedGPT(GPTModule):
    """The GPT with ``fully_shard`` on every block and at the root (FSDP2)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)


def _loader(steps: int, per_process: int) -> DataLoader:
    x, y = text_windows(steps * GLOBAL_BATCH)
    return DataLoader(TensorDataset(x, y), batch_size=per_process, shuffle=False)


def _trainer(steps: int, callbacks: list[Any], sharded: bool) -> pl.Trainer:
    from lightning.pytorch.strategies import ModelParallelStrategy

    kw: dict[str, Any] = (
        {"devices": 2, "strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}
        if sharded
        else {"devices": 1}
    )
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks, **kw,
    )  # fmt: skip


def _monitor(curv: int, **kw: Any) -> MemoryProbedMonitor:
    return MemoryProbedMonitor(loss_fn=curvature_loss, num_examples=curv, log_histogram=False, prog_bar=False, **kw)


def sharded(out: Path, steps: int, curv: int) -> None:
    threads()
    d, layers, _ = SIZES[SIZE]
    clock = FitClock()
    trainer = _trainer(steps, [clock], sharded=True)
    trainer.fit(ShardedGPT(d, layers), _loader(steps, GLOBAL_BATCH // 2))
    fit_base = clock.seconds
    monitor = _monitor(curv)
    trainer2 = _trainer(steps, [clock, monitor], sharded=True)  # the clock first: it starts before step 0
    module = ShardedGPT(d, layers)
    trainer2.fit(module, _loader(steps, GLOBAL_BATCH // 2))
    fit_monitor = clock.seconds
    step_s = fit_base / steps
    last = monitor.records[-1]
    gap = monitor.next_step - last["step"]
    mine = {
        "rank": trainer2.global_rank,
        "fit_s_base": fit_base,
        "fit_s_monitor": fit_monitor,
        "step_s": step_s,
        "measure_time_s": monitor.measure_time_s,
        "train_time_s": monitor.train_time_s,
        "measuring_share": monitor.measure_time_s / monitor.train_time_s,
        "num_measurements": monitor.num_measurements,
        "planned_gap": gap,
        "planned_overhead": monitor._last_measure_s / (gap * step_s),
        "measurements": monitor.records,
        "local_params": sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in module.parameters()),
    }
    gathered: list[Any] = [None] * trainer2.world_size
    torch.distributed.all_gather_object(gathered, mine)
    if trainer2.global_rank == 0:
        res = {"world_size": trainer2.world_size, "steps": steps, "global_batch": GLOBAL_BATCH,
               "curvature_examples": curv, "ranks": gathered}  # fmt: skip
        out.write_text(json.dumps(res, indent=1))


def unsharded(curv: int) -> None:
    threads()
    d, layers, _ = SIZES[SIZE]
    monitor = _monitor(curv, every_n_steps=1, method="finite_difference")
    module = GPTModule(d, layers)
    _trainer(1, [monitor], sharded=False).fit(module, _loader(1, GLOBAL_BATCH))
    print(json.dumps({"num_params": num_params(module), "measurement": monitor.records[0]}))


if __name__ == "__main__":
    if sys.argv[1] == "--unsharded":
        unsharded(int(sys.argv[2]))
    else:
        try:
            sharded(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
        finally:
            # Lightning leaves the gloo process group alive; without this the interpreter sometimes aborts at exit
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
