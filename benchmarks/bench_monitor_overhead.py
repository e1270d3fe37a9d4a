"""Wall-time overhead of the curvature monitors at their default (adaptive) cadence on real Lightning runs.

Two cases, as in ``benchmarks/cases.py``:

* ``mlp_digits``: tanh MLP 64-32-10 (2,410 parameters) on scikit-learn's digits (1,797 examples), batch 64, SGD;
* ``cnn``: ReLU CNN (3 conv blocks 16/32/64, 1024-960-10; about 1.02M parameters) on 2,048 random 3x32x32
  images with random labels, batch 64, SGD.

For each case, ``trainer.fit`` is timed without callbacks, with an empty ``Callback`` and with a Hessian monitor
whose measurement does nothing (the fixed per-step costs: Lightning's per-callback dispatch, then the monitor's own
hook and planning), with ``HessianEigenvalueMonitor()``, with
``GradientCovarianceMonitor()``, with both, and with both at half the budget each (``max_overhead=0.025``: the
budget is per monitor). All other arguments are the defaults: adaptive cadence with ``max_overhead=0.05`` (step 0,
then ``ceil(t_measure / (0.05 t_step))`` steps after each measurement), fixed batch of 256 / 128 examples,
k = 5 / 10, block warm start. Each configuration runs ``repeats`` times (the fastest counts), interleaved, with a
TensorBoard logger as a user would have.

Reported per configuration: fit time; ``wall_overhead`` (fit time / baseline - 1: everything the monitors add);
``monitor_share`` (the monitors' own measuring time / the rest of the run: less noisy on a shared machine); the
steps measured and measurements per 1,000 steps; time and Hessian-vector products of the first (cold) and later
(warm-started) measurements; and the plan at the end of the run: the gap to the next measurement, the monitor's
step-time average against the baseline's step time, the steady-state overhead of that plan
(``t_measure / (gap * baseline step time)``) and its measurements per 1,000 steps. The step-0 measurement is paid
for by no training time, so a run shorter than a few gaps shows a realised overhead above the steady state (on the
CNN the first gap is thousands of steps: see ``projected`` for longer runs).

Run::

    python benchmarks/bench_monitor_overhead.py            # prints a table, writes results/monitor_overhead.json
    python benchmarks/bench_monitor_overhead.py --quick    # a tenth of the steps, one repeat: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor

RESULTS = Path(__file__).parent / "results" / "monitor_overhead.json"
BUDGET = 0.05


class Classifier(pl.LightningModule):
    """A classifier around ``net`` trained with plain SGD (the loss is re-run by the monitors)."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 960), nn.ReLU(), nn.Linear(960, 10),
    )  # fmt: skip


def _data(case: str) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    if case == "mlp_digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return TensorDataset(torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target))
    x = torch.randn(2048, 3, 32, 32, generator=gen)
    return TensorDataset(x, torch.randint(0, 10, (2048,), generator=gen))


CASES: dict[str, dict[str, Any]] = {
    "mlp_digits": {"net": _mlp, "lr": 0.1, "batch_size": 64, "steps": 10_000, "repeats": 2},
    "cnn": {"net": _cnn, "lr": 0.02, "batch_size": 64, "steps": 800, "repeats": 1},
}
#: run lengths at which the realised overhead of the final plan is projected (the step-0 measurement amortised)
PROJECT_STEPS = (10_000, 100_000)


class _Counting:
    """Mixin recording the step, wall time and Hessian-vector products of every measurement."""

    records: list[tuple[int, float, float]]
    measure_time_s: float

    def measure(self, trainer: Any, pl_module: Any, current_batch: Any, step: int, prog_bar: bool) -> dict[str, float]:
        before = self.measure_time_s
        out = super().measure(trainer, pl_module, current_batch, step, prog_bar)  # type: ignore[misc]
        self.records.append((step, self.measure_time_s - before, out.get("curvature/num_hvp", float("nan"))))
        return out


class CountingHessian(_Counting, HessianEigenvalueMonitor):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records = []


class CountingCovariance(_Counting, GradientCovarianceMonitor):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records = []


class EmptyCallback(pl.Callback):
    """No hooks: what Lightning's per-callback dispatch costs by itself."""


class IdleHessian(HessianEigenvalueMonitor):
    """The monitor's per-step hook and planning, without measuring: the fixed per-step cost."""

    def measure(self, trainer: Any, pl_module: Any, current_batch: Any, step: int, prog_bar: bool) -> dict[str, float]:
        self.last_step = step
        return {}


HALF = {"max_overhead": 0.025}
CONFIGS: dict[str, tuple[tuple[type, dict[str, Any]], ...]] = {
    "baseline": (),
    "empty_callback": ((EmptyCallback, {}),),
    "idle_hessian": ((IdleHessian, {}),),
    "hessian": ((CountingHessian, {}),),
    "covariance": ((CountingCovariance, {}),),
    "both": ((CountingHessian, {}), (CountingCovariance, {})),
    "both_2.5pct": ((CountingHessian, HALF), (CountingCovariance, HALF)),
}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _monitor_summary(m: Any, steps: int) -> dict[str, Any]:
    times = [t for _, t, _ in m.records]
    hvps = [h for _, _, h in m.records if h == h]
    gap = m.next_step - m.last_step
    return {
        "max_overhead": m.max_overhead,
        "measured_steps": [s for s, _, _ in m.records],
        "per_1000_steps": round(1000 * len(m.records) / steps, 2),
        "first_measure_s": round(times[0], 4) if times else None,
        "later_measure_s": None if len(times) < 2 else round(_mean(times[1:]), 4),  # type: ignore[arg-type]
        "first_hvp": hvps[0] if hvps else None,
        "later_hvp": None if len(hvps) < 2 else round(_mean(hvps[1:]), 2),  # type: ignore[arg-type]
        "realised_overhead": None if m.overhead is None else round(m.overhead, 4),  # measuring / timed training
        "step_time_ema_s": m.step_time_s,
        "last_measure_s": round(m._last_measure_s, 4),
        "planned_gap": gap,
        "planned_provisional": m._provisional,
    }


def run_once(case: str, config: str, steps: int, workdir: Path) -> dict[str, Any]:
    spec = CASES[case]
    pl.seed_everything(0, verbose=False)
    model = Classifier(spec["net"](), spec["lr"])
    loader = DataLoader(_data(case), batch_size=spec["batch_size"], shuffle=True, drop_last=True)
    callbacks = [cls(**kwargs) for cls, kwargs in CONFIGS[config]]
    monitors = [c for c in callbacks if isinstance(c, _Counting)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=TensorBoardLogger(workdir, name=f"{case}-{config}"),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - t0
    return {
        "fit_s": wall,
        "monitor_s": sum(m.measure_time_s for m in monitors),
        "measurements": sum(m.num_measurements for m in monitors),
        "monitors": {type(m).__name__.replace("Counting", ""): _monitor_summary(m, steps) for m in monitors},
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def _project(mon: dict[str, Any], step_s: float, steps: int) -> float:
    """Overhead of a ``steps``-step run: step 0 at the first measurement's cost, then the final plan's cadence."""
    first, later = mon["first_measure_s"], mon["last_measure_s"]
    gap = mon["planned_gap"]
    n_later = steps // gap
    return (first + n_later * later) / (steps * step_s)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=None, help="override the per-case repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared box)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps, one repeat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            steps = CASES[case]["steps"] // (10 if args.quick else 1)
            repeats = 1 if args.quick else (args.repeats or CASES[case]["repeats"])
            best: dict[str, dict[str, Any]] = {}
            run_once(case, "both", 2, Path(tmp))  # warm-up (imports, allocator, first-call costs), discarded
            for _ in range(repeats):
                for config in CONFIGS:  # interleaved, so machine-load drifts hit every configuration
                    r = run_once(case, config, steps, Path(tmp))
                    if config not in best or r["fit_s"] < best[config]["fit_s"]:
                        best[config] = r
            base = best["baseline"]["fit_s"]
            step_s = base / steps
            for config, r in best.items():
                rest = r["fit_s"] - r["monitor_s"]
                monitors = r["monitors"]
                for mon in monitors.values():
                    ema = mon["step_time_ema_s"]
                    mon["ema_vs_baseline_step"] = None if ema is None else round(ema / step_s, 3)
                    mon["steady_state_overhead"] = round(mon["last_measure_s"] / (mon["planned_gap"] * step_s), 4)
                    mon["planned_per_1000_steps"] = round(1000 / mon["planned_gap"], 2)
                    mon["projected"] = {str(n): round(_project(mon, step_s, n), 4) for n in PROJECT_STEPS}
                row = {
                    "case": case, "config": config, "steps": steps, "repeats": repeats,
                    "num_params": r["num_params"], "baseline_step_s": round(step_s, 6),
                    "fit_s": round(r["fit_s"], 3), "wall_overhead": round(r["fit_s"] / base - 1.0, 4),
                    "monitor_s": round(r["monitor_s"], 3),
                    "monitor_share": round(r["monitor_s"] / rest, 4),
                    "measurements": r["measurements"],
                    "per_1000_steps": round(1000 * r["measurements"] / steps, 2),
                    "steady_state_overhead": round(sum(m["steady_state_overhead"] for m in monitors.values()), 4),
                    "projected": {
                        str(n): round(sum(m["projected"][str(n)] for m in monitors.values()), 4) for n in PROJECT_STEPS
                    },
                    "monitors": monitors,
                }  # fmt: skip
                rows.append(row)
    print(f"{'case':<11} {'config':<12} {'steps':>5} {'fit s':>7} {'wall ovh':>8} {'monitor':>8} {'meas/1k':>7} "
          f"{'plan/1k':>7} {'steady':>7} {'@10k':>6} {'@100k':>6}  "
          "per monitor: first/later s, HVP first/later")  # fmt: skip
    for r in rows:
        mons = r["monitors"].values()
        plan = sum(m["planned_per_1000_steps"] for m in mons)
        detail = "; ".join(
            f"{name}: {m['first_measure_s']}/{m['later_measure_s']} s"
            + (f", HVP {m['first_hvp']:.0f}/{m['later_hvp']}" if m["first_hvp"] is not None else "")
            for name, m in r["monitors"].items()
        )
        proj = r["projected"]
        print(f"{r['case']:<11} {r['config']:<12} {r['steps']:>5} {r['fit_s']:>7.2f} {r['wall_overhead']:>8.1%} "
              f"{r['monitor_share']:>8.1%} {r['per_1000_steps']:>7.2f} {plan:>7.2f} {r['steady_state_overhead']:>7.1%} "
              f"{proj['10000']:>6.1%} {proj['100000']:>6.1%}  {detail}")  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"benchmark time: {elapsed:.0f} s")
    result = {
        "description": "Overhead of HessianEigenvalueMonitor / GradientCovarianceMonitor at their default adaptive "
        "cadence (max_overhead=0.05 per monitor; both_2.5pct: 0.025 each) on Lightning fits. wall_overhead = fit "
        "time / baseline - 1 (best of repeats); monitor_share = the monitors' own measuring time / the rest of the "
        "run; per_1000_steps = measurements in this run per 1,000 steps; steady_state_overhead = last measurement "
        "time / (planned gap * baseline step time), summed over monitors; projected = overhead of a run of that "
        "many steps with the first (cold) measurement at step 0 and the final plan after it.",
        "budget": BUDGET,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "benchmark_s": round(elapsed, 1),
        "platform": platform.platform(),
        "rows": rows,
    }
    if args.out.exists() and set(args.cases) != set(CASES):  # a partial re-run keeps the other cases' rows
        kept = [r for r in json.loads(args.out.read_text()).get("rows", []) if r["case"] not in args.cases]
        result["rows"] = sorted(kept + rows, key=lambda r: list(CASES).index(r["case"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
