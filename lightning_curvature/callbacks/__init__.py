"""Lightning callbacks: they decide when, on which batch and in which mode to measure, and what to log."""

from lightning_curvature.callbacks.covariance_monitor import GradientCovarianceMonitor
from lightning_curvature.callbacks.directional import DirectionalCurvatureMonitor
from lightning_curvature.callbacks.hessian_monitor import HessianEigenvalueMonitor

__all__ = ["DirectionalCurvatureMonitor", "GradientCovarianceMonitor", "HessianEigenvalueMonitor"]
