"""The names under which every curvature value is logged (TensorBoard tags, CSV columns, ``callback_metrics`` keys).

The one place they are defined: the monitors write them, :mod:`lightning_curvature.tensorboard` lays them out,
:mod:`lightning_curvature.report` reads them back. The first group is the public contract of ``API.md``; tools and
dashboards may rely on every name here. Imports nothing.

Example::

    >>> eig_tag(2), grad_cov_eig_tag(1)
    ('curvature/eig_2', 'grad_cov/eig_1')
    >>> is_curvature_tag(SHARPNESS), is_curvature_tag("train_loss")
    (True, False)
"""

from __future__ import annotations

import re

__all__ = [
    "CDAT_DENOMINATOR",
    "CDAT_EDGE_LR",
    "CDAT_LR",
    "CDAT_NUMERATOR",
    "DENSITY_FIGURE",
    "EDGE_RATIO",
    "EIG_TAG_RE",
    "GRAD_COV_CONDITION_NUMBER",
    "GRAD_COV_EIG_1",
    "GRAD_COV_EIG_TAG_RE",
    "GRAD_COV_FROBENIUS_NORM",
    "GRAD_COV_NOISE_SCALE",
    "GRAD_COV_OVERHEAD",
    "GRAD_COV_TRACE",
    "HESSIAN_OVERHEAD",
    "HESSIAN_TRACE",
    "HESSIAN_TRACE_STD_ERROR",
    "NUM_HVP",
    "PREFIXES",
    "SHARPNESS",
    "SPECTRUM_HISTOGRAM",
    "STABILITY_THRESHOLD",
    "SUBSPACE_OVERLAP",
    "eig_tag",
    "grad_cov_eig_tag",
    "is_curvature_tag",
]

# --- API.md contract -------------------------------------------------------------------------------------------
SHARPNESS = "curvature/sharpness"
STABILITY_THRESHOLD = "curvature/stability_threshold"
GRAD_COV_EIG_1 = "grad_cov/eig_1"
GRAD_COV_CONDITION_NUMBER = "grad_cov/condition_number"
GRAD_COV_TRACE = "grad_cov/trace"
GRAD_COV_NOISE_SCALE = "grad_cov/noise_scale"

# --- Hessian monitor -------------------------------------------------------------------------------------------
EDGE_RATIO = "curvature/edge_ratio"
HESSIAN_TRACE = "curvature/trace"
HESSIAN_TRACE_STD_ERROR = "curvature/trace_std_error"
SUBSPACE_OVERLAP = "curvature/subspace_overlap"
NUM_HVP = "curvature/num_hvp"
ERROR_BOUND = "curvature/error_bound"
HESSIAN_OVERHEAD = "curvature/overhead"
SPECTRUM_HISTOGRAM = "curvature/spectrum"
DENSITY_FIGURE = "curvature/density"

# --- gradient-covariance monitor -------------------------------------------------------------------------------
GRAD_COV_FROBENIUS_NORM = "grad_cov/frobenius_norm"
GRAD_COV_NOISE_SCALE_BATCH = "grad_cov/noise_scale_batch"
GRAD_COV_OVERHEAD = "grad_cov/overhead"

# --- directional monitor (CDAT) --------------------------------------------------------------------------------
CDAT_LR = "cdat/lr"
CDAT_EDGE_LR = "cdat/edge_lr"
CDAT_NUMERATOR = "cdat/numerator"
CDAT_DENOMINATOR = "cdat/denominator"

#: Namespaces of every tag this library writes.
PREFIXES = ("curvature/", "grad_cov/", "cdat/")

#: ``curvature/eig_{i}`` (group 1: ``i``).
EIG_TAG_RE = re.compile(r"^curvature/eig_(\d+)$")
#: ``grad_cov/eig_{i}`` (group 1: ``i``).
GRAD_COV_EIG_TAG_RE = re.compile(r"^grad_cov/eig_(\d+)$")


def eig_tag(i: int) -> str:
    """Tag of the ``i``-th largest Hessian eigenvalue, ``curvature/eig_{i}`` (1 is the sharpness).

    Raises:
        ValueError: If ``i < 1``.
    """
    if i < 1:
        raise ValueError(f"Eigenvalue ranks are 1-based, got i={i}.")
    return f"curvature/eig_{i}"


def grad_cov_eig_tag(i: int) -> str:
    """Tag of the ``i``-th largest eigenvalue of the gradient covariance, ``grad_cov/eig_{i}``.

    Raises:
        ValueError: If ``i < 1``.
    """
    if i < 1:
        raise ValueError(f"Eigenvalue ranks are 1-based, got i={i}.")
    return f"grad_cov/eig_{i}"


def is_curvature_tag(tag: str) -> bool:
    """Whether ``tag`` is one this library writes (``curvature/*``, ``grad_cov/*``, ``cdat/*``, with suffixes)."""
    return tag.startswith(PREFIXES)
