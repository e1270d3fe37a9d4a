"""How fast could the top-5 be without reorthogonalisation? The ceiling any selective or partial scheme is under.

Runs ``hessian_eigenvalues(k=5, tol=1e-3)`` on the benchmark CNN twice per round, interleaved: as shipped (one
Gram–Schmidt pass against the whole basis per step, a second where it removed most of a vector), and with the basis
passes cut down to the last two vectors (plain three-term Lanczos: no reorthogonalisation at all, so converged
eigenvalues come back as ghost copies). Selective (Parlett–Scott) or partial (Simon) reorthogonalisation sit between
the two; the second row bounds what they could save. Also times the products alone (the same number of products as
the shipped run, through the same operator). Median seconds over ``--rounds``, one torch thread.

    python bench_reorth_ceiling.py [--rounds 3] [--out results/reorth_ceiling.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from cases import make_case  # noqa: E402

import lightning_curvature as lc  # noqa: E402
from lightning_curvature.core import _basis  # noqa: E402

LOCAL = 2  # vectors kept in the recurrence when reorthogonalisation is off (the three-term recurrence's two)


@contextmanager
def without_reorthogonalisation() -> Iterator[None]:
    """Basis products restricted to the last ``LOCAL`` vectors (what the three-term recurrence needs)."""
    dots, subtract = _basis.Basis.dots, _basis.Basis.subtract

    def local_dots(self: Any, w: Any) -> torch.Tensor:
        out = torch.zeros(len(self), dtype=torch.float64)
        for j in range(max(0, len(self) - LOCAL), len(self)):
            out[j] = self.space.dot(self.vector(j), w)
        return out

    def local_subtract(self: Any, w: Any, coeffs: torch.Tensor) -> None:
        for j in range(max(0, len(self) - LOCAL), len(self)):
            c = float(coeffs[j])
            if c:
                for wi, vi in zip(w, self.vector(j)):
                    wi.add_(vi, alpha=-c)

    _basis.Basis.dots, _basis.Basis.subtract = local_dots, local_subtract  # type: ignore[method-assign]
    try:
        yield
    finally:
        _basis.Basis.dots, _basis.Basis.subtract = dots, subtract  # type: ignore[method-assign]


def products_alone(case: Any, count: int) -> float:
    """Seconds for ``count`` products through the operator (graph built once, as in a measurement)."""
    t0 = time.perf_counter()
    with lc.HessianOperator(case.model, case.loss_fn, case.batch) as H:
        v = torch.randn(H.dim, generator=torch.Generator().manual_seed(0))
        for _ in range(count):
            v = H.matvec(v)
            v = v / v.norm()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "reorth_ceiling.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = make_case("cnn")
    ref = json.loads((HERE / "results" / "reference_cnn.json").read_text())["top_eigenvalues"][:5]

    def top5() -> tuple[float, Any]:
        t0 = time.perf_counter()
        res = lc.hessian_eigenvalues(case.model, case.loss_fn, case.batch, k=5, tol=1e-3)
        return time.perf_counter() - t0, res

    top5()  # warm-up: code paths, the auto check's cache
    rows: dict[str, list[tuple[float, Any]]] = {"shipped": [], "no reorthogonalisation": []}
    alone: list[float] = []
    for _ in range(args.rounds):
        rows["shipped"].append(top5())
        with without_reorthogonalisation():
            rows["no reorthogonalisation"].append(top5())
        alone.append(products_alone(case, rows["shipped"][-1][1].num_hvp))
    out: dict[str, Any] = {"case": "cnn", "rounds": args.rounds, "rows": {}}
    print(f"{'variant':<24} {'seconds':>8} {'HVPs':>5}  eigenvalues (relative error against the float64 reference)")
    for name, runs in rows.items():
        seconds = statistics.median(t for t, _ in runs)
        res = runs[-1][1]
        values = res.eigenvalues.tolist()
        errors = [abs(v - r) / abs(r) for v, r in zip(values, ref)]
        out["rows"][name] = {"seconds": seconds, "num_hvp": res.num_hvp, "eigenvalues": values, "rel_errors": errors}
        shown = ", ".join(f"{v:.4f} ({e:.0e})" for v, e in zip(values, errors))
        print(f"{name:<24} {seconds:>8.2f} {res.num_hvp:>5}  {shown}")
    out["products_alone_seconds"] = statistics.median(alone)
    print(f"{'products alone':<24} {out['products_alone_seconds']:>8.2f} {rows['shipped'][-1][1].num_hvp:>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
