"""Lanczos and power iteration on explicit matrices, against torch.linalg.eigvalsh."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_curvature import NonFiniteCurvatureError, lanczos, power_iteration, warm_start_vector


def _sym(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    n = eigs.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return Q @ torch.diag(eigs.double()) @ Q.T


def _outlier_spectrum(n: int, seed: int) -> torch.Tensor:
    """Network-like: ten outliers over a bulk near zero, some negative."""
    g = torch.Generator().manual_seed(seed)
    outliers = torch.tensor([50.0, 31.0, 20.0, 15.0, 12.0, 11.0, 10.0, 9.0, 8.0, 7.0])
    return torch.cat([outliers, torch.randn(n - 10, generator=g, dtype=torch.float64)])


CASES = [
    {"name": "outliers-n=100", "eigs": lambda: _outlier_spectrum(100, 1)},
    {"name": "outliers-n=400", "eigs": lambda: _outlier_spectrum(400, 2)},
    {
        "name": "heavy-tail-n=200",
        "eigs": lambda: torch.randn(200, generator=torch.Generator().manual_seed(3)).abs() ** 3,
    },
    {"name": "cluster", "eigs": lambda: torch.cat([torch.tensor([10.0, 9.99, 9.9, 9.5, 9.0]), torch.rand(95) * 3 - 1])},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("k", [1, 5], ids=lambda k: f"k={k}")
@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed={s}")
def test_top_k_within_tolerance(case: dict, k: int, seed: int) -> None:
    A = _sym(case["eigs"](), seed)
    ref = torch.linalg.eigvalsh(A).flip(0)[:k]
    res = lanczos(A, k=k, tol=1e-3, max_iter=200, seed=seed)
    assert res.converged
    rel = ((res.eigenvalues - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-3, rel
    # the reported bounds against the true error: test_error_bounds_cover_the_error (not for "cluster", see there)


@pytest.mark.parametrize("k", [1, 3])
def test_smallest(k: int) -> None:
    A = _sym(_outlier_spectrum(120, 5), 0)
    ref = torch.linalg.eigvalsh(A)[:k]
    res = lanczos(A, k=k, which="smallest", tol=1e-6, max_iter=120)
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-5, atol=1e-8)


def test_callable_and_eigenvectors() -> None:
    A = _sym(_outlier_spectrum(60, 0), 4)
    evals, evecs = torch.linalg.eigh(A)
    res = lanczos(lambda v: A @ v, 60, k=2, tol=1e-10, max_iter=60, return_eigenvectors=True, dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, evals.flip(0)[:2], rtol=1e-9, atol=0)
    assert res.eigenvectors is not None
    for i in range(2):
        u, v = evecs[:, -1 - i], res.eigenvectors[i]
        torch.testing.assert_close(v * torch.sign(v @ u), u, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            torch.linalg.vector_norm(A @ v - res.eigenvalues[i] * v), res.residuals[i], atol=1e-8, rtol=1e-3
        )


def test_kato_temple_stops_before_residual_rule() -> None:
    A = _sym(_outlier_spectrum(400, 7), 1)
    kt = lanczos(A, k=5, tol=1e-3, max_iter=200, rule="kato_temple")
    rr = lanczos(A, k=5, tol=1e-3, max_iter=200, rule="residual")
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    for r in (kt, rr):
        assert ((r.eigenvalues - ref).abs() / ref).max() <= 1e-3
    assert kt.num_matvecs <= rr.num_matvecs


def test_warm_start_needs_fewer_products() -> None:
    eigs = _outlier_spectrum(300, 3)
    A = _sym(eigs, 0)
    cold = lanczos(A, k=5, tol=1e-3, max_iter=200, return_warm_start=True)
    B = A + 1e-3 * _sym(torch.randn(300, generator=torch.Generator().manual_seed(9)), 2)  # the spectrum moved a little
    assert cold.warm_start is not None
    warm = lanczos(B, k=5, tol=1e-3, max_iter=200, v0=cold.warm_start)
    again = lanczos(B, k=5, tol=1e-3, max_iter=200)
    ref = torch.linalg.eigvalsh(B).flip(0)[:5]
    assert ((warm.eigenvalues - ref).abs() / ref).max() <= 1e-3
    assert warm.num_matvecs <= 0.6 * again.num_matvecs, (warm.num_matvecs, again.num_matvecs)
    assert warm.warm_start is None and cold.warm_start.shape == (6, 300)


def test_warm_start_vector_is_normalised_sum() -> None:
    V = torch.eye(4, dtype=torch.float64)[:2]
    v = warm_start_vector(V, noise=0.0)
    torch.testing.assert_close(v, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) / 2**0.5)


def test_power_iteration_matches_top() -> None:
    A = _sym(torch.tensor([4.0, 1.0, 0.5, -0.3]), 0)
    res = power_iteration(A, tol=1e-12, max_iter=500)
    assert math.isclose(res.eigenvalues.item(), 4.0, rel_tol=1e-9)


def test_invariant_start_subspace_does_not_hide_the_top_eigenvalue() -> None:
    # v0 is an eigenvector of the *smallest* eigenvalue: its Krylov space is invariant after one product. Stopping
    # there would return 1 as "exact"; the search continues from a random orthogonal direction and finds 3.
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    res = lanczos(A, k=1, v0=torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert res.converged
    assert res.eigenvalues.item() == pytest.approx(3.0, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k"),
        ({"k": 5}, "exceeds"),
        ({"tol": 0.0}, "tol"),
        ({"which": "middle"}, "which"),
        ({"k": 2, "max_iter": 1}, "max_iter"),
        ({"rule": "other"}, "rule"),
    ],
    ids=lambda x: str(x) if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lanczos(torch.eye(4, dtype=torch.float64), **kwargs)


def test_a_dense_matrix_must_be_real_and_symmetric_to_rounding() -> None:
    """[[1, 2], [0, 1]] (eigenvalues 1, 1) returned 2.96 with converged=True; an asymmetry at rounding level passes,
    and an integer matrix is taken in float64 (the product failed to cast before)."""
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), k=1)
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(30, 30, generator=gen)
    S = B + B.T
    rounding = S + 1e-6 * S.abs().max() * torch.randn(30, 30, generator=gen).triu(1)  # float32: below sqrt(eps)
    ref = torch.linalg.eigvalsh(S.double())[-1]
    assert abs(float(lanczos(rounding, k=1, tol=1e-6).eigenvalues[0]) - float(ref)) <= 1e-4 * abs(float(ref))
    res = lanczos(torch.tensor([[2, 1], [1, 2]]), k=2, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="real symmetric"):
        lanczos(torch.eye(3, dtype=torch.complex64), k=1)


def test_non_finite_product_raises() -> None:
    with pytest.raises(NonFiniteCurvatureError):
        lanczos(lambda v: v * float("nan"), 5, k=1)
    with pytest.raises(ValueError, match="non-zero"):
        lanczos(torch.eye(3), k=1, v0=torch.zeros(3))


def test_basis_stays_orthonormal_in_float32() -> None:
    """Full reorthogonalisation keeps the Lanczos basis orthonormal over many steps, even in float32."""
    from lightning_curvature.core.lanczos import lanczos_tridiagonal

    A = _sym(_outlier_spectrum(600, 1), 0).float()
    _, _, basis = lanczos_tridiagonal(A, torch.randn(600, generator=torch.Generator().manual_seed(0)), 150)
    V = basis.matrix()
    assert V.shape == (150, 600) and len(basis) == 150
    assert (V @ V.T - torch.eye(150)).abs().max().item() < 1e-5


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 5e-2], ids=lambda e: f"drift={e}")
@pytest.mark.parametrize("k", [1, 5], ids=lambda k: f"k={k}")
def test_warm_start_accuracy_under_drift(k: int, eps: float) -> None:
    """Warm starts from the previous Ritz block stay within tol of eigvalsh as the operator drifts."""
    A = _sym(_outlier_spectrum(300, 3), 3)
    first = lanczos(A, k=k, tol=1e-3, max_iter=200, return_warm_start=True)
    B = A + eps * _sym(torch.randn(300, generator=torch.Generator().manual_seed(7)), 4)
    ref = torch.linalg.eigvalsh(B).flip(0)[:k]
    warm = lanczos(B, k=k, tol=1e-3, max_iter=200, v0=first.warm_start)
    assert warm.converged
    assert ((warm.eigenvalues - ref).abs() / ref).max() <= 1e-3
    assert torch.all((warm.eigenvalues - ref).abs() <= warm.error_bounds + 1e-10)
    assert warm.num_matvecs < lanczos(B, k=k, tol=1e-3, max_iter=200).num_matvecs


def test_krylov_basis_grows_in_blocks_and_combines_exactly() -> None:
    """Memory follows the steps taken (blocks of 16 rows), and Ritz vectors from the blocks equal S^T V."""
    from lightning_curvature.core.lanczos import lanczos_tridiagonal

    A = _sym(_outlier_spectrum(300, 1), 0)
    alpha, beta, basis = lanczos_tridiagonal(A, torch.ones(300, dtype=torch.float64), 20)
    assert len(basis) == alpha.numel() == 20
    assert [b.shape[0] for b in basis._blocks[0]] == [16, 16]  # blocks of 16 rows, not a (max_iter, n) array
    V = basis.matrix()
    torch.testing.assert_close(V @ V.T, torch.eye(20, dtype=torch.float64), atol=1e-12, rtol=0)
    C = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.stack([v[0] for v in basis.combine(C)]), C @ V)
    # the basis satisfies the Lanczos relation A V_m^T = V_m^T T_m + β_m v_{m+1} e_m^T: check its first m - 1 columns
    T = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
    torch.testing.assert_close((A @ V.T)[:, :-1], (V.T @ T)[:, :-1], atol=1e-10, rtol=0)


def test_slq_without_reorthogonalisation_keeps_two_vectors_and_the_density() -> None:
    """The bare recurrence loses orthogonality (ghosts) but Gauss quadrature keeps the spectral measure."""
    from lightning_curvature import slq_density
    from lightning_curvature.core.lanczos import lanczos_tridiagonal

    A = _sym(_outlier_spectrum(400, 2), 5)
    alpha, _, bare = lanczos_tridiagonal(A, torch.ones(400, dtype=torch.float64), 120, reorthogonalize=False)
    assert alpha.numel() == 120 and bare is None  # no basis kept: two vectors at a time
    full = slq_density(A, num_probes=4, num_iters=120, sigma=0.3, seed=1)
    cheap = slq_density(A, num_probes=4, num_iters=120, sigma=0.3, seed=1, reorthogonalize=False)
    true = float(torch.trace(A))
    assert abs(cheap.trace - full.trace) <= 0.02 * abs(true) + 1e-9
    dt = float(full.grid[1] - full.grid[0])
    grid_cheap = torch.tensor([float(cheap.density[(cheap.grid - t).abs().argmin()]) for t in full.grid])
    assert float((grid_cheap - full.density).abs().sum()) * dt <= 0.05  # L1 distance of two unit-mass densities
    torch.testing.assert_close(cheap.weights.sum(1), torch.ones(4, dtype=torch.float64))


def test_refined_residual_is_the_smallest_residual_in_the_krylov_space() -> None:
    """σ_min(T̂ − θÎ) from the tridiagonal equals min ‖(A − θ)u‖ over unit u in the Krylov space (brute force)."""
    from lightning_curvature.core._ritz import refined_residuals, ritz_pairs
    from lightning_curvature.core.lanczos import lanczos_tridiagonal

    A = _sym(CASES[2]["eigs"](), 0)  # heavy-tailed spectrum, n = 200
    v0 = torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    alpha, beta, basis = lanczos_tridiagonal(A, v0, 20)
    V = basis.matrix()  # (m, n), orthonormal rows
    T = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
    coupling = torch.zeros(1, 20, dtype=torch.float64)
    coupling[0, -1] = beta[-1]  # A Vᵀ = Vᵀ T + β v_{m+1} e_mᵀ
    theta, S = ritz_pairs(T, "largest")
    resid = (beta[-1] * S[-1, :]).abs()
    shifts = torch.cat([theta[:6], torch.tensor([3.3, -0.7], dtype=torch.float64)])  # Ritz values and any shift
    refined = refined_residuals(T, coupling, shifts)
    eye = torch.eye(200, dtype=torch.float64)
    brute = torch.stack([torch.linalg.svdvals((A - s * eye) @ V.T)[-1] for s in shifts])
    torch.testing.assert_close(refined, brute, atol=1e-9, rtol=1e-7)
    assert torch.all(refined[:6] <= resid[:6] + 1e-12)  # the Ritz vector is one of the candidates
    assert (refined[:6] < 0.9 * resid[:6]).any()  # and here it is beaten


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c["name"])
@pytest.mark.parametrize("k", [1, 5], ids=lambda k: f"k={k}")
@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda s: f"seed={s}")
def test_error_bounds_cover_the_error(case: dict, k: int, seed: int) -> None:
    """The reported bound (Kato–Temple with refined-residual gaps) is never below the true error.

    Not for ``"cluster"``: λ₁, λ₂ = 10, 9.99 are closer than the Krylov space resolves in a few steps, and no bound
    can see an eigenvalue the space has not found (module docstring, "What no stopping rule can see").
    """
    A = _sym(case["eigs"](), seed)
    ref = torch.linalg.eigvalsh(A).flip(0)[:k]
    for tol in (1e-2, 1e-3, 1e-5):
        res = lanczos(A, k=k, tol=tol, max_iter=200, seed=seed)
        err = (ref - res.eigenvalues).abs()
        assert torch.all(err <= res.error_bounds + 1e-10), (tol, err, res.error_bounds)


def test_refined_coefficients_minimise_the_residual() -> None:
    """The warm start's refined vectors (from the Gram matrices T = BAB^T, G = BA²B^T) attain min ‖(A − θ)B^T y‖."""
    from lightning_curvature.core._ritz import refined_coefficients as _refined_coefficients

    A = _sym(_outlier_spectrum(200, 2), 1)
    B, _ = torch.linalg.qr(torch.randn(200, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    B = B.T  # (12, n) orthonormal rows
    W = B @ A
    T, G = B @ W.T, W @ W.T
    theta = torch.linalg.eigvalsh(T).flip(0)[:4]
    Y = _refined_coefficients(T, G, theta)
    got = torch.linalg.vector_norm(Y @ W - theta[:, None] * (Y @ B), dim=1)
    brute = torch.stack([torch.linalg.svdvals((A - t * torch.eye(200, dtype=torch.float64)) @ B.T)[-1] for t in theta])
    torch.testing.assert_close(torch.linalg.vector_norm(Y, dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(got, brute, atol=1e-10, rtol=1e-8)
