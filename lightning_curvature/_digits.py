"""Digits data and small models shared by the demo and the paper reproductions in ``examples/``.

The data is the 8×8 handwritten-digits set that scikit-learn ships (1797 images, 10 classes): nothing is
downloaded. Features are standardised with the statistics of the training split; targets are the class index
and its one-hot encoding, so the same batch serves the cross-entropy loss and the MSE-on-one-hot loss of the
edge-of-stability papers (Cohen et al. 2021, arXiv 2103.00065).

Batches are ``(x, y_onehot, labels)`` tuples; :func:`mse_loss` and :func:`cross_entropy_loss` have the
engine's ``loss_fn(model, batch)`` signature.

Example::

    >>> data = load_digits_data(num_train=100, num_test=50, seed=0)
    >>> data.x_train.shape, data.y_train.shape, data.num_classes
    (torch.Size([100, 64]), torch.Size([100, 10]), 10)
    >>> model = make_mlp(depth=2, width=32, seed=0)
    >>> float(mse_loss(model, data.train_batch()).detach()) > 0
    True
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DigitsData",
    "ResidualMLP",
    "accuracy",
    "cross_entropy_loss",
    "example_parser",
    "flat_gradient",
    "full_batch_loader",
    "load_digits_data",
    "make_mlp",
    "minibatch_loader",
    "mse_loss",
    "write_json",
]

Batch = tuple[Tensor, Tensor, Tensor]
Activation = Literal["tanh", "relu"]


@dataclass
class DigitsData:
    """Standardised digits features with one-hot and integer targets, split into train and test.

    Attributes:
        x_train: ``(N, 64)`` float features.
        y_train: ``(N, 10)`` one-hot targets.
        labels_train: ``(N,)`` integer classes.
        x_test: held-out features (standardised with the training statistics).
        y_test: held-out one-hot targets.
        labels_test: held-out integer classes.
        num_classes: 10.
    """

    x_train: Tensor
    y_train: Tensor
    labels_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labels_test: Tensor
    num_classes: int = 10

    @property
    def num_features(self) -> int:
        """Input dimension (64)."""
        return int(self.x_train.shape[1])

    def train_batch(self) -> Batch:
        """The whole training split as one batch ``(x, y_onehot, labels)``."""
        return self.x_train, self.y_train, self.labels_train

    def test_batch(self) -> Batch:
        """The whole test split as one batch ``(x, y_onehot, labels)``."""
        return self.x_test, self.y_test, self.labels_test

    def train_dataset(self) -> TensorDataset:
        """The training split as a ``TensorDataset`` of ``(x, y_onehot, labels)``."""
        return TensorDataset(self.x_train, self.y_train, self.labels_train)

    def test_dataset(self) -> TensorDataset:
        """The test split as a ``TensorDataset`` of ``(x, y_onehot, labels)``."""
        return TensorDataset(self.x_test, self.y_test, self.labels_test)


def load_digits_data(
    num_train: int | None = 1000,
    num_test: int | None = 500,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DigitsData:
    """Load scikit-learn's digits, shuffle with ``seed``, split and standardise.

    Args:
        num_train: training examples (``None``: all that remain after the test split).
        num_test: test examples (``None``: all that remain after the training split; at most 1797 in total).
        seed: seed of the shuffle.
        dtype: floating dtype of features and one-hot targets.

    Returns:
        :class:`DigitsData`.

    Raises:
        ValueError: if the requested splits are empty or exceed the 1797 examples.
        ImportError: if scikit-learn is not installed (``pip install lightning-curvature[demo]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError("The digits data needs scikit-learn: `pip install lightning-curvature[demo]`.") from err
    raw = load_digits()
    x_all = torch.as_tensor(raw.data, dtype=torch.float64)
    labels_all = torch.as_tensor(raw.target, dtype=torch.long)
    n = x_all.shape[0]
    if num_train is None and num_test is None:
        raise ValueError("Give at least one of `num_train` and `num_test`.")
    n_train = n - int(num_test or 0) if num_train is None else int(num_train)
    n_test = n - n_train if num_test is None else int(num_test)
    if n_train < 1 or n_test < 0 or n_train + n_test > n:
        raise ValueError(f"Expected 1 <= num_train and num_train + num_test <= {n}, got {n_train} and {n_test}.")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    train_idx, test_idx = perm[:n_train], perm[n_train : n_train + n_test]
    mean = x_all[train_idx].mean(0)
    std = x_all[train_idx].std(0).clamp_min(1e-3)  # some corner pixels are constant
    x_all = (x_all - mean) / std
    onehot = nn.functional.one_hot(labels_all, 10).to(torch.float64)
    return DigitsData(
        x_train=x_all[train_idx].to(dtype),
        y_train=onehot[train_idx].to(dtype),
        labels_train=labels_all[train_idx],
        x_test=x_all[test_idx].to(dtype),
        y_test=onehot[test_idx].to(dtype),
        labels_test=labels_all[test_idx],
    )


def _activation(name: Activation) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"`activation` must be 'tanh' or 'relu', got {name!r}.")


class ResidualMLP(nn.Module):
    """An MLP whose hidden layers are residual blocks ``h + act(W h + b)`` (no normalisation).

    Args:
        in_features: input dimension.
        width: hidden width.
        depth: number of hidden layers (residual blocks after the input projection); at least 1.
        out_features: output dimension.
        activation: ``"tanh"`` or ``"relu"``.
    """

    def __init__(
        self, in_features: int, width: int, depth: int, out_features: int, activation: Activation = "tanh"
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.act = _activation(activation)
        self.out = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """Input projection, residual blocks, linear read-out."""
        h = self.act(self.inp(x))
        for block in self.blocks:
            h = h + self.act(block(h))
        return self.out(h)


def make_mlp(
    depth: int = 2,
    width: int = 64,
    *,
    in_features: int = 64,
    out_features: int = 10,
    activation: Activation = "tanh",
    residual: bool = False,
    output_scale: float = 1.0,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A fully connected network with ``depth`` hidden layers of ``width`` units and PyTorch's default init.

    Args:
        depth: number of hidden layers (at least 1).
        width: hidden width.
        in_features: input dimension (64 for digits).
        out_features: output dimension (10 classes).
        activation: ``"tanh"`` or ``"relu"``.
        residual: hidden layers after the first are residual blocks (:class:`ResidualMLP`).
        output_scale: multiply the read-out layer's initial weight and bias by this (a larger value makes the
            initial loss surface sharper, a "bad initialisation" in the sense of Gilmer et al. 2021).
        seed: seed of the initialisation (``None``: the global RNG).
        dtype: parameter dtype.

    Returns:
        The model (``nn.Sequential`` or :class:`ResidualMLP`).

    Raises:
        ValueError: for ``depth`` or ``width`` below 1 or an unknown activation.

    Example::

        >>> sum(p.numel() for p in make_mlp(depth=1, width=8).parameters())  # 64·8 + 8 + 8·10 + 10
        610
    """
    if depth < 1 or width < 1:
        raise ValueError(f"`depth` and `width` must be >= 1, got depth={depth}, width={width}.")
    _activation(activation)
    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model: nn.Module
        if residual:
            model = ResidualMLP(in_features, width, depth, out_features, activation)
        else:
            layers: list[nn.Module] = []
            d_in = in_features
            for _ in range(depth):
                layers += [nn.Linear(d_in, width), _activation(activation)]
                d_in = width
            layers.append(nn.Linear(d_in, out_features))
            model = nn.Sequential(*layers)
        readout = model.out if isinstance(model, ResidualMLP) else model[-1]
        if output_scale != 1.0:
            with torch.no_grad():
                for p in readout.parameters():
                    p.mul_(output_scale)
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)
    return model.to(dtype)


def mse_loss(model: nn.Module, batch: Batch) -> Tensor:
    r"""Half squared error on one-hot targets, summed over classes and averaged over examples.

    .. math:: L = \frac{1}{2N} \sum_i \|f(x_i) - y_i\|^2

    (the loss of Cohen et al. 2021's MSE experiments).
    """
    x, y, _ = batch
    return 0.5 * (model(x) - y).pow(2).sum(1).mean()


def cross_entropy_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of the logits against the integer labels."""
    x, _, labels = batch
    return nn.functional.cross_entropy(model(x), labels)


@torch.no_grad()
def accuracy(model: nn.Module, batch: Batch) -> float:
    """Share of examples whose arg-max output is the label."""
    x, _, labels = batch
    return float((model(x).argmax(1) == labels).float().mean())


def flat_gradient(model: nn.Module, loss_fn: object, batch: Batch) -> Tensor:
    """The gradient of ``loss_fn(model, batch)`` as one flat vector (``.grad`` is not touched).

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batch: the batch.

    Returns:
        The flat gradient over the trainable parameters, in ``model.parameters()`` order.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(model, batch)  # type: ignore[operator]
        grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads])


def full_batch_loader(data: DigitsData) -> DataLoader:
    """A loader yielding the whole training split as a single batch (full-batch gradient descent)."""
    n = int(data.x_train.shape[0])
    return DataLoader(data.train_dataset(), batch_size=n, shuffle=False)


def minibatch_loader(data: DigitsData, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """A shuffled mini-batch loader over the training split, with its own seeded generator.

    Raises:
        ValueError: if ``batch_size`` is below 1.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data.train_dataset(), batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=True)


def example_parser(description: str, default_out: str | Path) -> argparse.ArgumentParser:
    """The command line shared by the scripts in ``examples/``: ``--fast``, ``--out DIR`` and ``--seed``.

    Args:
        description: the script's description (its docstring).
        default_out: default output folder (``examples/figures``).

    Returns:
        A parser; scripts add their own options before ``parse_args``.

    Example::

        >>> ns = example_parser("demo", "figs").parse_args(["--fast"])
        >>> ns.fast, ns.out, ns.seed
        (True, 'figs', 0)
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--fast", action="store_true", help="reduced size for CI and smoke tests (under ~20 s on one CPU thread)"
    )
    parser.add_argument(
        "--out",
        default=str(default_out),
        metavar="DIR",
        help="output folder for the PNG and JSON (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and initialisation")
    return parser


def _plain(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None``, tensors and tuples become lists."""
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN and infinities as ``null``), creating the folder.

    Args:
        path: file to write.
        payload: plain values, lists, dicts or tensors.

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_plain(payload), indent=2) + "\n", encoding="utf-8")
    return out


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``plt.subplots`` with constrained layout on the non-interactive Agg backend (the examples write PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, layout="constrained")


def save_figure(fig: Any, path: str | Path, title: str) -> None:
    """Grid every panel, title the figure, write it at 110 dpi and close it."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
