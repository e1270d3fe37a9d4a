"""Finite-difference products across processes (``reduce_fn``, as under DDP): every process must reach the same
decisions. Each process searches the step for its own batch, so each has its own error estimate; before they were
combined, the processes' eigenvalue bounds (and so their stopping decisions) could differ while their products, all-
reduced, agreed: one process stopped, the other waited in the next all-reduce.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

WORLD = 2


def _problem(rank: int | None) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A tanh MLP; the global batch is 64 examples of varied scale, rank r holds rows r::2 (its own error estimates)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g) * torch.linspace(0.5, 6.0, 64)[:, None]
    y = torch.randint(0, 4, (64,), generator=g)
    if rank is None:
        return model, (x, y)
    return model, (x[rank::WORLD], y[rank::WORLD])


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _worker(rank: int, port: int, out: str) -> None:
    from lightning_curvature import hessian_eigenvalues
    from lightning_curvature.core.hvp import all_reduce_sum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        model, batch = _problem(rank)
        res = hessian_eigenvalues(
            model, _loss, batch, k=3, tol=1e-4, method="finite_difference", reduce_fn=all_reduce_sum, max_iter=80
        )
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "eigenvalues": res.eigenvalues.tolist(),
                    "bounds": res.error_bounds.tolist(),
                    "num_hvp": res.num_hvp,
                    "converged": res.converged,
                }
            )
        )
    finally:  # both processes reach the teardown together: a gloo group torn down alone can abort the other
        dist.barrier()
        dist.destroy_process_group()


def test_processes_agree_on_finite_difference_measurements(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    except mp.ProcessExitedException:
        # both results written: what aborted is gloo's teardown after the measurement (see the worker), not it
        if not all((tmp_path / f"rank{r}.json").exists() for r in range(WORLD)):
            raise
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0 == r1  # same values, bounds, products and verdict on every process
    # and they are the global batch's: against float64 double backward in one process
    from lightning_curvature import hessian_eigenvalues

    model, (x, y) = _problem(None)
    ref = hessian_eigenvalues(model.double(), _loss, (x.double(), y), k=3, tol=1e-9, method="double_backward")
    err = (torch.tensor(r0["eigenvalues"], dtype=torch.float64) - ref.eigenvalues).abs()
    assert bool((err <= torch.tensor(r0["bounds"], dtype=torch.float64)).all()), (err, r0["bounds"])
