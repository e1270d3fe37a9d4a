"""Finite-difference products on a GPT trained with AdamW: the first step against the searched step.

The byte-level GPT of ``bench_scale.py`` (pre-LayerNorm, causal SDPA attention, tied head) is trained for a few
AdamW steps (β = (0.9, 0.95), weight decay 0.1, 8 windows per step) on the standard library's sources; then, on 8
other windows, the
finite-difference product of ``HessianOperator`` is compared with double backward (float32 both; the reference
is exact up to float32 rounding) along four directions: a random one and the top eigenvector of the Hessian, and
the same for the preconditioned Hessian ``P^{-1/2} H P^{-1/2}`` (``P`` from Adam's state; error measured in that
operator's output). For each: the relative error with the step search off (``FD_TARGET = inf``, the first step
only) and on (the default), the search's error estimate (``product_error``), and the gradients per product.

Run (nothing else on the CPU)::

    OMP_NUM_THREADS=1 python benchmarks/bench_fd_accuracy.py                   # d=64, 2 layers, 25 steps (~1 min)
    OMP_NUM_THREADS=1 python benchmarks/bench_fd_accuracy.py --d 256 --layers 4  # the 3M GPT

Writes ``results/fd_accuracy.json`` (``fd_accuracy_d{d}.json`` for other sizes).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from bench_scale import GPT, gpt_loss, text_batch

import lightning_curvature.core.hvp as hvp_module
from lightning_curvature import hessian_eigenvalues
from lightning_curvature.core.hvp import HessianOperator
from lightning_curvature.core.operators import ScaledOperator
from lightning_curvature.core.preconditioner import preconditioner_parts

RESULTS = Path(__file__).resolve().parent / "results"


def _norm(v: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in v))


def _as_vector(ev: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(ev, torch.Tensor):
        parts = torch.split(ev, [p.numel() for p in params])
        return [t.reshape(p.shape) for t, p in zip(parts, params)]
    return list(ev)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = GPT(args.d, args.layers)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x, y = text_batch(8 * args.steps + 8)  # 8-window training batches, then the 8 measured windows
    for s in range(args.steps):
        opt.zero_grad()
        gpt_loss(net, (x[8 * s : 8 * s + 8], y[8 * s : 8 * s + 8])).backward()
        opt.step()
    batch = (x[-8:], y[-8:])
    P = preconditioner_parts(opt, params)
    assert P is not None
    scale = [p.rsqrt() for p in P]
    gen = torch.Generator().manual_seed(1)
    rnd = [torch.randn(p.shape, generator=gen) for p in params]
    top = {}
    for name, pre in (("hessian", None), ("preconditioned", P)):
        res = hessian_eigenvalues(
            net, gpt_loss, batch, k=1, tol=1e-6, max_iter=300, preconditioner=pre, params=params,
            method="double_backward", return_eigenvectors=True,
        )  # fmt: skip
        top[name] = _as_vector(res.eigenvectors[0], params)
    calls = {"n": 0}
    original = HessianOperator._gradient_at

    def counted(self: HessianOperator, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        return original(self, *a, **k)

    HessianOperator._gradient_at = counted  # type: ignore[method-assign]
    rows = []
    cases = [
        ("random", rnd, None),
        ("top eigenvector", top["hessian"], None),
        ("random, preconditioned", rnd, scale),
        ("top eigenvector, preconditioned", top["preconditioned"], scale),
    ]
    searched_target = hvp_module.FD_TARGET
    for name, v, d in cases:
        out: dict[str, Any] = {"direction": name}
        for label, target in (("first_step", math.inf), ("searched", searched_target)):
            products = {}
            for method in ("double_backward", "finite_difference"):
                hvp_module.FD_TARGET = target
                with HessianOperator(net, gpt_loss, batch, params=params, method=method) as H:
                    op = H if d is None else ScaledOperator(H, d)
                    calls["n"] = 0
                    products[method] = op.matvec(v)
                    if method == "finite_difference":
                        out[f"{label}_gradients"] = calls["n"]
                        out[f"{label}_estimate"] = op.product_error
            exact = products["double_backward"]
            diff = [a - b for a, b in zip(products["finite_difference"], exact)]
            out[f"{label}_error"] = _norm(diff) / _norm(exact)
        hvp_module.FD_TARGET = searched_target
        rows.append(out)
    HessianOperator._gradient_at = original  # type: ignore[method-assign]

    n_params = sum(p.numel() for p in params)
    print(f"GPT d={args.d}, {args.layers} layers ({n_params:,} parameters), {args.steps} AdamW steps; 8 windows")
    print(f"{'direction':34s} {'first step':>11s} {'searched':>9s} {'estimate':>9s} {'gradients':>10s}")
    for r in rows:
        print(
            f"{r['direction']:34s} {r['first_step_error']:11.1e} {r['searched_error']:9.1e} "
            f"{r['searched_estimate']:9.1e} {r['first_step_gradients']:>4d} -> {r['searched_gradients']:<4d}"
        )
    RESULTS.mkdir(exist_ok=True)
    name = "fd_accuracy.json" if args.d == 64 else f"fd_accuracy_d{args.d}.json"
    report = {"torch": torch.__version__, "d": args.d, "layers": args.layers, "steps": args.steps}
    (RESULTS / name).write_text(json.dumps(report | {"params": n_params, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
