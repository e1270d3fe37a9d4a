"""The channel between curvature monitors and the schedulers they feed: what a scheduler subscribes to.

A monitor publishes a measurement *per optimizer*; a scheduler subscribes by implementing one of these protocols,
and receives the measurement of the parameters of its own ``optimizer`` only. In Lightning the monitors find the
subscribers among ``trainer.lr_scheduler_configs`` (:mod:`lightning_curvature.callbacks._subscriptions`); in a plain
loop, call the methods yourself. Your own scheduler can subscribe too: implement the methods, nothing to inherit.

* :class:`SharpnessSubscriber`: fed the top (preconditioned, for adaptive optimizers) Hessian eigenvalue by
  :class:`~lightning_curvature.callbacks.HessianEigenvalueMonitor` after every finite measurement. It should change
  learning rates only in ``step()``, so that what ``LearningRateMonitor`` logs does not depend on callback order
  (:class:`~lightning_curvature.schedules.SharpnessAwareLR` does). It may ask for a measurement
  (:class:`MeasurementRequester`).
* :class:`DirectionSubscriber`: fed the terms :math:`n_t = \\max(-g^\\top u, 0)` and :math:`d_t = |u^\\top H u|` of the
  update about to be taken by :class:`~lightning_curvature.callbacks.DirectionalCurvatureMonitor`, in
  ``on_before_optimizer_step``. CDAT's rule sets the lr of that very update from them
  (:class:`~lightning_curvature.schedules.CurvatureDynamicsAwareLR` writes it in ``observe_direction``, after
  Lightning's ``LearningRateMonitor`` has read the lrs of the step): the one exception to "lrs change in ``step()``",
  inherent to a rule that needs the current update direction.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["DirectionSubscriber", "MeasurementRequester", "SharpnessSubscriber"]


@runtime_checkable
class SharpnessSubscriber(Protocol):
    """A scheduler fed the sharpness of its optimizer's parameters."""

    optimizer: torch.optim.Optimizer

    def attach_monitor(self, monitor: object) -> None:
        """Called once at fit start by the monitor that will feed it."""

    def observe_sharpness(self, sharpness: float, step: int | None = None) -> None:
        """Receive a finite measurement made at the parameters the update ``step`` starts from."""


@runtime_checkable
class MeasurementRequester(Protocol):
    """A subscriber that can ask for a measurement when one would change what it does next."""

    def wants_measurement(self, step: int | None = None) -> bool:
        """Whether the monitor should measure before the update ``step`` (in addition to its own cadence)."""


@runtime_checkable
class DirectionSubscriber(Protocol):
    """A scheduler fed the gradient and curvature terms along its optimizer's update direction."""

    optimizer: torch.optim.Optimizer

    def attach_monitor(self, monitor: object) -> None:
        """Called once at fit start by the monitor that will feed it."""

    def observe_direction(
        self,
        numerator: float | torch.Tensor,
        denominator: float | torch.Tensor,
        step: int | None = None,
        *,
        loss: float | torch.Tensor | None = None,
    ) -> None:
        """Receive :math:`n_t, d_t` (NaN for a failed measurement, which it must ignore) and the step's loss."""
