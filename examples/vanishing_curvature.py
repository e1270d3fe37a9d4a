"""Vanishing curvature at initialisation (Orvieto et al. 2021, arXiv 2106.03763) on scikit-learn's digits.

Fully connected networks of width 8 to 64 and depth 1 to 128 (hidden layers), initialised at the critical variance
of their activation: ReLU with He (weight variance 2/fan_in) and tanh with LeCun (1/fan_in), zero biases. For
contrast, PyTorch's default ``nn.Linear`` initialisation (variance 1/(3·fan_in), below critical) at width 64. Loss:
half squared error on one-hot targets on 512 examples. At initialisation, over several seeds:

* λ_max of the Hessian of every parameter except the read-out layer (``hessian_eigenvalues(..., params=...)``): the
  read-out block of the MSE Hessian is (1/N)·Σ hhᵀ ⊗ I, large whatever the depth, and would hide the rest;

then, at depth 32 and widths 8 and 64, full-batch gradient descent at η = 1.9/λ_max (λ_max of the whole network at
initialisation, so that GD is as fast as it can be while stable) against Adam (lr 1e-3).

Paper: at random initialisation, the curvature of deep networks without normalisation or residual connections
vanishes with depth when the width is small compared to the depth (even at the critical initialisation); SGD is
then slow to leave the initial plateau while adaptive methods, which rescale each coordinate, escape it.

Run ``python examples/vanishing_curvature.py [--fast] [--out DIR] [--seeds N]``; writes ``vanishing_curvature.png``
and ``vanishing_curvature.json`` into ``--out``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from _digits import (
    Activation,
    Init,
    accuracy,
    band,
    example_parser,
    fmt,
    load_digits_data,
    make_mlp,
    mse_loss,
    new_figure,
    save_figure,
    spread,
    write_json,
)
from torch import nn

from lightning_curvature import hessian_eigenvalues

NAME = "vanishing_curvature"
FAMILIES: dict[str, tuple[Activation, Init]] = {"ReLU, He init": ("relu", "he"), "tanh, LeCun init": ("tanh", "lecun")}
DEFAULT = {"ReLU, He init": "ReLU, PyTorch default init", "tanh, LeCun init": "tanh, PyTorch default init"}


def hidden_params(model: nn.Sequential) -> list[torch.Tensor]:
    """Every parameter except the read-out layer's."""
    return [p for layer in list(model)[:-1] for p in layer.parameters()]


def sharpness(model: nn.Sequential, batch: Any, params: list[torch.Tensor] | None = None) -> float:
    """λ_max of the Hessian (of ``params``, default all)."""
    return hessian_eigenvalues(model, mse_loss, batch, k=1, tol=1e-3, params=params).sharpness


def curvature_vs_depth(widths: list[int], depths: list[int], seeds: list[int], batch: Any) -> dict[str, Any]:
    """λ_max without the read-out block, per family, width and depth: one list of per-seed values per depth."""
    out: dict[str, Any] = {}
    for family, (act, init) in FAMILIES.items():
        out[family] = {}
        for w in widths:
            out[family][str(w)] = [
                [
                    sharpness(m, batch, hidden_params(m))
                    for m in (make_mlp(d, w, activation=act, init=init, seed=s) for s in seeds)
                ]
                for d in depths
            ]
        w = widths[-1]
        out[DEFAULT[family]] = {
            str(w): [
                [sharpness(m, batch, hidden_params(m)) for m in (make_mlp(d, w, activation=act, seed=s) for s in seeds)]
                for d in depths
            ]
        }  # type: ignore[arg-type]
    return out


def train(family: str, depth: int, width: int, optimizer: str, steps: int, batch: Any, seed: int) -> dict[str, Any]:
    """Full-batch GD at 1.9/λ_max(init) or Adam (1e-3); the loss every step."""
    act, init = FAMILIES[family]
    model = make_mlp(depth, width, activation=act, init=init, seed=seed)  # type: ignore[arg-type]
    lam = sharpness(model, batch)
    if optimizer == "GD":
        lr = 1.9 / lam
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        lr = 1e-3
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = mse_loss(model, batch)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(mse_loss(model, batch)))
    return {
        "family": family,
        "depth": depth,
        "width": width,
        "optimizer": optimizer,
        "seed": seed,
        "lr": lr,
        "lambda_max_init": lam,
        "loss": losses,
        "train_accuracy": accuracy(model, batch),
    }


def plot(depths: list[int], curv: dict[str, Any], runs: list[dict[str, Any]], path: Path, sub: str) -> None:
    """λ_max vs depth per width (one panel per family) and the training curves at depth 32."""
    fig, axes = new_figure(1, 4, figsize=(24, 5.2))
    ax = axes[0]
    for j, family in enumerate(FAMILIES):
        for i, (w, rows) in enumerate(curv[family].items()):
            band(
                ax[j],
                depths,
                [[row[s] for row in rows] for s in range(len(rows[0]))],
                color=f"C{i}",
                label=f"width {w}",
                marker="o",
                ms=4,
            )
        for w, rows in curv[DEFAULT[family]].items():
            band(
                ax[j],
                depths,
                [[row[s] for row in rows] for s in range(len(rows[0]))],
                color="black",
                ls="--",
                label=f"width {w}, PyTorch default init",
                marker="x",
                ms=5,
            )
        ax[j].set(
            xscale="log",
            yscale="log",
            xlabel="depth (hidden layers)",
            ylabel="λ_max at init, all parameters but the read-out",
            title=f"({'ab'[j]}) {family}: curvature at initialisation",
        )
        ax[j].set_xticks(depths, [str(d) for d in depths])
    for j, family in enumerate(FAMILIES):
        a = ax[2 + j]
        keys = sorted({(r["width"], r["optimizer"]) for r in runs if r["family"] == family})
        widths = sorted({w for w, _ in keys})
        for w, opt in keys:
            rs = [r for r in runs if r["family"] == family and r["width"] == w and r["optimizer"] == opt]
            label = f"width {w}, " + ("GD η = 1.9/λ_max(init)" if opt == "GD" else "Adam lr 1e-3")
            band(
                a,
                range(len(rs[0]["loss"])),
                [r["loss"] for r in rs],
                color="C0" if w == widths[0] else "C3",
                label=label,
                ls="-" if opt == "Adam" else "--",
            )
        depth = runs[0]["depth"]
        a.set(
            xlabel="step",
            ylabel="full-batch training loss (MSE)",
            yscale="log",
            title=f"({'cd'[j]}) {family}, depth {depth}: GD against Adam",
        )
    for a in ax:
        a.legend(fontsize="x-small")
    save_figure(fig, path, f"Vanishing curvature at initialisation: MLPs on digits ({sub}; median and seed range)")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    args = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures", default_seeds=5).parse_args(
        argv
    )
    torch.set_num_threads(1)
    if args.fast:
        widths, depths, num_train, deep, steps, seeds = [8, 32], [1, 4, 16], 128, 16, 60, min(args.seeds, 2)
    else:
        widths, depths, num_train, deep, steps = [8, 16, 32, 64], [1, 2, 4, 8, 16, 32, 64, 128], 512, 32, 500
        seeds = args.seeds
    seed_list = list(range(args.seed, args.seed + seeds))
    batch = load_digits_data(num_train, seed=args.seed).train_batch()
    t0 = time.perf_counter()
    curv = curvature_vs_depth(widths, depths, seed_list, batch)
    train_widths = [widths[0], widths[-1]]
    runs = [
        train(f, deep, w, o, steps, batch, s)
        for f in FAMILIES
        for w in train_widths
        for o in ("GD", "Adam")
        for s in seed_list
    ]
    summary: dict[str, Any] = {"curvature": {}, "training": []}
    for family, per_width in curv.items():
        for w, rows in per_width.items():
            first, last = rows[0], rows[-1]
            summary["curvature"][f"{family}, width {w}"] = {
                "lambda_shallowest": spread(first),
                "lambda_deepest": spread(last),
                "median_ratio_deepest_to_shallowest": spread([last[s] / first[s] for s in range(seeds)])["median"],
                "seeds_deepest_below_shallowest": sum(last[s] < first[s] for s in range(seeds)),
                "median_per_depth": [spread(row)["median"] for row in rows],
            }
    for f in FAMILIES:
        for w in train_widths:
            for o in ("GD", "Adam"):
                rs = [r for r in runs if r["family"] == f and r["width"] == w and r["optimizer"] == o]
                summary["training"].append(
                    {
                        "family": f,
                        "width": w,
                        "depth": deep,
                        "optimizer": o,
                        "lr": spread([r["lr"] for r in rs]),
                        "final_loss": spread([r["loss"][-1] for r in rs]),
                        "train_accuracy": spread([r["train_accuracy"] for r in rs]),
                    }
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(depths, curv, runs, png, f"{num_train} examples, {seeds} seeds")
    elapsed = time.perf_counter() - t0
    config = {
        "widths": widths,
        "depths": depths,
        "num_train": num_train,
        "train_depth": deep,
        "train_widths": train_widths,
        "steps": steps,
        "seeds": seed_list,
    }
    write_json(
        out / f"{NAME}.json",
        {"config": config, "curvature": curv, "summary": summary, "training_curves": runs, "wall_time_s": elapsed},
    )
    d1 = depths[-1]
    ctext = "; ".join(
        f"{name}: medians by depth "
        + ", ".join(f"{v:.3g}" for v in s["median_per_depth"])
        + f" (range at depth {d1}: {s['lambda_deepest']['min']:.3g}–{s['lambda_deepest']['max']:.3g}), lower at "
        f"depth {d1} than at depth 1 on {s['seeds_deepest_below_shallowest']}/{seeds} seeds"
        for name, s in summary["curvature"].items()
    )
    ttext = "; ".join(
        f"{t['family']}, width {t['width']}, {t['optimizer']}"
        + (f" (η {fmt(t['lr'], center='median')})" if t["optimizer"] == "GD" else "")
        + f": loss {fmt(t['final_loss'], center='median')}, train acc {fmt(t['train_accuracy'], '.2f', 'median')}"
        for t in summary["training"]
    )
    print(
        f"Vanishing curvature ({num_train} digits, MSE, {seeds} seeds; median (seed range)). λ_max at init without "
        f"the read-out block, depths {depths}: {ctext}. Training at depth {deep} for {steps} full-batch steps: "
        f"{ttext}. Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
