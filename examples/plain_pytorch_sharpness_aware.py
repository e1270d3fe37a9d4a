"""SharpnessAwareLR in a plain PyTorch loop (no Lightning): measure the sharpness yourself and feed it.

The scheduler caps a base schedule at ``safety`` times the largest stable learning rate of the measured
sharpness (2/λ_max for plain gradient descent; the optimizer's own threshold for momentum, Nesterov, Adam).
In Lightning the ``HessianEigenvalueMonitor`` callback does the measuring and feeding; here the loop does:

1. every ``every`` steps, measure λ_max of the training loss with ``hessian_eigenvalues`` (Lanczos on
   Hessian-vector products; warm-started from the previous Ritz vectors) and call
   ``scheduler.observe_sharpness(λ, step)``: the new cap is written to the optimizer at once;
2. ``loss.backward()``, ``optimizer.step()``, ``scheduler.step()`` as usual (the scheduler also steps the
   wrapped base schedule, here a cosine decay).

Problem: full-batch gradient descent on scikit-learn's digits (MSE on one-hot targets, tanh MLP whose read-out is
initialised 10x too large, so the initial sharpness is in the hundreds) with a base lr far above 2/λ_max.

Run ``python examples/plain_pytorch_sharpness_aware.py [--fast]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _digits import load_digits_data, make_mlp, mse_loss

from lightning_curvature import SharpnessAwareLR, hessian_eigenvalues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="reduced size (a few seconds)")
    parser.add_argument("--out", default=None, help="unused (no figure); accepted for examples/make_figures.sh")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, every = (200, 10) if args.fast else (1000, 10)
    data = load_digits_data(300 if args.fast else 1797, seed=args.seed, standardise=False).train_batch()
    model = make_mlp(depth=2, width=32 if args.fast else 64, output_scale=10.0, seed=args.seed)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    base = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)  # built first, then wrapped
    scheduler = SharpnessAwareLR(optimizer, base=base, safety=0.9)

    warm_start = None
    start = time.perf_counter()
    print(f"{'step':>5} {'loss':>9} {'sharpness':>10} {'2/sharpness':>12} {'base lr':>9} {'lr':>9}")
    for step in range(steps):
        if step % every == 0:
            # 1. measure (the model, its .grad and the RNG are left untouched) and feed the scheduler
            res = hessian_eigenvalues(model, mse_loss, data, k=1, tol=1e-2, v0=warm_start, return_warm_start=True)
            warm_start = res.warm_start
            scheduler.observe_sharpness(res.sharpness, step=step)
        # 2. an ordinary training step
        optimizer.zero_grad()
        loss = mse_loss(model, data)
        loss.backward()
        if step % (steps // 10) == 0 or step == steps - 1:
            lam = scheduler.sharpness or float("nan")
            print(
                f"{step:5d} {loss.item():9.4f} {lam:10.2f} {2 / lam:12.5f} "
                f"{scheduler.base_values[0]:9.5f} {optimizer.param_groups[0]['lr']:9.5f}"
            )
        optimizer.step()
        scheduler.step()
    print(
        f"plain_pytorch_sharpness_aware: {steps} full-batch GD steps, base cosine schedule from 0.05 capped at "
        f"0.9·2/λ_max (λ_max measured every {every} steps); final loss {mse_loss(model, data).item():.4f} "
        f"({time.perf_counter() - start:.1f} s)."
    )


if __name__ == "__main__":
    main()
