"""Exceptions raised by the curvature engine."""

from __future__ import annotations

__all__ = ["InaccurateProductsError", "InaccurateProductsWarning", "NonFiniteCurvatureError"]


class NonFiniteCurvatureError(FloatingPointError):
    """A loss, gradient or Hessian-vector product was NaN or infinite.

    Raised instead of returning a silent ``nan`` so that callers (callbacks, schedulers) can catch it,
    report the measurement as failed and carry on training without feeding it into a learning rate.
    """


class InaccurateProductsError(ArithmeticError):
    """Hessian-vector products are too inaccurate for the measurement asked of them.

    Raised by the monitors when the finite-difference products' own error estimate
    (:attr:`~lightning_curvature.core.hvp.HessianOperator.product_error`) is too large to report a value; the
    measurement is logged as failed and nothing is fed to a scheduler.
    """


class InaccurateProductsWarning(RuntimeWarning):
    """Finite-difference products whose error estimate is past the point where it can be trusted: the solvers return
    values without a bound (``inf``). The monitors turn the same condition into :class:`InaccurateProductsError`."""
