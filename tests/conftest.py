"""Shared small models and data for the tests (generic: any test file may use them).

Classes live at module level so that ``ddp_spawn`` workers can unpickle them (pytest's default ``prepend``
import mode puts ``tests/`` on ``sys.path`` and the spawned interpreters inherit it). Import them with
``from conftest import TinyClassifier, make_trainer, ...`` or use the fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "FakeClock",
    "TinyClassifier",
    "classification_loader",
    "digits_tensors",
    "make_trainer",
    "random_tensors",
]


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for the whole run: the tests use small models, and on a loaded 2-core machine two OpenMP
    threads waiting for each other made single linear-algebra calls 1000x slower (0.7 s for a 128x128 eigvalsh)."""
    torch.set_num_threads(1)


def random_tensors(n: int = 64, dim: int = 8, num_classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random classification problem: ``(X, y)``, ``X`` standard normal, ``y`` from a linear rule."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    w = torch.randn(dim, num_classes, generator=gen)
    y = (x @ w + 0.5 * torch.randn(n, num_classes, generator=gen)).argmax(1)
    return x, y


def digits_tensors(n: int | None = None) -> tuple[Tensor, Tensor]:
    """sklearn's 8x8 digits (1797 examples, 64 features scaled to [0, 1], 10 classes); no download."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return (x, y) if n is None else (x[:n], y[:n])


def classification_loader(
    x: Tensor, y: Tensor, batch_size: int = 16, shuffle: bool = True, seed: int | None = None, **kwargs: Any
) -> DataLoader:
    """A DataLoader over ``(x, y)``; ``seed`` gives it its own generator (else shuffling uses the global RNG)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen, **kwargs)


class TinyClassifier(pl.LightningModule):
    """An MLP classifier; ``batch_norm``/``dropout`` give the BatchNorm + Dropout variant.

    Logs ``train_loss`` on every step (``on_step=True``, also on epoch) and returns the mean cross-entropy;
    ``validation_step`` logs ``val_loss``.

    Args:
        in_dim: input features.
        hidden: hidden width (``0``: a linear model).
        num_classes: classes.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"``.
        momentum: SGD momentum.
        nesterov: SGD Nesterov.
        batch_norm: BatchNorm after the hidden layer.
        dropout: dropout probability after the hidden layer.
        activation: ``"tanh"`` (smooth, for dense-Hessian references) or ``"relu"``.
        dtype: parameter dtype (e.g. ``torch.float64`` for reference tests).
    """

    def __init__(
        self,
        in_dim: int = 8,
        hidden: int = 16,
        num_classes: int = 3,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        nesterov: bool = False,
        batch_norm: bool = False,
        dropout: float = 0.0,
        activation: str = "tanh",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.momentum, self.nesterov = lr, optimizer, momentum, nesterov
        layers: list[nn.Module] = []
        if hidden > 0:
            layers.append(nn.Linear(in_dim, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.Tanh() if activation == "tanh" else nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(hidden, num_classes))
        else:
            layers.append(nn.Linear(in_dim, num_classes))
        self.net = nn.Sequential(*layers)
        if dtype is not None:
            self.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        name = self.optimizer_name
        if name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        if name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        if name == "rmsprop":
            return torch.optim.RMSprop(self.parameters(), lr=self.lr)
        raise ValueError(f"unknown optimizer {name!r}")


def make_trainer(tmp_path: Path | str, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer for tests (no progress bar, summary, logger or checkpointing unless given)."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class DestroyProcessGroup(pl.Callback):
    """Destroys the default process group at teardown, in each ``ddp_spawn`` worker; put it last.

    Lightning leaves a gloo group alive when a spawned CPU worker returns, and with torch 2.13 the worker then
    sometimes aborts in C++ teardown ("terminate called without an active exception", SIGABRT) after training has
    finished. Measured here with plain Lightning and none of this library's callbacks: 1 abort in 12 runs without
    this callback, 0 in 16 with it.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class FakeClock:
    """A clock that moves only when told to: ``clock()`` reads it, ``clock.advance(dt)`` moves it."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replace the curvature monitors' clock (``callbacks._common._now``) by a :class:`FakeClock` at 0."""
    from lightning_curvature.callbacks import _common

    clock = FakeClock()
    monkeypatch.setattr(_common, "_now", clock)
    monkeypatch.setattr(_common._MeasuringClock, "total_s", 0.0)
    return clock


@pytest.fixture
def random_data() -> tuple[Tensor, Tensor]:
    """64 examples, 8 features, 3 classes (seeded)."""
    return random_tensors()


@pytest.fixture
def digits_data() -> tuple[Tensor, Tensor]:
    """The sklearn digits data set as float tensors."""
    return digits_tensors()


@pytest.fixture
def torch_single_thread() -> Any:
    """Run the test with one intra-op thread (tiny models on a loaded 2-core machine), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
