"""Independent references for tests: dense float64 Hessians, per-example loops, small models."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call


class Float64Head(nn.Module):
    """A float32 body under a float64 head (the forward casts between them): parameters of two dtypes."""

    def __init__(self, inputs: int, hidden: int, classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(inputs, hidden)
        self.head = nn.Linear(hidden, classes).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)).double())


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


def pooled_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """One ``(x, y)`` batch, or several (e.g. a monitor's ``MultiBatch``) pooled into one; float inputs in float64."""
    batches = list(batch) if isinstance(batch[0], (list, tuple)) else [batch]  # several (x, y) or one
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return (x.double() if x.is_floating_point() else x), y


def dense_eigvalsh(net: nn.Module, batch: Any, loss_fn: Any = None) -> Tensor:
    """Eigenvalues, largest first, of the dense float64 Hessian of the mean loss over every example of ``batch``.

    ``batch`` is one ``(x, y)`` batch or several (e.g. a monitor's ``MultiBatch``): their examples are pooled,
    which is the size-weighted average of the batch means for a mean loss without cross-example terms (no BatchNorm
    in train mode). ``net`` is copied to float64; ``loss_fn`` defaults to :func:`ce_loss`.
    """
    H = dense_hessian(copy.deepcopy(net).double(), loss_fn or ce_loss, pooled_batch(batch))
    return torch.linalg.eigvalsh(H).flip(0)


def dense_preconditioned_eigvalsh(net: nn.Module, batch: Any, precond: Tensor, loss_fn: Any = None) -> Tensor:
    """Eigenvalues, largest first, of ``P^{-1/2} H P^{-1/2}`` (``H`` as in :func:`dense_eigvalsh`, ``P`` diagonal)."""
    H = dense_hessian(copy.deepcopy(net).double(), loss_fn or ce_loss, pooled_batch(batch))
    d = precond.double().rsqrt()
    return torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)


def optimizer_preconditioner(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor:
    """Diagonal ``P`` of the preconditioned sharpness (Cohen et al. 2022), read from the state torch wrote.

    Adam/AdamW: ``P = (1 - β₁ᵗ)(√(v / (1 - β₂ᵗ)) + ε)``; RMSprop: ``P = √v + ε`` (torch applies no bias correction).
    """
    group = opt.param_groups[0]
    parts = []
    for p in params:
        state = opt.state[p]
        if isinstance(opt, torch.optim.RMSprop):
            parts.append(state["square_avg"].double().sqrt() + group["eps"])
        else:
            b1, b2 = group["betas"]
            t = float(state["step"])
            v = state["exp_avg_sq"].double() / (1 - b2**t)
            parts.append((1 - b1**t) * (v.sqrt() + group["eps"]))
    return torch.cat([q.reshape(-1) for q in parts])


def first_step_preconditioner(opt: torch.optim.Optimizer, grads: Sequence[Tensor]) -> Tensor:
    """``P`` after one real step of a fresh twin of ``opt`` (same class and hyper-parameters) fed ``grads``."""
    twins = [torch.zeros_like(g, dtype=torch.float64, requires_grad=True) for g in grads]
    accepted = inspect.signature(type(opt)).parameters
    hyper = {k: v for k, v in opt.param_groups[0].items() if k in accepted and k != "params"}
    twin = type(opt)(twins, **hyper)
    for w, g in zip(twins, grads):
        w.grad = g.detach().double().clone()
    twin.step()
    return optimizer_preconditioner(twin, twins)


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
