"""Loss curvature, training instability and warm-up (Gilmer et al. 2021, arXiv 2110.04369) on scikit-learn's digits.

Full-batch gradient descent (half squared error on one-hot targets, tanh MLP 64-64-64-10 whose read-out layer is
initialised 3x larger than PyTorch's default, so training starts in a sharp region, λ_max ≈ 15) over several seeds:

* **mechanism**: at peak learning rate η = 0.8 (about 6x the initial 2/λ_max), without warm-up and with linear
  warm-ups of several lengths, λ_max of the training loss is measured with ``hessian_eigenvalues`` throughout
  training and drawn against the stability threshold 2/η_t of the current learning rate (the quadratic model is
  stable iff λ_max < 2/η_t); a constant η = 0.3 run is drawn beside them;
* **benefit**: a grid of peak learning rates × warm-up lengths (0 = constant learning rate), scored by the mean
  training loss over the last 20% of steps: which peak learning rates train without diverging, and whether the best
  warm-up run beats the best constant learning rate.

Paper: training blows up when η·λ_max goes well past 2 early in training; warm-up works by steering the early
trajectory into flatter regions (λ_max falls while η_t rises), which lets training use larger learning rates.

Run ``python examples/instability_warmup.py [--fast] [--out DIR] [--seeds N]``; writes ``instability_warmup.png``
and ``instability_warmup.json`` into ``--out``.
"""

from __future__ import annotations

import math
import statistics
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

NAME = "instability_warmup"
OUTPUT_SCALE = 3.0
DIVERGED = 1e3  # a full-batch MSE above this (it starts near 2) counts as divergence
LATE = 0.2  # runs are scored by their mean loss over the last 20% of steps


def measure_now(step: int) -> bool:
    """Dense curvature measurements early (every 2 steps for 40 steps), then every 5."""
    return step % 2 == 0 if step < 40 else step % 5 == 0


def lr_at(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up from ``peak/warmup`` to ``peak`` over ``warmup`` steps (0: constant ``peak``)."""
    return peak * min(1.0, (step + 1) / warmup) if warmup > 0 else peak


def run(peak: float, warmup: int, steps: int, num_train: int, seed: int, track: bool) -> dict[str, Any]:
    """Full-batch GD; λ_max every few steps if ``track``; stops on divergence."""
    batch = load_digits_data(num_train, seed=seed).train_batch()
    model = make_mlp(depth=2, width=64, output_scale=OUTPUT_SCALE, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=peak)
    warm = None
    rec: dict[str, Any] = {
        "peak_lr": peak,
        "warmup": warmup,
        "seed": seed,
        "steps": [],
        "sharpness": [],
        "threshold": [],
        "loss": [],
        "diverged_at": None,
    }
    for step in range(steps + 1):
        lr = lr_at(step, peak, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = mse_loss(model, batch)
        value = float(loss.detach())
        if not math.isfinite(value) or value > DIVERGED:
            rec["diverged_at"] = step
            break
        rec["loss"].append(value)
        if track and (measure_now(step) or step == steps):
            res = hessian_eigenvalues(model, mse_loss, batch, k=1, tol=1e-3, return_warm_start=True, v0=warm)
            warm = res.warm_start
            rec["steps"].append(step)
            rec["sharpness"].append(res.sharpness)
            rec["threshold"].append(2.0 / lr)
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rec


def late_loss(r: dict[str, Any]) -> float:
    """Mean training loss over the last 20% of steps (``inf`` if the run diverged)."""
    if r["diverged_at"] is not None:
        return math.inf
    n = len(r["loss"])
    return statistics.fmean(r["loss"][int((1 - LATE) * n) :])


def mechanism(r: dict[str, Any]) -> dict[str, Any]:
    """λ_max at step 0 and at the end of the warm-up, the largest η_t·λ/2 and whether the run diverged."""
    edge = [lam / thr for lam, thr in zip(r["sharpness"], r["threshold"])]
    end = r["warmup"] if r["warmup"] else 0
    at_end = next((lam for s, lam in zip(r["steps"], r["sharpness"]) if s >= end), math.nan)
    return {
        "sharpness_init": r["sharpness"][0] if r["sharpness"] else math.nan,
        "sharpness_end_of_warmup": at_end,
        "sharpness_final": r["sharpness"][-1] if r["diverged_at"] is None and r["sharpness"] else math.nan,
        "edge_ratio_max": max(edge, default=math.nan),
        "diverged": r["diverged_at"] is not None,
        "diverged_at": r["diverged_at"],
        "late_loss": late_loss(r),
    }


def label(peak: float, warmup: int) -> str:
    """Legend text of one setting."""
    return f"η = {peak:g}, " + (f"{warmup}-step warm-up" if warmup else "constant")


def plot(tracked: dict[tuple[float, int], list[dict[str, Any]]], grid: dict[str, Any], path: Path, sub: str) -> None:
    """(a) λ_max and 2/η_t, (b) training loss, (c) late loss against the peak learning rate per warm-up length."""
    fig, axes = new_figure(1, 3, figsize=(18, 5.2))
    ax_l, ax_loss, ax_g = axes[0]
    for i, ((peak, warmup), runs) in enumerate(tracked.items()):
        c = f"C{i}"
        longest = max(runs, key=lambda r: len(r["steps"]))
        band(ax_l, longest["steps"], [r["sharpness"] for r in runs], color=c, label=f"{label(peak, warmup)}: λ_max")
        ax_l.plot(
            longest["steps"], longest["threshold"], color=c, ls="--", lw=1.1, label=f"{label(peak, warmup)}: 2/η_t"
        )
        longest_loss = max(runs, key=lambda r: len(r["loss"]))
        band(ax_loss, range(len(longest_loss["loss"])), [r["loss"] for r in runs], color=c, label=label(peak, warmup))
        for r in runs:
            if r["diverged_at"] is not None and r["sharpness"]:
                ax_l.plot([r["steps"][-1]], [r["sharpness"][-1]], marker="X", ms=10, color=c, mec="black", ls="none")
                ax_loss.plot([len(r["loss"]) - 1], [r["loss"][-1]], marker="X", ms=10, color=c, mec="black", ls="none")
    ax_l.set(
        xlabel="step",
        ylabel="λ_max(H) (solid) and 2/η_t (dashed)",
        yscale="log",
        title="(a) sharpness against the threshold of the current lr (X: diverged)",
    )
    ax_loss.set(xlabel="step", ylabel="full-batch training loss (MSE)", yscale="log", title="(b) training loss")
    peaks = grid["peak_lrs"]
    for j, warmup in enumerate(grid["warmups"]):
        rows = grid["late_loss"][str(warmup)]  # seeds × peaks
        band(
            ax_g,
            peaks,
            rows,
            color=f"C{j + 5}",
            label="constant lr" if warmup == 0 else f"{warmup}-step warm-up",
            marker="o",
            ms=4,
            require_all=True,
        )
    ax_g.set(
        xlabel="peak learning rate η",
        ylabel=f"mean training loss, last {LATE:.0%} of steps",
        xscale="log",
        yscale="log",
        title="(c) outcome per peak lr (drawn where no seed diverged)",
    )
    ax_g.set_xticks(peaks, [f"{p:g}" for p in peaks])
    for ax in (ax_l, ax_loss, ax_g):
        ax.legend(fontsize="x-small")
    save_figure(fig, path, f"Instability and warm-up: full-batch GD, tanh MLP on digits ({sub})")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    args = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures").parse_args(argv)
    torch.set_num_threads(1)
    if args.fast:
        steps, num_train, seeds = 150, 300, min(args.seeds, 2)
        tracked_settings = [(0.8, 0), (0.8, 50), (0.3, 0)]
        peaks, warmups = [0.2, 0.4, 0.8, 1.6], [0, 50]
    else:
        steps, num_train, seeds = 600, 1000, args.seeds
        tracked_settings = [(0.8, 0), (0.8, 50), (0.8, 100), (0.8, 200), (0.3, 0)]
        peaks, warmups = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 1.6], [0, 50, 100, 200]
    seed_list = list(range(args.seed, args.seed + seeds))
    t0 = time.perf_counter()
    tracked = {(p, w): [run(p, w, steps, num_train, s, track=True) for s in seed_list] for p, w in tracked_settings}
    grid_runs = {
        (p, w): [run(p, w, steps, num_train, s, track=False) for s in seed_list] for w in warmups for p in peaks
    }
    grid: dict[str, Any] = {"peak_lrs": peaks, "warmups": warmups, "late_loss": {}, "diverged": {}}
    for w in warmups:
        grid["late_loss"][str(w)] = [[late_loss(grid_runs[p, w][i]) for p in peaks] for i in range(seeds)]
        grid["diverged"][str(w)] = [sum(r["diverged_at"] is not None for r in grid_runs[p, w]) for p in peaks]
    per_warmup: list[dict[str, Any]] = []
    for w in warmups:
        rows = grid["late_loss"][str(w)]
        stable = [i for i, n_div in enumerate(grid["diverged"][str(w)]) if n_div == 0]
        # the setting a practitioner would pick: lowest mean late loss among peak lrs that trained on every seed
        pick = min(stable, key=lambda i: statistics.fmean(row[i] for row in rows), default=None)
        per_warmup.append(
            {
                "warmup": w,
                "largest_peak_lr_trained_on_every_seed": peaks[stable[-1]] if stable else math.nan,
                "best_peak_lr": peaks[pick] if pick is not None else math.nan,
                "best_late_loss": spread([row[pick] if pick is not None else math.nan for row in rows]),
                # hindsight per seed: the lowest late loss over every peak lr that trained on that seed
                "lowest_late_loss_any_peak": spread([min(row) for row in rows]),
            }
        )
    const = per_warmup[0]
    for row in per_warmup[1:]:
        row["beats_best_constant_on_seeds"] = sum(
            a < b for a, b in zip(row["best_late_loss"]["values"], const["best_late_loss"]["values"])
        )
    mech: list[dict[str, Any]] = []
    for (p, w), runs in tracked.items():
        stats = [mechanism(r) for r in runs]
        mech.append(
            {
                "peak_lr": p,
                "warmup": w,
                "diverged_on_seeds": sum(s["diverged"] for s in stats),
                **{
                    k: spread([s[k] for s in stats])
                    for k in (
                        "sharpness_init",
                        "sharpness_end_of_warmup",
                        "sharpness_final",
                        "edge_ratio_max",
                        "late_loss",
                    )
                },
            }
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(tracked, grid, png, f"read-out init x{OUTPUT_SCALE:g}, {num_train} examples, {steps} steps, {seeds} seeds")
    elapsed = time.perf_counter() - t0
    config = {
        "steps": steps,
        "num_train": num_train,
        "output_scale": OUTPUT_SCALE,
        "seeds": seed_list,
        "tracked": tracked_settings,
        "late_fraction": LATE,
    }
    series = [
        {
            "peak_lr": r["peak_lr"],
            "warmup": r["warmup"],
            "seed": r["seed"],
            "steps": r["steps"],
            "sharpness": r["sharpness"],
            "threshold": r["threshold"],
        }
        for runs in tracked.values()
        for r in runs
    ]
    write_json(
        out / f"{NAME}.json",
        {
            "config": config,
            "mechanism": mech,
            "grid": grid,
            "per_warmup": per_warmup,
            "series": series,
            "wall_time_s": elapsed,
        },
    )
    mech_text = "; ".join(
        f"{label(m['peak_lr'], m['warmup'])}: λ_max {fmt(m['sharpness_init'])} at step 0"
        + (f", {fmt(m['sharpness_end_of_warmup'])} at the end of the warm-up" if m["warmup"] else "")
        + f", max η_t·λ/2 {fmt(m['edge_ratio_max'])}, diverged on {m['diverged_on_seeds']}/{seeds} seeds"
        for m in mech
    )
    grid_text = "; ".join(
        ("constant lr" if w["warmup"] == 0 else f"{w['warmup']}-step warm-up")
        + f": largest peak lr that trained on every seed {w['largest_peak_lr_trained_on_every_seed']:g}, best "
        f"of those (lowest mean) {w['best_peak_lr']:g} with late loss {fmt(w['best_late_loss'])}, lowest late loss "
        f"of any peak lr per seed (hindsight) {fmt(w['lowest_late_loss_any_peak'])}"
        + (f", below the best constant lr on {w['beats_best_constant_on_seeds']}/{seeds} seeds" if w["warmup"] else "")
        for w in per_warmup
    )
    print(
        f"Instability and warm-up ({num_train} digits, full-batch GD, MSE, tanh MLP with read-out init "
        f"x{OUTPUT_SCALE:g}, {seeds} seeds; mean (seed range)). Mechanism: {mech_text}. Grid of peak lrs "
        f"{peaks}: {grid_text}. Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
