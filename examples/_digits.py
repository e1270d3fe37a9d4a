"""Digits data, small models, losses and the plotting/JSON scaffolding shared by the scripts in ``examples/``.

Not part of the installed package: the examples run as ``python examples/X.py`` (this folder is then on
``sys.path``), and ``tests/test_examples.py`` puts the folder on ``sys.path`` itself.

The data is the 8×8 handwritten-digits set that scikit-learn ships (1797 images, 10 classes): nothing is
downloaded. Features are standardised with the statistics of the training split. A batch is a tuple
``(x, y_onehot, labels)``, so the same batch serves the half squared error on one-hot targets of the
edge-of-stability papers (:func:`mse_loss`, Cohen et al. 2021, arXiv 2103.00065) and the cross-entropy
(:func:`cross_entropy_loss`); both have the engine's ``loss_fn(model, batch)`` signature.

Example::

    >>> data = load_digits_data(num_train=100, num_test=50, seed=0)
    >>> data.x_train.shape, data.y_train.shape
    (torch.Size([100, 64]), torch.Size([100, 10]))
    >>> model = make_mlp(depth=2, width=32, seed=0)
    >>> float(mse_loss(model, data.train_batch()).detach()) > 0
    True
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
Activation = Literal["tanh", "relu"]
Init = Literal["default", "he", "lecun"]


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
    """

    x_train: Tensor
    y_train: Tensor
    labels_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labels_test: Tensor

    def train_batch(self) -> Batch:
        """The whole training split as one batch ``(x, y_onehot, labels)``."""
        return self.x_train, self.y_train, self.labels_train

    def test_batch(self) -> Batch:
        """The whole test split as one batch ``(x, y_onehot, labels)``."""
        return self.x_test, self.y_test, self.labels_test


def load_digits_data(
    num_train: int = 1000, num_test: int = 0, *, seed: int = 0, standardise: bool = True
) -> DigitsData:
    """Load scikit-learn's digits, shuffle with ``seed``, split and scale the features (float32).

    Args:
        num_train: training examples.
        num_test: held-out examples (``num_train + num_test <= 1797``).
        seed: seed of the shuffle.
        standardise: standardise each pixel with the training split's mean and standard deviation; ``False``
            scales the pixel values 0..16 to [0, 1] instead.

    Returns:
        :class:`DigitsData`.

    Raises:
        ValueError: if ``num_train < 1``, ``num_test < 0`` or the splits exceed the 1797 examples.
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
    if num_train < 1 or num_test < 0 or num_train + num_test > n:
        raise ValueError(f"Expected 1 <= num_train and num_train + num_test <= {n}, got {num_train} and {num_test}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = perm[:num_train], perm[num_train : num_train + num_test]
    if standardise:
        mean = x_all[train_idx].mean(0)
        std = x_all[train_idx].std(0).clamp_min(1e-3)  # some corner pixels are constant
        x_all = ((x_all - mean) / std).float()
    else:
        x_all = (x_all / 16.0).float()
    onehot = nn.functional.one_hot(labels_all, 10).float()
    return DigitsData(
        x_train=x_all[train_idx],
        y_train=onehot[train_idx],
        labels_train=labels_all[train_idx],
        x_test=x_all[test_idx],
        y_test=onehot[test_idx],
        labels_test=labels_all[test_idx],
    )


def _activation(name: Activation) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"`activation` must be 'tanh' or 'relu', got {name!r}.")


def make_mlp(
    depth: int = 2,
    width: int = 64,
    *,
    activation: Activation = "tanh",
    init: Init = "default",
    output_scale: float = 1.0,
    seed: int = 0,
) -> nn.Sequential:
    r"""A fully connected network 64 → ``width`` (× ``depth`` hidden layers) → 10.

    Args:
        depth: number of hidden layers (at least 1).
        width: hidden width.
        activation: ``"tanh"`` or ``"relu"``.
        init: ``"default"`` (PyTorch's ``nn.Linear``: weights uniform with variance :math:`1/(3\,\text{fan\_in})`),
            ``"he"`` (Gaussian weights of variance :math:`2/\text{fan\_in}`, zero biases; critical for ReLU) or
            ``"lecun"`` (variance :math:`1/\text{fan\_in}`, zero biases; critical for tanh).
        output_scale: multiply the read-out layer's initial weight and bias by this (a larger value makes the
            initial loss surface sharper, a "bad initialisation" in the sense of Gilmer et al. 2021).
        seed: seed of the initialisation (the global RNG is left as it was).

    Returns:
        The model; its last module is the read-out ``nn.Linear``.

    Raises:
        ValueError: for ``depth`` or ``width`` below 1, or an unknown activation or init.

    Example::

        >>> sum(p.numel() for p in make_mlp(depth=1, width=8).parameters())  # 64·8 + 8 + 8·10 + 10
        610
    """
    if depth < 1 or width < 1:
        raise ValueError(f"`depth` and `width` must be >= 1, got depth={depth}, width={width}.")
    if init not in ("default", "he", "lecun"):
        raise ValueError(f"`init` must be 'default', 'he' or 'lecun', got {init!r}.")
    _activation(activation)
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        d_in = 64
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), _activation(activation)]
            d_in = width
        layers.append(nn.Linear(d_in, 10))
    finally:
        torch.random.set_rng_state(state)
    model = nn.Sequential(*layers)
    with torch.no_grad():
        if init != "default":
            gain = 2.0 if init == "he" else 1.0
            for layer in model:
                if isinstance(layer, nn.Linear):
                    layer.weight.copy_(
                        torch.randn(layer.weight.shape, generator=gen) * math.sqrt(gain / layer.in_features)
                    )
                    layer.bias.zero_()
        for p in model[-1].parameters():
            p.mul_(output_scale)
    return model


def mse_loss(model: nn.Module, batch: Batch) -> Tensor:
    r"""Half squared error on one-hot targets, :math:`L = \frac{1}{2N} \sum_i \|f(x_i) - y_i\|^2`."""
    x, y, _ = batch
    return 0.5 * (model(x) - y).pow(2).sum(1).mean()


def cross_entropy_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of the logits against the integer labels."""
    x, _, labels = batch
    return nn.functional.cross_entropy(model(x), labels)


LOSSES: dict[str, LossFn] = {"mse": mse_loss, "ce": cross_entropy_loss}


@torch.no_grad()
def accuracy(model: nn.Module, batch: Batch) -> float:
    """Share of examples whose arg-max output is the label."""
    x, _, labels = batch
    return float((model(x).argmax(1) == labels).float().mean())


def flat_gradient(model: nn.Module, loss_fn: LossFn, batch: Batch, params: Sequence[Tensor] | None = None) -> Tensor:
    """The gradient of ``loss_fn(model, batch)`` with respect to ``params`` (default: all) as one flat vector.

    ``.grad`` is not touched.
    """
    ps = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(model, batch), ps)
    return torch.cat([g.reshape(-1) for g in grads])


def minibatches(data: DigitsData, batch_size: int, *, seed: int = 0) -> Callable[[], Batch]:
    """A callable returning the next mini-batch of a seeded sampler that reshuffles every epoch (drop last).

    Raises:
        ValueError: if ``batch_size`` is not in ``[1, N]``.
    """
    x, y, labels = data.train_batch()
    n = int(x.shape[0])
    if not 1 <= batch_size <= n:
        raise ValueError(f"`batch_size` must be in [1, {n}], got {batch_size}.")
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {"perm": torch.randperm(n, generator=gen), "pos": 0}

    def next_batch() -> Batch:
        if state["pos"] + batch_size > n:
            state["perm"], state["pos"] = torch.randperm(n, generator=gen), 0
        idx = state["perm"][state["pos"] : state["pos"] + batch_size]
        state["pos"] += batch_size
        return x[idx], y[idx], labels[idx]

    return next_batch


# --- command line, JSON, statistics over seeds, figures ----------------------------------------------------------
def example_parser(description: str, default_out: str | Path, default_seeds: int = 3) -> argparse.ArgumentParser:
    """The command line shared by the examples: ``--fast``, ``--out DIR``, ``--seed`` and ``--seeds``.

    Example::

        >>> ns = example_parser("demo", "figs").parse_args(["--fast"])
        >>> ns.fast, ns.out, ns.seed, ns.seeds
        (True, 'figs', 0, 3)
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="reduced size for CI (under ~20 s on one CPU thread)")
    parser.add_argument("--out", default=str(default_out), metavar="DIR", help="folder of the PNG and JSON")
    parser.add_argument("--seed", type=int, default=0, help="first seed (data split and initialisation)")
    parser.add_argument("--seeds", type=int, default=default_seeds, help="number of seeds (default: %(default)s)")
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
    """Write ``payload`` as indented JSON (NaN and infinities as ``null``), creating the folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_plain(payload), indent=1) + "\n", encoding="utf-8")
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, median, minimum and maximum of per-seed values (non-finite values are kept and counted).

    Example::

        >>> spread([1.0, 2.0, 4.0])["mean"], spread([1.0, 2.0, 4.0])["min"]
        (2.3333333333333335, 1.0)
    """
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "median": math.nan, "min": math.nan, "max": math.nan, "values": vals, "n_finite": 0}
    return {
        "mean": statistics.fmean(finite),
        "median": statistics.median(finite),
        "min": min(finite),
        "max": max(finite),
        "values": vals,
        "n_finite": len(finite),
    }


def fmt(s: dict[str, Any], spec: str = ".3g", center: str = "mean") -> str:
    """``"mean (min–max)"`` of a :func:`spread` (``center="median"``: the median instead of the mean)."""
    if not s["n_finite"]:
        return "n/a"
    return f"{s[center]:{spec}} ({s['min']:{spec}}–{s['max']:{spec}})"


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``plt.subplots`` with constrained layout on the non-interactive Agg backend (the examples write PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, layout="constrained", squeeze=False)


def band(
    ax: Any,
    x: Sequence[float],
    runs: Sequence[Sequence[float]],
    *,
    color: str,
    label: str,
    require_all: bool = False,
    **kw: Any,
) -> None:
    """Median over seeds as a line, the seed range (min–max) as a shaded band; ``runs`` are aligned with ``x``.

    Runs shorter than ``x`` (a diverged run) or non-finite values count only where they have values; with
    ``require_all`` a point is drawn only where every run has a finite value.
    """
    xs, med, lo, hi = [], [], [], []
    for i, xv in enumerate(x):
        col = [float(r[i]) for r in runs if i < len(r) and math.isfinite(float(r[i]))]
        if col and (len(col) == len(runs) or not require_all):
            xs.append(xv)
            med.append(statistics.median(col))
            lo.append(min(col))
            hi.append(max(col))
    ax.plot(xs, med, color=color, label=label, **{"lw": 1.6, **kw})
    if len(runs) > 1:
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)


def save_figure(fig: Any, path: str | Path, title: str) -> None:
    """Grid every panel, title the figure, write it at 110 dpi and close it."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
