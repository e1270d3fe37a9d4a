"""Minimal repro: forward-over-reverse through ``jacrev`` (and so ``torch.func.hessian``) is
wrong for LayerNorm weights on torch 2.13 (CPU).

For ``f(a, w) = sum(sin(layer_norm(x @ a, weight=w) * t))`` the Hessian-vector product by
double backward, by ``jvp(grad(f))`` and by a central difference of the gradient agree to
~1e-10, while ``jvp(jacrev(f))`` and ``torch.func.hessian(f) @ v`` (= ``jacfwd(jacrev)``)
are off on the LayerNorm-weight block by ~10%.

Consequences seen in this benchmark:

* curvlinops 3.x builds its HVP as ``jvp(jacrev(loss))``: on the transformer case its HVP
  has 4e-3 relative error overall, 5e-2 on LayerNorm-weight blocks (``hvp_check`` in
  ``results/peers.json``);
* a dense reference built with ``torch.func.hessian`` is wrong for any model with
  LayerNorm (the ``mlp_digits`` reference has none, and is cross-checked against a
  double-backward Lanczos).

Run: ``python benchmarks/repro_jacrev_layernorm.py``
"""

import torch
from torch.func import grad, hessian, jacrev, jvp

torch.manual_seed(0)
D = torch.float64
x, t = torch.randn(4, 8, dtype=D), torch.randn(4, 8, dtype=D)
a, w = torch.randn(8, 8, dtype=D), torch.randn(8, dtype=D)
va, vw = torch.randn(8, 8, dtype=D), torch.randn(8, dtype=D)
z0, dz = torch.cat([a.flatten(), w]), torch.cat([va.flatten(), vw])


def f(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.layer_norm(x @ a, (8,), w, None) * t).sin().sum()


def flat_f(z: torch.Tensor) -> torch.Tensor:
    return f(z[:64].view(8, 8), z[64:])


def flat_grad(z: torch.Tensor) -> torch.Tensor:
    z = z.detach().requires_grad_(True)
    return torch.autograd.grad(flat_f(z), z)[0]


zz = z0.clone().requires_grad_(True)
(g,) = torch.autograd.grad(flat_f(zz), zz, create_graph=True)
double_backward = torch.autograd.grad(g, zz, dz)[0]
eps = 1e-6
candidates = {
    "central difference": (flat_grad(z0 + eps * dz) - flat_grad(z0 - eps * dz)) / (2 * eps),
    "jvp(grad)": torch.cat([h.flatten() for h in jvp(grad(f, argnums=(0, 1)), (a, w), (va, vw))[1]]),
    "jvp(jacrev)": torch.cat([h.flatten() for h in jvp(jacrev(f, argnums=(0, 1)), (a, w), (va, vw))[1]]),
    "func.hessian @ v": hessian(flat_f)(z0) @ dz,
}
print(f"torch {torch.__version__}; relative difference from double backward")
for label, hv in candidates.items():
    e_a = float((hv[:64] - double_backward[:64]).norm() / double_backward[:64].norm())
    e_w = float((hv[64:] - double_backward[64:]).norm() / double_backward[64:].norm())
    print(f"  {label:18s}: matrix block {e_a:.1e}, LayerNorm-weight block {e_w:.1e}")
