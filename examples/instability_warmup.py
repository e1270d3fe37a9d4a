"""Loss curvature and training instability (Gilmer et al. 2021, arXiv 2110.04369) on scikit-learn's digits.

Full-batch gradient descent (MSE on one-hot targets, tanh MLP whose read-out layer is initialised 3x larger than
PyTorch's default, so that training starts in a sharp region) at a large peak learning rate, without and with
linear learning-rate warm-ups of several lengths. The sharpness λ_max(H) of the fixed training batch is measured with
``hessian_eigenvalues`` throughout training (densely at the start), and the edge ratio η_t·λ/2 is plotted:
the quadratic model is stable iff it is below 1 (η·λ < 2).

Paper: training blows up when η·λ goes well past 2 early in training; warm-up works by steering the early
trajectory into flatter regions, so η·λ stays near 2 while the learning rate rises.

Run ``python examples/instability_warmup.py [--fast] [--out DIR]``; writes ``instability_warmup.png`` and
``instability_warmup.json`` into ``--out``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from lightning_curvature import hessian_eigenvalues
from lightning_curvature._digits import (
    example_parser,
    load_digits_data,
    make_mlp,
    mse_loss,
    new_figure,
    save_figure,
    write_json,
)

NAME = "instability_warmup"
DIVERGED = 1e3  # a full-batch MSE above this (it starts near 0.5) counts as divergence


def measure_now(step: int) -> bool:
    """Dense measurements early (every 2 steps for 40 steps), then every 5."""
    return step % 2 == 0 if step < 40 else step % 5 == 0


OUTPUT_SCALE = 3.0


def run(peak_lr: float, warmup: int, steps: int, num_train: int, seed: int) -> dict[str, Any]:
    """Full-batch GD with linear warm-up over ``warmup`` steps (0: none); stops on divergence."""
    data = load_digits_data(num_train, 0, seed=seed)
    batch = data.train_batch()
    model = make_mlp(depth=2, width=64, output_scale=OUTPUT_SCALE, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr)
    warm = None
    rec: dict[str, Any] = {"peak_lr": peak_lr, "warmup": warmup, "steps": [], "edge": [], "sharpness": []}
    losses: list[float] = []
    lrs: list[float] = []
    diverged_at = None
    for step in range(steps + 1):
        lr = peak_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else peak_lr
        for group in opt.param_groups:
            group["lr"] = lr
        loss = mse_loss(model, batch)
        value = float(loss.detach())
        if not math.isfinite(value) or value > DIVERGED:
            diverged_at = step
            break
        if measure_now(step) or step == steps:
            res = hessian_eigenvalues(
                model, mse_loss, batch, k=1, tol=1e-3, max_iter=100, return_warm_start=True, v0=warm
            )
            warm = res.warm_start
            rec["steps"].append(step)
            rec["sharpness"].append(res.sharpness)
            rec["edge"].append(lr * res.sharpness / 2.0)
        losses.append(value)
        lrs.append(lr)
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec.update(loss=losses, lr=lrs, diverged_at=diverged_at)
    return rec


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """Peak edge ratio, when it peaked, divergence, and the final loss."""
    edge = r["edge"]
    i_max = max(range(len(edge)), key=edge.__getitem__) if edge else None
    late = [e for s, e in zip(r["steps"], edge) if s >= max(r["warmup"], 1) + 20]
    return {
        "peak_lr": r["peak_lr"],
        "warmup_steps": r["warmup"],
        "edge_ratio_init": edge[0] if edge else math.nan,
        "edge_ratio_max": edge[i_max] if i_max is not None else math.nan,
        "edge_ratio_max_step": r["steps"][i_max] if i_max is not None else None,
        "edge_ratio_after_warmup_mean": sum(late) / len(late) if late else math.nan,
        "diverged_at_step": r["diverged_at"],
        "final_loss": r["loss"][-1] if r["diverged_at"] is None else math.inf,
        "min_loss": min(r["loss"]),
    }


def label(r: dict[str, Any]) -> str:
    """Legend text of one run."""
    return f"η = {r['peak_lr']:g}, " + (f"{r['warmup']}-step warm-up" if r["warmup"] else "no warm-up")


def plot(results: list[dict[str, Any]], path: Path, subtitle: str) -> None:
    """Edge ratio, loss and learning rate; divergence marked with a cross."""
    fig, axes = new_figure(1, 3, figsize=(16, 4.8))
    for i, r in enumerate(results):
        c, ls, lw = f"C{i}", "-", 1.6
        axes[0].plot(r["steps"], r["edge"], color=c, ls=ls, lw=lw, label=label(r))
        axes[1].plot(range(len(r["loss"])), r["loss"], color=c, ls=ls, lw=lw, label=label(r))
        axes[2].plot(range(len(r["lr"])), r["lr"], color=c, ls=ls, lw=lw, label=label(r))
        if r["diverged_at"] is not None:
            for ax, ys in ((axes[0], r["edge"]), (axes[1], r["loss"])):
                if ys:
                    x = r["steps"][-1] if ax is axes[0] else len(r["loss"]) - 1
                    ax.plot([x], [ys[-1]], marker="X", ms=11, color=c, mec="black", ls="none")
    axes[0].axhline(1.0, color="black", ls="--", lw=1.3, label="η·λ/2 = 1 (stability limit)")
    axes[0].set(xlabel="step", ylabel="η_t · λ_max / 2", yscale="log", title="(a) edge ratio η·λ/2 (X = diverged)")
    axes[1].set(xlabel="step", ylabel="training loss (MSE)", yscale="log", title="(b) full-batch training loss")
    axes[2].set(xlabel="step", ylabel="learning rate η_t", title="(c) learning-rate schedule")
    for ax in axes:
        ax.legend(fontsize="small")
    save_figure(fig, path, f"Instability and warm-up: full-batch GD, tanh MLP on digits ({subtitle})")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    parser = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures")
    args = parser.parse_args(argv)
    peak_lr = 0.8
    if args.fast:
        warmups, steps, num_train = [0, 50, 100], 150, 300
    else:
        warmups, steps, num_train = [0, 50, 100, 200], 300, 1000
    t0 = time.perf_counter()
    results = [run(peak_lr, w, steps, num_train, args.seed) for w in warmups]
    summary = [summarise(r) for r in results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(results, png, f"read-out init x{OUTPUT_SCALE:g}, {num_train} examples, {steps} steps")
    elapsed = time.perf_counter() - t0
    config = {
        "peak_lr": peak_lr,
        "warmups": warmups,
        "steps": steps,
        "num_train": num_train,
        "output_scale": OUTPUT_SCALE,
        "seed": args.seed,
    }
    write_json(out / f"{NAME}.json", {"config": config, "summary": summary, "wall_time_s": elapsed})
    parts = []
    for s in summary:
        what = f"η={s['peak_lr']:g} " + (f"with {s['warmup_steps']}-step warm-up" if s["warmup_steps"] else "without")
        fate = (
            f"diverged at step {s['diverged_at_step']}"
            if s["diverged_at_step"] is not None
            else f"trained to loss {s['final_loss']:.4f}, η·λ/2 ≈ {s['edge_ratio_after_warmup_mean']:.2f} after warm-up"
        )
        parts.append(
            f"{what}: η·λ/2 = {s['edge_ratio_init']:.2f} at step 0, max {s['edge_ratio_max']:.3g} at step "
            f"{s['edge_ratio_max_step']}, {fate}"
        )
    print(
        f"Instability and warm-up ({num_train} digits, full-batch GD, MSE, tanh MLP with read-out init "
        f"x{OUTPUT_SCALE:g}): " + "; ".join(parts) + ". "
        f"Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
