"""Gradient descent in a tiny subspace? (Gur-Ari et al. 2018, arXiv 1812.04754; Song, Ahn & Yun 2024) on digits.

A tanh MLP 64-64-64-10 is trained on 1,000 digits with the half squared error on one-hot targets (MSE) and with the
cross-entropy (CE), by full-batch GD far below the edge of stability, full-batch GD at the edge (MSE only: with CE
the sharpness of this network falls during training and GD never reaches 2/η), and mini-batch SGD. Every few steps
the top-25 eigenpairs of the full-batch Hessian are computed (``hessian_eigenvalues(..., k=25,
return_eigenvectors=True)``), and we record:

* the alignment ``top_subspace_overlap`` = ‖P_k g‖²/‖g‖² of the gradient with the top-k eigenspace, k = 10 = the
  number of classes (a random direction: k/P);
* the top-25 spectrum, to see whether there is an eigengap at k = 10;
* the stability of the subspace: ‖V_tᵀ V_{t+Δ}‖²_F / k, the overlap of the top-k spaces Δ steps apart.

**Projection test** (Song, Ahn & Yun 2024, arXiv 2405.16002): from a point where the alignment is high, training
continues three ways for the same number of steps: the plain update, the update projected onto the top-k
eigenspace ("Dom"), and the update with that projection removed ("Bulk"); the eigenspace is recomputed every 10
steps. If descent happened in the tiny subspace, Dom would follow the plain run and Bulk would stall.

Paper (Gur-Ari et al.): after a short initial phase the gradient lies mostly in the top-k eigenspace, which is
stable over time. Song, Ahn & Yun: the aligned part does not drive the descent.

Run ``python examples/tiny_subspace.py [--fast] [--out DIR] [--seeds N]``; writes ``tiny_subspace.png`` and
``tiny_subspace.json`` into ``--out``.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _digits import (
    LOSSES,
    band,
    example_parser,
    flat_gradient,
    fmt,
    load_digits_data,
    make_mlp,
    minibatches,
    new_figure,
    save_figure,
    spread,
    write_json,
)
from torch import Tensor, nn

from lightning_curvature import hessian_eigenvalues, top_subspace_overlap

NAME = "tiny_subspace"
K = 10  # number of classes
FLOOR = 1e-6  # overlaps are drawn on a log axis; smaller values are drawn at this floor


def step_along(model: nn.Module, direction: Tensor, lr: float) -> None:
    """θ ← θ − lr · direction (flat direction in ``model.parameters()`` order)."""
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            n = p.numel()
            p.sub_(lr * direction[offset : offset + n].view_as(p))
            offset += n


def top_space(model: nn.Module, loss: str, batch: Any, k: int, warm: Tensor | None, tol: float = 1e-3) -> Any:
    """Top-k eigenpairs of the full-batch Hessian (warm-started)."""
    return hessian_eigenvalues(
        model,
        LOSSES[loss],
        batch,
        k=k,
        tol=tol,
        max_iter=300,
        return_eigenvectors=True,
        return_warm_start=True,
        v0=warm,
    )


def run(cfg: dict[str, Any], spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one configuration; top-25 spectrum, alignment and subspace stability every ``every`` steps."""
    loss, lr, bs = spec["loss"], spec["lr"], spec["batch_size"]
    loss_fn = LOSSES[loss]
    data = load_digits_data(cfg["num_train"], seed=seed)
    full = data.train_batch()
    model = make_mlp(depth=2, width=64, seed=seed)
    num_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    next_batch = minibatches(data, bs, seed=seed) if bs else None
    warm, prev = None, None
    rec: dict[str, Any] = {
        "name": spec["name"],
        "seed": seed,
        "num_params": num_params,
        "steps": [],
        "loss": [],
        "overlap": [],
        "overlap_minibatch": [],
        "stability": [],
        "spectrum": [],
    }
    for step in range(cfg["steps"] + 1):
        batch = next_batch() if next_batch is not None else full
        if step % cfg["every"] == 0:
            res = top_space(model, loss, full, cfg["k_spectrum"], warm)
            warm = res.warm_start
            vecs = res.eigenvectors[:K]
            rec["steps"].append(step)
            rec["spectrum"].append(res.eigenvalues.tolist())
            rec["overlap"].append(top_subspace_overlap(flat_gradient(model, loss_fn, full), vecs))
            if next_batch is not None:
                rec["overlap_minibatch"].append(top_subspace_overlap(flat_gradient(model, loss_fn, batch), vecs))
            rec["stability"].append(math.nan if prev is None else float((prev @ vecs.T).pow(2).sum()) / K)
            prev = vecs
            with torch.no_grad():
                rec["loss"].append(float(loss_fn(model, full)))
        if step == cfg["steps"]:
            break
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return rec


def projection_test(cfg: dict[str, Any], spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train to ``branch_at``, then continue with the plain, the top-k-only and the top-k-removed update."""
    loss, lr, bs = spec["loss"], spec["lr"], spec["batch_size"]
    loss_fn = LOSSES[loss]
    data = load_digits_data(cfg["num_train"], seed=seed)
    full = data.train_batch()
    model = make_mlp(depth=2, width=64, seed=seed)
    next_batch = minibatches(data, bs, seed=seed) if bs else None
    for _ in range(cfg["branch_at"]):
        g = flat_gradient(model, loss_fn, next_batch() if next_batch is not None else full)
        step_along(model, g, lr)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    out: dict[str, Any] = {"name": spec["name"], "seed": seed, "branch_at": cfg["branch_at"]}
    for variant in ("plain", "top-k only (Dom)", "top-k removed (Bulk)"):
        model.load_state_dict(start)
        sampler = minibatches(data, bs, seed=seed + 1000) if bs else None  # the same batches for every variant
        warm, vecs, losses, overlaps = None, None, [], []
        for step in range(cfg["branch_steps"] + 1):
            with torch.no_grad():
                losses.append(float(loss_fn(model, full)))
            if step == cfg["branch_steps"]:
                break
            batch = sampler() if sampler is not None else full
            g = flat_gradient(model, loss_fn, batch)
            if variant != "plain" and step % cfg["recompute_every"] == 0:
                res = top_space(model, loss, full, K, warm)
                warm, vecs = res.warm_start, res.eigenvectors
            if vecs is not None:
                proj = vecs.T @ (vecs @ g)
                overlaps.append(float(proj.pow(2).sum() / g.pow(2).sum()))
                g = proj if variant.startswith("top-k only") else g - proj
            step_along(model, g, lr)
        out[variant] = {"loss": losses, "mean_overlap_of_update": statistics.fmean(overlaps) if overlaps else None}
    return out


def eigengap(spectrum: list[float]) -> dict[str, float]:
    """λ_k/λ_{k+1} at k = 10 against the median of λ_i/λ_{i+1} over the other i."""
    ratios = [spectrum[i] / spectrum[i + 1] for i in range(len(spectrum) - 1) if spectrum[i + 1] > 0]
    at_k = ratios[K - 1]
    others = [r for i, r in enumerate(ratios) if i != K - 1]
    return {"ratio_at_k": at_k, "median_ratio_elsewhere": statistics.median(others), "max_ratio_elsewhere": max(others)}


def summarise(spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Alignment, eigengap and subspace stability over the second half of training, spread over seeds."""

    def second_half(r: dict[str, Any], key: str) -> float:
        vals = [v for s, v in zip(r["steps"], r[key]) if s >= r["steps"][-1] // 2 and math.isfinite(v)]
        return statistics.fmean(vals) if vals else math.nan

    gaps = [eigengap(r["spectrum"][-1]) for r in runs]
    out = {
        **spec,
        "random_baseline_k_over_P": K / runs[0]["num_params"],
        "overlap_init": spread([r["overlap"][0] for r in runs]),
        "overlap_second_half": spread([second_half(r, "overlap") for r in runs]),
        "stability_second_half": spread([second_half(r, "stability") for r in runs]),
        "lambda_1_final": spread([r["spectrum"][-1][0] for r in runs]),
        "threshold_2_over_lr": 2.0 / spec["lr"],
        "final_loss": spread([r["loss"][-1] for r in runs]),
        "gap_ratio_at_k_final": spread([g["ratio_at_k"] for g in gaps]),
        "gap_ratio_elsewhere_median_final": spread([g["median_ratio_elsewhere"] for g in gaps]),
        "gap_ratio_elsewhere_max_final": spread([g["max_ratio_elsewhere"] for g in gaps]),
    }
    if runs[0]["overlap_minibatch"]:
        out["overlap_minibatch_second_half"] = spread([second_half(r, "overlap_minibatch") for r in runs])
    return out


def plot(
    specs: list[dict[str, Any]],
    results: dict[str, list[dict[str, Any]]],
    proj: dict[str, list[dict[str, Any]]],
    path: Path,
    sub: str,
) -> None:
    """(a) alignment, (b) top-25 spectrum at the end, (c) subspace stability, (d) λ_1 against 2/η, (e, f) the
    projection tests."""
    fig, axes = new_figure(2, 3, figsize=(19, 10.5))
    ax = list(axes.ravel())
    for i, spec in enumerate(specs):
        c, rs = f"C{i}", results[spec["name"]]
        ls = "-" if spec["loss"] == "mse" else "--"
        band(
            ax[0],
            rs[0]["steps"],
            [[max(v, FLOOR) for v in r["overlap"]] for r in rs],
            color=c,
            ls=ls,
            label=spec["name"],
        )
        spectra = [r["spectrum"][-1] for r in rs]
        band(ax[1], range(1, len(spectra[0]) + 1), spectra, color=c, ls=ls, label=spec["name"], marker=".")
        band(ax[2], rs[0]["steps"], [r["stability"] for r in rs], color=c, ls=ls, label=spec["name"])
        band(ax[3], rs[0]["steps"], [[v[0] for v in r["spectrum"]] for r in rs], color=c, ls=ls, label=spec["name"])
        if 2.0 / spec["lr"] < 12:
            ax[3].axhline(2.0 / spec["lr"], color=c, ls=":", lw=1.2, label=f"2/η = {2.0 / spec['lr']:.3g}")
    baseline = K / results[specs[0]["name"]][0]["num_params"]
    ax[0].axhline(baseline, color="black", ls=":", lw=1.2, label=f"random direction: k/P = {baseline:.1e}")
    ax[0].set(
        xlabel="step",
        ylabel="‖P_k g‖² / ‖g‖² (full-batch gradient)",
        yscale="log",
        ylim=(FLOOR / 2, 2),
        title=f"(a) gradient share in the top-{K} Hessian eigenspace",
    )
    ax[1].axvline(K + 0.5, color="black", ls=":", lw=1.2, label=f"k = {K} (number of classes)")
    ax[1].set(
        xlabel="index i",
        ylabel="λ_i of the full-batch Hessian",
        yscale="log",
        title="(b) top-25 spectrum at the end of training",
    )
    ax[2].set(
        xlabel="step t",
        ylabel="‖V_tᵀ V_(t+Δ)‖²_F / k",
        ylim=(0, 1.05),
        title=f"(c) overlap of the top-{K} spaces at t − Δ and t",
    )
    ax[3].set(
        xlabel="step",
        ylabel="λ_1 of the full-batch Hessian",
        yscale="log",
        title="(d) sharpness against 2/η (dotted, where below 12)",
    )
    for j, (name, tests) in enumerate(proj.items()):
        a = ax[4 + j]
        for variant, c in zip(("plain", "top-k only (Dom)", "top-k removed (Bulk)"), ("black", "C3", "C2")):
            losses = [t[variant]["loss"] for t in tests]
            steps = [tests[0]["branch_at"] + s for s in range(len(losses[0]))]
            band(a, steps, losses, color=c, label=variant.replace("top-k", f"top-{K}"))
        a.set(
            xlabel="step", ylabel="full-batch training loss", yscale="log", title=f"({'ef'[j]}) projection test: {name}"
        )
    for a in ax:
        a.legend(fontsize="x-small")
    save_figure(fig, path, f"Tiny subspace: tanh MLP on digits, solid MSE, dashed CE ({sub}; median and seed range)")


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction, write the PNG and JSON, print a summary."""
    args = example_parser(__doc__ or NAME, Path(__file__).resolve().parent / "figures").parse_args(argv)
    torch.set_num_threads(1)
    if args.fast:
        cfg = {
            "num_train": 200,
            "steps": 200,
            "every": 100,
            "k_spectrum": 11,
            "branch_at": 100,
            "branch_steps": 30,
            "recompute_every": 15,
        }
        seeds, edge_lr = min(args.seeds, 1), 0.7  # the slowest example: one seed in CI
    else:
        cfg = {
            "num_train": 1000,
            "steps": 800,
            "every": 50,
            "k_spectrum": 25,
            "branch_at": 300,
            "branch_steps": 300,
            "recompute_every": 10,
        }
        seeds, edge_lr = args.seeds, 0.4
    specs: list[dict[str, Any]] = [
        {"name": "MSE, GD η=0.05 (far below the edge)", "loss": "mse", "lr": 0.05, "batch_size": None},
        {"name": f"MSE, GD η={edge_lr:g} (reaches the edge)", "loss": "mse", "lr": edge_lr, "batch_size": None},
        {"name": "MSE, SGD η=0.2, B=32", "loss": "mse", "lr": 0.2, "batch_size": 32},
        {"name": "CE, GD η=2", "loss": "ce", "lr": 2.0, "batch_size": None},
        {"name": "CE, SGD η=0.5, B=32", "loss": "ce", "lr": 0.5, "batch_size": 32},
    ]
    proj_specs = [specs[1], specs[4]]
    seed_list = list(range(args.seed, args.seed + seeds))
    t0 = time.perf_counter()
    results = {s["name"]: [run(cfg, s, sd) for sd in seed_list] for s in specs}
    proj = {s["name"]: [projection_test(cfg, s, sd) for sd in seed_list] for s in proj_specs}
    summary = [summarise(s, results[s["name"]]) for s in specs]
    projection = []
    for name, tests in proj.items():
        row: dict[str, Any] = {
            "run": name,
            "branch_at": cfg["branch_at"],
            "steps": cfg["branch_steps"],
            "loss_at_branch": spread([t["plain"]["loss"][0] for t in tests]),
        }
        for variant in ("plain", "top-k only (Dom)", "top-k removed (Bulk)"):
            row[variant] = {
                "final_loss": spread([t[variant]["loss"][-1] for t in tests]),
                "final_over_start": spread([t[variant]["loss"][-1] / t[variant]["loss"][0] for t in tests]),
            }
            if variant != "plain":
                row[variant]["mean_share_of_update_in_top_k"] = spread(
                    [t[variant]["mean_overlap_of_update"] for t in tests]
                )
        projection.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    plot(specs, results, proj, png, f"{cfg['num_train']} examples, {cfg['steps']} steps, {seeds} seeds")
    elapsed = time.perf_counter() - t0
    config = {**cfg, "k": K, "runs": specs, "projection_runs": [s["name"] for s in proj_specs], "seeds": seed_list}
    series = [
        {k: r[k] for k in ("name", "seed", "steps", "loss", "overlap", "overlap_minibatch", "stability")}
        | {"spectrum_final": r["spectrum"][-1]}
        for rs in results.values()
        for r in rs
    ]
    write_json(
        out / f"{NAME}.json",
        {"config": config, "summary": summary, "projection_test": projection, "series": series, "wall_time_s": elapsed},
    )
    parts = []
    for s in summary:
        text = (
            f"{s['name']}: overlap {fmt(s['overlap_init'])} at init, {fmt(s['overlap_second_half'])} over the "
            f"second half"
        )
        if "overlap_minibatch_second_half" in s:
            text += f" (mini-batch gradient {fmt(s['overlap_minibatch_second_half'])})"
        text += (
            f"; λ_10/λ_11 {fmt(s['gap_ratio_at_k_final'])} vs λ_i/λ_(i+1) elsewhere median "
            f"{fmt(s['gap_ratio_elsewhere_median_final'])}, max {fmt(s['gap_ratio_elsewhere_max_final'])}; "
            f"top-{K} space overlap after {cfg['every']} steps {fmt(s['stability_second_half'])}; final λ_1 "
            f"{fmt(s['lambda_1_final'])} vs 2/η {s['threshold_2_over_lr']:.3g}"
        )
        parts.append(text)
    ptexts = []
    for row in projection:
        ptexts.append(
            f"{row['run']}, from step {row['branch_at']} (loss {fmt(row['loss_at_branch'])}) for {row['steps']} "
            f"steps: plain → {fmt(row['plain']['final_loss'])}, top-{K} only → "
            f"{fmt(row['top-k only (Dom)']['final_loss'])}, top-{K} removed → "
            f"{fmt(row['top-k removed (Bulk)']['final_loss'])} (the removed part was "
            f"{fmt(row['top-k removed (Bulk)']['mean_share_of_update_in_top_k'])} of the update's squared norm)"
        )
    print(
        f"Tiny subspace ({cfg['num_train']} digits, tanh MLP, k={K}, random baseline "
        f"{summary[0]['random_baseline_k_over_P']:.1e}, {seeds} seeds; mean (seed range)): "
        + "; ".join(parts)
        + ". Projection test: "
        + "; ".join(ptexts)
        + f". Wrote {png} in {elapsed:.1f} s."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
