r"""The update direction of a base optimizer at unit learning rate, read from its state without changing it.

Every supported optimizer moves its parameters by a step that is *linear* in the learning rate once the
gradients and the state are fixed:

.. math:: \theta_{t+1} = \theta_t + \eta_t\, u_t,

so :math:`u_t` (the *update direction*) is what ``optimizer.step()`` would add to the parameters with
``lr = 1``. Curvature-aware tuners such as CDAT (Roulet et al. 2024, arXiv 2407.06183) choose
:math:`\eta_t` from the quadratic model of the loss along :math:`u_t`:

.. math::

    L(\theta_t + \eta u_t) \approx L(\theta_t) + \eta\, g_t^\top u_t + \tfrac{\eta^2}{2}\, u_t^\top H_t u_t .

:func:`update_direction` mirrors torch's single-tensor implementations (torch 2.x):

==========  ===========================================================================================
SGD         ``d = g + wd·θ``; momentum buffer ``b = d`` at the first step, else ``b = μ b + (1 − τ) d``
            (τ = dampening); ``u = −(d + μ b)`` with Nesterov, ``u = −b`` without; ``u = −d`` for μ = 0
Adam        ``g ← g + wd·θ`` (coupled decay); ``m = β₁m + (1−β₁)g``, ``v = β₂v + (1−β₂)g²``, step ``t+1``;
            ``u = −(m/(1−β₁^{t+1})) / (√(v̂) + ε)`` with ``v̂ = v/(1−β₂^{t+1})`` (AMSGrad: running max of v)
AdamW       as Adam without the coupled term, plus the decoupled decay ``−wd·θ`` (torch multiplies it by lr)
RMSprop     ``s = αs + (1−α)g²`` (centred: minus the squared running mean), ``a = √s + ε``;
            ``u = −(μ b + g/a)`` with momentum μ, ``u = −g/a`` without
==========  ===========================================================================================

``maximize=True`` flips the gradient as torch does. Nothing in ``optimizer.state`` is written: the moments are
recomputed out of place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_curvature.core.vectors import flat_pieces

__all__ = ["directional_terms", "supports_update_direction", "update_direction", "weight_decay_terms"]

_SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


def supports_update_direction(optimizer: torch.optim.Optimizer) -> bool:
    """True if :func:`update_direction` knows ``optimizer``'s update rule (SGD, Adam, AdamW, RMSprop)."""
    return isinstance(optimizer, _SUPPORTED)


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, tuple[int, dict]]:
    return {id(p): (i, g) for i, g in enumerate(optimizer.param_groups) for p in g["params"]}


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    if not supports_update_direction(optimizer):
        raise TypeError(
            f"No update direction is known for {type(optimizer).__name__}; supported: SGD (momentum, dampening, "
            "Nesterov, weight decay), Adam, AdamW (AMSGrad), RMSprop (centred, momentum)."
        )


def _managed_params(optimizer: torch.optim.Optimizer, params: Sequence[Tensor] | None) -> list[Tensor]:
    if params is None:
        return [p for g in optimizer.param_groups for p in g["params"]]
    group_of = _group_of(optimizer)
    for p in params:
        if id(p) not in group_of:
            raise ValueError(f"A parameter of shape {tuple(p.shape)} is not managed by the optimizer.")
    return list(params)


def _sgd_direction(p: Tensor, g: Tensor, group: dict, state: dict) -> Tensor:
    wd = _scalar(group.get("weight_decay", 0.0))
    if wd != 0:
        g = g + wd * p
    mu = _scalar(group.get("momentum", 0.0))
    if mu != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            b = g.clone()
        else:
            buf = buf.to_dense() if buf.is_sparse else buf  # SGD keeps a sparse buffer for sparse gradients
            b = mu * buf.to(g.dtype) + (1.0 - _scalar(group.get("dampening", 0.0))) * g
        g = g + mu * b if group.get("nesterov", False) else b
    return -g


def _adam_direction(p: Tensor, g: Tensor, group: dict, state: dict, decoupled: bool) -> Tensor:
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    eps = _scalar(group["eps"])
    wd = _scalar(group.get("weight_decay", 0.0))
    if wd != 0 and not decoupled:
        g = g + wd * p
    step = _scalar(state["step"]) if "step" in state else 0.0
    m = state.get("exp_avg")
    v = state.get("exp_avg_sq")
    m_new = (1.0 - beta1) * g if m is None else beta1 * m.to(g.dtype) + (1.0 - beta1) * g
    v_new = (1.0 - beta2) * g * g if v is None else beta2 * v.to(g.dtype) + (1.0 - beta2) * g * g
    t = step + 1.0
    if group.get("amsgrad", False):
        vmax = state.get("max_exp_avg_sq")
        if vmax is not None:
            v_new = torch.maximum(vmax.to(g.dtype), v_new)
    denom = (v_new.sqrt() / (1.0 - beta2**t) ** 0.5) + eps
    u = -(m_new / (1.0 - beta1**t)) / denom
    if wd != 0 and decoupled:
        u = u - wd * p
    return u


def _rmsprop_direction(p: Tensor, g: Tensor, group: dict, state: dict) -> Tensor:
    alpha = _scalar(group["alpha"])
    eps = _scalar(group["eps"])
    wd = _scalar(group.get("weight_decay", 0.0))
    if wd != 0:
        g = g + wd * p
    sq = state.get("square_avg")
    sq_new = (1.0 - alpha) * g * g if sq is None else alpha * sq.to(g.dtype) + (1.0 - alpha) * g * g
    if group.get("centered", False):
        ga = state.get("grad_avg")
        ga_new = (1.0 - alpha) * g if ga is None else alpha * ga.to(g.dtype) + (1.0 - alpha) * g
        avg = (sq_new - ga_new * ga_new).sqrt() + eps
    else:
        avg = sq_new.sqrt() + eps
    mu = _scalar(group.get("momentum", 0.0))
    if mu > 0:
        buf = state.get("momentum_buffer")
        b = g / avg if buf is None else mu * buf.to(g.dtype) + g / avg
        return -b
    return -(g / avg)


def update_direction(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor] | None = None,
    grads: Sequence[Tensor | None] | None = None,
    *,
    group_scales: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
) -> list[Tensor]:
    r"""The step :math:`u` that ``optimizer.step()`` would add to each parameter with learning rate 1.

    Computed from the optimizer's state and the current gradients, out of place: ``optimizer.state``,
    the parameters and their ``.grad`` are left untouched. A parameter without a gradient gets a zero
    direction (torch skips it).

    Args:
        optimizer: an ``SGD``, ``Adam``, ``AdamW`` or ``RMSprop`` instance.
        params: parameters to return directions for, all managed by ``optimizer`` (default: every parameter of
            every group, in group order).
        grads: gradients aligned with ``params`` (default: each parameter's ``.grad``).
        group_scales: multiply the direction of parameter group ``i`` by ``group_scales[i]`` (a scheduler that
            sets ``lr_i = η · group_scales[i]`` moves the parameters by ``η`` times the scaled direction).
        dtype: compute dtype (default: each parameter's own dtype; pass ``torch.float64`` for reference checks).

    Returns:
        One tensor per parameter, shaped like it.

    Raises:
        TypeError: for an unsupported optimizer.
        ValueError: for a parameter the optimizer does not manage, or ``grads``/``group_scales`` of the wrong
            length.

    Example::

        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.tensor([0.5, 0.5])
        >>> update_direction(opt)[0]  # first step: the momentum buffer is the gradient
        tensor([-0.5000, -0.5000])
        >>> opt.state[w]  # untouched
        {}
    """
    _check_optimizer(optimizer)
    plist = _managed_params(optimizer, params)
    if grads is None:
        glist: list[Tensor | None] = [p.grad for p in plist]
    else:
        glist = list(grads)
        if len(glist) != len(plist):
            raise ValueError(f"Expected {len(plist)} gradients, got {len(glist)}.")
    if group_scales is not None and len(group_scales) != len(optimizer.param_groups):
        raise ValueError(
            f"`group_scales` needs one entry per parameter group ({len(optimizer.param_groups)}), "
            f"got {len(group_scales)}."
        )
    group_of = _group_of(optimizer)
    out: list[Tensor] = []
    with torch.no_grad():
        for p, grad in zip(plist, glist):
            i, group = group_of[id(p)]
            cdtype = dtype or p.dtype
            if grad is None:
                out.append(torch.zeros_like(p, dtype=cdtype))
                continue
            g = (grad.to_dense() if grad.is_sparse else grad).detach().to(cdtype)  # nn.Embedding(sparse=True)
            if group.get("maximize", False):
                g = -g
            pd = p.detach().to(cdtype)
            state = optimizer.state.get(p, {})
            if isinstance(optimizer, torch.optim.SGD):
                u = _sgd_direction(pd, g, group, state)
            elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
                u = _adam_direction(pd, g, group, state, decoupled)
            else:
                u = _rmsprop_direction(pd, g, group, state)
            if group_scales is not None:
                u = u * float(group_scales[i])
            out.append(u)
    return out


def weight_decay_terms(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[float]:
    """Each parameter's weight-decay coefficient (0 for none), coupled or decoupled alike.

    With decay coefficient ``wd`` the optimizer minimises ``L(θ) + (wd/2)‖θ‖²``: its gradient gains ``wd·θ`` and
    its Hessian ``wd·I``. :func:`directional_terms` uses these so that the quadratic model is the one of the
    objective actually minimised.

    Raises:
        ValueError: for a parameter the optimizer does not manage.
    """
    group_of = _group_of(optimizer)
    out = []
    for p in params:
        if id(p) not in group_of:
            raise ValueError(f"A parameter of shape {tuple(p.shape)} is not managed by the optimizer.")
        out.append(_scalar(group_of[id(p)][1].get("weight_decay", 0.0)))
    return out


def _flat(x: Tensor | Sequence[Tensor] | None) -> Tensor | None:
    """A tensor as it is (its shape is checked by the caller), a parameter-shaped list concatenated."""
    if x is None or isinstance(x, Tensor):
        return x
    return torch.cat(flat_pieces(x))


def directional_terms(
    gradient: Tensor | Sequence[Tensor],
    direction: Tensor | Sequence[Tensor],
    hessian_direction: Tensor | Sequence[Tensor],
    *,
    params: Tensor | Sequence[Tensor] | None = None,
    weight_decay: Tensor | Sequence[Tensor] | None = None,
    maximize: Tensor | Sequence[Tensor] | None = None,
) -> tuple[float, float]:
    r"""CDAT's numerator and (un-regularised) denominator along a direction ``u``.

    .. math::

        n = \max(-\tilde g^\top u, 0), \qquad d = |u^\top \tilde H u|,

    where :math:`\tilde g = s\,(g + \omega\odot\theta)` and :math:`u^\top\tilde H u = s\,u^\top H u +
    \sum_i \omega_i u_i^2` for the per-entry weight decay :math:`\omega` and sign :math:`s = -1` on entries whose
    group maximises. The ``ε`` of CDAT is added by the scheduler, not here.

    Every vector may be flat or a list of tensors shaped like the parameters (as :func:`update_direction` and
    ``HessianOperator.matvec`` return them; lists are concatenated).

    Args:
        gradient: loss gradient :math:`g`.
        direction: update direction :math:`u` (see :func:`update_direction`).
        hessian_direction: :math:`Hu` of the loss.
        params: parameters :math:`\theta` (needed with ``weight_decay``).
        weight_decay: per-entry decay coefficients :math:`\omega`, or ``None``.
        maximize: boolean mask of entries whose group has ``maximize=True``, or ``None``.

    Returns:
        ``(n, d)`` as Python floats (``nan`` when an input is not finite).

    Raises:
        ValueError: if the sizes differ, or ``weight_decay`` is given without ``params``.
        TypeError: for an input that is neither a tensor nor a list of tensors.

    Example::

        >>> g = torch.tensor([1.0, 2.0]); u = -g; hu = torch.tensor([2.0, 8.0]) * u  # H = diag(2, 8)
        >>> directional_terms(g, u, hu)
        (5.0, 34.0)
    """
    g0, u0, hu0 = _flat(gradient), _flat(direction), _flat(hessian_direction)
    theta, decay, mask = _flat(params), _flat(weight_decay), _flat(maximize)
    assert g0 is not None and u0 is not None and hu0 is not None
    if not (g0.shape == u0.shape == hu0.shape) or g0.dim() != 1:
        raise ValueError(
            "gradient, direction and hessian_direction must be flat vectors (or parameter-shaped lists) of one "
            f"size, got {tuple(g0.shape)}, {tuple(u0.shape)}, {tuple(hu0.shape)}."
        )
    dtype = torch.promote_types(u0.dtype, hu0.dtype)
    g = g0.to(dtype)
    u = u0.to(dtype)
    hu = hu0.to(dtype)
    if mask is not None and bool(mask.any()):
        sign = 1.0 - 2.0 * mask.to(dtype)
        g = g * sign
        hu = hu * sign
    if decay is not None:
        if theta is None:
            raise ValueError("`params` is needed to add the weight-decay terms.")
        wd = decay.to(dtype)
        g = g + wd * theta.to(dtype)
        hu = hu + wd * u
    n = -torch.dot(g, u)
    d = torch.dot(u, hu)
    n_f, d_f = float(n.item()), float(d.item())
    if not (torch.isfinite(n) and torch.isfinite(d)):
        return float("nan"), float("nan")
    return max(n_f, 0.0), abs(d_f)
