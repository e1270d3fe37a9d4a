"""Deterministic benchmark problems for the curvature benchmarks.

Each case is built by :func:`make_case` and returns a :class:`Case` holding

* ``model``: an ``nn.Module`` in eval mode (no BatchNorm, no dropout), so the loss is a
  deterministic function of the parameters;
* ``loss_fn(model, batch) -> Tensor``: the scalar *mean* cross-entropy of ``batch``;
* ``batch``: a tuple ``(x, y)``;
* ``criterion``: ``nn.CrossEntropyLoss()`` so that peers needing the
  ``criterion(output, target)`` form (PyHessian, curvlinops) see the same loss.

Cases (all seeded through a private ``torch.Generator``; nothing is downloaded):

``mlp_digits``
    tanh MLP 64 -> 32 -> 10 (2,410 parameters) on all 1,797 examples of scikit-learn's
    bundled ``load_digits`` (pixels scaled to [0, 1]). Small enough for a dense float64
    Hessian via ``torch.func.hessian``.
``cnn``
    ReLU CNN (3 conv + max-pool blocks, 16/32/64 channels, then 1024 -> 960 -> 10;
    about 1.02M parameters) on a random 3x32x32 batch of 128 with 10 classes.
``transformer``
    ``nn.TransformerEncoder`` classifier: vocab 64, learned positions, d_model 64,
    4 heads, feed-forward 128, 2 layers, dropout 0, mean pooling, linear head to 10
    classes (about 74k parameters); batch 32 of random token sequences of length 32.
    Attention runs under ``sdpa_kernel(SDPBackend.MATH)``: on CPU the default fused kernel
    supports neither double backward nor forward-mode AD, so no HVP could go through it.

Example::

    >>> case = make_case("mlp_digits", dtype=torch.float64)  # doctest: +SKIP
    >>> case.loss_fn(case.model, case.batch)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

CASE_NAMES: tuple[str, ...] = ("mlp_digits", "cnn", "transformer")
DEFAULT_SEED = 0


def cross_entropy_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of ``model`` on ``batch = (x, y)``; the ``loss_fn`` of every case."""
    x, y = batch
    return F.cross_entropy(model(x), y)


@dataclass
class Case:
    """One benchmark problem. ``loss_fn(model, batch)`` equals ``criterion(model(x), y)``."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batch: tuple[Tensor, Tensor]
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    description: str = ""

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def to(self, dtype: torch.dtype) -> Case:
        """Return a copy of the case (model and float inputs) in ``dtype``; weights are copied."""
        import copy

        model = copy.deepcopy(self.model).to(dtype)
        x, y = self.batch
        if x.is_floating_point():
            x = x.to(dtype)
        return Case(self.name, model, self.loss_fn, (x, y), nn.CrossEntropyLoss(), self.description)


# --------------------------------------------------------------------------- models


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 32, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_cnn() -> nn.Sequential:
    """ReLU CNN, about 1.02M parameters, no normalisation layers."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16x16
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 960),
        nn.ReLU(),
        nn.Linear(960, 10),
    )


class TransformerClassifier(nn.Module):
    def __init__(
        self,
        vocab: int = 64,
        seq_len: int = 32,
        d_model: int = 64,
        nhead: int = 4,
        dim_feedforward: int = 128,
        num_layers: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=0.0, batch_first=True
        )
        # enable_nested_tensor=False: no fast path / nested tensors, plain differentiable ops.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos
        # The math SDPA kernel: on CPU the fused flash kernel has neither a double-backward
        # ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
        # implemented") nor a forward-mode derivative, so no HVP method works through it.
        with sdpa_kernel(SDPBackend.MATH):
            h = self.encoder(h)
        return self.head(h.mean(dim=1))


# --------------------------------------------------------------------------- builders


def _init_params(model: nn.Module, gen: torch.Generator) -> None:
    """Re-initialise every parameter from ``gen`` (PyTorch-default-like scales), so the
    case does not depend on the global RNG or on torch's init code."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # LayerNorm: identity at init
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            if name == "pos":
                bound = 0.05
            elif name.startswith("embed"):
                bound = 3.0**0.5  # unit variance, like nn.Embedding's N(0, 1)
            elif name.endswith("in_proj_weight"):
                bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5  # xavier, as nn.MultiheadAttention
            elif p.ndim >= 2:
                bound = (1.0 / p[0].numel()) ** 0.5  # kaiming_uniform(a=sqrt(5)), torch's default
            else:
                bound = 0.05  # biases
            p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1) * bound)


def _mlp_digits(gen: torch.Generator) -> Case:
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    model = TinyMLP()
    _init_params(model, gen)
    return Case(
        "mlp_digits",
        model,
        cross_entropy_loss,
        (x, y),
        description="tanh MLP 64-32-10 on sklearn digits (N=1797)",
    )


def _cnn(gen: torch.Generator) -> Case:
    model = make_cnn()
    _init_params(model, gen)
    x = torch.randn(128, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)
    return Case("cnn", model, cross_entropy_loss, (x, y), description="ReLU CNN on random 3x32x32, B=128")


def _transformer(gen: torch.Generator) -> Case:
    model = TransformerClassifier()
    _init_params(model, gen)
    x = torch.randint(0, 64, (32, 32), generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    return Case(
        "transformer",
        model,
        cross_entropy_loss,
        (x, y),
        description="2-layer TransformerEncoder d=64 on random tokens, B=32, T=32",
    )


_BUILDERS: dict[str, Callable[[torch.Generator], Case]] = {
    "mlp_digits": _mlp_digits,
    "cnn": _cnn,
    "transformer": _transformer,
}


def make_case(name: str, *, dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED) -> Case:
    """Build benchmark case ``name`` in ``dtype``; identical weights and data for a given seed.

    Args:
        name: one of :data:`CASE_NAMES`.
        dtype: floating dtype of parameters and float inputs (the float64 case has exactly
            the float32 weights, upcast).
        seed: seed of the private generator used for weights and synthetic data.

    Raises:
        ValueError: if ``name`` is not a known case.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown case {name!r}, expected one of {CASE_NAMES}")
    gen = torch.Generator().manual_seed(seed)
    case = _BUILDERS[name](gen)
    case.model.eval()
    case.model.requires_grad_(True)
    return case.to(dtype) if dtype != torch.float32 else case


if __name__ == "__main__":
    for n in CASE_NAMES:
        c = make_case(n)
        with torch.no_grad():
            loss = c.loss_fn(c.model, c.batch)
        print(f"{n:12s} params={c.num_params:>9,d} loss={loss.item():.4f}  {c.description}")
