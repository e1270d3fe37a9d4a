"""lightning-curvature: see and control loss curvature while a network trains.

The plain-PyTorch engine (:mod:`lightning_curvature.core`) is imported eagerly and needs no Lightning; the
Lightning callbacks and the schedulers are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_curvature.core import *  # noqa: F403
from lightning_curvature.core import __all__ as _core_all

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily: these need Lightning or are heavier)
_LAZY = {
    "HessianEigenvalueMonitor": "lightning_curvature.callbacks",
    "GradientCovarianceMonitor": "lightning_curvature.callbacks",
    "DirectionalCurvatureMonitor": "lightning_curvature.callbacks",
    "SharpnessAwareLR": "lightning_curvature.schedules",
    "CurvatureDynamicsAwareLR": "lightning_curvature.schedules",
    "GradientNoiseScale": "lightning_curvature.metrics",
}

__all__ = [*_core_all, *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_curvature' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
