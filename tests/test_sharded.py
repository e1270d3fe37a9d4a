"""FSDP2 (``ModelParallelStrategy`` with ``fully_shard``, two CPU processes over gloo): the monitor logs the sharpness
of the unsharded model on the global curvature batch, the scheduler is fed, and both survive a sharded checkpoint.

The run is a script of its own (``_sharded_worker.py``): the strategy re-launches the script in subprocesses.
``FSDPStrategy`` (FSDP1) needs CUDA: its test skips elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_curvature import hessian_eigenvalues
from lightning_curvature.core.preconditioner import predicted_first_step_preconditioner

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _sharded_worker as worker  # noqa: E402


def _run(tmp_path: Path, optimizer: str) -> dict:
    out = tmp_path / f"{optimizer}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(
        [sys.executable, str(HERE / "_sharded_worker.py"), str(out), optimizer],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _global_batch(result: dict) -> tuple[torch.Tensor, torch.Tensor]:
    xs = [torch.tensor(x) for x, _ in result["batch"]]
    ys = [torch.tensor(y) for _, y in result["batch"]]
    return torch.cat(xs), torch.cat(ys)


class _Plain(torch.nn.Module):
    """The unsharded model with the same initial parameters (``make_net`` is seeded)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = worker.make_net()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sharded_sharpness_equals_the_single_process_value(tmp_path: Path, optimizer: str) -> None:
    result = _run(tmp_path, optimizer)
    batch = _global_batch(result)
    assert batch[0].shape[0] == 64  # two shards of 32 examples
    model = _Plain()
    logged = result["values"]["0"]
    if optimizer == "adam":
        # step 0: the preconditioner Adam will use at its first step, from the global batch's gradient
        params = list(model.parameters())
        grads = torch.autograd.grad(worker.loss_fn(model, batch), params)
        opt = torch.optim.Adam(params, lr=0.05)
        precond = predicted_first_step_preconditioner(opt, params, grads)
        ref = hessian_eigenvalues(model, worker.loss_fn, batch, k=2, tol=1e-8, preconditioner=precond)
    else:
        ref = hessian_eigenvalues(model, worker.loss_fn, batch, k=2, tol=1e-8)
    for i in (1, 2):
        assert logged[f"curvature/eig_{i}"] == pytest.approx(float(ref.eigenvalues[i - 1]), rel=1e-3)
    assert "curvature/edge_ratio" in logged  # fed to the scheduler from step 0
    # the scheduler was fed and its state came back from the sharded checkpoint with the monitor's
    assert result["restored_sharpness"] == pytest.approx(result["values"]["2"]["curvature/sharpness"], rel=1e-12)
    assert result["history_after"][: len(result["history_before"])] == result["history_before"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="FSDPStrategy needs 2 GPUs")
def test_fsdp1_strategy_runs_the_monitor(tmp_path: Path) -> None:  # pragma: no cover - CUDA only
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_curvature import HessianEigenvalueMonitor

    x, y = worker.make_data()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = worker.make_net()

        def training_step(self, b, i):  # type: ignore[no-untyped-def]
            return worker.loss_fn(self, b)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = HessianEigenvalueMonitor(every_n_steps=2, k=1, num_examples=64)
    trainer = pl.Trainer(accelerator="cuda", devices=2, strategy=FSDPStrategy(), max_steps=3, logger=False,
                         callbacks=[monitor])  # fmt: skip
    trainer.fit(Module(), DataLoader(TensorDataset(x, y), batch_size=32))
    assert len(monitor.history) == 2 and all(v > 0 for _, v in monitor.history)
