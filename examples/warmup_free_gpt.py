"""Warm-up-free training of a byte-level GPT with AdamW: constant, linear warm-up, SharpnessAwareLR and CDAT.

The workload (``examples/_gpt.py``): a 2-layer GPT (d = 128, 4 heads, 64-byte context, tied head, ~0.44M
parameters) on the Python standard library's sources, AdamW betas (0.9, 0.95), weight decay 0.1, batches of 32
windows of 64 bytes. For every peak learning rate of a grid and every seed, five schedules:

* ``constant``: the peak lr from the first step;
* ``warmup5`` / ``warmup20``: linear warm-up over 5% / 20% of the steps, then constant;
* ``sharpness``: ``SharpnessAwareLR(opt)`` at its defaults (the edge-following rule) fed by a Hessian monitor;
* ``cdat``: ``CurvatureDynamicsAwareLR(opt)`` at its defaults fed by a directional-curvature monitor (the peak
  lr only sets CDAT's bound, ``lr_max="auto"`` = 10x it).

Recorded per run: final training loss (256 fresh training windows) and held-out loss (256 fixed windows of
held-out files), the largest spike (the largest rise of the per-batch training loss above its running minimum),
wall time of the training loop (measurements included; the final evaluation excluded) and, for the two curvature
schedulers, every measurement.

**Two loops.** ``--loop plain`` (default) is a plain PyTorch loop in which two small classes emulate the
monitors as specified for the Lightning callbacks (``HessianMonitorEmulation``, ``DirectionalMonitorEmulation``):

* Hessian: before update ``t`` (at the parameters it starts from) the preconditioned sharpness
  ``λ_max(P^{-1/2} H P^{-1/2})`` of a fixed curvature batch (``--curvature-examples`` windows drawn once from the
  training split, seeded) by Lanczos (``hessian_eigenvalues``, k = 1, ``tol``, ``max_iter``, warm-started from
  the previous Ritz vectors); ``P`` from AdamW's state (``adaptive_preconditioner``), and at step 0, before any
  state exists, the preconditioner of Adam's first step predicted from the curvature batch's gradient,
  ``P_1 = (1 - β₁)(|g| + ε)``. It measures at step 0, whenever ``scheduler.wants_measurement(t)`` is true, and
  every ``--every`` steps; each finite value goes to ``scheduler.observe_sharpness(λ, t)``.
* Directional (CDAT): after the backward pass of update ``t``, the optimizer's unit-lr update ``u``
  (``update_direction``), one Hessian-vector product on the step's batch and ``directional_terms`` (weight decay
  included, as ``DirectionalCurvatureMonitor`` does) give ``n, d``; ``scheduler.observe_direction(n, d, t,
  loss=batch loss)`` sets the lr of update ``t`` (the loss arms CDAT's runaway detection).

``--loop lightning`` runs the same grid through Lightning, where the monitors implement this contract (a requested
measurement is the top eigenvalue to 1%, warm-started, at most every 10 steps): with the callbacks at their
defaults (``HessianEigenvalueMonitor()`` + ``SharpnessAwareLR(opt)``, ``DirectionalCurvatureMonitor()`` +
``CurvatureDynamicsAwareLR(opt)``), or with ``--lightning-monitor study`` the Hessian monitor configured as the
emulation (``k=1``, ``num_examples``, ``tol``, ``max_iter`` and ``every_n_steps`` from the settings).

Run ``python examples/warmup_free_gpt.py [--fast] [--out DIR] [--loop plain|lightning]``. The full grid (5 peak
lrs x 5 schedules x 3 seeds, 200 steps) takes about an hour on one CPU thread; ``--fast`` runs a tiny model for
30 steps (seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt import (
    GPT,
    PRESETS,
    Batch,
    Corpus,
    GPTConfig,
    evaluate,
    gpt_loss,
    held_out_batches,
    linear_warmup,
    make_adamw,
    random_batch,
    stdlib_corpus,
    train,
)

from lightning_curvature import (
    CurvatureDynamicsAwareLR,
    HessianOperator,
    NonFiniteCurvatureError,
    SharpnessAwareLR,
    adaptive_preconditioner,
    hessian_eigenvalues,
)
from lightning_curvature.core.stability import stability_threshold
from lightning_curvature.core.update_direction import (
    directional_terms,
    update_direction,
    weight_decay_terms,
)

NAME = "warmup_free_gpt"
SCHEDULES = ("constant", "warmup5", "warmup20", "sharpness", "cdat")
LABELS = {
    "constant": "constant",
    "warmup5": "linear warm-up 5%",
    "warmup20": "linear warm-up 20%",
    "sharpness": "SharpnessAwareLR",
    "cdat": "CDAT",
}
COLORS = {
    "constant": "tab:red",
    "warmup5": "tab:orange",
    "warmup20": "tab:blue",
    "sharpness": "tab:green",
    "cdat": "tab:purple",
}


@dataclass
class Settings:
    """Everything a run depends on (written to the JSON)."""

    preset: str = "0.4M"
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    schedules: list[str] = field(default_factory=lambda: list(SCHEDULES))
    steps: int = 200
    batch_size: int = 32
    curvature_examples: int = 8
    lightning_monitor: str = "defaults"
    every: int = 25
    tol: float = 0.1
    max_iter: int = 8
    eval_windows: int = 256
    loop: str = "plain"
    config: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# the monitors, emulated in a plain loop


class HessianMonitorEmulation:
    """Measure the (preconditioned) sharpness before an update and feed ``SharpnessAwareLR`` (see module doc)."""

    def __init__(self, model: GPT, opt: torch.optim.Optimizer, sched: SharpnessAwareLR, batch: Batch, s: Settings):
        self.model, self.opt, self.sched, self.batch, self.s = model, opt, sched, batch, s
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.warm: torch.Tensor | None = None
        self.seconds = 0.0
        self.records: list[dict[str, float]] = []

    def _preconditioner(self) -> torch.Tensor:
        P = adaptive_preconditioner(self.opt, self.params)
        if P is not None:
            return P
        # before Adam's first step: v̂_1 = g², so P_1 = (1 - β₁)(|g| + ε), predicted from the curvature batch
        grads = torch.autograd.grad(gpt_loss(self.model, self.batch), self.params)
        group_of = {id(p): g for g in self.opt.param_groups for p in g["params"]}
        parts = []
        for p, g in zip(self.params, grads):
            group = group_of[id(p)]
            parts.append((1.0 - group["betas"][0]) * (g.detach().abs() + group["eps"]).reshape(-1))
        return torch.cat(parts)

    def before_update(self, step: int, batch: Batch) -> None:
        del batch
        if not (step == 0 or step % self.s.every == 0 or self.sched.wants_measurement(step)):
            return
        t0 = time.perf_counter()
        lr = float(self.opt.param_groups[0]["lr"])
        try:
            res = hessian_eigenvalues(
                self.model, gpt_loss, self.batch, k=1, tol=self.s.tol, max_iter=self.s.max_iter,
                preconditioner=self._preconditioner(), v0=self.warm, return_warm_start=True,
            )  # fmt: skip
        except NonFiniteCurvatureError:
            self.warm = None
            self.seconds += time.perf_counter() - t0
            self.records.append({"step": step, "lr": lr, "sharpness": math.nan, "threshold": math.nan})
            return
        self.warm = res.warm_start
        self.sched.observe_sharpness(res.sharpness, step)
        self.seconds += time.perf_counter() - t0
        threshold = stability_threshold(self.opt, 0, lr=lr)
        self.records.append(
            {"step": step, "lr": lr, "sharpness": res.sharpness, "threshold": threshold, "num_hvp": res.num_hvp}
        )


class DirectionalMonitorEmulation:
    """After the backward pass: ``n, d`` along the update on the step's batch, fed to CDAT (see module doc)."""

    def __init__(self, model: GPT, opt: torch.optim.Optimizer, sched: CurvatureDynamicsAwareLR) -> None:
        self.model, self.opt, self.sched = model, opt, sched
        self.params = [p for p in model.parameters() if p.requires_grad]
        wds = weight_decay_terms(opt, self.params)
        self.wd = torch.cat([torch.full((p.numel(),), w) for p, w in zip(self.params, wds)])
        self.seconds = 0.0
        self.records: list[dict[str, float]] = []

    def after_backward(self, step: int, batch: Batch, loss: float) -> None:
        t0 = time.perf_counter()
        u = torch.cat(
            [t.reshape(-1) for t in update_direction(self.opt, self.params, group_scales=self.sched.group_scales())]
        )
        g = torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]
        theta = torch.cat([p.detach().reshape(-1) for p in self.params])
        try:
            with HessianOperator(self.model, gpt_loss, batch, params=self.params, seed=None) as H:
                hu = H.matvec(u)
            n, d = directional_terms(g, u, hu, params=theta, weight_decay=self.wd)
        except NonFiniteCurvatureError:
            n, d = math.nan, math.nan
        self.sched.observe_direction(n, d, step, loss=loss)
        self.seconds += time.perf_counter() - t0
        self.records.append({"step": step, "numerator": n, "denominator": d, "lr": self.opt.param_groups[0]["lr"]})


# --------------------------------------------------------------------------------------------------------------
# one run


def largest_spike(losses: list[float]) -> tuple[float, int]:
    """The largest rise of ``losses`` above their running minimum, and the step where it happens."""
    best, spike, where = math.inf, 0.0, -1
    for i, value in enumerate(losses):
        if value - best > spike:
            spike, where = value - best, i
        best = min(best, value)
    return spike, where


def _curvature_batch(corpus: Corpus, cfg: GPTConfig, s: Settings, seed: int) -> Batch:
    return random_batch(corpus.train, s.curvature_examples, cfg.context, torch.Generator().manual_seed(10_000 + seed))


def run_plain(schedule: str, lr: float, seed: int, cfg: GPTConfig, s: Settings, corpus: Corpus) -> dict[str, Any]:
    """Train one configuration in a plain loop; return its summary and series."""
    model = GPT(cfg, seed=seed)
    opt = make_adamw(model, lr)
    sched: Any = None
    before: Callable[[int, Batch], None] | None = None
    after: Callable[[int, Batch, float], None] | None = None
    hessian: HessianMonitorEmulation | None = None
    directional: DirectionalMonitorEmulation | None = None
    if schedule.startswith("warmup"):
        sched = LambdaLR(opt, linear_warmup(round(s.steps * int(schedule[6:]) / 100)))
    elif schedule == "sharpness":
        sched = SharpnessAwareLR(opt)
        hessian = HessianMonitorEmulation(model, opt, sched, _curvature_batch(corpus, cfg, s, seed), s)
        before = hessian.before_update
    elif schedule == "cdat":
        sched = CurvatureDynamicsAwareLR(opt)
        directional = DirectionalMonitorEmulation(model, opt, sched)
        after = directional.after_backward
    elif schedule != "constant":
        raise ValueError(f"unknown schedule {schedule!r}")
    res = train(
        model, opt, s.steps, batch_size=s.batch_size, seed=seed, corpus=corpus, scheduler=sched,
        before_step=before, after_backward=after, eval_windows=s.eval_windows,
    )  # fmt: skip
    measuring = hessian.seconds if hessian else directional.seconds if directional else 0.0
    out = _summary(schedule, lr, seed, res.losses, res.lrs, res.final_train, res.final_held_out, res.seconds)
    out["measuring_seconds"] = measuring
    out["diverged"] = res.diverged
    if hessian is not None:
        out["measurements"] = hessian.records
        out["num_resets"] = sched.num_resets
    if directional is not None:
        out["measurements"] = directional.records[:: max(1, s.steps // 100)]
        out["num_runaways"] = sched.num_runaways
    return out


def _summary(schedule: str, lr: float, seed: int, losses: list[float], lrs: list[float], final_train: float,
             final_held: float, seconds: float) -> dict[str, Any]:  # fmt: skip
    spike, where = largest_spike(losses)
    return {
        "schedule": schedule, "lr": lr, "seed": seed, "final_train": final_train, "final_held_out": final_held,
        "spike": spike, "spike_step": where, "seconds": seconds, "losses": losses, "lrs": lrs,
    }  # fmt: skip


def run_lightning(schedule: str, lr: float, seed: int, cfg: GPTConfig, s: Settings, corpus: Corpus) -> dict[str, Any]:
    """The same run through Lightning with the callbacks at their defaults (the wiring the README shows)."""
    import lightning.pytorch as pl
    from _gpt import GPTDataModule, GPTModule

    from lightning_curvature import DirectionalCurvatureMonitor, HessianEigenvalueMonitor

    make: Callable[[torch.optim.Optimizer], Any] | None = None
    callbacks: list[pl.Callback] = []
    if schedule.startswith("warmup"):
        warm = round(s.steps * int(schedule[6:]) / 100)
        make = lambda opt: LambdaLR(opt, linear_warmup(warm))  # noqa: E731
    elif schedule == "sharpness":
        make = SharpnessAwareLR
        study = {"k": 1, "num_examples": s.curvature_examples, "tol": s.tol, "max_iter": s.max_iter}
        kwargs: dict[str, Any] = study | {"every_n_steps": s.every} if s.lightning_monitor == "study" else {}
        callbacks.append(HessianEigenvalueMonitor(**kwargs))
    elif schedule == "cdat":
        make = CurvatureDynamicsAwareLR
        callbacks.append(DirectionalCurvatureMonitor())

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.lrs: list[float] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            self.losses.append(float(outputs["loss"]))

    rec = Record()
    module = GPTModule(cfg, lr=lr, seed=seed, make_scheduler=make)
    data = GPTDataModule(cfg, batch_size=s.batch_size, steps=s.steps, seed=seed, eval_windows=s.eval_windows)
    trainer = pl.Trainer(
        max_steps=s.steps, callbacks=[*callbacks, rec], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - t0
    eval_gen = torch.Generator().manual_seed(seed + 10_000)
    train_eval = [random_batch(corpus.train, 64, cfg.context, eval_gen) for _ in range(4)]
    final_train = evaluate(module.model, train_eval)
    final_held = evaluate(module.model, held_out_batches(corpus.held_out, s.eval_windows, cfg.context))
    return _summary(schedule, lr, seed, rec.losses, rec.lrs, final_train, final_held, seconds)


# --------------------------------------------------------------------------------------------------------------
# aggregation, figure


def aggregate(runs: list[dict[str, Any]], s: Settings) -> list[dict[str, Any]]:
    """Per (schedule, lr): means over seeds, worst spike, wall time relative to the constant run of each seed."""
    const_time = {(r["lr"], r["seed"]): r["seconds"] for r in runs if r["schedule"] == "constant"}
    rows = []
    for schedule in s.schedules:
        for lr in s.lrs:
            group = [r for r in runs if r["schedule"] == schedule and r["lr"] == lr]
            if not group:
                continue
            rel = [r["seconds"] / const_time[(lr, r["seed"])] for r in group if (lr, r["seed"]) in const_time]
            rows.append({
                "schedule": schedule, "lr": lr, "seeds": len(group),
                "final_train": statistics.fmean(r["final_train"] for r in group),
                "final_held_out": statistics.fmean(r["final_held_out"] for r in group),
                "final_train_per_seed": [r["final_train"] for r in group],
                "spike_max": max(r["spike"] for r in group),
                "spike_mean": statistics.fmean(r["spike"] for r in group),
                "seconds": statistics.fmean(r["seconds"] for r in group),
                "wall_time_vs_constant": statistics.fmean(rel) if rel else math.nan,
                "measuring_seconds": statistics.fmean(r.get("measuring_seconds", 0.0) for r in group),
                "diverged": sum(bool(r.get("diverged")) for r in group),
            })  # fmt: skip
    return rows


def targets(rows: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """The issue's targets for SharpnessAwareLR, checked row by row (means over seeds)."""
    by = {(r["schedule"], r["lr"]): r for r in rows}
    per_lr = []
    for lr in s.lrs:
        sal, const = by.get(("sharpness", lr)), by.get(("constant", lr))
        warm = [by[(w, lr)] for w in ("warmup5", "warmup20") if (w, lr) in by]
        if sal is None or const is None or not warm:
            continue
        best_warm = min(w["final_train"] for w in warm)
        per_lr.append({
            "lr": lr,
            "no_spike": sal["spike_max"] <= 1.0,
            "not_worse_than_constant": sal["final_train"] <= const["final_train"],
            "within_0.03_of_best_warmup": sal["final_train"] <= best_warm + 0.03,
            "gap_to_best_warmup": sal["final_train"] - best_warm,
            "wall_time_ok": sal["wall_time_vs_constant"] <= 1.5,
        })  # fmt: skip
    tuned = [r for r in rows if r["schedule"] in ("constant", "warmup5", "warmup20")]
    sal_rows = [r for r in rows if r["schedule"] == "sharpness"]
    best_pair = min(tuned, key=lambda r: r["final_train"]) if tuned else None
    best_sal = min(sal_rows, key=lambda r: r["final_train"]) if sal_rows else None
    overall = {}
    if best_pair and best_sal:
        overall = {
            "best_tuned": {"schedule": best_pair["schedule"], "lr": best_pair["lr"], "loss": best_pair["final_train"]},
            "best_sharpness_aware": {"lr": best_sal["lr"], "loss": best_sal["final_train"]},
            "within_1_percent": best_sal["final_train"] <= 1.01 * best_pair["final_train"],
        }
    return {"per_lr": per_lr, "overall": overall}


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    for schedule in s.schedules:
        sel = [r for r in rows if r["schedule"] == schedule]
        lrs = [r["lr"] for r in sel]
        kw = {"color": COLORS[schedule], "marker": "o", "label": LABELS[schedule]}
        ax[0, 0].plot(lrs, [r["final_train"] for r in sel], **kw)
        ax[0, 1].plot(lrs, [max(r["spike_max"], 1e-2) for r in sel], **kw)
    ax[0, 0].set(xscale="log", xlabel="peak lr", ylabel="final training loss (mean of seeds)", title="final loss")
    ax[0, 1].axhline(1.0, color="k", ls=":", lw=1)
    ax[0, 1].set(xscale="log", yscale="log", xlabel="peak lr", ylabel="largest rise above running min (nats)",
                 title="largest spike (worst seed)")  # fmt: skip
    ax[0, 0].legend(fontsize=8)
    seed0 = s.seeds[0]
    cmap = plt.get_cmap("viridis")
    for k, lr in enumerate(s.lrs):
        color = cmap(k / max(1, len(s.lrs) - 1))
        sal = next((r for r in runs if r["schedule"] == "sharpness" and r["lr"] == lr and r["seed"] == seed0), None)
        if sal is None:
            continue
        ax[0, 2].plot(sal["lrs"], color=color, label=f"peak {lr:g}")
        meas = [m for m in sal.get("measurements", []) if m["sharpness"] == m["sharpness"]]
        ax[1, 0].plot([m["step"] for m in meas], [m["sharpness"] / m["threshold"] for m in meas], "o-", ms=3,
                      color=color, label=f"peak {lr:g}")  # fmt: skip
    ax[0, 2].set(yscale="log", xlabel="step", ylabel="lr", title=f"SharpnessAwareLR: lr (seed {seed0})")
    ax[0, 2].legend(fontsize=8)
    ax[1, 0].axhline(1.0, color="k", ls="--", lw=1, label="edge (λ = 38/lr)")
    ax[1, 0].axhline(2.0, color="k", ls=":", lw=1, label="2x edge: reset")
    ax[1, 0].set(yscale="log", xlabel="step", ylabel="edge ratio lr·λ/38",
                 title="SharpnessAwareLR: preconditioned sharpness / threshold")  # fmt: skip
    ax[1, 0].legend(fontsize=7)
    top = max(s.lrs)
    for schedule in s.schedules:
        r = next((r for r in runs if r["schedule"] == schedule and r["lr"] == top and r["seed"] == seed0), None)
        if r is None:
            continue
        ax[1, 1].plot(r["losses"], color=COLORS[schedule], lw=1, label=LABELS[schedule])
        ax[1, 2].plot(r["lrs"], color=COLORS[schedule], lw=1, label=LABELS[schedule])
    ax[1, 1].set(xlabel="step", ylabel="training loss (batch)", title=f"peak lr {top:g}: training loss (seed {seed0})")
    ax[1, 1].set_ylim(top=min(ax[1, 1].get_ylim()[1], 12.0))
    ax[1, 2].set(yscale="log", xlabel="step", ylabel="lr", title=f"peak lr {top:g}: lr of each schedule")
    ax[1, 1].legend(fontsize=8)
    cfg = GPTConfig(**s.config) if s.config else PRESETS[s.preset]
    fig.suptitle(
        f"byte-level GPT ({cfg.num_params:,} parameters), AdamW β=(0.9, 0.95), wd 0.1, batch {s.batch_size}x"
        f"{cfg.context}, {s.steps} steps, seeds {s.seeds}, loop: {s.loop}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'schedule':<20} {'peak lr':>8} {'train':>7} {'held-out':>8} {'max spike':>9} {'time':>7} {'vs const':>8}")
    for r in rows:
        print(
            f"{LABELS[r['schedule']]:<20} {r['lr']:8.3g} {r['final_train']:7.3f} {r['final_held_out']:8.3f} "
            f"{r['spike_max']:+9.2f} {r['seconds']:6.1f}s {r['wall_time_vs_constant']:7.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny model, 2 lrs, 1 seed, 30 steps (seconds)")
    parser.add_argument("--out", default="examples/figures")
    parser.add_argument("--loop", choices=("plain", "lightning"), default="plain")
    parser.add_argument("--lrs", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--max-iter", type=int, default=None)
    parser.add_argument("--every", type=int, default=None)
    parser.add_argument("--curvature-examples", type=int, default=None)
    parser.add_argument(
        "--lightning-monitor",
        choices=("defaults", "study"),
        default="defaults",
        help="--loop lightning: the Hessian monitor at its defaults or configured as the emulation",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    s = Settings(loop=args.loop)
    cfg = PRESETS[s.preset]
    if args.fast:
        cfg = GPTConfig(n_layer=1, d_model=64, n_head=2, context=32)
        s = Settings(lrs=[3e-3, 1e-1], seeds=[0], steps=30, batch_size=8, eval_windows=64, loop=args.loop,
                     every=10, config=asdict(cfg))  # fmt: skip
    s.lrs = args.lrs or s.lrs
    s.seeds = args.seeds if args.seeds is not None else s.seeds
    s.schedules = args.schedules or s.schedules
    s.steps = args.steps or s.steps
    s.tol = args.tol or s.tol
    s.max_iter = args.max_iter or s.max_iter
    s.every = args.every or s.every
    s.curvature_examples = args.curvature_examples or s.curvature_examples
    s.lightning_monitor = args.lightning_monitor
    corpus = stdlib_corpus()
    run = run_plain if args.loop == "plain" else run_lightning

    runs = []
    t_start = time.perf_counter()
    for seed in s.seeds:
        for lr in s.lrs:
            for schedule in s.schedules:
                r = run(schedule, lr, seed, cfg, s, corpus)
                runs.append(r)
                print(
                    f"  {LABELS[schedule]:<20} lr {lr:<7g} seed {seed}: train {r['final_train']:.3f} held-out "
                    f"{r['final_held_out']:.3f} spike {r['spike']:+.2f}@{r['spike_step']} {r['seconds']:.1f}s",
                    flush=True,
                )
    rows = aggregate(runs, s)
    checks = targets(rows, s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": asdict(s), "model_parameters": cfg.num_params, "summary": rows, "targets": checks,
               "runs": runs, "total_seconds": time.perf_counter() - t_start}  # fmt: skip
    (out / f"{NAME}.json").write_text(_dumps(_finite(payload)), encoding="utf-8")
    plot(runs, rows, s, out / f"{NAME}.png")
    print_table(rows)
    print(json.dumps(_finite(checks), indent=1))
    print(f"{NAME}: {len(runs)} runs in {time.perf_counter() - t_start:.0f} s; wrote {out / (NAME + '.png')} and .json")


def _dumps(payload: dict[str, Any]) -> str:
    """Indented JSON, one line per run (the per-step series stay compact)."""
    parts = []
    for key, value in payload.items():
        if key == "runs":
            body = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in value)
            parts.append(f' "{key}": [\n{body}\n ]')
        else:
            parts.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _finite(x: Any) -> Any:
    """JSON without bare NaN/inf (they become null); floats to 6 significant digits."""
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    main()
