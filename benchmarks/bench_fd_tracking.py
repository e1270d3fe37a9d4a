"""What the finite-difference step search costs in warm measurements, and what ``fd_target`` saves.

The byte-level GPT of ``bench_transformer.py`` (3M) is trained compiled with AdamW; from step 20 on, after every
step, the preconditioned sharpness :math:`\\lambda_{max}(P^{-1/2} H P^{-1/2})` is measured on a fixed curvature batch
with float32 finite differences through the compiled model, warm-started from the last top vector and starting each
search from the step the last one settled on, as the Hessian monitor does:

* ``tracking``: two products per measurement (``tracking_products=2``);
* ``tol=0.1``: Lanczos to ``tol=0.1``, at most 8 products (the README's monitor for ``SharpnessAwareLR``).

Each mode runs three times with the same seed: twice with products searched down to ``FD_TARGET`` (what every
solve asked before ``fd_target``; the second run shows how far two runs of one configuration are apart, the
compiled model not being bit-reproducible), once with the target the monitor now sets (``TRACKING_FD_TARGET``;
``fd_target_for(0.1)``). The table gives the gradients spent, the products, the bounds, and each run's values
against the first run's.

    OMP_NUM_THREADS=2 python benchmarks/bench_fd_tracking.py                    # ~12 min: results/fd_tracking.json
    OMP_NUM_THREADS=2 python benchmarks/bench_fd_tracking.py --modes tol=0.1    # one mode, keeping the other's runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _transformer_common import CONTEXT, SIZES, adamw, adamw_step, text_windows
from bench_scale import GPT, gpt_loss

from lightning_curvature import lanczos
from lightning_curvature.callbacks.hessian_monitor import TRACKING_FD_TARGET, fd_target_for
from lightning_curvature.core.eigen import preconditioned_operator
from lightning_curvature.core.hvp import FD_TARGET, HessianOperator
from lightning_curvature.core.lanczos import Handoff
from lightning_curvature.core.preconditioner import preconditioner_parts

RESULTS = Path(__file__).resolve().parent / "results"
FIRST = 20  # AdamW steps before the first (cold) measurement
MODES = {"tracking": (1e-3, 2, TRACKING_FD_TARGET), "tol=0.1": (0.1, 8, fd_target_for(0.1))}


def run(mode: str, target: float, steps: int) -> dict[str, Any]:
    """One training run measuring after every step from ``FIRST`` on; the warm measurements' figures."""
    tol, max_iter, _ = MODES[mode]
    d, layers, batch = SIZES["3M"]
    torch.manual_seed(0)
    model = GPT(d, layers, context=CONTEXT)
    net, opt = torch.compile(model), adamw(model.parameters())
    curvature_batch = text_windows(8, start=300_000)
    ratio, start = 1.0, None
    rows = []
    t0 = time.perf_counter()
    for step in range(steps):
        adamw_step(model, net, opt, step, batch)
        if step < FIRST:
            continue
        P = preconditioner_parts(opt, list(model.parameters()))
        with HessianOperator(net, gpt_loss, curvature_batch, method="finite_difference") as H:
            H.fd_step_ratio = ratio
            warm = start is not None
            if warm:
                H.fd_target = target
            op = preconditioned_operator(H, P)
            res = lanczos(
                op, k=1, tol=tol, max_iter=max_iter if warm else 60, v0=Handoff([start]) if warm else None,
                return_warm_start=True,
            )  # fmt: skip
            assert res.warm_start is not None
            start = [t.clone() for t in res.warm_start[0]]
            ratio = H.fd_step_ratio
            if warm:
                rows.append(
                    {"step": step, "gradients": H.num_grad, "products": res.num_hvp,
                     "value": float(res.eigenvalues[0]), "bound": float(res.error_bounds[0]),
                     "converged": res.converged, "product_error": float(op.product_error)}
                )  # fmt: skip
    return {"mode": mode, "fd_target": target, "seconds": time.perf_counter() - t0, "measurements": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=75, help="training steps (warm measurements from step 21)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="which modes (a partial re-run keeps the others' runs in --out)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "fd_tracking.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    report: dict[str, Any] = {"torch": torch.__version__, "steps": args.steps, "runs": []}
    if args.out.exists():
        kept = json.loads(args.out.read_text())
        if kept.get("steps") == args.steps:
            report["runs"] = [r for r in kept["runs"] if r["mode"] not in args.modes]
    print(f"{'mode':9s} {'fd_target':>9s} {'gradients':>9s} {'per meas.':>9s} {'products':>8s} {'converged':>9s} "
          f"{'median bound':>12s} {'value vs FD_TARGET run':>24s}")  # fmt: skip
    for mode in args.modes:
        target = MODES[mode][2]
        base = run(mode, FD_TARGET, args.steps)
        again = run(mode, FD_TARGET, args.steps)  # how far two runs of one configuration are apart
        raised = run(mode, target, args.steps)
        for r in (base, again, raised):
            rows = r["measurements"]
            diffs = [abs(a["value"] - b["value"]) / abs(b["value"]) for a, b in zip(rows, base["measurements"])]
            r["summary"] = {
                "measurements": len(rows),
                "gradients": sum(x["gradients"] for x in rows),
                "products": sum(x["products"] for x in rows),
                "converged": sum(bool(x["converged"]) for x in rows),
                "median_relative_bound": statistics.median(x["bound"] / x["value"] for x in rows),
                "value_difference_median": statistics.median(diffs),
                "value_difference_max": max(diffs),
            }
            s = r["summary"]
            print(
                f"{mode:9s} {r['fd_target']:9.1e} {s['gradients']:9d} {s['gradients'] / s['measurements']:9.2f} "
                f"{s['products']:8d} {s['converged']:9d} {s['median_relative_bound']:12.2e} "
                f"{s['value_difference_median']:11.1e} (max {s['value_difference_max']:.1e})",
                flush=True,
            )
            report["runs"].append(r)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
