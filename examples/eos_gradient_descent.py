"""Edge of stability (Cohen et al. 2021, arXiv 2103.00065) on scikit-learn's digits.

Full-batch gradient descent with MSE on one-hot targets and a tanh MLP, at several learning rates η. Every few
steps the sharpness λ_max(H) of the full training batch is measured with ``hessian_eigenvalues`` (Lanczos,
warm-started from the previous measurement's Ritz vectors).

Paper: sharpness rises during training (progressive sharpening) until it reaches 2/η, then hovers just above
it while the loss keeps decreasing non-monotonically.

Run ``python examples/eos_gradient_descent.py [--fast] [--out DIR]``; writes ``eos_gradient_descent.png`` and
``eos_gradient_descent.json`` into ``--out``.
"""

from __future__ import annotations

import itertools
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

NAME = "eos_gradient_descent"


def run(lr: float, steps: int, every: int, num_train: int, seed: int) -> dict[str, Any]:
    """Full-batch GD at learning rate ``lr``; sharpness every ``every`` steps, loss every step."""
    data = load_digits_data(num_train, 0, seed=seed)
    batch = data.train_batch()
    model = make_mlp(depth=2, width=64, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    warm = None
    sharp_steps: list[int] = []
    sharpness: list[float] = []
    losses: list[float] = []
    num_hvp = 0
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            res = hessian_eigenvalues(
                model, mse_loss, batch, k=1, tol=1e-3, max_iter=100, return_warm_start=True, v0=warm
            )
            warm = res.warm_start
            num_hvp += res.num_hvp
            sharp_steps.append(step)
            sharpness.append(res.sharpness)
        if step == steps:
            break
        opt.zero_grad()
        loss = mse_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"lr": lr, "steps": sharp_steps, "sharpness": sharpness, "loss": losses, "num_hvp": num_hvp}


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """Numbers that say whether the run shows progressive sharpening and the edge of stability."""
    threshold = 2.0 / r["lr"]
    lam = r["sharpness"]
    reached = next((s for s, v in zip(r["steps"], lam) if v >= 0.95 * threshold), None)
    out: dict[str, Any] = {
        "lr": r["lr"],
        "threshold_2_over_lr": threshold,
        "sharpness_init": lam[0],
        "sharpness_max": max(lam),
        "sharpness_final": lam[-1],
        "step_reached_0.95_threshold": reached,
        "final_loss": r["loss"][-1],
        "num_hvp": r["num_hvp"],
    }
    if reached is not None:
        after = [v / threshold for s, v in zip(r["steps"], lam) if s >= reached + 50]
        loss_after = r["loss"][reached:]
        ups = sum(b > a for a, b in itertools.pairwise(loss_after))
        out.update(
            {
                "ratio_after_edge_mean": sum(after) / len(after) if after else math.nan,
                "ratio_after_edge_min": min(after, default=math.nan),
                "ratio_after_edge_max": max(after, default=math.nan),
                "loss_increases_after_edge": ups,
                "steps_after_edge": len(loss_after),
            }
        )
    return out


def plot(results: list[dict[str, Any]], path: Path, subtitle: str) -> None:
    """Sharpness with 2/η (dashed) and the training loss, one colour per learning rate."""
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(12, 4.6))
    for i, r in enumerate(results):
        c = f"C{i}"
        ax1.plot(r["steps"], r["sharpness"], color=c, lw=1.6, label=f"η = {r['lr']:g}: sharpness")
        ax1.axhline(2.0 / r["lr"], color=c, ls="--", lw=1.2, label=f"η = {r['lr']:g}: 2/η = {2.0 / r['lr']:.3g}")
        ax2.plot(range(len(r["loss"])), r["loss"], color=c, lw=1.0, label=f"η = {r['lr']:g}")
    ax1.set(xlabel="step", ylabel="sharpness λ_max(H)", title="(a) sharpness (solid) rises to 2/η (dashed)")
    ax1.legend(fontsize="small", ncol=1)
    ax2.set(xlabel="step", ylabel="training loss (MSE)", yscale="log", title="(b) full-batch training loss")
    ax2.legend(fontsize="small")
    save_figure(fig, path, f"Edge of stability: full-batch GD, tanh MLP on digits ({subtitle})")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    parser = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures")
    args = parser.parse_args(argv)
    if args.fast:
        lrs, steps, every, num_train = [0.3, 0.5], 400, 10, 300
    else:
        lrs, steps, every, num_train = [0.2, 0.3, 0.4], 2000, 20, 1000
    t0 = time.perf_counter()
    results = [run(lr, steps, every, num_train, args.seed) for lr in lrs]
    summary = [summarise(r) for r in results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(results, png, f"{num_train} examples, {steps} steps")
    elapsed = time.perf_counter() - t0
    config = {"lrs": lrs, "steps": steps, "measure_every": every, "num_train": num_train, "seed": args.seed}
    write_json(out / f"{NAME}.json", {"config": config, "summary": summary, "wall_time_s": elapsed})
    parts = []
    for s in summary:
        if s["step_reached_0.95_threshold"] is None:
            parts.append(
                f"η={s['lr']:g}: sharpness {s['sharpness_init']:.2f} → {s['sharpness_final']:.2f}, never reached "
                f"2/η={s['threshold_2_over_lr']:.2f} in {steps} steps"
            )
        else:
            parts.append(
                f"η={s['lr']:g}: sharpness {s['sharpness_init']:.2f} at init, reached 2/η="
                f"{s['threshold_2_over_lr']:.2f} at step {s['step_reached_0.95_threshold']}, then λ·η/2 averaged "
                f"{s['ratio_after_edge_mean']:.2f} (range {s['ratio_after_edge_min']:.2f}-"
                f"{s['ratio_after_edge_max']:.2f}); loss rose on {s['loss_increases_after_edge']} of "
                f"{s['steps_after_edge']} steps after that, final loss {s['final_loss']:.4f}"
            )
    print(
        f"Edge of stability ({num_train} digits, full-batch GD, MSE, tanh MLP): " + "; ".join(parts) + ". "
        f"Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
