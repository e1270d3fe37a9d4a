"""The break-even point (Jastrzebski et al. 2020, arXiv 2002.09572) on scikit-learn's digits.

Mini-batch SGD (MSE on one-hot targets, tanh MLP) with a small and a large learning rate. On a fixed batch of
training examples we measure, over training, the sharpness λ_1(H) (``hessian_eigenvalues``, warm-started), the
top eigenvalue λ_1(K) of the per-example gradient covariance K and its condition number λ_1(K)/λ_10(K)
(``gradient_covariance``, k=10), side by side for the two learning rates; against the step and against the
training loss (the second comparison removes the confound that the larger learning rate simply trains faster).

Paper: early in training SGD reaches a point after which a larger learning rate (or a smaller batch) gives a
lower λ_1(H), a lower λ_1(K) and a better-conditioned K.

Run ``python examples/break_even_point.py [--fast] [--out DIR]``; writes ``break_even_point.png`` and
``break_even_point.json`` into ``--out``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from lightning_curvature import gradient_covariance, hessian_eigenvalues
from lightning_curvature._digits import (
    example_parser,
    load_digits_data,
    make_mlp,
    minibatch_loader,
    mse_loss,
    new_figure,
    save_figure,
    write_json,
)

NAME = "break_even_point"
QUANTITIES = ("lambda_H", "lambda_K", "cond_K")
LABELS = {"lambda_H": "λ_1(H)", "lambda_K": "λ_1(K)", "cond_K": "λ_1(K) / λ_10(K)"}


def run(lr: float, steps: int, every: int, num_train: int, batch_size: int, curv_examples: int, seed: int) -> dict:
    """Mini-batch SGD; curvature and gradient-covariance statistics every ``every`` steps on a fixed batch."""
    data = load_digits_data(num_train, 0, seed=seed)
    full = data.train_batch()
    fixed = tuple(t[:curv_examples] for t in full)
    model = make_mlp(depth=2, width=64, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = minibatch_loader(data, batch_size, seed=seed)
    batches = iter(loader)
    warm = None
    rec: dict[str, Any] = {"lr": lr, "steps": [], "loss": [], **{q: [] for q in QUANTITIES}, "trace_K": []}
    for step in range(steps + 1):
        if step % every == 0:
            res = hessian_eigenvalues(
                model, mse_loss, fixed, k=1, tol=1e-3, max_iter=100, return_warm_start=True, v0=warm
            )
            warm = res.warm_start
            cov = gradient_covariance(model, mse_loss, fixed, k=10)
            with torch.no_grad():
                rec["loss"].append(float(mse_loss(model, full)))
            rec["steps"].append(step)
            rec["lambda_H"].append(res.sharpness)
            rec["lambda_K"].append(float(cov.eigenvalues[0]))
            rec["cond_K"].append(cov.condition_number)
            rec["trace_K"].append(cov.trace)
        if step == steps:
            break
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        opt.zero_grad()
        mse_loss(model, batch).backward()
        opt.step()
    return rec


def at_loss(r: dict[str, Any], level: float, key: str) -> float:
    """``key`` at the first measurement whose training loss is at most ``level`` (NaN if never)."""
    return next((v for v, loss in zip(r[key], r["loss"]) if loss <= level), math.nan)


def summarise(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """The three quantities of both runs: late in training, and at a matched training loss."""
    level = max(small["loss"][-1], large["loss"][-1])  # a loss both runs reach
    n_late = max(1, len(small["steps"]) // 3)
    out: dict[str, Any] = {"matched_loss": level, "runs": []}
    for r in (small, large):
        row: dict[str, Any] = {"lr": r["lr"], "final_loss": r["loss"][-1]}
        for q in QUANTITIES:
            row[f"{q}_late_mean"] = sum(r[q][-n_late:]) / n_late
            row[f"{q}_at_matched_loss"] = at_loss(r, level, q)
            row[f"{q}_max"] = max(r[q])
        out["runs"].append(row)
    a, b = out["runs"]
    out["large_lr_lower"] = {f"{q}_late": b[f"{q}_late_mean"] < a[f"{q}_late_mean"] for q in QUANTITIES}
    out["large_lr_lower"].update(
        {f"{q}_at_matched_loss": b[f"{q}_at_matched_loss"] < a[f"{q}_at_matched_loss"] for q in QUANTITIES}
    )
    return out


def plot(results: list[dict[str, Any]], path: Path, subtitle: str) -> None:
    """Top row against the step, bottom row against the training loss; 2/η dashed in the λ_1(H) panels."""
    import matplotlib.ticker

    fig, axes = new_figure(2, 3, figsize=(16, 8.5))
    for i, r in enumerate(results):
        c = f"C{i}"
        lab = f"η = {r['lr']:g}"
        for j, q in enumerate(QUANTITIES):
            axes[0, j].plot(r["steps"], r[q], color=c, lw=1.6, marker=".", ms=4, label=lab)
            axes[1, j].plot(r["loss"], r[q], color=c, lw=1.6, marker=".", ms=4, label=lab)
    top = max(max(r["lambda_H"]) for r in results)
    ylim = max(top * 1.15, 2.0 / max(r["lr"] for r in results) * 1.1)  # 2/η of the small lr may be far above
    for i, r in enumerate(results):
        thr = 2.0 / r["lr"]
        text = f"2/η = {thr:.3g}" + (" (off scale)" if thr > ylim else "")
        for row in (0, 1):
            axes[row, 0].axhline(thr, color=f"C{i}", ls="--", lw=1.2, label=text)
    losses = [v for r in results for v in r["loss"]]
    ticks = [t for t in (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001) if min(losses) <= t <= max(losses)]
    for j, q in enumerate(QUANTITIES):
        axes[0, j].set(xlabel="step", ylabel=LABELS[q], title=f"({'abc'[j]}) {LABELS[q]} over training")
        axes[1, j].set(
            xlabel="training loss (log, decreasing →)",
            ylabel=LABELS[q],
            xscale="log",
            title=f"({'def'[j]}) {LABELS[q]} against training loss",
        )
        axes[1, j].invert_xaxis()
        axes[1, j].set_xticks(ticks, [f"{t:g}" for t in ticks])
        axes[1, j].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if q == "lambda_K":
            for row in (0, 1):
                axes[row, j].set_yscale("log")
    for ax in axes.ravel():
        ax.legend(fontsize="small")
    for row in (0, 1):
        axes[row, 0].set_ylim(0, ylim)
    save_figure(fig, path, f"Break-even point: mini-batch SGD, tanh MLP on digits ({subtitle})")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    parser = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures")
    args = parser.parse_args(argv)
    lrs, batch_size, curv_examples = [0.05, 0.5], 32, 256
    if args.fast:
        steps, every, num_train = 600, 60, 500
    else:
        steps, every, num_train = 3000, 100, 1000
    t0 = time.perf_counter()
    results = [run(lr, steps, every, num_train, batch_size, curv_examples, args.seed) for lr in lrs]
    summary = summarise(*results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(results, png, f"batch {batch_size}, {num_train} examples, {steps} steps, K and H on {curv_examples} examples")
    elapsed = time.perf_counter() - t0
    config = {
        "lrs": lrs,
        "batch_size": batch_size,
        "steps": steps,
        "measure_every": every,
        "num_train": num_train,
        "curvature_examples": curv_examples,
        "seed": args.seed,
    }
    series = [{k: r[k] for k in ("lr", "steps", "loss", *QUANTITIES, "trace_K")} for r in results]
    write_json(out / f"{NAME}.json", {"config": config, "summary": summary, "series": series, "wall_time_s": elapsed})
    a, b = summary["runs"]
    late = ", ".join(f"{LABELS[q]} {a[f'{q}_late_mean']:.3g} vs {b[f'{q}_late_mean']:.3g}" for q in QUANTITIES)
    matched = ", ".join(
        f"{LABELS[q]} {a[f'{q}_at_matched_loss']:.3g} vs {b[f'{q}_at_matched_loss']:.3g}" for q in QUANTITIES
    )
    print(
        f"Break-even point ({num_train} digits, SGD batch {batch_size}, MSE, tanh MLP), η={a['lr']:g} vs "
        f"η={b['lr']:g}: over the last third of training {late}; at the same training loss "
        f"{summary['matched_loss']:.4f}: {matched}. Final losses {a['final_loss']:.4f} vs {b['final_loss']:.4f}. "
        f"Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
