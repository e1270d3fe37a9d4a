"""TensorBoard helpers: the custom-scalars layout, spectrum histograms and density figures.

This module imports only ``torch`` and ``tensorboard`` at import time. Lightning is never imported
here: :func:`find_summary_writer` duck-types the trainer and its loggers, and matplotlib is imported
lazily by :func:`log_density_figure`.

The tag names are defined in :mod:`lightning_curvature.tags` (re-exported here under their old names); the
custom-scalars layout groups them into three dashboard categories:

* ``curvature``: sharpness against the stability threshold, the edge ratio
  ``sharpness / threshold`` (``lr * sharpness / 2`` for plain SGD, 1.0 is the edge of stability), the
  top-k Hessian eigenvalues, the Hessian trace and the top-subspace overlap;
* ``grad_cov``: top eigenvalue(s), condition number, trace, Frobenius norm and noise scale of the
  gradient covariance;
* ``cdat``: the CDAT learning rate against the edge learning rate, and its numerator/denominator.

Example::

    >>> layout = curvature_layout(k=3)
    >>> layout["curvature"]["sharpness vs stability threshold"]
    ['Multiline', ['curvature/sharpness', 'curvature/stability_threshold']]
    >>> sorted(layout)
    ['cdat', 'curvature', 'grad_cov']
    >>> writer = find_summary_writer(trainer)  # doctest: +SKIP
    >>> if writer is not None:  # doctest: +SKIP
    ...     add_curvature_layout(writer, k=3)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

# tag names are defined in `tags.py`; importable from here as before
from lightning_curvature.tags import (
    CDAT_DENOMINATOR,
    CDAT_EDGE_LR,
    CDAT_LR,
    CDAT_NUMERATOR,
    EDGE_RATIO,
    GRAD_COV_CONDITION_NUMBER,
    GRAD_COV_EIG_1,
    GRAD_COV_FROBENIUS_NORM,
    GRAD_COV_NOISE_SCALE,
    GRAD_COV_TRACE,
    HESSIAN_TRACE,
    SHARPNESS,
    STABILITY_THRESHOLD,
    SUBSPACE_OVERLAP,
    eig_tag,
    grad_cov_eig_tag,
)

__all__ = [
    "CDAT_DENOMINATOR",
    "CDAT_EDGE_LR",
    "CDAT_LR",
    "CDAT_NUMERATOR",
    "EDGE_RATIO",
    "GRAD_COV_CONDITION_NUMBER",
    "GRAD_COV_EIG_1",
    "GRAD_COV_FROBENIUS_NORM",
    "GRAD_COV_NOISE_SCALE",
    "GRAD_COV_TRACE",
    "HESSIAN_TRACE",
    "LAYOUT_TAG",
    "SHARPNESS",
    "STABILITY_THRESHOLD",
    "SUBSPACE_OVERLAP",
    "add_curvature_layout",
    "curvature_layout",
    "eig_tag",
    "find_summary_writer",
    "grad_cov_eig_tag",
    "log_density_figure",
    "log_spectrum_histogram",
]

#: Tensor tag under which ``SummaryWriter.add_custom_scalars`` stores the layout proto.
LAYOUT_TAG = "custom_scalars__config__"

# Custom-scalars multiline tags are regular expressions matched with ``re.match`` (anchored at the
# start only), so the ``$`` keeps ``eig_1`` from also matching e.g. ``eig_1_residual``.
_EIG_REGEX = r"curvature/eig_\d+$"
_GRAD_COV_EIG_REGEX = r"grad_cov/eig_\d+$"

# Attribute set on a writer once the layout has been written to it (``add_custom_scalars`` may be
# called only once per writer).
_LAYOUT_WRITTEN_ATTR = "_lightning_curvature_layout_written"

_CHART_TYPES = ("Multiline", "Margin")
_warned_no_matplotlib = False


def _validate_charts(category: str, charts: Any) -> dict[str, list[Any]]:
    if not isinstance(category, str) or not isinstance(charts, Mapping):
        raise TypeError(
            "`extra` must map category names to {chart title: ['Multiline' | 'Margin', [tags...]]},"
            f" got {category!r}: {charts!r}."
        )
    out: dict[str, list[Any]] = {}
    for title, spec in charts.items():
        if (
            not isinstance(title, str)
            or not isinstance(spec, Sequence)
            or isinstance(spec, str)
            or len(spec) != 2
            or not isinstance(spec[1], Sequence)
            or isinstance(spec[1], str)
            or not all(isinstance(t, str) for t in spec[1])
        ):
            raise TypeError(f"Chart {category!r}/{title!r} must be ['Multiline' | 'Margin', [tag, ...]], got {spec!r}.")
        kind, tags = spec[0], list(spec[1])
        if kind not in _CHART_TYPES:
            raise ValueError(f"Chart {category!r}/{title!r}: type must be one of {_CHART_TYPES}, got {kind!r}.")
        if kind == "Margin" and len(tags) != 3:
            raise ValueError(
                f"Chart {category!r}/{title!r}: a Margin chart needs exactly 3 tags (value, lower, upper),"
                f" got {len(tags)}."
            )
        if not tags:
            raise ValueError(f"Chart {category!r}/{title!r} has no tags.")
        out[title] = [kind, tags]
    return out


def curvature_layout(
    k: int = 5,
    include_grad_cov: bool = True,
    extra: dict[str, dict[str, list[Any]]] | None = None,
    *,
    include_cdat: bool = True,
) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout for :meth:`SummaryWriter.add_custom_scalars`.

    The layout is ``{category: {chart title: ["Multiline" | "Margin", [tag regex, ...]]}}``. Charts
    whose tags are never logged simply stay empty in TensorBoard.

    Args:
        k: Number of Hessian eigenvalues logged as ``curvature/eig_1 .. eig_k``; it names the
            top-k chart (whose regex matches any ``curvature/eig_{i}``).
        include_grad_cov: Add the ``grad_cov`` category.
        extra: More charts, ``{category: {title: [type, tags]}}``. Categories that already exist are
            extended; a chart with an existing title replaces it.
        include_cdat: Add the ``cdat`` category (CDAT scheduler diagnostics).

    Returns:
        A fresh dict (safe to mutate).

    Raises:
        ValueError: If ``k < 1``, or a chart in ``extra`` has an unknown type, no tags, or a Margin
            chart does not have exactly three tags.
        TypeError: If ``extra`` is not shaped as described.

    Example::

        >>> layout = curvature_layout(k=2, include_grad_cov=False, include_cdat=False,
        ...                           extra={"loss": {"train": ["Multiline", ["train_loss"]]}})
        >>> list(layout)
        ['curvature', 'loss']
        >>> layout["curvature"]["top-2 eigenvalues"]
        ['Multiline', ['curvature/eig_\\\\d+$']]
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got k={k!r}.")
    layout: dict[str, dict[str, list[Any]]] = {
        "curvature": {
            "sharpness vs stability threshold": ["Multiline", [SHARPNESS, STABILITY_THRESHOLD]],
            "lr x sharpness / 2 (sharpness / threshold, 1 = edge)": ["Multiline", [EDGE_RATIO]],
            f"top-{k} eigenvalues": ["Multiline", [_EIG_REGEX]],
            "trace": ["Multiline", [HESSIAN_TRACE]],
            "top-subspace overlap": ["Multiline", [SUBSPACE_OVERLAP]],
        }
    }
    if include_grad_cov:
        layout["grad_cov"] = {
            "eig_1": ["Multiline", [GRAD_COV_EIG_1]],
            "top eigenvalues": ["Multiline", [_GRAD_COV_EIG_REGEX]],
            "condition number": ["Multiline", [GRAD_COV_CONDITION_NUMBER]],
            "trace and Frobenius norm": ["Multiline", [GRAD_COV_TRACE, GRAD_COV_FROBENIUS_NORM]],
            "noise scale": ["Multiline", [GRAD_COV_NOISE_SCALE]],
        }
    if include_cdat:
        layout["cdat"] = {
            "lr vs edge lr": ["Multiline", [CDAT_LR, CDAT_EDGE_LR]],
            "numerator and denominator": ["Multiline", [CDAT_NUMERATOR, CDAT_DENOMINATOR]],
        }
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"`extra` must be a dict of categories, got {type(extra).__name__}.")
        for category, charts in extra.items():
            layout.setdefault(category, {}).update(_validate_charts(category, charts))
    return layout


def _is_summary_writer(obj: Any) -> bool:
    """Duck-type check for a real ``SummaryWriter`` (torch's or tensorboardX's)."""
    if obj is None or type(obj).__name__ == "_DummyExperiment":
        # Lightning's rank>0 stand-in answers every attribute with a no-op.
        return False
    return all(
        callable(getattr(type(obj), name, None))
        for name in ("add_scalar", "add_custom_scalars", "add_histogram", "add_image")
    )


def find_summary_writer(trainer: Any) -> Any | None:
    """Return the TensorBoard ``SummaryWriter`` among the trainer's loggers.

    The first logger whose ``experiment`` is a summary writer wins (in practice Lightning's
    ``TensorBoardLogger``). Other loggers' ``experiment`` is not touched unless no logger looks like a
    TensorBoard logger by name, because creating it may have side effects (e.g. start a W&B run).

    Args:
        trainer: A Lightning ``Trainer`` (anything with ``loggers`` or ``logger``, and ``global_rank``).

    Returns:
        The writer on global rank 0, or ``None`` when no TensorBoard logger is attached or on any other
        rank (where Lightning's experiment is a no-op stand-in).

    Example::

        >>> class _NoLoggerTrainer:
        ...     global_rank = 0
        ...     loggers = []
        >>> find_summary_writer(_NoLoggerTrainer()) is None
        True
    """
    if getattr(trainer, "global_rank", 0) != 0:
        return None
    loggers = getattr(trainer, "loggers", None)
    if loggers is None:
        single = getattr(trainer, "logger", None)
        loggers = [] if single is None else [single]
    loggers = list(loggers)
    # TensorBoard loggers first (by class name, so nothing needs importing), then the rest.
    by_name = [lg for lg in loggers if "tensorboard" in type(lg).__name__.lower()]
    for candidates in (by_name, [lg for lg in loggers if lg not in by_name]):
        for lg in candidates:
            if _is_summary_writer(lg):  # a bare SummaryWriter passed as a "logger"
                return lg
            try:
                experiment = lg.experiment
            except Exception:  # a broken unrelated logger must not break curvature logging
                continue
            if _is_summary_writer(experiment):
                return experiment
    return None


def add_curvature_layout(
    writer: Any,
    k: int = 5,
    include_grad_cov: bool = True,
    extra: dict[str, dict[str, list[Any]]] | None = None,
    *,
    include_cdat: bool = True,
) -> bool:
    """Write the curvature custom-scalars layout to ``writer`` once.

    ``SummaryWriter.add_custom_scalars`` may be called only once per writer, so the first call marks
    the writer and later calls (e.g. from a second curvature callback) do nothing. Pass the full layout
    the run needs on the first call; charts whose tags never appear just stay empty.

    Args:
        writer: A ``SummaryWriter``, or ``None`` (nothing happens).
        k: See :func:`curvature_layout`.
        include_grad_cov: See :func:`curvature_layout`.
        extra: See :func:`curvature_layout`.
        include_cdat: See :func:`curvature_layout`.

    Returns:
        ``True`` if the layout was written by this call, ``False`` if ``writer`` is ``None`` or already
        has a layout from this library.

    Raises:
        ValueError: See :func:`curvature_layout`.
        TypeError: See :func:`curvature_layout`.

    Example::

        >>> add_curvature_layout(None)
        False
    """
    layout = curvature_layout(k, include_grad_cov, extra, include_cdat=include_cdat)
    if writer is None or getattr(writer, _LAYOUT_WRITTEN_ATTR, False):
        return False
    writer.add_custom_scalars(layout)
    try:
        setattr(writer, _LAYOUT_WRITTEN_ATTR, True)
    except AttributeError:  # writer with __slots__: cannot mark it, accept a possible rewrite
        pass
    return True


def log_spectrum_histogram(writer: Any, tag: str, eigenvalues: Tensor, step: int) -> bool:
    """Log eigenvalues (e.g. the top-k Hessian spectrum or Ritz values) as a TensorBoard histogram.

    Non-finite values are dropped before binning.

    Args:
        writer: A ``SummaryWriter``, or ``None`` (nothing happens).
        tag: Histogram tag, e.g. ``"curvature/spectrum"``.
        eigenvalues: Tensor of eigenvalues, any shape (flattened), any device or dtype.
        step: Global step on the x-axis.

    Returns:
        ``True`` if a histogram was written, ``False`` if ``writer`` is ``None`` or no finite value was
        left.

    Raises:
        TypeError: If ``eigenvalues`` is not a tensor.

    Example::

        >>> log_spectrum_histogram(None, "curvature/spectrum", torch.tensor([3.0, 1.0]), step=0)
        False
    """
    if not isinstance(eigenvalues, Tensor):
        raise TypeError(f"`eigenvalues` must be a torch.Tensor, got {type(eigenvalues).__name__}.")
    if writer is None:
        return False
    values = eigenvalues.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return False
    writer.add_histogram(tag, values.numpy(), global_step=int(step))
    return True


def _warn_no_matplotlib() -> None:
    global _warned_no_matplotlib
    if not _warned_no_matplotlib:
        _warned_no_matplotlib = True
        warnings.warn(
            "matplotlib is not installed, so spectral-density figures are not logged to TensorBoard."
            " Install it with `pip install lightning-curvature[demo]` (or `pip install matplotlib`).",
            UserWarning,
            stacklevel=3,
        )


def _as_1d_float(x: Tensor | Sequence[float], name: str) -> Any:
    t = torch.as_tensor(x).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError(f"`{name}` is empty.")
    return t.numpy()


def log_density_figure(
    writer: Any,
    tag: str,
    grid: Tensor | Sequence[float],
    density: Tensor | Sequence[float],
    step: int,
    markers: dict[str, float] | None = None,
) -> bool:
    """Log a line plot of a spectral density (e.g. from stochastic Lanczos quadrature) as an image.

    The figure is drawn with matplotlib's Agg canvas without touching ``pyplot`` or the global
    backend. A log-scaled y-axis is used when the density is positive everywhere. Each marker is a
    labelled vertical dashed line, e.g. ``{"stability threshold 2/lr": 20.0}``; non-finite markers are
    skipped.

    Args:
        writer: A ``SummaryWriter``, or ``None`` (nothing happens).
        tag: Image tag, e.g. ``"curvature/density"``.
        grid: Eigenvalue grid (x-axis), 1-D.
        density: Density values on ``grid``, same length.
        step: Global step.
        markers: Optional ``{label: x position}`` for vertical lines.

    Returns:
        ``True`` if an image was written; ``False`` if ``writer`` is ``None`` or matplotlib is missing
        (then a warning is issued once per process).

    Raises:
        ValueError: If ``grid`` and ``density`` are empty or differ in length.

    Example::

        >>> log_density_figure(None, "curvature/density", [0.0, 1.0], [0.5, 0.5], step=0)
        False
    """
    x = _as_1d_float(grid, "grid")
    y = _as_1d_float(density, "density")
    if x.shape != y.shape:
        raise ValueError(f"`grid` and `density` must have the same length, got {x.size} and {y.size}.")
    if writer is None:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        _warn_no_matplotlib()
        return False

    import numpy as np

    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, y, color="tab:blue", linewidth=1.5, label="density")
    finite = np.isfinite(y)
    if finite.any() and (y[finite] > 0).all():
        ax.set_yscale("log")
    colours = ["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:gray"]
    for i, (label, pos) in enumerate((markers or {}).items()):
        if pos is None or not math.isfinite(float(pos)):
            continue
        ax.axvline(
            float(pos),
            color=colours[i % len(colours)],
            linestyle="--",
            linewidth=1.2,
            label=f"{label} = {float(pos):.4g}",
        )
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral density")
    ax.set_title(f"{tag} (step {int(step)})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
    writer.add_image(tag, image, global_step=int(step), dataformats="HWC")
    return True
