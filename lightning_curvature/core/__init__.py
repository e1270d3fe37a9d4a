"""Pure-PyTorch curvature engine: imports and runs without Lightning.

Matrix-free Hessian-vector products, Lanczos / power iteration, Hutchinson / Hutch++ trace, stochastic Lanczos
quadrature, adaptive-optimizer preconditioners, stability thresholds, per-example gradient covariance and
top-subspace overlap.
"""

from lightning_curvature.core._batch import MultiBatch
from lightning_curvature.core._state import math_attention, preserved_model_state
from lightning_curvature.core.covariance import CovarianceResult, NoiseScaleEstimate, gradient_covariance
from lightning_curvature.core.density import DensityResult, hessian_spectral_density, slq_density
from lightning_curvature.core.eigen import (
    EigenResult,
    gradient_start_vector,
    hessian_eigenvalues,
    preconditioned_sharpness,
    warm_start_vector,
)
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.hvp import HessianOperator, all_reduce_sum, hessian_vector_product
from lightning_curvature.core.lanczos import LanczosResult, lanczos
from lightning_curvature.core.operators import CurvatureOperator, DenseOperator, ScaledOperator
from lightning_curvature.core.per_example import per_example_gradient_chunks
from lightning_curvature.core.power import power_iteration
from lightning_curvature.core.preconditioner import adaptive_preconditioner
from lightning_curvature.core.stability import (
    adam_stability_threshold,
    is_adaptive,
    max_stable_lr,
    rmsprop_stability_threshold,
    sgd_stability_threshold,
    stability_threshold,
)
from lightning_curvature.core.subspace import top_subspace_overlap
from lightning_curvature.core.trace import TraceResult, hessian_trace, hutchinson_trace, hutchpp_trace
from lightning_curvature.core.update_direction import directional_terms, update_direction
from lightning_curvature.core.vectors import VectorSpace

__all__ = [
    "CovarianceResult",
    "CurvatureOperator",
    "DenseOperator",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "LanczosResult",
    "MultiBatch",
    "NoiseScaleEstimate",
    "NonFiniteCurvatureError",
    "ScaledOperator",
    "TraceResult",
    "VectorSpace",
    "adam_stability_threshold",
    "adaptive_preconditioner",
    "all_reduce_sum",
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
    "math_attention",
    "max_stable_lr",
    "per_example_gradient_chunks",
    "power_iteration",
    "preconditioned_sharpness",
    "preserved_model_state",
    "rmsprop_stability_threshold",
    "sgd_stability_threshold",
    "slq_density",
    "stability_threshold",
    "top_subspace_overlap",
    "update_direction",
    "warm_start_vector",
]
