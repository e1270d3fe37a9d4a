"""CDAT (Roulet et al. 2024, arXiv 2407.06183) against a grid of constant learning rates, on scikit-learn's digits.

Gradient descent on 1,000 digits, half squared error on one-hot targets, tanh MLP 64-64-64-10 with PyTorch's
default initialisation, several seeds (data split, initialisation and mini-batch order):

* **full batch**: a grid of constant learning rates against CurvatureDynamicsAwareLR with σ = 2 ("on the edge")
  and σ = 1 (greedy), ``ema_beta=0`` (the raw rule);
* **mini-batch** (batches of 128): a grid of constant learning rates against CDAT σ = 2 and σ = 1 with
  ``ema_beta=0.9``.

Every run is scored by its mean full-batch training loss over the last 20% of steps (measured every 10 steps), not
by one noisy final value. The best constant learning rate is the one with the lowest mean score over the seeds
among those that trained on every seed; CDAT is compared with it seed by seed.

Paper: in full batch, CDAT with σ ≈ 2 beats greedy tuning (σ = 1) and tuned constant learning rates, with a
warm-up-like rise of its learning rate; in mini-batch its advantage shrinks and the best σ falls with the batch size.

Run ``python examples/cdat_vs_constant.py [--fast] [--out DIR] [--seeds N]``; writes ``cdat_vs_constant.png`` and
``cdat_vs_constant.json`` into ``--out``.
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
    minibatches,
    new_figure,
    save_figure,
    spread,
    write_json,
)
from _training import Run, train_cdat, train_constant

NAME = "cdat_vs_constant"
SMOOTH = 25  # the greedy tuner's learning rate alternates step to step; the figure shows its moving average


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def regime(cfg: dict[str, Any], seed: int) -> dict[str, Run]:
    """Every constant learning rate of the grid and the CDAT runs, from the same initialisation and batches."""
    data = load_digits_data(cfg["num_train"], seed=seed)
    batch = data.train_batch()

    def kw() -> dict[str, Any]:
        return {} if cfg["batch_size"] is None else {"batch_fn": minibatches(data, cfg["batch_size"], seed=seed)}

    def model() -> torch.nn.Module:
        return make_mlp(depth=2, width=cfg["width"], seed=seed)

    runs = {f"constant {lr:g}": train_constant(model(), batch, lr, cfg["steps"], **kw()) for lr in cfg["grid"]}
    for sigma in (2.0, 1.0):
        r = train_cdat(
            model(), batch, cfg["steps"], sigma=sigma, ema_beta=cfg["ema_beta"], lr_max=cfg["lr_max"], **kw()
        )
        runs[r.name] = r
    return runs


def summarise(cfg: dict[str, Any], per_seed: list[dict[str, Run]]) -> dict[str, Any]:
    """Scores of every setting, the best constant learning rate, and CDAT against it seed by seed."""
    names = list(per_seed[0])
    scores = {n: [rs[n].late_loss() for rs in per_seed] for n in names}
    constants = [n for n in names if n.startswith("constant")]
    trained = [n for n in constants if all(math.isfinite(v) for v in scores[n])]
    best = min(trained, key=lambda n: statistics.fmean(scores[n]))
    cdat = [n for n in names if n.startswith("CDAT")]
    out: dict[str, Any] = {
        "scores": {n: spread(v) for n, v in scores.items()},
        "diverged_on_seeds": {n: sum(rs[n].diverged for rs in per_seed) for n in names},
        "best_constant": best,
        "best_constant_score": spread(scores[best]),
    }
    for n in cdat:
        lrs = [rs[n].lrs for rs in per_seed]
        early = [lr[: max(1, len(lr) // 5)] for lr in lrs]
        out[n] = {
            "score": spread(scores[n]),
            "beats_best_constant_on_seeds": sum(a < b for a, b in zip(scores[n], scores[best])),
            "beats_other_cdat_on_seeds": sum(
                a < b for other in cdat if other != n for a, b in zip(scores[n], scores[other])
            ),
            "score_over_best_constant": spread([a / b for a, b in zip(scores[n], scores[best])]),
            "lr_first": spread([lr[0] for lr in lrs]),
            "lr_max_first_fifth": spread([max(e) for e in early]),
            "lr_median_last_fifth": spread([statistics.median(lr[-max(1, len(lr) // 5) :]) for lr in lrs]),
        }
    return out


def plot(results: dict[str, list[dict[str, Run]]], summaries: dict[str, Any], path: Path, sub: str) -> None:
    """Per regime: full-batch training loss and learning rate of the CDAT runs, the best constant and the grid."""
    fig, axes = new_figure(2, 2, figsize=(14, 9))
    for row, (title, per_seed) in enumerate(results.items()):
        ax_loss, ax_lr = axes[row]
        best = summaries[title]["best_constant"]
        for name in per_seed[0]:
            runs = [rs[name] for rs in per_seed]
            if name.startswith("CDAT"):
                style = {"color": "tab:red" if "σ=2" in name else "tab:blue", "lw": 1.5}
            elif name == best:
                style = {"color": "black", "lw": 1.5}
            else:
                style = {"color": "grey", "lw": 0.7, "alpha": 0.7}
            label = f"{name} (best constant)" if name == best else name
            steps = [s for s, _ in max(runs, key=lambda r: len(r.evals)).evals]
            band(ax_loss, steps, [[v for _, v in r.evals] for r in runs], label=label, **style)  # type: ignore[arg-type]
            if name.startswith("CDAT") or name == best:
                smooth = [moving_average(r.lrs, SMOOTH) for r in runs]
                band(ax_lr, range(len(smooth[0])), smooth, label=label, **style)  # type: ignore[arg-type]
        ax_loss.set(
            xlabel="step",
            ylabel="full-batch training loss (MSE)",
            yscale="log",
            title=f"({'ac'[row]}) {title}: training loss (grey: the other constant lrs)",
        )
        ax_lr.set(
            xlabel="step",
            ylabel="learning rate",
            yscale="log",
            title=f"({'bd'[row]}) {title}: learning rate ({SMOOTH}-step moving average)",
        )
        for a in (ax_loss, ax_lr):
            a.legend(fontsize="x-small", ncol=2)
    save_figure(fig, path, f"CDAT against constant learning rates: tanh MLP on digits ({sub}; median and seed range)")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    args = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures").parse_args(argv)
    torch.set_num_threads(1)
    if args.fast:
        full = {
            "num_train": 300,
            "width": 32,
            "steps": 300,
            "batch_size": None,
            "ema_beta": 0.0,
            "lr_max": None,
            "grid": [0.2, 0.4, 0.8],
        }
        mini = {
            "num_train": 300,
            "width": 32,
            "steps": 300,
            "batch_size": 64,
            "ema_beta": 0.9,
            "lr_max": 10.0,
            "grid": [0.2, 0.4, 0.8],
        }
        seeds = min(args.seeds, 2)
    else:
        full = {
            "num_train": 1000,
            "width": 64,
            "steps": 2000,
            "batch_size": None,
            "ema_beta": 0.0,
            "lr_max": None,
            "grid": [0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 2.0],
        }
        mini = {
            "num_train": 1000,
            "width": 64,
            "steps": 2000,
            "batch_size": 128,
            "ema_beta": 0.9,
            "lr_max": 10.0,
            "grid": [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6],
        }
        seeds = args.seeds
    seed_list = list(range(args.seed, args.seed + seeds))
    t0 = time.perf_counter()
    titles: dict[str, dict[str, Any]] = {"full batch": full, f"mini-batch {mini['batch_size']}": mini}
    results = {title: [regime(cfg, s) for s in seed_list] for title, cfg in titles.items()}
    summaries = {title: summarise(titles[title], per_seed) for title, per_seed in results.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(results, summaries, png, f"{full['num_train']} examples, {full['steps']} steps, {seeds} seeds")
    elapsed = time.perf_counter() - t0
    series = {
        title: [{n: {"evals": r.evals, "lrs": r.lrs[::10]} for n, r in rs.items()} for rs in per_seed]
        for title, per_seed in results.items()
    }
    write_json(
        out / f"{NAME}.json",
        {
            "config": {**titles, "seeds": seed_list, "score": "mean full-batch loss, last 20%"},
            "summary": summaries,
            "series": series,
            "wall_time_s": elapsed,
        },
    )
    texts = []
    for title, s in summaries.items():
        text = f"{title}: best constant lr {s['best_constant'].split()[-1]} scores {fmt(s['best_constant_score'])}"
        for n in (k for k in s if k.startswith("CDAT")):
            c = s[n]
            text += (
                f"; {n} {fmt(c['score'])} (×{fmt(c['score_over_best_constant'])} of the best constant, lower on "
                f"{c['beats_best_constant_on_seeds']}/{seeds} seeds, than the other σ on "
                f"{c['beats_other_cdat_on_seeds']}/{seeds}; lr {fmt(c['lr_first'])} at step 0, up to "
                f"{fmt(c['lr_max_first_fifth'])} in the first fifth, {fmt(c['lr_median_last_fifth'])} in the "
                f"last)"
            )
        diverged = [n for n, v in s["diverged_on_seeds"].items() if v]
        if diverged:
            text += "; diverged: " + ", ".join(f"{n} ({s['diverged_on_seeds'][n]}/{seeds})" for n in diverged)
        texts.append(text)
    print(
        f"CDAT vs constant ({full['num_train']} digits, tanh MLP, MSE, default init, {seeds} seeds; score = mean "
        f"full-batch loss over the last 20% of steps, mean (seed range)). "
        + " | ".join(texts)
        + f". Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
