"""Wall-time overhead of the curvature monitors at their default cadence on real Lightning training runs.

Two cases, as in ``benchmarks/cases.py``:

* ``mlp_digits``: tanh MLP 64-32-10 (2,410 parameters) on scikit-learn's digits (1,797 examples), batch 64, SGD;
* ``cnn``: ReLU CNN (3 conv blocks 16/32/64, 1024-960-10; about 1.02M parameters) on 2,048 random 3x32x32
  images with random labels, batch 64, SGD.

For each case, ``trainer.fit`` is timed without callbacks, with ``HessianEigenvalueMonitor()``, with
``GradientCovarianceMonitor()`` and with both (all defaults: every 50 steps plus step 0, fixed batch of 256 /
128 examples, k = 5 / 10), each ``--repeats`` times (the fastest run counts), with a TensorBoard logger as a user
would have. Reported per configuration: fit time, overhead against the baseline (wall time), the monitors' own
measured time (``measure_time_s``) as a share of the rest of the run (less noisy on a shared machine), time and
Hessian-vector products per measurement, and the ``every_n_steps`` that would keep the monitor at 5%.

Run::

    python benchmarks/bench_monitor_overhead.py            # prints a table, writes results/monitor_overhead.json
    python benchmarks/bench_monitor_overhead.py --quick    # fewer steps, for a smoke test
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
    "mlp_digits": {"net": _mlp, "lr": 0.1, "batch_size": 64, "steps": 1000},
    "cnn": {"net": _cnn, "lr": 0.02, "batch_size": 64, "steps": 200},
}


class _Counting:
    """Mixin recording the Hessian-vector products of every measurement."""

    hvps: list[float]

    def measure(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        out = super().measure(*args, **kwargs)  # type: ignore[misc]
        self.hvps.append(out.get("curvature/num_hvp", float("nan")))
        return out


class CountingHessian(_Counting, HessianEigenvalueMonitor):
    def __init__(self) -> None:
        super().__init__()
        self.hvps = []


class CountingCovariance(_Counting, GradientCovarianceMonitor):
    def __init__(self) -> None:
        super().__init__()
        self.hvps = []


CONFIGS = {
    "baseline": (),
    "hessian": (CountingHessian,),
    "covariance": (CountingCovariance,),
    "both": (CountingHessian, CountingCovariance),
}


def run_once(case: str, config: str, steps: int, workdir: Path) -> dict[str, Any]:
    spec = CASES[case]
    pl.seed_everything(0, verbose=False)
    model = Classifier(spec["net"](), spec["lr"])
    loader = DataLoader(_data(case), batch_size=spec["batch_size"], shuffle=True, drop_last=True)
    monitors = [cls() for cls in CONFIGS[config]]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=TensorBoardLogger(workdir, name=f"{case}-{config}"),
        callbacks=monitors, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - t0
    measure = sum(m.measure_time_s for m in monitors)
    count = sum(m.num_measurements for m in monitors)
    hvps = [h for m in monitors for h in m.hvps if h == h]
    return {
        "fit_s": wall,
        "monitor_s": measure,
        "measurements": count,
        "per_measurement_s": {type(m).__name__: m.measure_time_s / max(1, m.num_measurements) for m in monitors},
        "hvp_per_measurement": sum(hvps) / len(hvps) if hvps else None,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared box)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            steps = CASES[case]["steps"] // (10 if args.quick else 1)
            best: dict[str, dict[str, Any]] = {}
            run_once(case, "both", 2, Path(tmp))  # warm-up (imports, allocator, first-call costs), discarded
            for _ in range(args.repeats):
                for config in CONFIGS:  # interleaved, so machine-load drifts hit every configuration
                    r = run_once(case, config, steps, Path(tmp))
                    if config not in best or r["fit_s"] < best[config]["fit_s"]:
                        best[config] = r
            base = best["baseline"]["fit_s"]
            step_s = base / steps
            for config, r in best.items():
                rest = r["fit_s"] - r["monitor_s"]
                row = {
                    "case": case, "config": config, "steps": steps, "repeats": args.repeats,
                    "num_params": r["num_params"],
                    "fit_s": round(r["fit_s"], 3), "wall_overhead": round(r["fit_s"] / base - 1.0, 4),
                    "monitor_s": round(r["monitor_s"], 3),
                    "monitor_share": round(r["monitor_s"] / rest, 4) if config != "baseline" else 0.0,
                    "measurements": r["measurements"],
                    "per_measurement_s": {k: round(v, 4) for k, v in r["per_measurement_s"].items()},
                    "hvp_per_measurement": r["hvp_per_measurement"],
                }  # fmt: skip
                # cadence at which the measured cost per measurement stays within the budget
                per = sum(r["per_measurement_s"].values())
                row["every_n_steps_for_5pct"] = int(per / (BUDGET * step_s)) + 1 if per > 0 else None
                rows.append(row)
    print(f"{'case':<11} {'config':<11} {'steps':>5} {'fit s':>8} {'wall ovh':>9} {'monitor':>8} "
          f"{'s/meas':>8} {'HVP/meas':>8} {'n for 5%':>8}")  # fmt: skip
    for r in rows:
        per = sum(r["per_measurement_s"].values())
        hvp = "" if r["hvp_per_measurement"] is None else f"{r['hvp_per_measurement']:.1f}"
        print(f"{r['case']:<11} {r['config']:<11} {r['steps']:>5} {r['fit_s']:>8.2f} {r['wall_overhead']:>8.1%} "
              f"{r['monitor_share']:>8.1%} {per:>8.3f} {hvp:>8} {r['every_n_steps_for_5pct'] or '':>8}")  # fmt: skip
    result = {
        "description": "Overhead of HessianEigenvalueMonitor / GradientCovarianceMonitor at default settings "
        "(every_n_steps=50 plus step 0) on Lightning fits; wall_overhead = fit time / baseline - 1 (best of "
        "repeats), monitor_share = the monitors' own timed share of the rest of the run.",
        "budget": BUDGET,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
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
