"""Gradient covariance against a per-example autograd loop and closed forms."""

from __future__ import annotations

import copy

import pytest
import torch
from _reference import ce_loss, digits, mlp, per_example_grads
from torch import nn

from lightning_curvature import MultiBatch, NonFiniteCurvatureError, gradient_covariance

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    G = per_example_grads(model, ce_loss, x, y)
    gbar = G.mean(0)
    K = (G - gbar).T @ (G - gbar) / G.shape[0]
    evals = torch.linalg.eigvalsh(K).flip(0)
    # McCandlish et al. (2018), A.1: unbiased |G|² and tr Σ from the two "batch sizes" 1 and N
    n = G.shape[0]
    small, big = (G * G).sum(1).mean().item(), gbar.dot(gbar).item()
    g2 = (n * big - small) / (n - 1)
    tr_sigma = (small - big) / (1 - 1 / n)
    return {
        "evals": evals,
        "trace": K.trace().item(),
        "frob": torch.linalg.matrix_norm(K).item(),
        "gbar": gbar,
        "noise_scale": tr_sigma / g2 if g2 > 0 else float("inf"),  # |G|² estimated ≤ 0: no finite noise scale
    }


SETTINGS = [
    {"id": "vmap-one-chunk", "strategy": "vmap", "chunk_size": None},
    {"id": "vmap-chunks-of-7", "strategy": "vmap", "chunk_size": 7},
    {"id": "loop-chunks-of-16", "strategy": "loop", "chunk_size": 16},
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s["id"])
def test_matches_per_example_loop(setting: dict) -> None:
    model = mlp(hidden=10)
    x, y = digits(40)
    ref = _reference(model, x, y)
    cov = gradient_covariance(
        model, ce_loss, (x, y), k=6, strategy=setting["strategy"], chunk_size=setting["chunk_size"]
    )
    torch.testing.assert_close(cov.eigenvalues, ref["evals"][:6], rtol=1e-9, atol=1e-12)
    assert cov.trace == pytest.approx(ref["trace"], rel=1e-10)
    assert cov.frobenius_norm == pytest.approx(ref["frob"], rel=1e-10)
    assert cov.condition_number == pytest.approx((ref["evals"][0] / ref["evals"][5]).item(), rel=1e-8)
    assert cov.noise_scale == pytest.approx(ref["noise_scale"], rel=1e-9)
    assert cov.num_examples == 40


def test_multibatch_and_distributed_path_agree() -> None:
    model = mlp(hidden=10)
    x, y = digits(30)
    ref = _reference(model, x, y)
    split = gradient_covariance(model, ce_loss, MultiBatch([(x[:11], y[:11]), (x[11:], y[11:])]), k=4)
    torch.testing.assert_close(split.eigenvalues, ref["evals"][:4], rtol=1e-9, atol=1e-12)
    # the distributed path (parameter-space Lanczos on reduced products) with an identity "all-reduce"
    dist = gradient_covariance(model, ce_loss, (x, y), k=4, reduce_fn=lambda t: t, tol=1e-8)
    torch.testing.assert_close(dist.eigenvalues, ref["evals"][:4], rtol=1e-6, atol=1e-10)
    assert dist.trace == pytest.approx(ref["trace"], rel=1e-9)
    assert dist.frobenius_norm is None and dist.method == "operator"
    assert dist.noise_scale == pytest.approx(ref["noise_scale"], rel=1e-9)
    # too large to keep (max_memory_bytes below N·P·8): streamed operator, one chunk of gradients at a time
    streamed = gradient_covariance(model, ce_loss, (x, y), k=4, max_memory_bytes=20_000, tol=1e-8)
    assert streamed.method == "operator" and streamed.frobenius_norm is None
    torch.testing.assert_close(streamed.eigenvalues, ref["evals"][:4], rtol=1e-6, atol=1e-10)


def test_a_dataloader_or_a_generator_of_batches_is_one_curvature_batch() -> None:
    """As for the Hessian functions (it failed: "Expected a batch holding at least one tensor, got DataLoader")."""
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp(hidden=10)
    x, y = digits(30)
    ref = _reference(model, x, y)
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    chunks = ((x[i : i + 9], y[i : i + 9]) for i in range(0, 30, 9))
    for batches in (loader, chunks):
        cov = gradient_covariance(model, ce_loss, batches, k=4)
        torch.testing.assert_close(cov.eigenvalues, ref["evals"][:4], rtol=1e-9, atol=1e-12)
        assert cov.noise_scale == pytest.approx(ref["noise_scale"], rel=1e-9) and cov.num_examples == 30
    with pytest.raises(ValueError, match="iterable is empty"):
        gradient_covariance(model, ce_loss, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=7), k=4)


def test_per_example_gradients_are_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time linear in N: each example's gradient is computed once on the Gram path, whatever the chunk size."""
    import lightning_curvature.core.covariance as cov_module

    calls: list[int] = []
    original = cov_module.per_example_gradient_chunks

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        for chunk in original(*args, **kwargs):
            calls.append(chunk.shape[0])
            yield chunk

    monkeypatch.setattr(cov_module, "per_example_gradient_chunks", counting)
    model = mlp(hidden=4)
    x, y = digits(24)
    gradient_covariance(model, ce_loss, (x, y), k=3, chunk_size=1)
    assert sum(calls) == 24  # at chunk size 1 the old pairwise recomputation took 24·25/2 = 300


def test_pooled_unbiased_noise_scale_recovers_a_known_value_far_above_the_batch_size() -> None:
    """Per-example gradients a_i ~ N(μ, σ²I) (a linear loss): B_simple = Pσ²/|μ|² = 2383 by construction, N = 128.
    The biased tr K/‖ḡ‖² saturates near N; the pooled unbiased ratio recovers the truth."""
    from lightning_curvature.core.covariance import NoiseScaleEstimate

    P, n, sigma = 200, 128, 1.0
    mu = torch.full((P,), (P * sigma**2 / 2383.0 / P) ** 0.5, dtype=torch.float64)
    lin = nn.Linear(P, 1, bias=False).double()
    pooled = NoiseScaleEstimate(beta=0.99)
    biased = []
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        a = mu + sigma * torch.randn(n, P, dtype=torch.float64, generator=g)
        cov = gradient_covariance(lin, lambda m, b: m(b).mean(), a, k=1)
        pooled.update(cov.gradient_norm_sq_unbiased, cov.trace_sigma_unbiased)
        biased.append(cov.trace / cov.mean_gradient_norm_sq)
    assert sum(biased) / len(biased) < 200  # saturated near N = 128
    assert pooled.value == pytest.approx(2383.0, rel=0.25)


def test_k_capped_at_rank() -> None:
    model = mlp(hidden=4)
    x, y = digits(5)
    cov = gradient_covariance(model, ce_loss, (x, y), k=50)
    assert cov.eigenvalues.numel() == 4  # rank of K is at most N - 1


def test_closed_form_linear_regression() -> None:
    """Loss ½(wᵀx − t)² at w=0: g_i = −t_i x_i, so K is the covariance of −t_i x_i."""
    torch.manual_seed(0)
    x = torch.randn(25, 3, dtype=torch.float64)
    t = torch.randn(25, 1, dtype=torch.float64)
    lin = nn.Linear(3, 1, bias=False).double()
    nn.init.zeros_(lin.weight)
    cov = gradient_covariance(lin, lambda m, b: 0.5 * ((m(b[0]) - b[1]) ** 2).mean(), (x, t), k=3)
    g = -t * x
    K = torch.cov(g.T, correction=0)
    torch.testing.assert_close(cov.eigenvalues, torch.linalg.eigvalsh(K).flip(0), rtol=1e-10, atol=1e-12)


def test_batchnorm_in_train_mode_is_rejected_and_eval_works() -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)).double().train()
    x, y = digits(16)
    with pytest.raises(ValueError, match="BatchNorm.*mode='eval'"):
        gradient_covariance(model, ce_loss, (x, y))
    with torch.no_grad():  # non-trivial running statistics
        model(x)
    before = [b.clone() for b in model.buffers()]
    cov = gradient_covariance(model, ce_loss, (x, y), k=3, mode="eval")
    ref = _reference(copy.deepcopy(model).eval(), x, y)  # per-example loop, BatchNorm on its running statistics
    torch.testing.assert_close(cov.eigenvalues, ref["evals"][:3], rtol=1e-9, atol=1e-12)
    assert cov.trace == pytest.approx(ref["trace"], rel=1e-10)
    assert model.training and model[1].training
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_vmap_failure_falls_back_to_loop() -> None:
    class ItemModel(nn.Module):  # .item() breaks vmap
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(64, 10).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * (1.0 if x.sum().item() > -1e9 else 0.0)

    model = ItemModel()
    x, y = digits(12)
    ref = _reference(model, x, y)
    cov = gradient_covariance(model, ce_loss, (x, y), k=3)
    torch.testing.assert_close(cov.eigenvalues, ref["evals"][:3], rtol=1e-9, atol=1e-12)
    with pytest.raises(Exception):  # noqa: B017 - strict vmap surfaces torch's own error
        gradient_covariance(model, ce_loss, (x, y), k=3, strategy="vmap")


def test_bad_input() -> None:
    model = mlp(hidden=4)
    x, y = digits(8)
    with pytest.raises(ValueError, match="k"):
        gradient_covariance(model, ce_loss, (x, y), k=0)
    with pytest.raises(ValueError, match="at least 2"):
        gradient_covariance(model, ce_loss, (x[:1], y[:1]))
    with pytest.raises(ValueError, match="chunk_size"):
        gradient_covariance(model, ce_loss, (x, y), chunk_size=0)
    with pytest.raises(ValueError, match="strategy"):
        gradient_covariance(model, ce_loss, (x, y), strategy="magic")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteCurvatureError):
        gradient_covariance(model, ce_loss, (x, y))


def test_non_finite_with_reduction_raises_after_the_reduction() -> None:
    model = mlp(hidden=4)
    x, y = digits(8)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    calls: list[int] = []

    def reduce_fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return t

    with pytest.raises(NonFiniteCurvatureError, match="some process"):
        gradient_covariance(model, ce_loss, (x, y), reduce_fn=reduce_fn)
    assert calls  # reduced first
