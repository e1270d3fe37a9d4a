"""Block against single-vector Lanczos on the clustered benchmark CNN: products, seconds, misses.

The CNN of ``cases.py`` has λ₄, λ₅, λ₆ = 1.99, 1.94, 1.93 (``results/reference_cnn.json``): a single Krylov vector
can return λ₆ in place of λ₅ with a tight bound when λ₅'s eigenvector is nearly absent from its start. For seeds
0..S-1, top-5 at ``tol=1e-3`` with block sizes 1, 2 and 3; a run *misses* when some returned value is more than
``tol`` (relative) off the float64 reference. Products run one at a time on CPU (batched products were slower there).

    OMP_NUM_THREADS=1 python benchmarks/bench_block.py --seeds 10     # results/block.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import make_case  # noqa: E402

import lightning_curvature as lc  # noqa: E402

RESULTS = HERE / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=RESULTS / "block.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    case = make_case("cnn")
    ref = torch.tensor(json.loads((RESULTS / "reference_cnn.json").read_text())["top_eigenvalues"][:5])
    rows = []
    for b in args.blocks:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            res = lc.hessian_eigenvalues(
                case.model, case.loss_fn, case.batch, k=5, tol=1e-3, max_iter=200, block_size=b, seed=seed,
                start="random", method="double_backward",
            )  # fmt: skip
            err = float(((res.eigenvalues - ref).abs() / ref.abs()).max())
            rows.append({"block_size": b, "seed": seed, "num_hvp": res.num_hvp, "seconds": time.perf_counter() - t0,
                         "max_rel_err": err, "miss": err > 1e-3, "converged": res.converged})  # fmt: skip
            print(f"b={b} seed={seed} {res.num_hvp:4d} HVPs {rows[-1]['seconds']:6.1f} s err {err:.1e}", flush=True)
    summary = []
    for b in args.blocks:
        mine = [r for r in rows if r["block_size"] == b]
        summary.append({
            "block_size": b,
            "median_hvp": statistics.median(r["num_hvp"] for r in mine),
            "median_seconds": statistics.median(r["seconds"] for r in mine),
            "misses": sum(r["miss"] for r in mine),
            "runs": len(mine),
            "worst_rel_err": max(r["max_rel_err"] for r in mine),
        })  # fmt: skip
    print(f"{'block':>5} {'median HVPs':>12} {'median s':>9} {'misses':>7} {'worst err':>10}")
    for s in summary:
        print(f"{s['block_size']:>5} {s['median_hvp']:>12} {s['median_seconds']:>9.1f} "
              f"{s['misses']:>3}/{s['runs']:<3} {s['worst_rel_err']:>10.1e}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
