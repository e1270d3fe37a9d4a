"""Curvature-aware learning-rate schedulers: a pure function plus a thin ``LRScheduler`` each."""

from lightning_curvature.schedules.cdat import CurvatureDynamicsAwareLR
from lightning_curvature.schedules.sharpness_aware import SharpnessAwareLR

__all__ = ["CurvatureDynamicsAwareLR", "SharpnessAwareLR"]
