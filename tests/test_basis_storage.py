"""``basis_device``: the Krylov basis kept in host memory while the vectors stay on the parameters' devices.

There is no accelerator here, so these tests run the host-storage code path with both sides on the CPU (the copies
across are then no-ops) and check it against dense float64 references and the default storage; the transfer itself
is covered in ``test_cuda.py`` (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
from _reference import ce_loss, dense_eigvalsh, digits, mlp
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_curvature import HessianEigenvalueMonitor, hessian_eigenvalues, lanczos
from lightning_curvature.core._basis import Basis
from lightning_curvature.core.density import slq_density
from lightning_curvature.core.vectors import VectorSpace


def _space_and_vectors(m: int) -> tuple[VectorSpace, list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (3, 2, 2)]
    space = VectorSpace([torch.zeros(s, dtype=torch.float64) for s in shapes])
    return space, [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(m)]


def _dense(vectors: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vectors])


@pytest.mark.parametrize("storage", [None, "cpu"])
def test_basis_products_match_dense_arithmetic(storage: str | None) -> None:
    space, vectors = _space_and_vectors(9)
    basis = Basis(space, block_rows=4, storage=storage)  # 3 blocks, the last partly filled
    for v in vectors[:6]:
        basis.append(v)
    V = _dense(vectors[:6])  # independent reference: dense float64 matrix arithmetic
    w = [t.clone() for t in vectors[6]]
    wd = _dense([w])[0]
    torch.testing.assert_close(basis.dots(w), V @ wd, rtol=1e-13, atol=1e-13)
    c = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)
    basis.subtract(w, c)
    torch.testing.assert_close(_dense([w])[0], wd - V.T @ c, rtol=1e-13, atol=1e-13)
    C = torch.arange(12, dtype=torch.float64).reshape(2, 6) / 7
    torch.testing.assert_close(_dense(basis.combine(C)), C @ V, rtol=1e-13, atol=1e-12)
    local = basis.local(4)
    assert [t.device for t in local] == space.devices
    torch.testing.assert_close(_dense([local])[0], V[4], rtol=0, atol=0)
    basis.rotate_(C[:, :6].contiguous())
    assert len(basis) == 2
    torch.testing.assert_close(_dense([basis.local(j) for j in range(2)]), C @ V, rtol=1e-13, atol=1e-12)
    expected = torch.device(storage) if storage is not None else space.devices[0]
    assert all(t.device == expected for t in basis.vector(0))


def test_lanczos_with_host_basis_matches_eigh_and_the_default_storage() -> None:
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    eigs = torch.cat([torch.tensor([9.0, 8.5, 8.2, 8.0, 7.9]), torch.rand(295, generator=g, dtype=torch.float64) * 7])
    A = (Q * eigs) @ Q.T
    ref = torch.linalg.eigvalsh(A).flip(0)[:4]
    for max_vectors in (None, 14):
        default = lanczos(A, k=4, tol=1e-8, max_iter=300, max_vectors=max_vectors, return_eigenvectors=True)
        host = lanczos(
            A, k=4, tol=1e-8, max_iter=300, max_vectors=max_vectors, return_eigenvectors=True, basis_device="cpu"
        )
        assert host.converged and host.num_matvecs == default.num_matvecs
        err = (host.eigenvalues - ref).abs()
        assert torch.all(err <= host.error_bounds + 1e-12) and torch.all(err <= 1e-8 * ref)
        torch.testing.assert_close(host.eigenvalues, default.eigenvalues, rtol=1e-12, atol=0)
        assert host.eigenvectors is not None
        residual = A @ host.eigenvectors.T - host.eigenvectors.T * host.eigenvalues
        assert float(residual.norm(dim=0).max()) < 1e-3


def test_hessian_eigenvalues_with_host_basis_and_block_warm_start_match_the_dense_hessian() -> None:
    model = mlp(hidden=12)
    batch = digits(64)
    ref = dense_eigvalsh(model, batch)[:3]
    cold = hessian_eigenvalues(
        model, ce_loss, batch, k=3, tol=1e-6, max_vectors=10, basis_device="cpu", return_warm_start=True
    )
    assert cold.converged
    torch.testing.assert_close(cold.eigenvalues, ref, rtol=1e-6, atol=1e-9)
    assert cold.warm_start is not None
    warm = hessian_eigenvalues(model, ce_loss, batch, k=3, tol=1e-6, v0=cold.warm_start, basis_device="cpu")
    assert warm.converged and warm.num_hvp < cold.num_hvp  # the Davidson warm start with host storage
    torch.testing.assert_close(warm.eigenvalues, ref, rtol=1e-6, atol=1e-9)


def test_density_with_host_basis_equals_the_default() -> None:
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
    A = (Q * torch.linspace(-1.0, 3.0, 80, dtype=torch.float64)) @ Q.T
    default = slq_density(A, num_probes=2, num_iters=30)
    host = slq_density(A, num_probes=2, num_iters=30, basis_device="cpu")
    torch.testing.assert_close(host.nodes, default.nodes, rtol=1e-10, atol=1e-10)
    assert abs(host.trace - float(torch.trace(A))) < 0.25 * abs(float(torch.trace(A)))


@pytest.mark.parametrize("bad", ["bogus", "cuda:x", 3, 1.5, "meta"])
def test_a_bad_basis_device_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="basis_device"):
        lanczos(torch.eye(3, dtype=torch.float64), k=1, basis_device=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="basis_device"):
        hessian_eigenvalues(mlp(hidden=3), ce_loss, digits(8), basis_device=bad)  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="basis_device"):
        HessianEigenvalueMonitor(basis_device=bad)  # type: ignore[arg-type]


def test_monitor_with_host_basis_logs_what_the_default_logs(tmp_path) -> None:
    from conftest import TinyClassifier, classification_loader, make_trainer, random_tensors

    x, y = random_tensors(64)
    values = []
    for basis_device in (None, "cpu"):
        torch.manual_seed(0)
        monitor = HessianEigenvalueMonitor(
            every_n_steps=2, k=2, num_examples=32, compute_density=True, density_num_iters=10, basis_device=basis_device
        )
        trainer = make_trainer(tmp_path / str(basis_device), max_steps=5, callbacks=[monitor])
        trainer.fit(TinyClassifier(), classification_loader(x, y, seed=0))
        assert monitor.last_sharpness is not None
        kept = [t for v in monitor._warm_start[0] for t in v]
        assert kept and all(t.device.type == "cpu" for t in kept)
        values.append(monitor.last_sharpness)
    assert values[1] == pytest.approx(values[0], rel=1e-5)
