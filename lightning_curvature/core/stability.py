r"""Stability thresholds: the sharpness above which an optimizer's quadratic model diverges.

On a quadratic with curvature :math:`\lambda` the iteration is stable iff :math:`\lambda` is below:

==========================  =====================================================================
gradient descent            :math:`2/\eta`
heavy-ball momentum β       :math:`(2 + 2\beta)/\eta` (torch ``dampening`` d scales η by ``1 − d``)
Nesterov momentum β         :math:`(2 + 2\beta)/((1 + 2\beta)\eta)`
Adam/AdamW (β₁)             :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)` on the *preconditioned* sharpness
RMSProp (momentum β)        :math:`(2 + 2\beta)/\eta` on the preconditioned sharpness
==========================  =====================================================================

References:
    J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar, "Gradient Descent on Neural Networks Typically Occurs
    at the Edge of Stability", ICLR 2021 (arXiv 2103.00065), appendix on momentum.
    J. Cohen et al., "Adaptive Gradient Methods at the Edge of Stability", arXiv 2207.14484 (2022).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "adam_stability_threshold",
    "is_adaptive",
    "max_stable_lr",
    "rmsprop_stability_threshold",
    "sgd_stability_threshold",
    "stability_threshold",
]


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"The learning rate must be positive and finite, got {lr!r}.")
    return lr


def _check_beta(name: str, beta: float) -> float:
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {beta!r}.")
    return beta


def sgd_stability_threshold(lr: float, momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0) -> float:
    """Largest stable sharpness of SGD with learning rate ``lr``.

    Raises:
        ValueError: for a non-positive ``lr`` or ``momentum``/``dampening`` outside ``[0, 1)``.

    Example::

        >>> sgd_stability_threshold(0.1)
        20.0
        >>> round(sgd_stability_threshold(0.1, momentum=0.9), 6)
        38.0
    """
    lr = _check_lr(lr)
    beta = _check_beta("momentum", momentum)
    d = _check_beta("dampening", dampening)
    eff = lr * (1.0 - d) if beta > 0 else lr
    if nesterov and beta > 0:
        return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * eff)
    return (2.0 + 2.0 * beta) / eff


def adam_stability_threshold(lr: float, beta1: float = 0.9) -> float:
    """Largest stable *preconditioned* sharpness of Adam/AdamW: ``(2 + 2β₁)/((1 − β₁)·lr)``.

    Raises:
        ValueError: for a non-positive ``lr`` or ``beta1`` outside ``[0, 1)``.

    Example::

        >>> round(adam_stability_threshold(1e-3, 0.9), 6)
        38000.0
    """
    lr = _check_lr(lr)
    b1 = _check_beta("beta1", beta1)
    return (2.0 + 2.0 * b1) / ((1.0 - b1) * lr)


def rmsprop_stability_threshold(lr: float, momentum: float = 0.0) -> float:
    """Largest stable preconditioned sharpness of RMSProp: ``(2 + 2β)/lr``.

    Raises:
        ValueError: for a non-positive ``lr`` or ``momentum`` outside ``[0, 1)``.
    """
    return sgd_stability_threshold(lr, momentum)


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose stability is governed by the preconditioned sharpness (Adam, AdamW, RMSprop)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop))


def _group_threshold(optimizer: torch.optim.Optimizer, group: dict, lr: float) -> float:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return adam_stability_threshold(lr, group["betas"][0])
    if isinstance(optimizer, torch.optim.RMSprop):
        return rmsprop_stability_threshold(lr, group.get("momentum", 0.0))
    if isinstance(optimizer, torch.optim.SGD):
        return sgd_stability_threshold(
            lr, group.get("momentum", 0.0), bool(group.get("nesterov", False)), group.get("dampening", 0.0)
        )
    raise TypeError(
        f"No stability threshold is known for {type(optimizer).__name__}; supported: SGD (with momentum, "
        "Nesterov), Adam, AdamW, RMSprop."
    )


def stability_threshold(optimizer: torch.optim.Optimizer, group: int = 0, lr: float | None = None) -> float:
    """Stability threshold of ``optimizer``'s parameter group ``group`` at its current (or a given) lr.

    For Adam/AdamW/RMSprop it applies to the preconditioned sharpness
    (:func:`~lightning_curvature.core.eigen.preconditioned_sharpness`).

    Raises:
        TypeError: for an unsupported optimizer.
        IndexError: for a missing parameter group.
        ValueError: for a non-positive learning rate.

    Example::

        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        >>> stability_threshold(opt)
        4.0
    """
    if not 0 <= group < len(optimizer.param_groups):
        raise IndexError(f"Optimizer has {len(optimizer.param_groups)} parameter groups, got group={group}.")
    g = optimizer.param_groups[group]
    return _group_threshold(optimizer, g, float(g["lr"]) if lr is None else lr)


def max_stable_lr(optimizer: torch.optim.Optimizer, sharpness: float, group: int = 0) -> float:
    """The learning rate at which ``sharpness`` sits exactly on the stability threshold.

    Every threshold is ``c / lr`` with ``c`` depending only on momentum parameters, so the answer is
    ``c / sharpness``.

    Raises:
        ValueError: if ``sharpness`` is not positive and finite.
        TypeError: for an unsupported optimizer.

    Example::

        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        >>> max_stable_lr(opt, 40.0)
        0.05
    """
    if not (sharpness > 0 and math.isfinite(sharpness)):
        raise ValueError(f"`sharpness` must be positive and finite, got {sharpness!r}.")
    c = stability_threshold(optimizer, group, lr=1.0)
    return c / float(sharpness)
