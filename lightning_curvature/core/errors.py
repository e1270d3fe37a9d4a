"""Exceptions raised by the curvature engine."""

from __future__ import annotations

__all__ = ["NonFiniteCurvatureError"]


class NonFiniteCurvatureError(FloatingPointError):
    """A loss, gradient or Hessian-vector product was NaN or infinite.

    Raised instead of returning a silent ``nan`` so that callers (callbacks, schedulers) can catch it,
    report the measurement as failed and carry on training without feeding it into a learning rate.
    """
