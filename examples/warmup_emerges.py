"""A warm-up emerges from SharpnessAwareLR: against hand-tuned linear warm-ups and a constant learning rate.

Full-batch gradient descent on all 1,797 digits (pixels scaled to [0, 1], half squared error on one-hot targets,
tanh MLP 64-64-64-10) whose read-out layer is initialised 10x larger than PyTorch's default, so training starts on
a sharp surface (λ_max ≈ 420, 2/λ_max ≈ 0.005) while the target learning rate is 0.02, four times above it. Over
several seeds:

* ``constant``: lr 0.02 from the first step;
* ``hand-tuned warm-up``: linear from 0 to 0.02 over W steps, W the best of a small grid (lowest mean score over
  the seeds): the tuning a practitioner does by hand;
* ``SharpnessAwareLR``: base lr 0.02 capped at 0.9·2/λ_max, λ_max measured by Lanczos every 10 steps: no tuning.

Runs are scored by the mean training loss over the last 20% of steps. Gilmer et al. (2021, arXiv 2110.04369)
explain warm-up as steering the early trajectory out of sharp regions. The sharpness-aware cap starts at
0.9·2/λ_max and rises as λ_max falls: a warm-up emerges without being scheduled. It rises only as far as the
sharpness falls on its own, though: staying below 2/λ never forces the flattening that the overshoot of a long
hand-tuned warm-up causes.

Run ``python examples/warmup_emerges.py [--fast] [--out DIR] [--seeds N]``; writes ``warmup_emerges.png`` and
``warmup_emerges.json`` into ``--out``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _digits import band, example_parser, fmt, load_digits_data, make_mlp, new_figure, save_figure, spread, write_json
from _training import Run, train_constant, train_sharpness_aware, train_warmup

NAME = "warmup_emerges"
BASE_LR = 0.02
OUTPUT_SCALE = 10.0


def runs_for_seed(num: int, width: int, steps: int, warmups: tuple[int, ...], seed: int) -> dict[str, Run]:
    """The constant run, every warm-up of the grid and the SharpnessAwareLR run, from one initialisation."""
    data = load_digits_data(num, seed=seed, standardise=False).train_batch()

    def model() -> torch.nn.Module:
        return make_mlp(depth=2, width=width, output_scale=OUTPUT_SCALE, seed=seed)

    runs = {"constant": train_constant(model(), data, BASE_LR, steps)}
    for w in warmups:
        runs[f"warm-up {w}"] = train_warmup(model(), data, BASE_LR, w, steps)
    runs["SharpnessAwareLR"] = train_sharpness_aware(model(), data, BASE_LR, steps, every=10, safety=0.9)
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, write the PNG and JSON, print a summary."""
    args = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures").parse_args(argv)
    torch.set_num_threads(1)
    if args.fast:
        num, width, steps, warmups, seeds = 300, 32, 300, (50, 100, 200), min(args.seeds, 2)
    else:
        num, width, steps, warmups, seeds = 1797, 64, 1500, (100, 300, 600), args.seeds
    seed_list = list(range(args.seed, args.seed + seeds))
    start = time.perf_counter()
    per_seed = [runs_for_seed(num, width, steps, warmups, s) for s in seed_list]
    scores = {n: [rs[n].late_loss() for rs in per_seed] for n in per_seed[0]}
    best_warmup = min((f"warm-up {w}" for w in warmups), key=lambda n: statistics.fmean(scores[n]))
    shown = {"constant": "tab:red", best_warmup: "tab:blue", "SharpnessAwareLR": "tab:green"}

    fig, axes = new_figure(1, 3, figsize=(17, 4.8))
    ax_loss, ax_lr, ax_cap = axes[0]
    for name, color in shown.items():
        runs = [rs[name] for rs in per_seed]
        label = f"{name}: score {fmt(spread(scores[name]))}"
        band(ax_loss, range(len(runs[0].losses)), [r.losses for r in runs], color=color, label=label)
        band(ax_lr, range(len(runs[0].lrs)), [r.lrs for r in runs], color=color, label=name)
    capped = [rs["SharpnessAwareLR"] for rs in per_seed]
    steps_l = [s for s, _ in capped[0].sharpness]
    band(
        ax_cap,
        steps_l,
        [[2.0 / v for _, v in r.sharpness] for r in capped],
        color="tab:green",
        label="2/λ_max (SharpnessAwareLR runs)",
    )
    band(
        ax_cap,
        range(len(capped[0].lrs)),
        [r.lrs for r in capped],
        color="tab:green",
        ls="--",
        label="their lr: min(base, 0.9·2/λ_max)",
    )
    ax_cap.axhline(BASE_LR, color="grey", ls=":", label=f"base lr {BASE_LR:g}")
    ax_loss.set(xlabel="step", ylabel="full-batch training loss (MSE)", yscale="log", title="(a) training loss")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="(b) learning rate")
    ax_cap.set(xlabel="step", ylabel="learning rate", yscale="log", title="(c) SharpnessAwareLR: 2/λ_max and its lr")
    for ax in (ax_loss, ax_lr, ax_cap):
        ax.legend(fontsize="small")
    lam0 = spread([r.sharpness[0][1] for r in capped])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    save_figure(
        fig,
        png,
        f"Constant vs hand-tuned warm-up vs SharpnessAwareLR: tanh MLP (read-out init x10) on "
        f"digits, full-batch GD ({seeds} seeds; median and seed range)",
    )
    elapsed = time.perf_counter() - start
    summary: dict[str, Any] = {
        "initial_sharpness": lam0,
        "final_sharpness": spread([r.sharpness[-1][1] for r in capped]),
        "scores": {n: spread(v) for n, v in scores.items()},
        "max_loss": {n: spread([max(rs[n].losses) for rs in per_seed]) for n in per_seed[0]},
        "initial_loss": spread([rs["constant"].losses[0] for rs in per_seed]),
        "best_warmup": best_warmup,
        "sharpness_aware_lr_first": spread([r.lrs[0] for r in capped]),
        "sharpness_aware_lr_last": spread([r.lrs[-1] for r in capped]),
        "sharpness_aware_beats_constant_on_seeds": sum(
            a < b for a, b in zip(scores["SharpnessAwareLR"], scores["constant"])
        ),
        "sharpness_aware_beats_best_warmup_on_seeds": sum(
            a < b for a, b in zip(scores["SharpnessAwareLR"], scores[best_warmup])
        ),
    }
    config = {
        "num_examples": num,
        "width": width,
        "steps": steps,
        "base_lr": BASE_LR,
        "output_scale": OUTPUT_SCALE,
        "warmups": warmups,
        "seeds": seed_list,
        "score": "mean training loss, last 20% of steps",
    }
    write_json(out / f"{NAME}.json", {"config": config, "summary": summary, "wall_time_s": elapsed})
    s = summary
    print(
        f"{NAME} ({num} digits, {seeds} seeds; mean (seed range)): base lr {BASE_LR:g}, initial λ_max {fmt(lam0)}. "
        f"Constant lr: loss peaks at {fmt(s['max_loss']['constant'])} (start {fmt(s['initial_loss'])}), score "
        f"{fmt(s['scores']['constant'])}. Best hand-tuned warm-up ({best_warmup} steps): score "
        f"{fmt(s['scores'][best_warmup])}, peak loss {fmt(s['max_loss'][best_warmup])}. SharpnessAwareLR: score "
        f"{fmt(s['scores']['SharpnessAwareLR'])}, peak loss {fmt(s['max_loss']['SharpnessAwareLR'])}, lower than the "
        f"constant on {s['sharpness_aware_beats_constant_on_seeds']}/{seeds} seeds and than the best warm-up on "
        f"{s['sharpness_aware_beats_best_warmup_on_seeds']}/{seeds}; its lr went {fmt(s['sharpness_aware_lr_first'])}"
        f" → {fmt(s['sharpness_aware_lr_last'])} as λ_max fell to {fmt(s['final_sharpness'])}. Wrote {png} in "
        f"{elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
