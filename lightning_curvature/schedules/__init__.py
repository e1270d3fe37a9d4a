"""Curvature-aware learning-rate schedulers: a pure function plus a thin ``LRScheduler`` each.

* :class:`SharpnessAwareLR`: keep a base schedule within reach of the edge of stability of the measured sharpness;
  fed by ``HessianEigenvalueMonitor`` or ``observe_sharpness``. Default rule :func:`edge_following_lr` (start just
  below the edge, rise at most :func:`default_growth` per step, never lowered by a sharpness that rose to meet the
  lr, reset below the edge after a measured runaway); ``rule="cap"``: :func:`sharpness_aware_lr`.
* :class:`CurvatureDynamicsAwareLR` (rule :func:`cdat_learning_rate`): CDAT (Roulet et al. 2024), the lr from the
  curvature along the optimizer's update direction, bounded and watched for runaways; fed by
  ``DirectionalCurvatureMonitor`` or ``observe_direction``.

How monitors find the schedulers they feed: :mod:`lightning_curvature.schedules.protocols`.
"""

from lightning_curvature.schedules.cdat import CurvatureDynamicsAwareLR, cdat_learning_rate
from lightning_curvature.schedules.sharpness_aware import (
    SharpnessAwareLR,
    default_growth,
    edge_following_lr,
    sharpness_aware_lr,
)

__all__ = [
    "CurvatureDynamicsAwareLR",
    "SharpnessAwareLR",
    "cdat_learning_rate",
    "default_growth",
    "edge_following_lr",
    "sharpness_aware_lr",
]
