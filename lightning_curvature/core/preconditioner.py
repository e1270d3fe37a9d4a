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
correction in torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["adaptive_preconditioner"]


def adaptive_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    *,
    momentum_bias_step: Literal["current", "next", "none"] = "current",
) -> Tensor | None:
    """Diagonal of ``P`` as one flat vector over ``params`` (in their order), or ``None`` without state yet.

    Args:
        optimizer: an ``Adam``, ``AdamW`` or ``RMSprop`` instance that has taken at least one step.
        params: the parameters curvature is measured over, all managed by ``optimizer``.
        momentum_bias_step: include ``1 − β₁^t`` (``"current"``), ``1 − β₁^{t+1}`` (``"next"``), or no
            momentum bias factor (``"none"``) for Adam/AdamW.

    Returns:
        float32/float64 flat tensor of positive entries on the parameters' device, or ``None`` if the optimizer
        has no state for the parameters yet (before its first step).

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
            denom = (v / (1.0 - beta2**t)).sqrt() + eps
            factor = {"current": 1.0 - beta1**t, "next": 1.0 - beta1 ** (t + 1), "none": 1.0}[momentum_bias_step]
            parts.append((denom * factor).reshape(-1))
        else:
            if "square_avg" not in state:
                return None
            parts.append((state["square_avg"].to(dtype).sqrt() + eps).reshape(-1))
    return torch.cat(parts)
