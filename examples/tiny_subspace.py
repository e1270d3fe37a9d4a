"""Gradient descent in a tiny subspace (Gur-Ari et al. 2018, arXiv 1812.04754; Lowell 2022) on digits.

A tanh MLP (MSE on one-hot targets) is trained three ways: full-batch GD with a small learning rate (far below
the edge of stability), full-batch GD with a large one (it reaches the edge, 2/η), and mini-batch SGD. At a
series of steps the top-k Hessian eigenvectors (k = 10 = number of classes) of the full training batch are
computed with ``hessian_eigenvalues(..., return_eigenvectors=True)`` and the share of the gradient in their span,
``top_subspace_overlap`` = ‖P_k g‖²/‖g‖², is recorded (for SGD both for the full-batch gradient and for the
mini-batch gradient of the step). A random direction would have overlap k/P.

Paper: after a short initial phase the gradient lies mostly (overlap close to 1) in the top-k eigenspace.

Run ``python examples/tiny_subspace.py [--fast] [--out DIR]``; writes ``tiny_subspace.png`` and
``tiny_subspace.json`` into ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lightning_curvature import hessian_eigenvalues, top_subspace_overlap
from lightning_curvature._digits import (
    example_parser,
    flat_gradient,
    load_digits_data,
    make_mlp,
    minibatch_loader,
    mse_loss,
    new_figure,
    save_figure,
    write_json,
)

NAME = "tiny_subspace"
K = 10
FLOOR = 1e-6  # overlaps are drawn on a log axis; exact zeros are shown at this floor


def schedule(steps: int, every: int) -> list[int]:
    """Measurement steps: dense at the start, then every ``every``."""
    early = [s for s in (0, 5, 20, 50) if s < every]
    return sorted({*early, *range(0, steps + 1, every), steps})


def run(
    name: str, lr: float, batch_size: int | None, steps: int, every: int, num_train: int, seed: int
) -> dict[str, Any]:
    """GD (``batch_size=None``) or SGD; top-k eigenspace of the full-batch Hessian and gradient overlaps."""
    data = load_digits_data(num_train, 0, seed=seed)
    full = data.train_batch()
    model = make_mlp(depth=2, width=64, seed=seed)
    num_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = minibatch_loader(data, batch_size, seed=seed) if batch_size else None
    batches = iter(loader) if loader is not None else None
    when = set(schedule(steps, every))
    warm = None
    rec: dict[str, Any] = {
        "name": name, "lr": lr, "batch_size": batch_size, "num_params": num_params,
        "steps": [], "overlap_full": [], "overlap_minibatch": [], "lambda_1": [], "lambda_k": [], "loss": [],
    }  # fmt: skip
    for step in range(steps + 1):
        if batches is not None and loader is not None:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
        else:
            batch = full
        if step in when:
            res = hessian_eigenvalues(
                model, mse_loss, full, k=K, tol=1e-3, max_iter=200,
                return_eigenvectors=True, return_warm_start=True, v0=warm,
            )  # fmt: skip
            warm = res.warm_start
            assert res.eigenvectors is not None
            rec["steps"].append(step)
            rec["overlap_full"].append(top_subspace_overlap(flat_gradient(model, mse_loss, full), res.eigenvectors))
            if batch_size:
                g = flat_gradient(model, mse_loss, batch)
                rec["overlap_minibatch"].append(top_subspace_overlap(g, res.eigenvectors))
            rec["lambda_1"].append(float(res.eigenvalues[0]))
            rec["lambda_k"].append(float(res.eigenvalues[-1]))
            with torch.no_grad():
                rec["loss"].append(float(mse_loss(model, full)))
        if step == steps:
            break
        opt.zero_grad()
        mse_loss(model, batch).backward()
        opt.step()
    return rec


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """Overlap at the start, its mean over the second half of training, and the random baseline."""
    half = [v for s, v in zip(r["steps"], r["overlap_full"]) if s >= r["steps"][-1] // 2]
    out = {
        "run": r["name"],
        "lr": r["lr"],
        "batch_size": r["batch_size"],
        "random_baseline_k_over_P": K / r["num_params"],
        "overlap_full_init": r["overlap_full"][0],
        "overlap_full_second_half_mean": sum(half) / len(half),
        "overlap_full_second_half_min": min(half),
        "overlap_full_second_half_max": max(half),
        "lambda_1_final": r["lambda_1"][-1],
        "threshold_2_over_lr": 2.0 / r["lr"],
        "final_loss": r["loss"][-1],
    }
    if r["overlap_minibatch"]:
        mb = [v for s, v in zip(r["steps"], r["overlap_minibatch"]) if s >= r["steps"][-1] // 2]
        out["overlap_minibatch_second_half_mean"] = sum(mb) / len(mb)
    return out


def plot(results: list[dict[str, Any]], path: Path, subtitle: str) -> None:
    """Overlap (log scale, random baseline dashed), sharpness against 2/η (dashed), training loss."""
    fig, axes = new_figure(1, 3, figsize=(17, 4.9))
    for i, r in enumerate(results):
        c = f"C{i}"
        axes[0].plot(r["steps"], [max(v, FLOOR) for v in r["overlap_full"]], color=c, lw=1.7, marker=".",
                     label=f"{r['name']}: full-batch gradient")  # fmt: skip
        if r["overlap_minibatch"]:
            axes[0].plot(r["steps"], [max(v, FLOOR) for v in r["overlap_minibatch"]], color=c, lw=1.2, ls=":",
                         marker="x", ms=4, label=f"{r['name']}: mini-batch gradient")  # fmt: skip
        axes[1].plot(r["steps"], r["lambda_1"], color=c, lw=1.7, label=f"{r['name']}: λ_1")
        axes[1].plot(r["steps"], r["lambda_k"], color=c, lw=1.0, alpha=0.6, label=f"{r['name']}: λ_{K}")
        axes[2].plot(r["steps"], r["loss"], color=c, lw=1.6, marker=".", label=r["name"])
    ymax = max(max(r["lambda_1"]) for r in results) * 1.15
    for i, r in enumerate(results):
        thr = 2.0 / r["lr"]
        if thr <= ymax:
            axes[1].axhline(thr, color=f"C{i}", ls="--", lw=1.1, label=f"{r['name']}: 2/η = {thr:.3g}")
    baseline = K / results[0]["num_params"]
    axes[0].axhline(baseline, color="black", ls="--", lw=1.2, label=f"random direction: k/P = {baseline:.1e}")
    axes[0].text(0.99, 0.02, f"values below {FLOOR:g} drawn at {FLOOR:g}", transform=axes[0].transAxes,
                 ha="right", va="bottom", fontsize="x-small", color="0.4")  # fmt: skip
    axes[0].set(xlabel="step", ylabel="‖P_k g‖² / ‖g‖²", yscale="log", ylim=(FLOOR / 2, 2.0),
                title=f"(a) share of the gradient in the top-{K} Hessian eigenspace")  # fmt: skip
    axes[1].set(xlabel="step", ylabel="Hessian eigenvalue", ylim=(0, ymax),
                title=f"(b) λ_1 and λ_{K} of the full-batch Hessian")  # fmt: skip
    axes[2].set(xlabel="step", ylabel="training loss (MSE)", yscale="log", title="(c) full-batch training loss")
    for ax in axes:
        ax.legend(fontsize="x-small")
    save_figure(
        fig,
        path,
        f"Tiny subspace: gradient overlap with the top-{K} Hessian eigenvectors, tanh MLP on digits ({subtitle})",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    parser = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures")
    args = parser.parse_args(argv)
    if args.fast:
        steps, every, num_train, eos_lr = 200, 40, 200, 0.7
    else:
        steps, every, num_train, eos_lr = 1000, 50, 1000, 0.4
    configs = [
        (f"GD η={0.05:g}", 0.05, None),
        (f"GD η={eos_lr:g}", eos_lr, None),
        ("SGD η=0.2, batch 32", 0.2, 32),
    ]
    t0 = time.perf_counter()
    results = [run(name, lr, bs, steps, every, num_train, args.seed) for name, lr, bs in configs]
    summary = [summarise(r) for r in results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(results, png, f"{num_train} examples, {steps} steps")
    elapsed = time.perf_counter() - t0
    config = {
        "k": K,
        "steps": steps,
        "measure_every": every,
        "num_train": num_train,
        "runs": configs,
        "seed": args.seed,
    }
    series = [{k: r[k] for k in ("name", "steps", "overlap_full", "overlap_minibatch", "lambda_1")} for r in results]
    write_json(out / f"{NAME}.json", {"config": config, "summary": summary, "series": series, "wall_time_s": elapsed})
    parts = []
    for s in summary:
        text = (
            f"{s['run']}: overlap {s['overlap_full_init']:.3f} at init, {s['overlap_full_second_half_mean']:.3g} on "
            f"average over the second half (range {s['overlap_full_second_half_min']:.2g}-"
            f"{s['overlap_full_second_half_max']:.2g})"
        )
        if "overlap_minibatch_second_half_mean" in s:
            text += f", mini-batch gradient {s['overlap_minibatch_second_half_mean']:.3g}"
        parts.append(text + f", final λ_1 {s['lambda_1_final']:.2f} vs 2/η {s['threshold_2_over_lr']:.3g}")
    print(
        f"Tiny subspace ({num_train} digits, MSE, tanh MLP, k={K}, random baseline "
        f"{summary[0]['random_baseline_k_over_P']:.1e}): " + "; ".join(parts) + f". Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
