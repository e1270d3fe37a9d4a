"""Models compiled with ``torch.compile``: compiled code has no double backward.

``method="auto"`` measures them with finite-difference products through the compiled code (no eager re-run);
``method="double_backward"`` runs their eager code for the measurement (exactly the uncompiled values).
``backend="aot_eager"`` goes through AOTAutograd, which is where double backward is missing, without needing a C++
compiler for Inductor.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _reference import dense_eigvalsh
from torch import Tensor, nn

from lightning_curvature import (
    HessianEigenvalueMonitor,
    gradient_covariance,
    hessian_eigenvalues,
    hessian_trace,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_torch_compile_wrapper_gives_the_eager_values():
    net, batch = _net(), _batch()
    compiled = torch.compile(net, backend="aot_eager")
    exact = dict(method="double_backward", tol=1e-6)
    eig, eig_c = (hessian_eigenvalues(m, _loss, batch, k=2, **exact) for m in (net, compiled))
    torch.testing.assert_close(eig_c.eigenvalues, eig.eigenvalues, rtol=0, atol=0)  # the same eager code
    auto = hessian_eigenvalues(compiled, _loss, batch, k=2, tol=1e-6)  # finite differences through compiled code
    assert auto.method == "finite_difference"
    torch.testing.assert_close(auto.eigenvalues, eig.eigenvalues, rtol=1e-4, atol=0)
    tr, tr_c = (hessian_trace(m, _loss, batch, num_samples=8, method="double_backward") for m in (net, compiled))
    assert tr_c.estimate == tr.estimate
    cov, cov_c = (gradient_covariance(m, _loss, batch, k=3) for m in (net, compiled))
    torch.testing.assert_close(cov_c.eigenvalues, cov.eigenvalues, rtol=0, atol=0)


def test_module_compiled_in_place_is_measured_and_stays_compiled():
    net, batch = _net(), _batch()
    expected = hessian_eigenvalues(net, _loss, batch, k=2, method="double_backward", tol=1e-6).eigenvalues
    net.compile(backend="aot_eager")
    compiled_call = net._compiled_call_impl
    for method in ("double_backward", "auto"):
        res = hessian_eigenvalues(net, _loss, batch, k=2, method=method, tol=1e-6)
        torch.testing.assert_close(res.eigenvalues, expected, rtol=0 if method != "auto" else 1e-4, atol=0)
    assert net._compiled_call_impl is compiled_call


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return _loss(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize(("product_dtype", "rel"), [(None, 1e-4), (torch.float64, 1e-6)])
def test_lightning_compiled_module_is_monitored(tmp_path, product_dtype, rel):
    """``trainer.fit(torch.compile(module))``: the monitor measures, training stays compiled. Float64 products
    (finite differences through the compiled code, recompiled for float64) agree with the float64 reference 100x
    more closely than float32 ones can."""
    x, y = _batch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    monitor = HessianEigenvalueMonitor(every_n_steps=2, k=1, tol=1e-6, product_dtype=product_dtype)

    class Reference(pl.Callback):  # λ_max of the dense float64 Hessian of the fixed batch, on the eager network
        def __init__(self) -> None:
            self.refs: dict[int, float] = {}

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            self.refs[trainer.global_step] = float(dense_eigvalsh(pl_module.net, monitor._source.get(None))[0])

    ref = Reference()
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[ref, monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = _Classifier()
    trainer.fit(torch.compile(module, backend="aot_eager"), loader)
    assert [s for s, _ in monitor.history] == [0, 2]
    assert [v for _, v in monitor.history] == pytest.approx([ref.refs[0], ref.refs[2]], rel=rel)
    assert float(trainer.callback_metrics["curvature/sharpness"]) == pytest.approx(ref.refs[2], rel=1e-4)
    assert monitor.last_method == "finite_difference"
    assert set(monitor.state_dict()["fd_step_ratio"]) == {0}  # the next search starts where this one ended
    assert module._compiler_ctx is not None and module.forward is not module._compiler_ctx["original_forward"]
