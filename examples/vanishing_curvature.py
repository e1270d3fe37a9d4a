"""Vanishing curvature at initialisation (Orvieto et al. 2021, arXiv 2106.03763) on scikit-learn's digits.

Fully connected networks of width 64 and depth 1 to 32 (PyTorch's default initialisation, MSE on one-hot
targets), plain (tanh, ReLU) and residual (hidden layers ``h + act(W h + b)``, no normalisation). At
initialisation we measure with ``hessian_eigenvalues``:

* λ_max of the Hessian with respect to the first layer's parameters (``params=`` the first ``nn.Linear``),
* λ_max of the Hessian with respect to all parameters,

averaged over a few seeds. Then, as a consequence, the deepest plain tanh net is trained with full-batch GD at
several learning rates and with Adam.

Paper: without residual connections or normalisation, the curvature of deep networks at initialisation
shrinks (exponentially) with depth, so SGD is slow to leave the initial plateau while adaptive methods, which
rescale each coordinate, are fast.

Run ``python examples/vanishing_curvature.py [--fast] [--out DIR]``; writes ``vanishing_curvature.png`` and
``vanishing_curvature.json`` into ``--out``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_curvature import hessian_eigenvalues
from lightning_curvature._digits import (
    ResidualMLP,
    accuracy,
    example_parser,
    load_digits_data,
    make_mlp,
    mse_loss,
    new_figure,
    save_figure,
    write_json,
)

NAME = "vanishing_curvature"
VARIANTS = [("tanh", False), ("relu", False), ("tanh", True), ("relu", True)]


def variant_name(activation: str, residual: bool) -> str:
    """Legend text of an architecture."""
    return f"{'residual' if residual else 'plain'} {activation}"


def first_layer(model: nn.Module) -> list[torch.Tensor]:
    """Parameters of the first ``nn.Linear``."""
    layer = model.inp if isinstance(model, ResidualMLP) else model[0]  # type: ignore[index]
    return list(layer.parameters())


def curvature_vs_depth(depths: list[int], seeds: int, num_train: int, seed: int) -> dict[str, Any]:
    """λ_max (first layer and whole network) at initialisation, per architecture and depth, mean over seeds."""
    data = load_digits_data(num_train, 0, seed=seed)
    batch = data.train_batch()
    out: dict[str, Any] = {}
    for act, res in VARIANTS:
        rows: dict[str, list[float]] = {"first_layer": [], "all": [], "first_layer_min": [], "first_layer_max": []}
        for depth in depths:
            first, whole = [], []
            for s in range(seeds):
                model = make_mlp(depth=depth, width=64, activation=act, residual=res, seed=seed + s)  # type: ignore[arg-type]
                first.append(
                    hessian_eigenvalues(model, mse_loss, batch, k=1, max_iter=100, params=first_layer(model)).sharpness
                )
                whole.append(hessian_eigenvalues(model, mse_loss, batch, k=1, max_iter=100).sharpness)
            rows["first_layer"].append(math.exp(sum(math.log(abs(v) + 1e-300) for v in first) / seeds))
            rows["first_layer_min"].append(min(first))
            rows["first_layer_max"].append(max(first))
            rows["all"].append(sum(whole) / seeds)
        out[variant_name(act, res)] = rows
    return out


def train_deep(depth: int, steps: int, num_train: int, seed: int) -> list[dict[str, Any]]:
    """Full-batch GD (three learning rates) and Adam on the plain tanh net of ``depth`` layers."""
    data = load_digits_data(num_train, 0, seed=seed)
    batch = data.train_batch()
    runs: list[dict[str, Any]] = []
    optimizers = [("GD", 0.03), ("GD", 0.1), ("GD", 0.3), ("Adam", 1e-3)]
    for name, lr in optimizers:
        model = make_mlp(depth=depth, width=64, activation="tanh", seed=seed)
        opt = (
            torch.optim.Adam(model.parameters(), lr=lr)
            if name == "Adam"
            else torch.optim.SGD(model.parameters(), lr=lr)
        )
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = mse_loss(model, batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs.append({"optimizer": name, "lr": lr, "loss": losses, "train_accuracy": accuracy(model, batch)})
    return runs


def plot(depths: list[int], curv: dict[str, Any], runs: list[dict[str, Any]], deep: int, path: Path, sub: str) -> None:
    """λ_max vs depth (first layer, whole net) and the training curves of the deep plain net."""
    fig, axes = new_figure(1, 3, figsize=(17, 4.9))
    for i, (name, rows) in enumerate(curv.items()):
        ls = "--" if name.startswith("residual") else "-"
        axes[0].plot(depths, rows["first_layer"], color=f"C{i}", ls=ls, marker="o", lw=1.7, label=name)
        axes[0].fill_between(depths, rows["first_layer_min"], rows["first_layer_max"], color=f"C{i}", alpha=0.15)
        axes[1].plot(depths, rows["all"], color=f"C{i}", ls=ls, marker="o", lw=1.7, label=name)
    for ax, what in ((axes[0], "first-layer block"), (axes[1], "all parameters")):
        ax.set(xscale="log", yscale="log", xlabel="depth (hidden layers)", ylabel="λ_max at initialisation")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_title(f"({'ab'[ax is axes[1]]}) λ_max of the Hessian, {what}")
        ax.legend(fontsize="small", title="solid: plain, dashed: residual", title_fontsize="small")
    for j, r in enumerate(runs):
        axes[2].plot(range(1, len(r["loss"]) + 1), r["loss"], color=f"C{j + 4}", lw=1.6,
                     label=f"{r['optimizer']} lr={r['lr']:g} (train acc {r['train_accuracy']:.2f})")  # fmt: skip
    axes[2].set(xlabel="step", ylabel="training loss (MSE)", yscale="log",
                title=f"(c) plain tanh, depth {deep}: full-batch GD vs Adam")  # fmt: skip
    axes[2].legend(fontsize="small")
    save_figure(fig, path, f"Vanishing curvature at initialisation: width-64 MLPs on digits ({sub})")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    parser = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures")
    args = parser.parse_args(argv)
    if args.fast:
        depths, seeds, num_train, deep, steps = [1, 2, 4, 8, 16], 1, 256, 16, 100
    else:
        depths, seeds, num_train, deep, steps = [1, 2, 4, 8, 16, 32], 3, 512, 16, 500
    t0 = time.perf_counter()
    curv = curvature_vs_depth(depths, seeds, num_train, args.seed)
    runs = train_deep(deep, steps, num_train, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(depths, curv, runs, deep, png, f"{num_train} examples, {seeds} seed(s) per depth")
    elapsed = time.perf_counter() - t0
    summary = {
        name: {
            "first_layer_shallowest": rows["first_layer"][0],
            "first_layer_deepest": rows["first_layer"][-1],
            "first_layer_ratio_deepest_to_shallowest": rows["first_layer"][-1] / rows["first_layer"][0],
            "all_shallowest": rows["all"][0],
            "all_deepest": rows["all"][-1],
        }
        for name, rows in curv.items()
    }
    training = [
        {"optimizer": r["optimizer"], "lr": r["lr"], "final_loss": r["loss"][-1], "train_accuracy": r["train_accuracy"]}
        for r in runs
    ]
    config = {"depths": depths, "seeds": seeds, "num_train": num_train, "width": 64, "deep_depth": deep, "steps": steps}
    write_json(
        out / f"{NAME}.json",
        {"config": config, "curvature": curv, "summary": summary, "training": training, "wall_time_s": elapsed},
    )
    d0, d1 = depths[0], depths[-1]
    parts = [
        f"{name}: first-layer λ_max {s['first_layer_shallowest']:.3g} (depth {d0}) → {s['first_layer_deepest']:.3g} "
        f"(depth {d1}), whole-network λ_max {s['all_shallowest']:.3g} → {s['all_deepest']:.3g}"
        for name, s in summary.items()
    ]
    train_text = ", ".join(
        f"{t['optimizer']} lr={t['lr']:g} loss {t['final_loss']:.3f} (acc {t['train_accuracy']:.2f})" for t in training
    )
    print(
        f"Vanishing curvature ({num_train} digits, width 64, default init, MSE): " + "; ".join(parts) + ". "
        f"Training the plain tanh net of depth {deep} for {steps} full-batch steps: {train_text}. "
        f"Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
