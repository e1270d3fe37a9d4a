"""Finite-difference against exact Hessian-vector products: accuracy and cost on the benchmark cases.

For each case (``cases.py``: digits MLP, ~1M-parameter CNN, small transformer) and a few directions (random, the
gradient, and the top eigenvector), compares float32 products with a float64 double-backward reference on the same
model (parameters cast to float64):

* ``double_backward`` (float32): the exact product, for scale;
* ``finite_difference`` (float32), the default fourth-order stencil at the default step
  (:func:`~lightning_curvature.core.hvp.finite_difference_step`) and at 1/4x and 4x of it, and the central
  difference (``fd_order=2``) at its default step.

Cost: seconds per product over seconds per gradient (median of interleaved repetitions, one thread).

    OMP_NUM_THREADS=1 python benchmarks/bench_products.py            # results/products.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from cases import CASE_NAMES, make_case

from lightning_curvature import HessianOperator, hessian_eigenvalues
from lightning_curvature.core import hvp as hvp_module

RESULTS = Path(__file__).resolve().parent / "results"


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.double().pow(2).sum()) for y in b) ** 0.5
    return num / den


def directions(name: str, case32, H32: HessianOperator) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = {"random": H32.space.randn(gen), "gradient": [g.clone() for g in H32.gradient()]}
    top = hessian_eigenvalues(
        case32.model, case32.loss_fn, case32.batch, k=1, tol=1e-4, return_eigenvectors=True, method="double_backward"
    )
    assert top.eigenvector_list is not None
    out["top eigenvector"] = top.eigenvector_list[0]
    return out


def bf16_rows(name: str) -> list[dict]:
    """Finite differences through a forward that runs in bfloat16 (autocast; what an FSDP2 run with a bf16
    ``param_dtype`` policy does), against the float64 exact product."""
    case32 = make_case(name)
    case64 = make_case(name, dtype=torch.float64)

    def bf16_loss(model, batch):  # type: ignore[no-untyped-def]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return case32.loss_fn(model, batch).float()

    rows = []
    with (
        HessianOperator(case64.model, case64.loss_fn, case64.batch, method="double_backward") as H64,
        HessianOperator(case32.model, bf16_loss, case32.batch, method="finite_difference") as F16,
    ):
        gen = torch.Generator().manual_seed(0)
        for dname, v in (("random", F16.space.randn(gen)), ("gradient", [g.clone() for g in F16.gradient()])):
            ref = H64.matvec([t.double() for t in v])
            rows.append({"direction": dname, "finite_difference_bf16_forward": relative_error(F16.matvec(v), ref)})
    return rows


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(name: str, reps: int) -> dict:
    case32 = make_case(name)
    case64 = make_case(name, dtype=torch.float64)
    rows = []
    with (
        HessianOperator(case64.model, case64.loss_fn, case64.batch, method="double_backward") as H64,
        HessianOperator(case32.model, case32.loss_fn, case32.batch, method="double_backward") as H32,
        HessianOperator(case32.model, case32.loss_fn, case32.batch, method="finite_difference") as F32,
        HessianOperator(case32.model, case32.loss_fn, case32.batch, method="finite_difference", fd_order=2) as F2,
    ):
        for dname, v in directions(name, case32, H32).items():
            ref = H64.matvec([t.double() for t in v])
            row = {"direction": dname, "double_backward_f32": relative_error(H32.matvec(v), ref)}
            original = hvp_module.finite_difference_step
            for factor in (0.25, 1.0, 4.0):
                hvp_module.finite_difference_step = lambda d, t, n, o=4, f=factor, g=original: f * g(d, t, n, o)  # type: ignore[misc]
                try:
                    F32._fd_ratio = 1.0  # each column starts from its own first step (not the last product's)
                    row[f"finite_difference_f32_x{factor:g}"] = relative_error(F32.matvec(v), ref)
                finally:
                    hvp_module.finite_difference_step = original
            row["central_difference_f32"] = relative_error(F2.matvec(v), ref)
            rows.append(row)
        v = directions(name, case32, H32)["random"]
        t_grad = timed(lambda: F32._gradient_at(case32.batch), reps)
        t_db = timed(lambda: H32.matvec(v), reps)
        t_fd = timed(lambda: F32.matvec(v), reps)
        t_fd2 = timed(lambda: F2.matvec(v), reps)
    return {
        "case": name,
        "num_params": H32.dim,
        "accuracy": rows,
        "bf16_forward": bf16_rows(name),
        "seconds": {"gradient": t_grad, "double_backward": t_db, "finite_difference": t_fd, "central": t_fd2},
        "per_gradient": {
            "double_backward": t_db / t_grad,
            "finite_difference": t_fd / t_grad,
            "central_difference": t_fd2 / t_grad,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASE_NAMES))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "products.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [run_case(name, args.reps) for name in args.cases]
    print("relative error against float64 double backward (float32 products)")
    head = ["case", "direction", "exact", "FD4 x0.25", "FD4 (default)", "FD4 x4", "FD2"]
    print(f"{head[0]:12s} {head[1]:16s} " + " ".join(f"{h:>13s}" for h in head[2:]))
    for r in results:
        for row in r["accuracy"]:
            vals = [row["double_backward_f32"]] + [row[f"finite_difference_f32_x{f:g}"] for f in (0.25, 1.0, 4.0)]
            vals.append(row["central_difference_f32"])
            print(f"{r['case']:12s} {row['direction']:16s} " + " ".join(f"{x:13.1e}" for x in vals))
    print()
    print("finite differences through a bfloat16 forward (autocast), against float64 double backward")
    for r in results:
        for row in r["bf16_forward"]:
            print(f"{r['case']:12s} {row['direction']:16s} {row['finite_difference_bf16_forward']:13.1e}")
    print()
    print(f"{'case':12s} {'params':>9s} {'grad s':>8s} {'DB/grad':>8s} {'FD4/grad':>9s} {'FD2/grad':>9s}")
    for r in results:
        pg = r["per_gradient"]
        print(
            f"{r['case']:12s} {r['num_params']:9d} {r['seconds']['gradient']:8.4f} "
            f"{pg['double_backward']:8.2f} {pg['finite_difference']:9.2f} {pg['central_difference']:9.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
