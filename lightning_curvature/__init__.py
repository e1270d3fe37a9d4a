"""lightning-curvature: see and control loss curvature while a network trains.

The plain-PyTorch engine (:mod:`lightning_curvature.core`) is imported eagerly and needs no Lightning; the
Lightning callbacks and the schedulers are imported on first access.

Public names (``__all__``): the model-level functions and their results, the operator-level API (operators on
parameter-shaped vectors and the solvers that take them), stability thresholds, the callbacks and the schedulers.
Names that 0.1 exported but that are internals or superseded still import, with a ``DeprecationWarning`` saying
what to use instead.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lightning_curvature.core import (
    CovarianceResult,
    CurvatureOperator,
    DenseOperator,
    DensityResult,
    EigenResult,
    HessianOperator,
    LanczosResult,
    MultiBatch,
    NoiseScaleEstimate,
    NonFiniteCurvatureError,
    ScaledOperator,
    TraceResult,
    VectorSpace,
    adaptive_preconditioner,
    directional_terms,
    gradient_covariance,
    gradient_start_vector,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
    hessian_vector_product,
    hutchinson_trace,
    hutchpp_trace,
    is_adaptive,
    lanczos,
    max_stable_lr,
    preconditioned_sharpness,
    slq_density,
    stability_threshold,
    top_subspace_overlap,
    update_direction,
)

__version__ = "0.2.0"

# public name -> module that defines it (imported lazily: these need Lightning or are heavier)
_LAZY = {
    "HessianEigenvalueMonitor": "lightning_curvature.callbacks",
    "GradientCovarianceMonitor": "lightning_curvature.callbacks",
    "DirectionalCurvatureMonitor": "lightning_curvature.callbacks",
    "SharpnessAwareLR": "lightning_curvature.schedules",
    "CurvatureDynamicsAwareLR": "lightning_curvature.schedules",
}

# 0.1 names kept importable: name -> (module, what to use instead)
_DEPRECATED = {
    "math_attention": ("lightning_curvature.core._state", "an internal of the measurements (no replacement needed)"),
    "preserved_model_state": ("lightning_curvature.core._state", "an internal of the measurements"),
    "all_reduce_sum": ("lightning_curvature.core.hvp", "pass your own SUM all-reduce as `reduce_fn`"),
    "warm_start_vector": ("lightning_curvature.core.eigen", "`v0=result.warm_start` (a block warm start)"),
    "power_iteration": (
        "lightning_curvature.core.power",
        "`lanczos` (power iteration finds the largest *magnitude*, which can be the most negative eigenvalue)",
    ),
    "per_example_gradient_chunks": ("lightning_curvature.core.per_example", "`gradient_covariance`"),
    "adam_stability_threshold": ("lightning_curvature.core.stability", "`stability_threshold(optimizer)`"),
    "sgd_stability_threshold": ("lightning_curvature.core.stability", "`stability_threshold(optimizer)`"),
    "rmsprop_stability_threshold": ("lightning_curvature.core.stability", "`stability_threshold(optimizer)`"),
    "GradientNoiseScale": ("lightning_curvature.metrics", "`GradientCovarianceMonitor` (grad_cov/noise_scale)"),
}

__all__ = [
    "CovarianceResult",
    "CurvatureDynamicsAwareLR",
    "CurvatureOperator",
    "DenseOperator",
    "DensityResult",
    "DirectionalCurvatureMonitor",
    "EigenResult",
    "GradientCovarianceMonitor",
    "HessianEigenvalueMonitor",
    "HessianOperator",
    "LanczosResult",
    "MultiBatch",
    "NoiseScaleEstimate",
    "NonFiniteCurvatureError",
    "ScaledOperator",
    "SharpnessAwareLR",
    "TraceResult",
    "VectorSpace",
    "__version__",
    "adaptive_preconditioner",
    "directional_terms",
    "gradient_covariance",
    "gradient_start_vector",
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "hessian_trace",
    "hessian_vector_product",
    "hutchinson_trace",
    "hutchpp_trace",
    "is_adaptive",
    "lanczos",
    "max_stable_lr",
    "preconditioned_sharpness",
    "slq_density",
    "stability_threshold",
    "top_subspace_overlap",
    "update_direction",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    deprecated = _DEPRECATED.get(name)
    if deprecated is not None:
        warnings.warn(
            f"lightning_curvature.{name} is deprecated and will be removed; use {deprecated[1]}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(deprecated[0]), name)
    raise AttributeError(f"module 'lightning_curvature' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
