"""The break-even point (Jastrzebski et al. 2020, arXiv 2002.09572) on scikit-learn's digits.

Mini-batch SGD with the cross-entropy on a ReLU MLP 64-128-128-128-10 (PyTorch's default initialisation), over
several seeds, along two axes: the learning rate (batch 32) and the batch size (fixed learning rate). On a fixed
batch of training examples we measure, densely early in training:

* λ_1(H), the sharpness (``hessian_eigenvalues``, warm-started);
* the whole spectrum of the per-example gradient covariance K (``gradient_covariance`` with k = N − 1: the
  centred N×N Gram matrix gives every non-zero eigenvalue), hence λ_1(K) and its conditioning.

Paper: SGD reaches, early in training, the *break-even point* where λ_1(H) reaches the stability threshold
(≈ 2/η); from there on the trajectory depends on the learning rate η and batch size B. Conjecture 1: the maximum
attained values of λ_1(H) and λ_1(K) along the trajectory are smaller for a larger η or a smaller B.
Conjecture 2: the maximum attained λ*_K/λ_1(K) is larger for a larger η or a smaller B.

The paper's λ*_K is not measurable here: the spectrum of K decays smoothly over many decades and its smallest
eigenvalues sit at the round-off level of the float32 per-example gradients (λ_{N−1}/λ_1 falls to 1e-13..1e-21,
and to 0 once clamped, on every run), so we measure the conditioning of the whole spectrum by its effective rank
tr(K)/λ_1(K) (larger: better conditioned) and keep the literal λ_{N−1}(K)/λ_1(K) in the JSON.

We test the conjectures as stated (maxima over the trajectory after initialisation) and, because a larger learning
rate also trains faster, at equal training loss: for every loss level in a range that both runs pass through, the
quantities at the first time each run's training loss reaches that level (interpolated linearly in log-loss between
measurements), compared against the smallest learning rate (largest batch) of the axis.

Run ``python examples/break_even_point.py [--fast] [--out DIR] [--seeds N]``; writes ``break_even_point.png`` and
``break_even_point.json`` into ``--out``.
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
    cross_entropy_loss,
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

from lightning_curvature import gradient_covariance, hessian_eigenvalues

NAME = "break_even_point"
QUANTITIES = ("lambda_H", "lambda_K", "erank_K")
LABELS = {"lambda_H": "λ_1(H)", "lambda_K": "λ_1(K)", "erank_K": "tr(K) / λ_1(K)"}
#: Conjecture direction: +1 if the quantity should be *lower* for a larger lr / smaller batch, -1 if higher.
DIRECTION = {"lambda_H": 1, "lambda_K": 1, "erank_K": -1}
LOSS_HI = 0.3  # equal-loss comparisons from this training loss (about an eighth of the initial ln 10) down


def schedule(steps: int, dense_until: int, dense: int, sparse: int) -> list[int]:
    """Measurement steps: every ``dense`` steps until ``dense_until``, then every ``sparse``."""
    return sorted({*range(0, dense_until, dense), *range(dense_until, steps + 1, sparse), steps})


def run(cfg: dict[str, Any], lr: float, batch_size: int, seed: int) -> dict[str, Any]:
    """SGD from one initialisation; curvature and gradient-covariance spectra at the scheduled steps."""
    data = load_digits_data(cfg["num_train"], seed=seed)
    full = data.train_batch()
    fixed = tuple(t[: cfg["curvature_examples"]] for t in full)
    model = make_mlp(depth=cfg["depth"], width=cfg["width"], activation="relu", seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    next_batch = minibatches(data, batch_size, seed=seed)
    when = set(cfg["measure_at"])
    n_fixed = int(fixed[0].shape[0])
    warm = None
    rec: dict[str, Any] = {
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "steps": [],
        "loss": [],
        "lambda_H": [],
        "lambda_K": [],
        "erank_K": [],
        "smallest_ratio_K": [],
        "spectra_K": [],
    }
    for step in range(cfg["steps"] + 1):
        if step in when:
            res = hessian_eigenvalues(model, cross_entropy_loss, fixed, k=1, tol=1e-3, return_warm_start=True, v0=warm)
            warm = res.warm_start
            cov = gradient_covariance(model, cross_entropy_loss, fixed, k=n_fixed - 1, chunk_size=64)
            spectrum = cov.eigenvalues
            with torch.no_grad():
                rec["loss"].append(float(cross_entropy_loss(model, full)))
            rec["steps"].append(step)
            rec["lambda_H"].append(res.sharpness)
            rec["lambda_K"].append(float(spectrum[0]))
            rec["erank_K"].append(cov.trace / float(spectrum[0]))
            rec["smallest_ratio_K"].append(float(spectrum[-1] / spectrum[0]))
            rec["spectra_K"].append(spectrum.float())
        if step == cfg["steps"]:
            break
        opt.zero_grad()
        cross_entropy_loss(model, next_batch()).backward()
        opt.step()
    return rec


def at_loss(r: dict[str, Any], level: float, key: str) -> float:
    """``key`` when the training loss first reaches ``level``, interpolated linearly in log-loss (NaN if never)."""
    losses, values = r["loss"], r[key]
    for i in range(1, len(losses)):
        if losses[i] <= level:
            a, b = math.log(losses[i - 1]), math.log(losses[i])
            t = 1.0 if a <= b else (a - math.log(level)) / (a - b)
            t = min(max(t, 0.0), 1.0)
            return values[i - 1] + t * (values[i] - values[i - 1])
    return math.nan


def first_index_at_loss(r: dict[str, Any], level: float) -> int | None:
    """Index of the first measurement whose training loss is at most ``level``."""
    return next((i for i, v in enumerate(r["loss"]) if v <= level), None)


def loss_levels(a: dict[str, Any], b: dict[str, Any], num: int = 12) -> list[float]:
    """Log-spaced training-loss levels from ``LOSS_HI`` down to the lowest loss both runs reach."""
    lo = max(min(a["loss"]), min(b["loss"])) * 1.02
    if lo >= LOSS_HI:
        return []
    return [math.exp(math.log(LOSS_HI) + i / (num - 1) * (math.log(lo) - math.log(LOSS_HI))) for i in range(num)]


def compare_at_equal_loss(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Ratios other/ref of each quantity at equal training loss, over the common loss range."""
    levels = loss_levels(ref, other)
    out: dict[str, Any] = {"levels": levels}
    for q in QUANTITIES:
        ratios = [at_loss(other, lv, q) / at_loss(ref, lv, q) for lv in levels]
        ratios = [x for x in ratios if math.isfinite(x) and x > 0]
        agree = [x < 1.0 if DIRECTION[q] > 0 else x > 1.0 for x in ratios]
        out[q] = {
            "geomean_ratio": math.exp(statistics.fmean(math.log(x) for x in ratios)) if ratios else math.nan,
            "min_ratio": min(ratios, default=math.nan),
            "max_ratio": max(ratios, default=math.nan),
            "share_of_levels_as_conjectured": sum(agree) / len(agree) if agree else math.nan,
        }
    return out


def run_summary(r: dict[str, Any]) -> dict[str, Any]:
    """Break-even reached?, maxima after initialisation, final loss."""
    thr = 2.0 / r["lr"]
    after = range(1, len(r["steps"]))
    reached = next((r["steps"][i] for i in after if r["lambda_H"][i] >= thr), None)
    i_h = max(after, key=lambda i: r["lambda_H"][i])
    return {
        "threshold_2_over_lr": thr,
        "break_even_step": reached,
        "max_lambda_H": r["lambda_H"][i_h],
        "max_lambda_H_step": r["steps"][i_h],
        "max_lambda_K": max(r["lambda_K"][i] for i in after),
        "max_erank_K": max(r["erank_K"][i] for i in after),
        "min_smallest_ratio_K": min(r["smallest_ratio_K"][i] for i in after),
        "final_loss": r["loss"][-1],
    }


def axis_summary(runs: dict[Any, list[dict[str, Any]]], ref_key: Any, order: list[Any]) -> dict[str, Any]:
    """Per setting: maxima (seed spread), equal-loss ratios against the reference, and the ordering of maxima.

    ``order`` lists the settings from the one that should have the *highest* λ_1(H) to the lowest (smallest lr
    first, or largest batch first).
    """
    seeds = len(runs[ref_key])
    rows = []
    for key in order:
        per_seed = [run_summary(r) for r in runs[key]]
        row: dict[str, Any] = {
            "setting": key,
            "reached_break_even_on_seeds": sum(s["break_even_step"] is not None for s in per_seed),
        }
        for f in (
            "break_even_step",
            "max_lambda_H",
            "max_lambda_H_step",
            "max_lambda_K",
            "max_erank_K",
            "min_smallest_ratio_K",
            "final_loss",
        ):
            row[f] = spread([math.nan if s[f] is None else s[f] for s in per_seed])
        if key != ref_key:
            cmp = [compare_at_equal_loss(runs[ref_key][i], runs[key][i]) for i in range(seeds)]
            row["equal_loss_vs_reference"] = {
                q: {
                    m: spread([c[q][m] for c in cmp])
                    for m in ("geomean_ratio", "min_ratio", "max_ratio", "share_of_levels_as_conjectured")
                }
                for q in QUANTITIES
            }
        rows.append(row)
    # conjecture on maxima: for every pair of settings (i before j in `order`), per seed, is the max ordered?
    ordered: dict[str, Any] = {}
    for q, field in (("lambda_H", "max_lambda_H"), ("lambda_K", "max_lambda_K"), ("erank_K", "max_erank_K")):
        pairs = ok = 0
        for s in range(seeds):
            vals = [run_summary(runs[k][s])[field] for k in order]
            for i in range(len(vals)):
                for j in range(i + 1, len(vals)):
                    pairs += 1
                    ok += vals[j] < vals[i] if DIRECTION[q] > 0 else vals[j] > vals[i]
        ordered[q] = {"pairs_as_conjectured": ok, "pairs": pairs}
    return {"reference": ref_key, "rows": rows, "maxima_ordered": ordered}


def spectrum_at(r: dict[str, Any], level: float) -> list[float]:
    """The full K spectrum over λ_1(K) at the first measurement with training loss ≤ ``level`` (empty if never)."""
    i = first_index_at_loss(r, level)
    return [] if i is None else (r["spectra_K"][i] / r["spectra_K"][i][0]).tolist()


def plot(
    axes_runs: list[tuple[str, dict[Any, list[dict[str, Any]]], list[Any]]], level: float, path: Path, sub: str
) -> None:
    """Per axis (row): λ_1(H) over steps with 2/η; λ_1(H), λ_1(K), tr(K)/λ_1(K) at equal loss; the K spectrum."""
    fig, axes = new_figure(len(axes_runs), 5, figsize=(26, 5.2 * len(axes_runs)))
    for row, (axis_name, runs, order) in enumerate(axes_runs):
        ax = axes[row]
        lowest = max(min(r["loss"]) for rs in runs.values() for r in rs) * 1.02
        levels = [math.exp(math.log(1.5) + i / 39 * (math.log(lowest) - math.log(1.5))) for i in range(40)]
        for i, key in enumerate(order):
            c, rs = f"C{i}", runs[key]
            lab = f"η = {key[0]:g}, B = {key[1]}"
            band(ax[0], rs[0]["steps"], [r["lambda_H"] for r in rs], color=c, label=lab)
            ax[0].axhline(2.0 / key[0], color=c, ls="--", lw=1.0)
            for j, q in enumerate(QUANTITIES, start=1):
                band(ax[j], levels, [[at_loss(r, lv, q) for lv in levels] for r in rs], color=c, label=lab)
            spectra = [s for s in (spectrum_at(r, level) for r in rs) if s]
            if spectra:
                band(ax[4], range(1, len(spectra[0]) + 1), spectra, color=c, label=lab)
        ax[0].set(
            xlabel="step",
            ylabel="λ_1(H)",
            xscale="symlog",
            yscale="log",
            xlim=(0, None),
            title=f"({'af'[row]}) {axis_name}: λ_1(H) over training; 2/η dashed",
        )
        for j, q in enumerate(QUANTITIES, start=1):
            ax[j].set(
                xlabel="training loss (log, decreasing →)",
                ylabel=LABELS[q],
                xscale="log",
                yscale="log",
                title=f"({'bcdghi'[3 * row + j - 1]}) {LABELS[q]} when the loss first reaches x",
            )
            ax[j].invert_xaxis()
        ax[4].set(
            xlabel="index i",
            ylabel="λ_i(K) / λ_1(K)",
            xscale="log",
            yscale="log",
            title=f"({'ej'[row]}) whole K spectrum when the loss first reaches {level:g}",
        )
        for a in ax:
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize="x-small")
    save_figure(fig, path, f"Break-even point: SGD, cross-entropy, ReLU MLP on digits ({sub}; median and seed range)")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    args = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures").parse_args(argv)
    torch.set_num_threads(1)
    if args.fast:
        cfg = {
            "num_train": 300,
            "curvature_examples": 64,
            "depth": 2,
            "width": 32,
            "steps": 150,
            "measure_at": schedule(150, 50, 5, 25),
        }
        lrs, lr_batch, batches, batch_lr, seeds = [0.1, 0.5], 32, [32, 128], 0.5, min(args.seeds, 2)
    else:
        cfg = {
            "num_train": 1000,
            "curvature_examples": 256,
            "depth": 3,
            "width": 128,
            "steps": 600,
            "measure_at": schedule(600, 150, 5, 25),
        }
        lrs, lr_batch, batches, batch_lr, seeds = [0.1, 0.3, 0.5, 0.8], 32, [32, 128, 512], 0.3, args.seeds
    seed_list = list(range(args.seed, args.seed + seeds))
    t0 = time.perf_counter()
    settings = sorted({(lr, lr_batch) for lr in lrs} | {(batch_lr, b) for b in batches})
    runs = {key: [run(cfg, key[0], key[1], s) for s in seed_list] for key in settings}
    lr_order = [(lr, lr_batch) for lr in lrs]  # smallest lr first: conjectured highest λ_1(H)
    batch_order = [(batch_lr, b) for b in sorted(batches, reverse=True)]  # largest batch first
    level = 0.1
    summary = {
        "learning_rate_axis": axis_summary(runs, lr_order[0], lr_order),
        "batch_size_axis": axis_summary(runs, batch_order[0], batch_order),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(
        [(f"learning rate (B = {lr_batch})", runs, lr_order), (f"batch size (η = {batch_lr:g})", runs, batch_order)],
        level,
        png,
        f"{cfg['num_train']} examples, H and K on {cfg['curvature_examples']}, {seeds} seeds",
    )
    elapsed = time.perf_counter() - t0
    config = {
        **cfg,
        "lrs": lrs,
        "lr_axis_batch": lr_batch,
        "batch_sizes": batches,
        "batch_axis_lr": batch_lr,
        "seeds": seed_list,
        "equal_loss_from": LOSS_HI,
        "spectrum_at_loss": level,
    }
    series = [
        {k: r[k] for k in ("lr", "batch_size", "seed", "steps", "loss", *QUANTITIES, "smallest_ratio_K")}
        | {"spectrum_K_at_loss": spectrum_at(r, level)}
        for rs in runs.values()
        for r in rs
    ]
    write_json(out / f"{NAME}.json", {"config": config, "summary": summary, "series": series, "wall_time_s": elapsed})
    texts = []
    for axis_name, s in summary.items():
        parts = []
        for row in s["rows"]:
            lr, b = row["setting"]
            text = (
                f"η={lr:g}, B={b}: break-even (λ_1(H) ≥ 2/η) on {row['reached_break_even_on_seeds']}/{seeds} "
                f"seeds, max λ_1(H) {fmt(row['max_lambda_H'])}, max λ_1(K) {fmt(row['max_lambda_K'])}, "
                f"max tr(K)/λ_1(K) {fmt(row['max_erank_K'])}"
            )
            if "equal_loss_vs_reference" in row:
                eq = row["equal_loss_vs_reference"]
                text += "; at equal loss vs the reference: " + ", ".join(
                    f"{LABELS[q]} ×{fmt(eq[q]['geomean_ratio'])}" for q in QUANTITIES
                )
            parts.append(text)
        mo = s["maxima_ordered"]
        order_text = ", ".join(f"{LABELS[q]} {v['pairs_as_conjectured']}/{v['pairs']}" for q, v in mo.items())
        texts.append(
            f"{axis_name.replace('_', ' ')}: "
            + "; ".join(parts)
            + f". Pairs of maxima ordered as conjectured: {order_text}"
        )
    print(
        f"Break-even point ({cfg['num_train']} digits, SGD, cross-entropy, ReLU MLP, {seeds} seeds; mean (seed "
        f"range); equal-loss ratios are geometric means over loss levels {LOSS_HI:g} → lowest common loss). "
        + " | ".join(texts)
        + f". Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
