"""Independent references for tests: dense float64 Hessians, per-example loops, small models."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dense_hessian(model: nn.Module, loss_fn: Any, batch: Any) -> Tensor:
    """The full Hessian of ``loss_fn(model, batch)`` w.r.t. all parameters, by ``torch.func.hessian``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, b: Any) -> Tensor:
            return loss_fn(self.model, b)

    wrapped = Wrapped()

    def f(w: Tensor) -> Tensor:
        ps = {f"model.{n}": c.view(s) for n, c, s in zip(names, torch.split(w, numels), shapes)}
        return functional_call(wrapped, ps, (batch,), strict=False)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Row by row with plain autograd (torch.autograd.functional.hessian, vectorize=False). torch.func.hessian and
    # jacrev∘jacrev (vmap-based) gave wrong LayerNorm-weight entries inside nn.TransformerEncoderLayer on
    # torch 2.13; central finite differences of the gradient agree with the row-by-row Hessian to 2e-9.
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(f, flat_params(model))


def plain_hvp(model: nn.Module, loss_fn: Any, batch: Any, v: list[Tensor]) -> Tensor:
    """Flat :math:`Hv` by plain autograd double backward on the model itself (no HessianOperator, no routing)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, v)])


def per_example_grads(model: nn.Module, loss_fn: Any, xs: Tensor, ys: Tensor) -> Tensor:
    rows = []
    for i in range(xs.shape[0]):
        gs = torch.autograd.grad(loss_fn(model, (xs[i : i + 1], ys[i : i + 1])), list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def ce_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def mse_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def least_squares(
    n: int = 64, d: int = 5, seed: int = 0, *, scale: float = 1.0, noise: float = 0.1
) -> tuple[Tensor, Tensor]:
    """A float64 linear regression problem ``y = x w + noise·ε``: under :func:`mse_loss` a quadratic."""
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=gen, dtype=torch.float64) + noise * torch.randn(
        n, 1, generator=gen, dtype=torch.float64
    )
    return x, y


def least_squares_hessian(x: Tensor) -> np.ndarray:
    """Closed form for ``nn.Linear(d, 1)`` under :func:`mse_loss`: ``H = 2 [X 1]ᵀ[X 1] / n`` (weight, then bias)."""
    a = np.concatenate([x.numpy(), np.ones((x.shape[0], 1))], axis=1)
    return 2.0 * a.T @ a / x.shape[0]


def least_squares_sharpness(x: Tensor) -> float:
    """λ_max of :func:`least_squares_hessian`."""
    return float(np.linalg.eigvalsh(least_squares_hessian(x))[-1])


def digits(n: int = 64, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n] / 16.0, dtype=dtype)
    y = torch.tensor(d.target[:n], dtype=torch.long)
    return x, y


def mlp(
    d_in: int = 64, hidden: int = 16, d_out: int = 10, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 6 * 6, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(-1, 1, 8, 8)
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8, seq: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.layer(self.emb(tokens)).mean(1))
