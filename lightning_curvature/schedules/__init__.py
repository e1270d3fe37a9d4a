"""Curvature-aware learning-rate schedulers: a pure function plus a thin ``LRScheduler`` each.

* :class:`SharpnessAwareLR` (rule :func:`sharpness_aware_lr`): cap a base schedule at ``safety`` times the largest
  stable learning rate of the measured sharpness; fed by ``HessianEigenvalueMonitor`` or ``observe_sharpness``.
* :class:`CurvatureDynamicsAwareLR` (rule :func:`cdat_learning_rate`): CDAT (Roulet et al. 2024), the lr from the
  curvature along the optimizer's update direction; fed by ``DirectionalCurvatureMonitor`` or
  ``observe_direction``.
"""

from lightning_curvature.schedules.cdat import CurvatureDynamicsAwareLR, cdat_learning_rate
from lightning_curvature.schedules.sharpness_aware import SharpnessAwareLR, sharpness_aware_lr

__all__ = ["CurvatureDynamicsAwareLR", "SharpnessAwareLR", "cdat_learning_rate", "sharpness_aware_lr"]
