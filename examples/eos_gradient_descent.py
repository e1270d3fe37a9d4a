"""Edge of stability (Cohen et al. 2021, arXiv 2103.00065) on scikit-learn's digits.

Full-batch gradient descent with the half squared error on one-hot targets and a tanh MLP 64-64-64-10 (PyTorch's
default initialisation) at several learning rates η, over several seeds (data split and initialisation). Every few
steps the sharpness λ_max(H) of the full training batch is measured with ``hessian_eigenvalues`` (Lanczos,
warm-started from the previous measurement's Ritz vectors).

Paper: sharpness rises during training (progressive sharpening) until it reaches 2/η, then hovers just above
it while the loss keeps decreasing non-monotonically.

Run ``python examples/eos_gradient_descent.py [--fast] [--out DIR] [--seeds N]``; writes
``eos_gradient_descent.png`` and ``eos_gradient_descent.json`` into ``--out``.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch
from _digits import (
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

from lightning_curvature import hessian_eigenvalues

NAME = "eos_gradient_descent"


def run(lr: float, steps: int, every: int, num_train: int, seed: int) -> dict[str, Any]:
    """Full-batch GD at learning rate ``lr``; sharpness every ``every`` steps, loss every step."""
    batch = load_digits_data(num_train, seed=seed).train_batch()
    model = make_mlp(depth=2, width=64, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    warm = None
    rec: dict[str, Any] = {"lr": lr, "seed": seed, "steps": [], "sharpness": [], "loss": [], "num_hvp": 0}
    for step in range(steps + 1):
        if step % every == 0:
            res = hessian_eigenvalues(model, mse_loss, batch, k=1, tol=1e-3, return_warm_start=True, v0=warm)
            warm = res.warm_start
            rec["num_hvp"] += res.num_hvp
            rec["steps"].append(step)
            rec["sharpness"].append(res.sharpness)
        opt.zero_grad()
        loss = mse_loss(model, batch)
        rec["loss"].append(float(loss.detach()))
        if step == steps:
            break
        loss.backward()
        opt.step()
    return rec


def edge_statistics(r: dict[str, Any]) -> dict[str, Any]:
    """When the run reached 0.95·2/η, the edge ratio η·λ/2 afterwards, and how often the loss rose."""
    threshold = 2.0 / r["lr"]
    lam = r["sharpness"]
    reached = next((s for s, v in zip(r["steps"], lam) if v >= 0.95 * threshold), None)
    out: dict[str, Any] = {"sharpness_init": lam[0], "step_reached": reached, "final_loss": r["loss"][-1]}
    if reached is None:
        return out | {
            "ratio_after_mean": math.nan,
            "ratio_after_min": math.nan,
            "ratio_after_max": math.nan,
            "loss_increase_share": math.nan,
        }
    after = [v / threshold for s, v in zip(r["steps"], lam) if s >= reached + 50]
    loss_after = r["loss"][reached:]
    ups = sum(b > a for a, b in itertools.pairwise(loss_after))
    return out | {
        "ratio_after_mean": sum(after) / len(after) if after else math.nan,
        "ratio_after_min": min(after, default=math.nan),
        "ratio_after_max": max(after, default=math.nan),
        "loss_increase_share": ups / max(1, len(loss_after) - 1),
    }


def plot(results: dict[float, list[dict[str, Any]]], path: Path, subtitle: str) -> None:
    """Sharpness (median and seed range) with 2/η dashed, and the training loss, one colour per learning rate."""
    fig, axes = new_figure(1, 2, figsize=(13, 4.8))
    ax1, ax2 = axes[0]
    for i, (lr, runs) in enumerate(results.items()):
        c = f"C{i}"
        band(ax1, runs[0]["steps"], [r["sharpness"] for r in runs], color=c, label=f"η = {lr:g}: λ_max(H)")
        ax1.axhline(2.0 / lr, color=c, ls="--", lw=1.2, label=f"η = {lr:g}: 2/η = {2.0 / lr:.3g}")
        band(ax2, range(len(runs[0]["loss"])), [r["loss"] for r in runs], color=c, label=f"η = {lr:g}", lw=0.9)
    ax1.set(
        xlabel="step",
        ylabel="sharpness λ_max(H) of the training loss",
        title="(a) sharpness rises to 2/η (dashed) and stays there",
    )
    ax2.set(xlabel="step", ylabel="full-batch training loss (MSE)", yscale="log", title="(b) training loss")
    for ax in (ax1, ax2):
        ax.legend(fontsize="small")
    save_figure(fig, path, f"Edge of stability: full-batch GD, tanh MLP on digits ({subtitle})")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    args = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures").parse_args(argv)
    torch.set_num_threads(1)
    if args.fast:
        lrs, steps, every, num_train, seeds = [0.3, 0.5], 300, 10, 300, min(args.seeds, 2)
    else:
        lrs, steps, every, num_train, seeds = [0.2, 0.3, 0.4], 2000, 20, 1000, args.seeds
    seed_list = list(range(args.seed, args.seed + seeds))
    t0 = time.perf_counter()
    results = {lr: [run(lr, steps, every, num_train, s) for s in seed_list] for lr in lrs}
    summary = []
    for lr, runs in results.items():
        stats = [edge_statistics(r) for r in runs]
        row: dict[str, Any] = {"lr": lr, "threshold_2_over_lr": 2.0 / lr, "seeds": seed_list}
        row["runs_reaching_edge"] = sum(s["step_reached"] is not None for s in stats)
        for key in (
            "sharpness_init",
            "final_loss",
            "ratio_after_mean",
            "ratio_after_min",
            "ratio_after_max",
            "loss_increase_share",
        ):
            row[key] = spread([s[key] for s in stats])
        row["step_reached"] = spread([math.nan if s["step_reached"] is None else s["step_reached"] for s in stats])
        row["num_hvp"] = sum(r["num_hvp"] for r in runs)
        summary.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(results, png, f"{num_train} examples, {steps} steps, {seeds} seeds: median and seed range")
    elapsed = time.perf_counter() - t0
    config = {"lrs": lrs, "steps": steps, "measure_every": every, "num_train": num_train, "seeds": seed_list}
    write_json(out / f"{NAME}.json", {"config": config, "summary": summary, "wall_time_s": elapsed})
    parts = [
        f"η={s['lr']:g} (2/η={s['threshold_2_over_lr']:.3g}): {s['runs_reaching_edge']}/{seeds} seeds reached "
        f"0.95·2/η, at step {fmt(s['step_reached'], '.0f')}; afterwards η·λ/2 averaged {fmt(s['ratio_after_mean'])} "
        f"(lowest {fmt(s['ratio_after_min'])}, highest {fmt(s['ratio_after_max'])}); the loss rose on "
        f"{fmt(s['loss_increase_share'], '.2f')} of the steps after that; final loss {fmt(s['final_loss'])}"
        for s in summary
    ]
    print(
        f"Edge of stability ({num_train} digits, full-batch GD, MSE, tanh MLP, {seeds} seeds; mean (seed range)): "
        + "; ".join(parts)
        + f". Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
