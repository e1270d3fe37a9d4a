"""Do the finite-difference error estimates cover the error at the sizes users run? Every product of a Lanczos run.

The byte-level GPT of ``bench_transformer.py`` is trained compiled for 20 AdamW steps; then the preconditioned
sharpness :math:`\\lambda_{max}(P^{-1/2} H P^{-1/2})` is measured with float32 finite differences through the
compiled model, as the monitors do for a compiled module, from the gradient start (``hessian_eigenvalues``'
default for top-1) and from a Gaussian. Each product's direction is kept and its product recomputed exactly by
double backward through an eager float64 copy of the model (the reference); the table lists, per product, the
reported error (``last_product_error``), the true error against the reference, and the step the search settled on.
A reported error below the true one would be a false certificate.

    OMP_NUM_THREADS=2 python benchmarks/bench_fd_coverage.py                # 25M (~4 min): results/fd_coverage_25M.json
    OMP_NUM_THREADS=2 python benchmarks/bench_fd_coverage.py --size 3M      # ~1 min
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from _transformer_common import CONTEXT, SIZES, adamw, adamw_step, text_windows
from bench_scale import GPT, gpt_loss
from bench_transformer import CURVATURE_START, TRAIN_STEPS

from lightning_curvature import lanczos
from lightning_curvature.core.eigen import cold_start_vector, preconditioned_operator
from lightning_curvature.core.hvp import HessianOperator
from lightning_curvature.core.lanczos import Handoff
from lightning_curvature.core.operators import RELIABLE_PRODUCT_ERROR, ScaledOperator
from lightning_curvature.core.preconditioner import preconditioner_parts

RESULTS = Path(__file__).resolve().parent / "results"


def trained(size: str) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.Tensor]]:
    """The model, its compiled module and Adam's preconditioner after the training steps."""
    d, layers, bsz = SIZES[size]
    torch.manual_seed(0)
    model = GPT(d, layers, context=CONTEXT)
    net = torch.compile(model)
    opt = adamw(model.parameters())
    for i in range(TRAIN_STEPS):
        adamw_step(model, net, opt, i, bsz)
    P = preconditioner_parts(opt, [p for p in model.parameters() if p.requires_grad])
    assert P is not None
    return model, net, P


def run(model: torch.nn.Module, net: torch.nn.Module, P: list[torch.Tensor], batch: Any, start: str) -> dict:
    """One float32 finite-difference top-1 through ``net``; every product checked against float64 double backward."""
    records: list[tuple[list[torch.Tensor], list[torch.Tensor], float, float]] = []
    t0 = time.perf_counter()
    with HessianOperator(net, gpt_loss, batch, method="finite_difference") as H:
        op = preconditioned_operator(H, P)
        assert isinstance(op, ScaledOperator)
        matvec = op.matvec

        def recording(v: Any) -> Any:
            out = matvec(v)
            keep = [t.detach().clone() for t in v], [t.detach().clone() for t in out]
            records.append((*keep, float(op.last_product_error), float(H.fd_step_ratio)))
            return out

        op.matvec = recording  # type: ignore[method-assign]
        v0 = cold_start_vector(H, 1, start="gradient", scale=op.scale) if start == "gradient" else None
        res = lanczos(op, k=1, tol=1e-3, max_iter=100, v0=None if v0 is None else Handoff([v0]))
        gradients = H.num_grad
    seconds = time.perf_counter() - t0
    reference = copy.deepcopy(model).double()
    rows = []
    with HessianOperator(reference, gpt_loss, batch, method="double_backward") as H64:
        op64 = preconditioned_operator(H64, [p.double() for p in P])
        for j, (v, out, reported, ratio) in enumerate(records):
            exact = op64.matvec([t.double() for t in v])
            err = math.sqrt(sum(float((o.double() - e).square().sum()) for o, e in zip(out, exact)))
            size = math.sqrt(sum(float(e.square().sum()) for e in exact))
            rows.append({"product": j, "reported": reported, "error": err / size, "step_ratio": ratio})
    return {
        "start": start,
        "eigenvalue": float(res.eigenvalues[0]),
        "error_bound": float(res.error_bounds[0]),
        "converged": res.converged,
        "products": res.num_matvecs,
        "gradients": gradients,
        "seconds": seconds,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="25M", choices=list(SIZES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, net, P = trained(args.size)
    batch = text_windows(SIZES[args.size][2], start=CURVATURE_START)
    with HessianOperator(copy.deepcopy(model).double(), gpt_loss, batch, method="double_backward") as H64:
        op64 = preconditioned_operator(H64, [p.double() for p in P])
        exact_top = float(lanczos(op64, k=1, tol=1e-8, max_iter=100).eigenvalues[0])
    out: dict[str, Any] = {"torch": torch.__version__, "size": args.size, "float64_top": exact_top, "runs": []}
    print(f"GPT {args.size}, compiled, float32 finite differences; float64 double-backward top: {exact_top:,.2f}")
    for start in ("gradient", "random"):
        r = run(model, net, P, batch, start)
        out["runs"].append(r)
        print(
            f"\nstart {start}: {r['eigenvalue']:,.2f} (error {abs(r['eigenvalue'] - exact_top):.3g}, bound "
            f"{r['error_bound']:.3g}, converged {r['converged']}), {r['products']} products, {r['gradients']} "
            f"gradients, {r['seconds']:.1f} s"
        )
        print(f"{'product':>8} {'reported':>10} {'true error':>11} {'true/reported':>14} {'step ratio':>11}")
        for row in r["rows"]:
            flag = "  FALSE" if row["error"] > row["reported"] else ""
            beyond = "  (past 5%: not trusted)" if row["reported"] > RELIABLE_PRODUCT_ERROR else ""
            print(
                f"{row['product']:8d} {row['reported']:10.3e} {row['error']:11.3e} "
                f"{row['error'] / max(row['reported'], 1e-300):14.3f} {row['step_ratio']:11.4g}{flag}{beyond}"
            )
    path = args.out or RESULTS / f"fd_coverage_{args.size}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
