"""Hessian eigenvalues, products and trace of real networks against dense float64 Hessians."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _reference import Float64Head, TinyCNN, TinyTransformer, ce_loss, dense_hessian, digits, flat_params, mlp
from torch import Tensor, nn

from lightning_curvature import (
    HessianOperator,
    MultiBatch,
    NonFiniteCurvatureError,
    adaptive_preconditioner,
    gradient_covariance,
    gradient_start_vector,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
    hessian_vector_product,
    hutchpp_trace,
    lanczos,
    preconditioned_sharpness,
    top_subspace_overlap,
)


def _mlp_case() -> tuple[nn.Module, Any, Any]:
    return mlp(hidden=12), ce_loss, digits(64)


def _cnn_case() -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(1)
    return TinyCNN().double(), ce_loss, digits(48)


def _transformer_case() -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 11, (16, 5), generator=g)
    labels = torch.randint(0, 3, (16,), generator=g)
    return TinyTransformer().double(), ce_loss, (tokens, labels)


CASES = {"mlp-digits": _mlp_case, "cnn-digits": _cnn_case, "transformer": _transformer_case}


_DENSE: dict[str, torch.Tensor] = {}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, Any, Any, torch.Tensor]:
    model, loss_fn, batch = CASES[request.param]()
    if request.param not in _DENSE:  # the dense reference is the slow part: build it once per case
        _DENSE[request.param] = dense_hessian(model, loss_fn, batch)
    return model, loss_fn, batch, _DENSE[request.param]


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvp_matches_dense(case: tuple, method: str) -> None:
    model, loss_fn, batch, H = case
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = hessian_vector_product(model, loss_fn, batch, v, method=method)
    torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("start", ["auto", "gradient", "random"])
@pytest.mark.parametrize("k", [1, 5], ids=lambda k: f"k={k}")
def test_top_k_matches_dense(case: tuple, k: int, start: str) -> None:
    model, loss_fn, batch, H = case
    ref = torch.linalg.eigvalsh(H).flip(0)[:k]
    res = hessian_eigenvalues(model, loss_fn, batch, k=k, tol=1e-3, max_iter=200, start=start)
    assert res.converged
    assert ((res.eigenvalues - ref).abs() / ref.abs()).max() <= 1e-3
    assert res.num_hvp >= k


def test_most_negative(case: tuple) -> None:
    model, loss_fn, batch, H = case
    ref = torch.linalg.eigvalsh(H)[:1]
    res = hessian_eigenvalues(model, loss_fn, batch, k=1, which="smallest", tol=1e-6, max_iter=H.shape[0])
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-4, atol=1e-8)


def test_gradient_start_vector_mixes_gradient_and_the_default_random_start() -> None:
    g = torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    z = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(gradient_start_vector(g, seed=4), g / 5 + z / z.norm())
    # a zero gradient leaves the random half alone: the same vector lanczos draws for that seed
    A = torch.diag(torch.arange(5.0, dtype=torch.float64))
    zero = gradient_start_vector(torch.zeros(5, dtype=torch.float64), seed=4)
    torch.testing.assert_close(
        lanczos(A, k=1, v0=zero, seed=4).eigenvalues, lanczos(A, k=1, seed=4).eigenvalues, rtol=1e-14, atol=0
    )
    with pytest.raises(ValueError, match="flat gradient"):
        gradient_start_vector(torch.zeros(2, 2))


@pytest.mark.parametrize("method", ["double_backward", "finite_difference", "forward_over_reverse"])
def test_params_restricts_the_hessian_to_the_principal_block_of_those_parameters(method: str) -> None:
    """``params=[first weight, last bias]``: the eigenvalues of the dense Hessian's principal submatrix on exactly
    those entries (parameters in the model's order, whatever order they are given in)."""
    model, batch = mlp(hidden=5), digits(48)
    H = dense_hessian(model, ce_loss, batch)
    sizes = [p.numel() for p in model.parameters()]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    chosen = [3, 0]  # model[2].bias, model[0].weight
    rows = torch.cat([torch.arange(offsets[i], offsets[i] + sizes[i]) for i in sorted(chosen)])
    ref = torch.linalg.eigvalsh(H[rows][:, rows]).flip(0)[:3]
    params = [list(model.parameters())[i] for i in chosen]
    res = hessian_eigenvalues(model, ce_loss, batch, k=3, tol=1e-9, params=params, method=method)
    rtol = 1e-6 if method == "finite_difference" else 1e-9
    torch.testing.assert_close(res.eigenvalues, ref, rtol=rtol, atol=0)
    with pytest.raises(ValueError, match="`params` is empty"):
        hessian_eigenvalues(model, ce_loss, batch, params=[])
    with pytest.raises(ValueError, match="parameters of `model`"):
        hessian_eigenvalues(model, ce_loss, batch, params=[nn.Parameter(torch.zeros(3, dtype=torch.float64))])


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_a_single_parameter_model_has_its_closed_form_hessian_for_every_seed(method: str) -> None:
    """L(w) = mean((w·x − y)²) has H = 2·mean(x²). With one parameter the gradient start g/|g| + z/|z| is zero for
    every seed whose Gaussian has the other sign (it raised "start vector ... non-zero" for half the seeds)."""
    model = nn.Linear(1, 1, bias=False).double()
    x = torch.linspace(-1.0, 2.0, 16, dtype=torch.float64)[:, None]
    expected = float(2.0 * (x**2).mean())
    for target in (3.0, -3.0):  # both signs of the gradient
        batch = (x, target * x)
        for seed in range(4):
            res = hessian_eigenvalues(model, _mse, batch, k=1, seed=seed, method=method)
            assert res.converged
            assert abs(res.sharpness - expected) <= 1e-6 * expected, (target, seed, res.sharpness, expected)
    for sign in (1.0, -1.0):  # the start itself: the gradient alone where the two halves cancel
        g = torch.tensor([sign], dtype=torch.float64)
        v = gradient_start_vector(g, seed=next(s for s in range(8) if _cancels(g, s)))
        torch.testing.assert_close(v, g)


def _mse(m: nn.Module, b: Any) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


def _cancels(g: torch.Tensor, seed: int) -> bool:
    z = torch.randn(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return bool(torch.sign(z) == -torch.sign(g))


def test_auto_start_is_the_gradient_for_k1_and_a_gaussian_for_more() -> None:
    model, loss_fn, batch = _mlp_case()
    for k, expected in ((1, "gradient"), (5, "random")):
        auto = hessian_eigenvalues(model, loss_fn, batch, k=k, seed=3)
        chosen = hessian_eigenvalues(model, loss_fn, batch, k=k, seed=3, start=expected)
        other = hessian_eigenvalues(
            model, loss_fn, batch, k=k, seed=3, start={"gradient": "random"}.get(expected, "gradient")
        )
        assert torch.equal(auto.eigenvalues, chosen.eigenvalues) and auto.num_hvp == chosen.num_hvp
        assert not torch.equal(auto.eigenvalues, other.eigenvalues)  # the two starts give different last digits


def test_gradient_start_needs_fewer_products_when_the_gradient_is_along_the_top() -> None:
    """Quadratic ½(w−w*)ᵀA(w−w*) with w−w* mostly along A's top eigenvector: the gradient start finds λ₁ sooner."""
    n = 200
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.cat([torch.tensor([10.0, 9.7, 9.5]), torch.rand(n - 3, generator=gen, dtype=torch.float64) * 9])
    A = Q @ torch.diag(lam) @ Q.T
    model = nn.Linear(n, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(Q[:, 0] + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64))

    def loss_fn(m: nn.Module, _: Any) -> torch.Tensor:
        w = m.weight.reshape(-1)
        return 0.5 * w @ A @ w

    batch = torch.zeros(1, n, dtype=torch.float64)
    by_grad = hessian_eigenvalues(model, loss_fn, batch, k=1, tol=1e-6, max_iter=n)
    by_rand = hessian_eigenvalues(model, loss_fn, batch, k=1, tol=1e-6, max_iter=n, start="random")
    for res in (by_grad, by_rand):
        assert abs(res.sharpness - 10.0) <= 1e-5
    assert by_grad.num_hvp < by_rand.num_hvp, (by_grad.num_hvp, by_rand.num_hvp)


def test_trace_estimators_cover_truth(case: tuple) -> None:
    model, loss_fn, batch, H = case
    true = torch.trace(H).item()
    for estimator in ("hutch++", "hutchinson"):
        res = hessian_trace(model, loss_fn, batch, num_samples=60, estimator=estimator, seed=3)
        assert res.num_hvp <= 60
        assert abs(res.estimate - true) <= 4 * res.std_error + 1e-9, (estimator, res, true)


def test_the_trace_standard_error_is_calibrated_as_a_student_t() -> None:
    """200 seeds of Hutch++ with 30 products (10 random samples) on a network-like spectrum: the 95% interval of
    Student's t with 9 degrees of freedom (±2.26 standard errors, as ``TraceResult`` documents) misses the exact
    trace in about 5% of the seeds; ±1 standard error would miss far more often."""
    gen = torch.Generator().manual_seed(0)
    lam = torch.cat(
        [torch.linspace(8.0, 3.0, 10, dtype=torch.float64), torch.rand(90, generator=gen, dtype=torch.float64)]
    )
    Q, _ = torch.linalg.qr(torch.randn(100, 100, generator=gen, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    trace = float(lam.sum())

    def z_score(seed: int) -> float:
        res = hutchpp_trace(A, 30, seed=seed)
        return (res.estimate - trace) / res.std_error

    z = torch.tensor([z_score(s) for s in range(200)])
    assert 0.01 <= float((z.abs() > 2.262).double().mean()) <= 0.10
    assert float((z.abs() > 1.0).double().mean()) >= 0.2


def test_too_few_trace_samples_fail_naming_num_samples_before_any_work() -> None:
    model, _, batch = _mlp_case()
    calls = []

    def counted(m: nn.Module, b: Any) -> torch.Tensor:
        calls.append(1)
        return ce_loss(m, b)

    for bad in (2, 0, 3.0, "10", True):
        with pytest.raises(ValueError, match="`num_samples` must be an integer >= 3"):
            hessian_trace(model, counted, batch, num_samples=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_samples` must be an integer >= 1"):
        hessian_trace(model, counted, batch, num_samples=0, estimator="hutchinson")
    assert not calls  # refused before the operator evaluated the loss
    assert hessian_trace(model, ce_loss, batch, num_samples=1, estimator="hutchinson").num_hvp == 1


def test_numpy_integers_count_as_integers_in_the_functions() -> None:
    """``k=np.int64(2)`` was refused as "must be a positive integer, got np.int64(2)"; same results as Python ints."""
    np = pytest.importorskip("numpy")
    model, _, batch = _mlp_case()
    a = hessian_eigenvalues(model, ce_loss, batch, k=np.int64(2), max_vectors=np.int32(9))
    b = hessian_eigenvalues(model, ce_loss, batch, k=2, max_vectors=9)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_hvp == b.num_hvp
    assert hessian_trace(model, ce_loss, batch, num_samples=np.int64(6)).num_hvp == 6
    density = hessian_spectral_density(model, ce_loss, batch, num_probes=np.int64(1), num_iters=np.int16(4))
    assert density.num_hvp == 4
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        hessian_eigenvalues(model, ce_loss, batch, k=np.float64(2.0))


def test_trace_deflation_reduces_error_and_stays_honest() -> None:
    model, loss_fn, batch = _mlp_case()
    H = dense_hessian(model, loss_fn, batch)
    true = torch.trace(H).item()
    eig = hessian_eigenvalues(model, loss_fn, batch, k=20, tol=1e-8, max_iter=300, return_eigenvectors=True)
    plain = hessian_trace(model, loss_fn, batch, num_samples=30, estimator="hutchinson", seed=1)
    deflated = hessian_trace(model, loss_fn, batch, num_samples=30, deflate=eig, seed=1)
    assert abs(deflated.estimate - true) <= 4 * deflated.std_error
    assert deflated.std_error <= plain.std_error


def test_deflation_by_every_eigenpair_is_exact() -> None:
    from lightning_curvature import hutchinson_trace

    A = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = A + A.T
    evals, evecs = torch.linalg.eigh(A)
    res = hutchinson_trace(A, num_matvecs=3, deflate=evecs.T, deflate_eigenvalues=evals)
    assert abs(res.estimate - torch.trace(A).item()) < 1e-10


def test_hutchinson_standard_error_is_honest() -> None:
    """Across 40 seeds, |error| <= 2 SE in at least 85% of runs (95% nominal)."""
    model, loss_fn, batch = _mlp_case()
    true = torch.trace(dense_hessian(model, loss_fn, batch)).item()
    hits = 0
    for seed in range(40):
        r = hessian_trace(model, loss_fn, batch, num_samples=20, estimator="hutchinson", seed=seed)
        hits += abs(r.estimate - true) <= 2 * r.std_error
    assert hits >= 34, hits


def test_spectral_density_integrates_to_one_and_gives_trace() -> None:
    model, loss_fn, batch = _mlp_case()
    H = dense_hessian(model, loss_fn, batch)
    evals = torch.linalg.eigvalsh(H)
    res = hessian_spectral_density(model, loss_fn, batch, num_probes=8, num_iters=40, seed=0)
    mass = torch.trapezoid(res.density, res.grid).item()
    assert abs(mass - 1.0) < 1e-3
    assert res.grid.min() <= evals.min() and res.grid.max() >= evals.max() - 1e-6
    assert abs(res.trace - evals.sum().item()) < 0.25 * evals.abs().sum().item()
    torch.testing.assert_close(res.weights.sum(1), torch.ones(8, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_multibatch_equals_concatenated_batch() -> None:
    model, loss_fn, (x, y) = _mlp_case()
    whole = hessian_eigenvalues(model, loss_fn, (x, y), k=3, tol=1e-8, max_iter=200)
    parts = MultiBatch([(x[:10], y[:10]), (x[10:40], y[10:40]), (x[40:], y[40:])])
    split = hessian_eigenvalues(model, loss_fn, parts, k=3, tol=1e-8, max_iter=200)
    torch.testing.assert_close(split.eigenvalues, whole.eigenvalues, rtol=1e-8, atol=1e-10)


def test_gradient_is_computed_once_per_operator() -> None:
    """Without a reused graph each gradient costs a pass per batch (and an all-reduce under DDP): done once."""
    model, loss_fn, (x, y) = _mlp_case()
    parts = MultiBatch([(x[:10], y[:10]), (x[10:], y[10:])])
    with HessianOperator(model, loss_fn, parts, method="double_backward") as H:
        first = H.gradient()
        assert H.num_grad == 2 and H.gradient() is first and H.num_grad == 2
        flat = H.flatten(first)
    loss = loss_fn(model, (x, y))
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(flat, ref, rtol=1e-10, atol=1e-12)


def test_dict_batch_and_reduce_hook() -> None:
    model, _, (x, y) = _mlp_case()

    def loss_fn(m: nn.Module, b: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b["x"]), b["y"])

    calls = []

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:  # a "world" of two identical ranks
        calls.append(t.numel())
        return 2 * t

    H = dense_hessian(model, ce_loss, (x, y))
    v = torch.ones(H.shape[0], dtype=torch.float64)
    hv = hessian_vector_product(model, loss_fn, {"x": x, "y": y}, v, reduce_fn=reduce_fn)
    torch.testing.assert_close(hv, H @ v)
    # one all-reduce per product: the example count and the sums (finite differences, as in auto's first-use
    # probe, add their three error sums to the same all-reduce)
    assert calls and set(calls) <= {1 + H.shape[0], 4 + H.shape[0]}


def test_half_precision_model_is_measured_in_float32() -> None:
    model, loss_fn, (x, y) = _mlp_case()
    ref = hessian_eigenvalues(model, loss_fn, (x, y), k=1, tol=1e-4).eigenvalues
    half = copy.deepcopy(model).to(torch.bfloat16)
    res = hessian_eigenvalues(half, loss_fn, (x.to(torch.bfloat16), y), k=1, tol=1e-4)
    assert res.eigenvalues.dtype == torch.float64
    torch.testing.assert_close(res.eigenvalues, ref, rtol=5e-2, atol=0)  # bf16 weights differ from fp64 ones


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "flags": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for x, y in zip(a["params"] + a["buffers"], b["params"] + b["buffers"]):
        assert torch.equal(x, y)
    for x, y in zip(a["grads"], b["grads"]):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a["flags"] == b["flags"]
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_measurements_leave_model_untouched(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 10))
    model.train()
    model[4].eval()  # a mixed-flag model: each flag must come back as it was
    x, y = digits(32, torch.float32)
    ce_loss(model, (x, y)).backward()  # .grad populated, as inside training
    before = _state(model)
    hessian_eigenvalues(model, ce_loss, (x, y), k=2, mode=mode, return_eigenvectors=True)
    hessian_trace(model, ce_loss, (x, y), num_samples=6, mode=mode)
    hessian_spectral_density(model, ce_loss, (x, y), num_probes=1, num_iters=5, mode=mode)
    _assert_same(before, _state(model))


@pytest.mark.parametrize("method", ["double_backward", "finite_difference", "forward_over_reverse"])
def test_a_pruned_layers_hook_made_weight_is_left_as_it_was(method: str) -> None:
    """``torch.nn.utils.prune`` keeps ``weight = weight_orig * weight_mask`` as a plain attribute that its forward
    pre-hook rewrites: a measurement left it computed from its own parameter copies (holding their graph; with
    finite differences, a shifted copy's values)."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    batch = digits(32, torch.float32)
    weight = model[0].weight
    res = hessian_eigenvalues(model, ce_loss, batch, k=1, tol=1e-4, method=method)
    hessian_trace(model, ce_loss, batch, num_samples=3, method=method)
    assert model[0].weight is weight and weight.grad_fn is not None  # the hook's own tensor, from weight_orig
    torch.testing.assert_close(model[0].weight, model[0].weight_orig * model[0].weight_mask, rtol=0, atol=0)
    masked = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()  # the mask by hand
    with torch.no_grad():
        for dst, src in zip(masked.parameters(), [model[0].weight, model[0].bias, model[2].weight, model[2].bias]):
            dst.copy_(src)
    mask = model[0].weight_mask.bool()
    H = dense_hessian(masked, ce_loss, (batch[0].double(), batch[1]))
    keep = torch.cat([mask.reshape(-1), torch.ones(H.shape[0] - mask.numel(), dtype=torch.bool)])
    ref = torch.linalg.eigvalsh(H[keep][:, keep]).max()  # the pruned entries are not variables
    assert abs(float(res.eigenvalues[0]) - float(ref)) <= 2e-4 * float(ref)


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_a_callers_autocast_region_does_not_round_the_products(method: str) -> None:
    """Measured inside ``torch.autocast`` (a training loop's region), the products ran in bf16: the second
    eigenvalue came back 3e-4 relative off with a reported bound of 3e-6."""
    model = mlp(hidden=24).float()
    x, y = digits(64, torch.float32)
    ref = torch.linalg.eigvalsh(dense_hessian(mlp(hidden=24), ce_loss, (x.double(), y))).flip(0)[:3]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tol = 1e-4 if method == "double_backward" else 1e-3  # float32 differences do not certify 1e-4 here
        res = hessian_eigenvalues(model, ce_loss, (x, y), k=3, tol=tol, method=method)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is back
    assert res.converged
    assert bool(((res.eigenvalues - ref).abs() <= res.error_bounds + 1e-6 * ref.abs()).all())


def test_dropout_mask_is_fixed_within_a_measurement() -> None:
    """With dropout active, the operator must be one fixed symmetric matrix: products are reproducible."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 10)).double().train()
    x, y = digits(32)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for reuse in (True, False):
        with HessianOperator(model, ce_loss, (x, y), reuse_graph=reuse) as H:
            a, b = H.matvec(v), H.matvec(v)
            w = torch.randn_like(v)
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(torch.dot(w, H.matvec(v)), torch.dot(v, H.matvec(w)))


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("rmsprop", lambda ps: torch.optim.RMSprop(ps, lr=0.01)),
        ("rmsprop centered", lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True)),
        ("adam beta1=0", lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.0, 0.99))),
        ("adam amsgrad beta1=0", lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.0, 0.99), amsgrad=True)),
    ],
)
def test_the_preconditioner_is_the_one_the_optimizer_divides_by(name: str, make: Any) -> None:
    """Without momentum an adaptive step is ``Δθ = −lr·g/P``: the preconditioner read from the state after a step
    must equal ``−lr·g/Δθ`` of that step, at the first step (predicted from the gradient, before any state) and at
    a later one. ``centered=True`` RMSprop divides by ``sqrt(v − ḡ²) + eps``; it was read as ``sqrt(v) + eps``."""
    from lightning_curvature.core.preconditioner import predicted_first_step_preconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    params = list(model.parameters())
    opt = make(params)
    x = torch.randn(32, 6, dtype=torch.float64)

    def step(i: int) -> Tensor:
        """One optimizer step; returns ``−lr·g/Δθ``, the preconditioner it divided by."""
        opt.zero_grad()
        loss = (model(x * (1 + 0.1 * i)) ** 2).mean()
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt.step()
        moved = torch.cat([p.detach().reshape(-1) for p in params]) - before
        return -0.01 * g / moved

    opt.zero_grad()
    (model(x) ** 2).mean().backward()
    predicted = predicted_first_step_preconditioner(opt, params, [p.grad.clone() for p in params])
    assert predicted is not None
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in predicted]), step(0), rtol=1e-6, atol=0)
    for i in range(1, 3):
        step(i)
    observed = step(3)
    torch.testing.assert_close(adaptive_preconditioner(opt, params), observed, rtol=1e-6, atol=0)


def _adam_after_three_steps(model: nn.Module, loss_fn: Any, batch: Any) -> torch.optim.Adam:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    opt.zero_grad()
    return opt


def test_preconditioned_sharpness_matches_dense() -> None:
    model, loss_fn, batch = _mlp_case()
    opt = _adam_after_three_steps(model, loss_fn, batch)
    P = adaptive_preconditioner(opt, list(model.parameters()))
    assert P is not None
    # independent construction of P from the Adam state
    b1, b2 = opt.param_groups[0]["betas"]
    t = 3
    parts = [
        (1 - b1**t) * ((opt.state[p]["exp_avg_sq"] / (1 - b2**t)).sqrt() + opt.param_groups[0]["eps"]).reshape(-1)
        for p in model.parameters()
    ]
    torch.testing.assert_close(P, torch.cat(parts))
    H = dense_hessian(model, loss_fn, batch)
    d = P.rsqrt()
    ref = torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)[:2]
    res = preconditioned_sharpness(model, loss_fn, batch, opt, k=2, tol=1e-4, max_iter=200)
    assert res.preconditioned
    assert ((res.eigenvalues - ref).abs() / ref.abs()).max() <= 1e-4


def _channels_last_case() -> tuple[nn.Module, Any, nn.Module, Any]:
    """A CNN and its batch in ``channels_last`` (the float32 model measured) and the same weights in float64,
    contiguous (the dense reference)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    ref = copy.deepcopy(net).double()
    return net.to(memory_format=torch.channels_last), (x.to(memory_format=torch.channels_last), y), ref, (x.double(), y)


@pytest.mark.parametrize("method", ["auto", "double_backward", "finite_difference", "forward_over_reverse"])
def test_channels_last_models_and_inputs_are_measured(method: str) -> None:
    """Gradients of ``channels_last`` convolutions are not contiguous: every method failed in Lanczos's in-place
    basis subtraction ("view size is not compatible with input tensor's size and stride")."""
    model, batch, ref_model, ref_batch = _channels_last_case()
    H = dense_hessian(ref_model, ce_loss, ref_batch)
    res = hessian_eigenvalues(model, ce_loss, batch, k=2, tol=1e-5, method=method)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-4, atol=0)
    tr = hessian_trace(model, ce_loss, batch, num_samples=30, method=method)
    assert abs(tr.estimate - float(torch.trace(H))) <= 4 * tr.std_error


def test_channels_last_preconditioned_sharpness_matches_dense() -> None:
    model, batch, ref_model, ref_batch = _channels_last_case()
    opt = _adam_after_three_steps(model, ce_loss, batch)
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    H = dense_hessian(ref_model, ce_loss, ref_batch)
    P = adaptive_preconditioner(opt, list(model.parameters()))
    d = P.double().rsqrt()
    ref = torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)[:2]
    res = preconditioned_sharpness(model, ce_loss, batch, opt, k=2, tol=1e-5, max_iter=200)
    assert res.preconditioned
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-4, atol=0)


class _TransposedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(10, 64).t())  # (64, 10), not contiguous
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w) + self.b


@pytest.mark.parametrize("method", ["auto", "double_backward", "finite_difference", "forward_over_reverse"])
def test_a_non_contiguous_parameter_is_measured(method: str) -> None:
    model = _TransposedWeight()
    assert not model.w.is_contiguous()
    batch = digits(32, torch.float32)
    ref_model = _TransposedWeight().double()
    H = dense_hessian(ref_model, ce_loss, (batch[0].double(), batch[1]))
    res = hessian_eigenvalues(model, ce_loss, batch, k=2, tol=1e-5, method=method)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-4, atol=0)


def test_subspace_overlap_matches_projection() -> None:
    model, loss_fn, batch = _mlp_case()
    H = dense_hessian(model, loss_fn, batch)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))])
    evecs = torch.linalg.eigh(H).eigenvectors[:, -10:]
    ref = (torch.linalg.vector_norm(evecs.T @ g) ** 2 / g.dot(g)).item()
    res = hessian_eigenvalues(model, loss_fn, batch, k=10, tol=1e-8, max_iter=H.shape[0], return_eigenvectors=True)
    assert res.eigenvectors is not None and res.eigenvector_list is not None
    assert abs(top_subspace_overlap(g, res.eigenvectors) - ref) < 1e-6
    # the parameter-shaped forms the operator API returns, in any mix, and the result itself
    with HessianOperator(model, loss_fn, batch) as Hop:
        g_list = Hop.gradient()
    for grad in (g, g_list):
        for vectors in (res.eigenvectors, res.eigenvector_list, res):
            assert abs(top_subspace_overlap(grad, vectors) - ref) < 1e-6
    with pytest.raises(ValueError, match="return_eigenvectors=True"):
        top_subspace_overlap(g, hessian_eigenvalues(model, loss_fn, batch, k=2))
    with pytest.raises(ValueError, match="zero"):
        top_subspace_overlap(torch.zeros_like(g), res)
    with pytest.raises(ValueError, match="entries"):
        top_subspace_overlap(g[:-1], res)


def test_warm_start_on_a_training_trajectory_saves_products() -> None:
    model, loss_fn, batch = _mlp_case()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = hessian_eigenvalues(model, loss_fn, batch, k=5, return_warm_start=True)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    cold = hessian_eigenvalues(model, loss_fn, batch, k=5)
    warm = hessian_eigenvalues(model, loss_fn, batch, k=5, v0=first.warm_start)
    ref = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batch)).flip(0)[:5]
    assert ((warm.eigenvalues - ref).abs() / ref).max() <= 1e-3
    assert warm.num_hvp <= 0.7 * cold.num_hvp, (warm.num_hvp, cold.num_hvp)  # measured 15 vs 25


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda m, b: hessian_eigenvalues(m, ce_loss, b, k=10_000), ValueError, "exceeds"),
        (lambda m, b: hessian_eigenvalues(m, ce_loss, (b[0][:0], b[1][:0])), ValueError, "empty"),
        (lambda m, b: hessian_eigenvalues(m, ce_loss, b, algorithm="power", k=2), ValueError, "Power"),
        (lambda m, b: hessian_eigenvalues(m, ce_loss, b, mode="test"), ValueError, "mode"),
        (lambda m, b: hessian_eigenvalues(m, ce_loss, b, method="finite"), ValueError, "method"),
        (lambda m, b: hessian_eigenvalues(m, ce_loss, b, v0=torch.ones(3)), ValueError, "v0"),
        (lambda m, b: hessian_eigenvalues(m, ce_loss, b, start="ones"), ValueError, "start"),
        (lambda m, b: hessian_trace(m, ce_loss, b, estimator="exact"), ValueError, "estimator"),
    ],
    ids=["k-too-large", "empty-batch", "power-k", "mode", "method", "v0-size", "start", "estimator"],
)
def test_bad_input_names_the_value(make: Any, error: type, match: str) -> None:
    model, _, batch = _mlp_case()
    with pytest.raises(error, match=match):
        make(model, batch)


def test_no_trainable_parameters_and_integer_dtype() -> None:
    model = nn.Linear(3, 1)
    x = (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_eigenvalues(model, lambda m, b: m(b[0]).sum(), x)
    with pytest.raises(TypeError, match="scalar"):
        hessian_eigenvalues(nn.Linear(3, 2), lambda m, b: m(b[0]), x)


@pytest.mark.parametrize("method", ["auto", "double_backward", "finite_difference", "forward_over_reverse"])
def test_parameters_of_different_dtypes_are_each_measured_in_their_own(method: str) -> None:
    """Every parameter was copied into the first one's dtype: the float64 head's copy became float32 and the
    forward's cast then failed ("mat1 and mat2 must have the same dtype")."""
    model = Float64Head(64, 12, 10)
    x, y = digits(32, torch.float32)
    ref_model = copy.deepcopy(model).double()
    H = dense_hessian(ref_model, ce_loss, (x.double(), y))
    res = hessian_eigenvalues(model, ce_loss, (x, y), k=2, tol=1e-5, method=method)
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-4, atol=0)
    cov = gradient_covariance(model, ce_loss, (x, y), k=2)
    ref_cov = gradient_covariance(ref_model, ce_loss, (x.double(), y), k=2)
    torch.testing.assert_close(cov.eigenvalues, ref_cov.eigenvalues, rtol=1e-4, atol=0)


def test_an_uninitialised_lazy_module_is_a_clear_error() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for measure in (
        lambda: hessian_eigenvalues(model, ce_loss, (x, y)),
        lambda: hessian_trace(model, ce_loss, (x, y), num_samples=3),
        lambda: gradient_covariance(model, ce_loss, (x, y), k=2),
    ):
        with pytest.raises(ValueError, match="'0.weight' is not initialised yet .* run one forward pass"):
            measure()
    model(x)
    assert hessian_eigenvalues(model, ce_loss, (x, y)).converged


def test_non_finite_loss_raises_catchable_error() -> None:
    model, loss_fn, batch = _mlp_case()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteCurvatureError):
        hessian_eigenvalues(model, loss_fn, batch)
    assert flat_params(model).isnan().any()  # untouched, still the caller's NaN


def test_non_finite_with_reduction_raises_after_the_reduction() -> None:
    """Under a cross-process reduction, the error must come after the all-reduce so no rank waits alone."""
    model, loss_fn, batch = _mlp_case()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    calls: list[int] = []

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return t

    with pytest.raises(NonFiniteCurvatureError, match="some process"):
        hessian_eigenvalues(model, loss_fn, batch, reduce_fn=reduce_fn)
    assert len(calls) == 1  # the first (NaN) product with its example count: reduced before raising
