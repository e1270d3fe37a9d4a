"""CurvatureDynamicsAwareLR (CDAT, Roulet et al. 2024, arXiv 2407.06183) in a plain PyTorch loop.

CDAT sets the learning rate of every step from the curvature along the base optimizer's own update direction
``u`` (the step it would take with learning rate 1):

    n = max(-gᵀu, 0),   d = |uᵀHu|,   lr = σ · n̄ / (d̄ + ε)   (n̄, d̄ moving averages)

σ = 1 is the quadratically greedy step, σ = 2 the step "on the edge". In Lightning the
``DirectionalCurvatureMonitor`` callback does the measuring; here the loop does, between ``backward`` and
``optimizer.step``:

1. ``update_direction(optimizer)``: u from the optimizer's state and the current gradients (state untouched);
2. one Hessian-vector product Hu on the step's batch (Pearlmutter's double backward, ``hvp`` below);
3. ``directional_terms(g, u, Hu)`` gives (n, d); ``scheduler.observe_direction(n, d, step)`` sets the lr of
   *this* step;
4. ``optimizer.step()``, then ``scheduler.step()`` (which only advances its counter).

Problem: full-batch gradient descent with momentum 0.9 on scikit-learn's digits (MSE on one-hot targets, tanh
MLP). Full batch, so ``ema_beta=0`` (the raw rule; keep the default 0.9 with mini-batches).

Run ``python examples/plain_pytorch_cdat.py [--fast]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from _digits import load_digits_data, make_mlp, mse_loss
from torch import Tensor, nn

from lightning_curvature import CurvatureDynamicsAwareLR, directional_terms, update_direction


def hvp(model: nn.Module, batch: tuple[Tensor, ...], params: Sequence[Tensor], v: Tensor) -> Tensor:
    """Hv = ∇(∇L · v): a gradient built with ``create_graph=True``, differentiated along ``v``."""
    grads = torch.autograd.grad(mse_loss(model, batch), params, create_graph=True)  # type: ignore[arg-type]
    flat = torch.cat([g.reshape(-1) for g in grads])
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, params)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="reduced size (a few seconds)")
    parser.add_argument("--out", default=None, help="unused (no figure); accepted for examples/make_figures.sh")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sigma", type=float, default=2.0, help="1: greedy, 2: on the edge (default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = 200 if args.fast else 1000
    data = load_digits_data(300 if args.fast else 1797, seed=args.seed, standardise=False).train_batch()
    model = make_mlp(depth=2, width=32 if args.fast else 64, seed=args.seed)
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)  # the lr only fixes relative group scales
    scheduler = CurvatureDynamicsAwareLR(optimizer, sigma=args.sigma, ema_beta=0.0)

    start = time.perf_counter()
    print(f"{'step':>5} {'loss':>9} {'n = -gᵀu':>10} {'d = |uᵀHu|':>11} {'edge lr':>9} {'lr':>9}")
    for step in range(steps):
        optimizer.zero_grad()
        loss = mse_loss(model, data)
        loss.backward()

        # 1-3: measure along the update direction and set this step's learning rate
        u = torch.cat(
            [t.reshape(-1) for t in update_direction(optimizer, params, group_scales=scheduler.group_scales())]
        )
        g = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        n, d = directional_terms(g, u, hvp(model, data, params, u))
        scheduler.observe_direction(numerator=n, denominator=d, step=step)

        if step % (steps // 10) == 0 or step == steps - 1:
            edge = scheduler.edge_lr() or float("nan")
            print(
                f"{step:5d} {loss.item():9.4f} {n:10.3e} {d:11.3e} {edge:9.4f} {optimizer.param_groups[0]['lr']:9.4f}"
            )
        # 4: the update, then the scheduler's counter
        optimizer.step()
        scheduler.step()
    print(
        f"plain_pytorch_cdat: {steps} full-batch heavy-ball steps tuned by CDAT (sigma={args.sigma:g}); final loss "
        f"{mse_loss(model, data).item():.4f} ({time.perf_counter() - start:.1f} s)."
    )


if __name__ == "__main__":
    main()
