"""Do the finite-difference error estimates cover the error? A sweep over closed-form Hessians.

The loss ``mean(cos(ω θ))/ω²`` on ``n = 200`` parameters has Hessian ``diag(-cos(ω θ_i))/n`` and fourth
derivatives ``ω²`` times larger: as ``ω`` grows the step must shrink, until float32 rounding (of the parameters
and, inside the loss, of ``ω θ``) and aliasing (a step near a period of the loss) take over. For every ``ω`` from
20 to 1e5, random and coordinate directions and three draws of ``θ``, one float32 product of
``HessianOperator(method="finite_difference")`` is compared with the exact ``Hv``: a *finite* reported error
(``product_error`` below ``RELIABLE_PRODUCT_ERROR``, where bounds are reported at all) must be at least the error.

    OMP_NUM_THREADS=1 python benchmarks/bench_fd_closed_form.py     # ~1 min; results/fd_closed_form.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_curvature.core.hvp import HessianOperator
from lightning_curvature.core.operators import RELIABLE_PRODUCT_ERROR

RESULTS = Path(__file__).resolve().parent / "results"
N = 200


class Wavy(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.rand(N, generator=g) + 0.5)


def wavy_loss(omega: float) -> Any:
    def loss(model: Wavy, batch: torch.Tensor) -> torch.Tensor:
        return torch.cos(omega * model.theta).mean() / omega**2 + 0.0 * batch.sum()

    return loss


def directions() -> list[tuple[str, torch.Tensor]]:
    eye = torch.eye(N)
    out = [(f"random {s}", torch.randn(N, generator=torch.Generator().manual_seed(s))) for s in range(4)]
    out += [(f"random {10 + s}", torch.randn(N, generator=torch.Generator().manual_seed(10 + s))) for s in range(2)]
    out += [("e0 x3", eye[0] * 3.0), ("e1 x2", eye[1] * 2.0), ("e5 x6", eye[5] * 6.0)]
    out += [("sum e0..e9", eye[:10].sum(0)), ("sum e0..e2", eye[:3].sum(0))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "fd_closed_form.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in range(3):
        model, batch = Wavy(seed), torch.zeros(4, 1)
        theta = model.theta.detach().double()
        for omega in (20.0, 30.0, 50.0, 100.0, 150.0, 200.0, 300.0, 500.0, 700.0, 1e3, 2e3, 3e3, 5e3, 1e4, 3e4, 1e5):
            for name, v in directions():
                with HessianOperator(model, wavy_loss(omega), batch, method="finite_difference") as H:
                    hv = H.matvec(v)
                    reported, grads = H.product_error, H.num_grad
                exact = -torch.cos(omega * theta) * v.double() / N
                error = float((hv.double() - exact).norm() / exact.norm())
                rows.append(
                    {"seed": seed, "omega": omega, "direction": name, "error": error, "reported": reported,
                     "gradients": grads}
                )  # fmt: skip
    finite = [r for r in rows if r["reported"] <= RELIABLE_PRODUCT_ERROR]
    uncovered = [r for r in finite if r["reported"] < r["error"]]
    worst = max((r["error"] / r["reported"] for r in finite if r["reported"] > 0), default=0.0)
    grads = sorted(r["gradients"] for r in rows)
    summary = {
        "cases": len(rows),
        "finite": len(finite),
        "finite_below_the_error": len(uncovered),
        "worst_error_over_reported": worst,
        "gradients_median": grads[len(grads) // 2],
        "gradients_max": grads[-1],
    }
    print(json.dumps(summary, indent=1))
    for r in uncovered:
        print("NOT COVERED", r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
