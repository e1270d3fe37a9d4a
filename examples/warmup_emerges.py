"""A warm-up emerges from SharpnessAwareLR: against a hand-tuned linear warm-up and a constant learning rate.

Full-batch gradient descent on scikit-learn's digits (half squared error on one-hot targets, tanh MLP 64-64-64-10)
whose read-out layer is initialised 10x larger than PyTorch's default, so training starts on a sharp surface
(λ_max ≈ 420, 2/λ_max ≈ 0.005) while the target learning rate is 0.02, four times above it. Three runs:

* ``constant``: lr 0.02 from the first step: the loss blows up by orders of magnitude before it recovers
  (a catapult), and ends higher;
* ``hand-tuned warm-up``: linear from 0 to 0.02 over W steps, W picked as the best of a small grid (the tuning
  a practitioner does by hand);
* ``SharpnessAwareLR``: base lr 0.02 capped at 0.9·2/λ_max, λ_max measured by Lanczos every 10 steps: no tuning.

Gilmer et al. (2021, arXiv 2110.04369) explain warm-up as steering the early trajectory out of sharp regions. The
sharpness-aware cap starts at 0.9·2/λ_max and rises as λ_max falls: a warm-up emerges without being scheduled.
It rises only as far as the sharpness falls on its own, though: staying below 2/λ never forces the flattening
that the overshoot of a long hand-tuned warm-up causes (compare Roulet et al. 2024 on tuners that undershoot the
edge), so its learning rate stays lower than the warm-up's. The printed summary states what was measured.

Run ``python examples/warmup_emerges.py [--fast] [--out DIR]``; writes ``warmup_emerges.png`` and
``warmup_emerges.json`` into ``--out`` (default ``examples/figures``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_curvature._digits import write_json
from lightning_curvature.schedules._experiments import (
    digits_problem,
    make_tanh_mlp,
    train_constant,
    train_sharpness_aware,
    train_warmup,
)

NAME = "warmup_emerges"
FIGURES = Path(__file__).resolve().parent / "figures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="reduced size (300 digits, 300 steps; a few seconds)")
    parser.add_argument("--out", default=str(FIGURES), help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.02, help="target (base) learning rate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.fast:
        num, width, steps, warmups = 300, 32, 300, (50, 100, 200)
    else:
        num, width, steps, warmups = None, 64, 1500, (100, 300, 600)
    data = digits_problem(num, seed=args.seed)

    def model() -> torch.nn.Module:
        return make_tanh_mlp(width=width, depth=2, output_scale=10.0, seed=args.seed)

    const = train_constant(model(), data, args.lr, steps)
    tried = [train_warmup(model(), data, args.lr, w, steps) for w in warmups]
    warm = min(tried, key=lambda r: r.final_loss)
    capped = train_sharpness_aware(model(), data, args.lr, steps, every=10, safety=0.9)
    runs = {"constant": const, "hand-tuned warm-up": warm, "SharpnessAwareLR": capped}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"constant": "tab:red", "hand-tuned warm-up": "tab:blue", "SharpnessAwareLR": "tab:green"}
    for label, run in runs.items():
        axes[0].plot(run.losses, color=colors[label], label=f"{run.name}: final {run.final_loss:.4f}")
        axes[1].plot(run.lrs, color=colors[label], label=run.name)
    steps_l, lam = zip(*capped.sharpness)
    axes[2].plot(steps_l, [2.0 / v for v in lam], color="tab:green", label="2/λ_max (SharpnessAwareLR run)")
    axes[2].plot(capped.lrs, color="tab:green", linestyle="--", label="its lr (0.9·2/λ_max, capped at base)")
    axes[2].axhline(args.lr, color="grey", linestyle=":", label=f"base lr {args.lr:g}")
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].set_title("full-batch training loss (MSE on one-hot)")
    axes[1].set_title("learning rate")
    axes[2].set_title("SharpnessAwareLR run: 2/λ_max and its lr")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"digits, tanh MLP (read-out init x10), full-batch GD: constant vs hand-tuned warm-up vs SharpnessAwareLR "
        f"(initial λ_max = {lam[0]:.0f}, 2/λ_max = {2 / lam[0]:.4f})",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{NAME}.png", dpi=110)
    plt.close(fig)

    lr_rise = capped.lrs[-1] / capped.lrs[0]
    payload = {
        "setting": {
            "num_examples": num or 1797,
            "width": width,
            "steps": steps,
            "base_lr": args.lr,
            "output_scale": 10.0,
            "seed": args.seed,
            "fast": args.fast,
        },
        "initial_sharpness": lam[0],
        "final_sharpness": lam[-1],
        "warmup_grid": {str(r.name): r.final_loss for r in tried},
        "final_loss": {k: r.final_loss for k, r in runs.items()},
        "max_loss": {k: max(r.losses) for k, r in runs.items()},
        "sharpness_aware_lr_first_last": [capped.lrs[0], capped.lrs[-1]],
    }
    write_json(out / f"{NAME}.json", payload)  # non-finite values as null
    print(
        f"{NAME}: base lr {args.lr:g} vs initial 2/λ_max {2 / lam[0]:.4f}. Constant lr: loss peaks at "
        f"{max(const.losses):.1f} (start {const.losses[0]:.1f}) and ends at {const.final_loss:.4f}. "
        f"Best hand-tuned linear warm-up ({warm.name}): {warm.final_loss:.4f} (peak {max(warm.losses):.1f}). "
        f"SharpnessAwareLR: {capped.final_loss:.4f} with no loss above its start; its lr rose {lr_rise:.2f}x "
        f"({capped.lrs[0]:.4f} -> {capped.lrs[-1]:.4f}) as λ_max fell {lam[0]:.0f} -> {lam[-1]:.0f}. "
        f"({time.perf_counter() - start:.0f} s; {out / (NAME + '.png')})"
    )


if __name__ == "__main__":
    main()
