"""Lanczos start vectors: the gradient mixed with a Gaussian against a Gaussian alone, along short training runs.

The evidence behind ``hessian_eigenvalues(start="auto")`` (gradient start for k = 1, Gaussian for k > 1). For each
benchmark case (``cases.py``) and SGD learning rate (two for the CNN), the model is trained for 0, 3, 10, 30 and
60 full-batch steps; at each point the top eigenvalues are measured to ``tol=1e-3`` from both starts with seeds
0-2 and compared with a tight reference: the elementwise maximum of two ``tol=1e-9`` runs from different starts
(Ritz values never exceed the eigenvalues they approximate, Cauchy interlacing, so the maximum is the better of
the two). Reported: products and relative error per start, and how many runs missed ``tol``.

    python bench_start_vector.py [--cases cnn transformer mlp_digits] [--k 1 5]   # writes results/start_vector.json

Runs in the dev or the benchmark venv (no peers needed); about 12 minutes on one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from cases import make_case  # noqa: E402

import lightning_curvature as lc  # noqa: E402

LR = {"cnn": (0.01, 0.05), "transformer": (0.1,), "mlp_digits": (0.5,)}
STEPS = (0, 3, 10, 30, 60)
SEEDS = (0, 1, 2)


def tight_reference(model: Any, case: Any, k: int) -> torch.Tensor:
    """Top-``k`` of a model with no cached reference (one along a training run): our own solver, run tight.

    Two ``tol=1e-9`` runs for ``k + 1`` values from different starts (gradient, seed 0; Gaussian, seed 1); Ritz
    values never exceed the eigenvalues they approximate (Cauchy interlacing), so their elementwise maximum is the
    better of the two, and a value one run missed is caught by the other unless both miss it.
    """
    tight = [
        lc.hessian_eigenvalues(model, case.loss_fn, case.batch, k=k + 1, tol=1e-9, max_iter=150, start=s, seed=sd)
        for s, sd in (("gradient", 0), ("random", 1))
    ]
    return torch.maximum(tight[0].eigenvalues, tight[1].eigenvalues)[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(LR), choices=list(LR))
    ap.add_argument("--k", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "start_vector.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name, lr in ((n, lr) for n in args.cases for lr in LR[n]):
        case = make_case(name)
        model = copy.deepcopy(case.model)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        done = 0
        for target in STEPS:
            while done < target:
                opt.zero_grad()
                case.loss_fn(model, case.batch).backward()
                opt.step()
                done += 1
            opt.zero_grad(set_to_none=True)
            for k in args.k:
                ref = tight_reference(model, case, k)
                for start in ("gradient", "random"):
                    for seed in SEEDS:
                        r = lc.hessian_eigenvalues(model, case.loss_fn, case.batch, k=k, start=start, seed=seed)
                        err = float(((r.eigenvalues - ref).abs() / ref.abs()).max())
                        rows.append(
                            {"case": name, "lr": lr, "step": done, "k": k, "start": start, "seed": seed,
                             "num_hvp": r.num_hvp, "rel_err": err}
                        )  # fmt: skip
                cur = [x for x in rows if x["case"] == name and x["lr"] == lr and x["step"] == done and x["k"] == k]
                line = "  ".join(
                    f"{s}: " + " ".join(f"{x['num_hvp']}/{x['rel_err']:.0e}" for x in cur if x["start"] == s)
                    for s in ("gradient", "random")
                )
                print(f"{name:<12} lr {lr:<5} step {done:>2} k={k}  {line}", flush=True)
    print(f"\n{'case':<12} {'k':>2} {'start':<9} {'mean HVPs':>9} {'range':>8} {'missed tol':>10}")
    summary = []
    for name in args.cases:
        for k in args.k:
            for start in ("gradient", "random"):
                sel = [x for x in rows if x["case"] == name and x["k"] == k and x["start"] == start]
                hv = [x["num_hvp"] for x in sel]
                missed = sum(x["rel_err"] > 1e-3 for x in sel)
                summary.append(
                    {"case": name, "k": k, "start": start, "mean_hvp": sum(hv) / len(hv), "min_hvp": min(hv),
                     "max_hvp": max(hv), "missed": missed, "runs": len(sel)}
                )  # fmt: skip
                print(f"{name:<12} {k:>2} {start:<9} {sum(hv) / len(hv):>9.1f} {min(hv):>3}-{max(hv):<4} "
                      f"{missed:>4}/{len(sel)}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"lr": LR, "steps": STEPS, "seeds": SEEDS, "summary": summary, "rows": rows,
                    "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n"
    )  # fmt: skip
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
