"""How often the solver's error bounds, and its residual radii, miss the real error: random dense problems.

``lanczos`` reports two numbers per eigenvalue: the residual ``r = ‖Av − θv‖`` (a rigorous radius: some eigenvalue
lies within ``r`` of ``θ``, up to rounding) and the error bound ``min(r, r²/δ)`` (Kato–Temple with a gap ``δ``
*estimated* from the other Ritz values, see ``lightning_curvature/core/_ritz.py``). The estimate fails where the
eigenvalue next to a wanted one is not yet represented in the Krylov space: a cluster narrower than the space
resolves, or a dense end of the spectrum. This counts, for each converged value, whether the bound is below the
distance to the true k-th eigenvalue, whether it is below the distance to *any* eigenvalue, and whether the residual
is, against ``torch.linalg.eigvalsh`` of the float64 matrix.

Problems: symmetric ``Q diag(λ) Qᵀ`` with a seeded orthogonal ``Q``; spectra ``outliers`` (10, 7, 5, 4, 3.5 over a
uniform [0, 1] bulk), ``cluster`` (5, 4.999, 4.998, 4 over uniform [0, 3]), ``heavy`` (10·U⁶), ``indef`` (N(0, 9)),
``network`` (10 values from 8 to 3 over |N(0, 0.09)|); n = 60 and 150; k = 1, 3, 5; 4 seeds; float64 and float32;
``max_vectors`` None and 12; both ends. Each block size runs the same 960 problems.

    OMP_NUM_THREADS=1 python benchmarks/bench_bounds.py                  # results/bounds.json (about 2 minutes)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lightning_curvature as lc  # noqa: E402

RESULTS = HERE / "results"
SPECTRA = ("outliers", "cluster", "heavy", "indef", "network")
COUNTS = ("bound below the error", "bound below the distance to any", "residual below the distance to any")
LABELS = ("bound<error", "bound<any", "residual<any")


def spectrum(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    def bulk(m: int) -> torch.Tensor:
        return torch.rand(m, generator=gen, dtype=torch.float64)

    if kind == "outliers":
        return torch.cat([torch.tensor([10.0, 7.0, 5.0, 4.0, 3.5], dtype=torch.float64), bulk(n - 5)])
    if kind == "cluster":
        return torch.cat([torch.tensor([5.0, 4.999, 4.998, 4.0], dtype=torch.float64), 3.0 * bulk(n - 4)])
    if kind == "heavy":
        return 10.0 * bulk(n) ** 6
    if kind == "indef":
        return 3.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    top = torch.linspace(8.0, 3.0, 10, dtype=torch.float64)
    return torch.cat([top, 0.3 * torch.randn(n - 10, generator=gen, dtype=torch.float64).abs()])


def problem(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lam = spectrum(kind, n, gen)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


def sweep(tol: float, block_size: int) -> dict[str, dict[str, int]]:
    """Counts per ``"<spectrum> <end>"`` (and ``"all"``) for one block size."""
    by: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    grid = itertools.product(SPECTRA, (60, 150), (1, 3, 5), range(4), (None, 12), (torch.float64, torch.float32))
    for (kind, n, k, seed, max_vectors, dtype), which in itertools.product(grid, ("largest", "smallest")):
        if max_vectors is not None and max_vectors < k + 1 + 3 * block_size:
            continue
        A = problem(kind, n, seed)
        ev = torch.linalg.eigvalsh(A)
        wanted = ev.flip(0)[:k] if which == "largest" else ev[:k]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = lc.lanczos(
                A.to(dtype), k=k, tol=tol, max_iter=n, seed=seed, which=which, max_vectors=max_vectors,
                block_size=block_size,
            )  # fmt: skip
        counts = by[f"{kind} {which}"]
        counts["runs"] += 1
        counts["products"] += res.num_hvp
        if not res.converged:
            counts["unconverged"] += 1
            continue
        # rounding of the products themselves: a few ulps of the spectrum's scale in the matrix's dtype
        slack = 64 * torch.finfo(dtype).eps * float(ev.abs().max())
        for theta, bound, resid, true in zip(
            res.eigenvalues.tolist(), res.error_bounds.tolist(), res.residuals.tolist(), wanted.tolist()
        ):
            nearest = float((ev - theta).abs().min())
            counts["values"] += 1
            counts[COUNTS[0]] += abs(theta - true) > bound + slack
            counts[COUNTS[1]] += nearest > bound + slack
            counts[COUNTS[2]] += nearest > resid + slack
    total: collections.Counter[str] = collections.Counter()
    for counts in by.values():
        total.update(counts)
    return {**{key: dict(c) for key, c in sorted(by.items())}, "all": dict(total)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "bounds.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"tol": args.tol, "torch": torch.__version__, "block_sizes": {}}
    print(
        f"tol={args.tol}: converged values whose bound is below the error to the true k-th eigenvalue (bound<error) "
        "or the distance to any eigenvalue (bound<any), and whose residual radius is (residual<any)"
    )
    header = f"{'block':>5} {'spectrum, end':<18}{'runs':>5}{'unconv.':>8}{'products':>9}{'values':>7}"
    print(header + "".join(f"{c:>14}" for c in LABELS))
    for b in args.blocks:
        result = sweep(args.tol, b)
        out["block_sizes"][str(b)] = result
        for key, c in result.items():
            print(
                f"{b:>5} {key:<18}{c.get('runs', 0):>5}{c.get('unconverged', 0):>8}{c.get('products', 0):>9}"
                f"{c.get('values', 0):>7}" + "".join(f"{c.get(name, 0):>14}" for name in COUNTS)
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
