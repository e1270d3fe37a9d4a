r"""Preconditioners of adaptive optimizers, read from their state.

Adam/AdamW update :math:`\theta \leftarrow \theta - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)` with
:math:`\hat m_t = m_t/(1-\beta_1^t)`, :math:`\hat v_t = v_t/(1-\beta_2^t)`. Written as a preconditioned
heavy-ball method on the *unnormalised* momentum, the preconditioner is

.. math:: P_t = (1 - \beta_1^{t})\,\mathrm{diag}(\sqrt{\hat v_t} + \epsilon),

which is how Cohen et al. (2022, arXiv 2207.14484, §2 eq. for "preconditioned sharpness") define it, with
:math:`t` the number of steps taken so far (the bias-correction factor of the *next* step is
:math:`1-\beta_1^{t+1}`; ``momentum_bias_step="next"`` selects that one). The stability threshold of the
preconditioned sharpness :math:`\lambda_{\max}(P^{-1}H) = \lambda_{\max}(P^{-1/2} H P^{-1/2})` is then
:math:`(2+2\beta_1)/((1-\beta_1)\eta)`. RMSprop: :math:`P = \mathrm{diag}(\sqrt{v_t} + \epsilon)` (no bias
correction in torch); ``centered=True`` divides by the centred second moment, :math:`P = \mathrm{diag}(\sqrt{v_t -
\bar g_t^2} + \epsilon)` with :math:`\bar g_t` its running mean gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["adaptive_preconditioner", "preconditioner_parts", "predicted_first_step_preconditioner"]


def adaptive_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    *,
    momentum_bias_step: Literal["current", "next", "none"] = "current",
) -> Tensor | None:
    """Diagonal of ``P`` as one flat vector over ``params`` (see :func:`preconditioner_parts`), or ``None``.

    Raises:
        TypeError: for a non-adaptive optimizer.
        ValueError: for a parameter the optimizer does not manage, or a bad ``momentum_bias_step``.
    """
    parts = preconditioner_parts(optimizer, params, momentum_bias_step=momentum_bias_step)
    return None if parts is None else torch.cat([t.reshape(-1) for t in parts])


def preconditioner_parts(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    *,
    momentum_bias_step: Literal["current", "next", "none"] = "current",
) -> list[Tensor] | None:
    """Diagonal of ``P`` shaped like each of ``params`` (in their order), or ``None`` without state yet.

    Args:
        optimizer: an ``Adam``, ``AdamW`` or ``RMSprop`` instance that has taken at least one step.
        params: the parameters curvature is measured over, all managed by ``optimizer``.
        momentum_bias_step: include ``1 − β₁^t`` (``"current"``), ``1 − β₁^{t+1}`` (``"next"``), or no
            momentum bias factor (``"none"``) for Adam/AdamW.

    Returns:
        float32/float64 tensors of positive entries shaped like the parameters (local shards for sharded ones),
        or ``None`` if the optimizer has no state for the parameters yet (before its first step).

    Raises:
        TypeError: for a non-adaptive optimizer.
        ValueError: for a parameter the optimizer does not manage, or a bad ``momentum_bias_step``.
    """
    if momentum_bias_step not in ("current", "next", "none"):
        raise ValueError(f"`momentum_bias_step` must be 'current', 'next' or 'none', got {momentum_bias_step!r}.")
    is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    if not (is_adam or isinstance(optimizer, torch.optim.RMSprop)):
        raise TypeError(f"Expected Adam, AdamW or RMSprop, got {type(optimizer).__name__}.")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts: list[Tensor] = []
    for p in params:
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"A parameter of shape {tuple(p.shape)} is not managed by the optimizer.")
        state = optimizer.state.get(p, {})
        eps = float(group["eps"])
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        if is_adam:
            if "exp_avg_sq" not in state:
                return None
            beta1, beta2 = group["betas"]
            t = float(state["step"])
            v = state["exp_avg_sq"].to(dtype)
            if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
                v = state["max_exp_avg_sq"].to(dtype)
            denom = (_local(v) / (1.0 - beta2**t)).sqrt() + eps
            factor = {"current": 1.0 - beta1**t, "next": 1.0 - beta1 ** (t + 1), "none": 1.0}[momentum_bias_step]
            parts.append(denom * factor)
        else:
            if "square_avg" not in state:
                return None
            v = _local(state["square_avg"].to(dtype))
            if group.get("centered", False) and "grad_avg" in state:
                mean = _local(state["grad_avg"].to(dtype))
                v = v.addcmul(mean, mean, value=-1.0)  # torch's centred second moment, v − ḡ²
            parts.append(v.sqrt() + eps)
    return parts


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 optimizer state), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def predicted_first_step_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], gradient: Sequence[Tensor]
) -> list[Tensor] | None:
    r"""The preconditioner an adaptive optimizer will use at its first step, from the gradient it will see.

    Adam/AdamW start from zero moments, so after one step :math:`\hat v_1 = g^2` and
    :math:`P_1 = (1-\beta_1)\,\mathrm{diag}(|g| + \epsilon)`; RMSprop has :math:`v_1 = (1-\alpha) g^2` and
    :math:`P_1 = \mathrm{diag}(\sqrt{1-\alpha}\,|g| + \epsilon)` (centred: :math:`v_1 - \bar g_1^2 = \alpha(1-\alpha)
    g^2`, :math:`P_1 = \mathrm{diag}(\sqrt{\alpha(1-\alpha)}\,|g| + \epsilon)`). With the gradient of a curvature
    batch in place of the first training batch's this predicts the sharpness the first update meets, when there is
    no optimizer state to read yet (Cohen et al. 2022's preconditioned sharpness at :math:`t = 1`).

    Returns:
        Tensors shaped like ``params``, or ``None`` for a non-adaptive optimizer.

    Raises:
        ValueError: for a parameter the optimizer does not manage.
    """
    is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    if not (is_adam or isinstance(optimizer, torch.optim.RMSprop)):
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p, g in zip(params, gradient):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"A parameter of shape {tuple(p.shape)} is not managed by the optimizer.")
        eps = float(group["eps"])
        if is_adam:
            beta1 = float(group["betas"][0])
            parts.append((1.0 - beta1) * (g.abs() + eps))
        else:
            alpha = float(group["alpha"])
            share = alpha * (1.0 - alpha) if group.get("centered", False) else 1.0 - alpha
            parts.append(share**0.5 * g.abs() + eps)
    return parts
