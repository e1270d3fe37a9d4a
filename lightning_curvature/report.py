"""Offline report: read TensorBoard event files and draw the curvature dashboard as one PNG (plus CSV).

Used by ``lightning-curvature report LOGDIR [LOGDIR ...] --out DIR``. Every folder below a logdir that
holds ``*tfevents*`` files is a run; several runs (and several logdirs) are overlaid, one colour per
run. The PNG has six panels:

(a) ``curvature/sharpness`` (solid) with ``curvature/stability_threshold`` (dashed, same colour);
(b) the edge ratio ``sharpness / threshold`` (``curvature/edge_ratio``, or computed from (a)), with
    the edge of stability at 1;
(c) the top-k Hessian eigenvalues ``curvature/eig_{i}``;
(d) the gradient-covariance condition number and ``grad_cov/eig_1`` (log scale);
(e) the learning rate (``lr-*`` from ``LearningRateMonitor``, ``cdat/lr``, ``curvature/lr``), with
    ``cdat/edge_lr`` dashed when present;
(f) the training loss (``train_loss``, ``train/loss``, ``loss``, ...).

Panels without data say so instead of failing; logdirs whose event files hold no curvature tag at all
(``curvature/*``, ``grad_cov/*``, ``cdat/*``) are refused with a message saying so, and runs without one are
named on stderr. The CSV is in long format with columns ``run, tag, step, value`` and holds every scalar of every
run, not only the plotted ones.

Example::

    >>> paths = make_report(["lightning_logs"], out="curvature_report")  # doctest: +SKIP
    >>> [p.name for p in paths]  # doctest: +SKIP
    ['curvature_report.png', 'curvature_scalars.csv']
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing import event_accumulator

from lightning_curvature import tags as tag_names

__all__ = ["add_report_arguments", "make_report", "output_problem", "read_scalars", "report_main"]

#: ``{run name: {tag: [(step, value), ...]}}``
Scalars = dict[str, dict[str, list[tuple[int, float]]]]

PNG_NAME = "curvature_report.png"
CSV_NAME = "curvature_scalars.csv"

_SHARPNESS = tag_names.SHARPNESS
_THRESHOLD = tag_names.STABILITY_THRESHOLD
_EDGE_RATIO = tag_names.EDGE_RATIO
_EIG_RE = tag_names.EIG_TAG_RE
_GC_COND = tag_names.GRAD_COV_CONDITION_NUMBER
_GC_EIG1 = tag_names.GRAD_COV_EIG_1
_EDGE_LR = tag_names.CDAT_EDGE_LR
_LOSS_TAGS = (
    "train_loss",
    "train_loss_step",
    "train/loss",
    "train/loss_step",
    "loss",
    "training_loss",
    "train_loss_epoch",
)

# Keep every scalar; the other kinds are not used here, so load as little of them as possible.
_SIZE_GUIDANCE = {
    event_accumulator.SCALARS: 0,
    event_accumulator.TENSORS: 0,
    event_accumulator.HISTOGRAMS: 1,
    event_accumulator.COMPRESSED_HISTOGRAMS: 1,
    event_accumulator.IMAGES: 1,
    event_accumulator.AUDIO: 1,
}


def _is_event_file(name: str) -> bool:
    return "tfevents" in name


def _run_dirs(logdir: Path) -> list[Path]:
    runs = []
    for dirpath, dirnames, filenames in os.walk(logdir):
        dirnames.sort()
        if any(_is_event_file(f) for f in filenames):
            runs.append(Path(dirpath))
    return runs


def _read_run(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance=_SIZE_GUIDANCE)
    acc.Reload()
    tags = acc.Tags()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in tags.get(event_accumulator.SCALARS, []):
        out[tag] = [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
    # TF2-style scalars (``tf.summary.scalar``, tensorboardX new style) live in the tensors store.
    try:
        tensor_tags = acc.PluginTagToContent("scalars")
    except KeyError:
        tensor_tags = {}
    if tensor_tags:
        from tensorboard.util import tensor_util

        for tag in tensor_tags:
            if tag in out:
                continue
            out[tag] = [(int(e.step), float(tensor_util.make_ndarray(e.tensor_proto).item())) for e in acc.Tensors(tag)]
    return out


def read_scalars(logdir: str | os.PathLike[str]) -> Scalars:
    """Read every scalar of every run below ``logdir``.

    Each folder holding TensorBoard event files (``*tfevents*``) is one run, named by its path relative
    to ``logdir`` in POSIX form (``"."`` for ``logdir`` itself). All event files of a folder are read in
    order, with no downsampling.

    Args:
        logdir: Root folder to search, e.g. ``lightning_logs``.

    Returns:
        ``{run name: {tag: [(step, value), ...]}}``, runs and tags in sorted order, points in the order
        they were written. Runs with no scalars map to an empty dict.

    Raises:
        FileNotFoundError: If ``logdir`` does not exist.

    Example::

        >>> read_scalars("lightning_logs")["version_0"]["curvature/sharpness"][:2]  # doctest: +SKIP
        [(0, 3.25), (50, 7.5)]
    """
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(f"Log directory {str(root)!r} does not exist.")
    result: Scalars = {}
    for run_dir in _run_dirs(root):
        name = run_dir.relative_to(root).as_posix()
        data = _read_run(run_dir)
        result[name] = {tag: data[tag] for tag in sorted(data)}
    return dict(sorted(result.items()))


def _read_many(logdirs: Sequence[str | os.PathLike[str]]) -> Scalars:
    """Read several logdirs; prefix run names with the logdir name when there is more than one."""
    combined: Scalars = {}
    for logdir in logdirs:
        runs = read_scalars(logdir)
        base = Path(logdir).resolve().name or str(logdir)
        for run, tags in runs.items():
            if run == ".":  # event files directly in the logdir: name the run after it
                name = base
            elif len(logdirs) > 1:
                name = f"{base}/{run}"
            else:
                name = run
            unique, n = name, 2
            while unique in combined:
                unique, n = f"{name} ({n})", n + 1
            combined[unique] = tags
    return combined


def _write_csv(data: Scalars, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "tag", "step", "value"])
        for run, tags in data.items():
            for tag, points in tags.items():
                for step, value in points:
                    # repr() round-trips floats exactly (also nan/inf, which float() parses back).
                    writer.writerow([run, tag, step, repr(value)])


def _xy(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def _edge_ratio(tags: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    if _EDGE_RATIO in tags:
        return tags[_EDGE_RATIO]
    if _SHARPNESS not in tags or _THRESHOLD not in tags:
        return []
    threshold = dict(tags[_THRESHOLD])
    return [
        (step, value / threshold[step])
        for step, value in tags[_SHARPNESS]
        if step in threshold and threshold[step] != 0.0 and math.isfinite(threshold[step])
    ]


def _lr_tags(tags: dict[str, list[tuple[int, float]]]) -> list[str]:
    found = [t for t in tags if t.startswith("lr-")]
    found += [t for t in (tag_names.CDAT_LR, "curvature/lr") if t in tags]
    return found


def _loss_tag(tags: dict[str, list[tuple[int, float]]]) -> str | None:
    for candidate in _LOSS_TAGS:
        if candidate in tags:
            return candidate
    return None


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no data\n({what})", ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.45")
    ax.set_xticks([])
    ax.set_yticks([])


def _maybe_log_y(ax: Any, values: list[float], ratio: float = 100.0) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > ratio:
        ax.set_yscale("log")


def _style_legend(ax: Any, styles: list[tuple[Any, str]], loc: str = "best") -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.25", linestyle=ls, label=label) for ls, label in styles]
    ax.legend(handles=handles, loc=loc, fontsize="small", framealpha=0.8)


def _draw(data: Scalars, path: Path, title: str | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(14, 13), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 2).ravel()
    palette = [f"C{i}" for i in range(10)]
    colours = {run: palette[i % len(palette)] for i, run in enumerate(data)}
    run_handles = [Line2D([], [], color=colours[run], linewidth=2.5, label=run) for run in data]

    # (a) sharpness and stability threshold
    ax = axes[0]
    ax.set_title("(a) sharpness (solid) vs stability threshold (dashed)")
    has_sharpness = has_threshold = False
    for run, tags in data.items():
        if _SHARPNESS in tags:
            ax.plot(*_xy(tags[_SHARPNESS]), color=colours[run], linewidth=1.6)
            has_sharpness = True
        if _THRESHOLD in tags:
            ax.plot(*_xy(tags[_THRESHOLD]), color=colours[run], linestyle="--", linewidth=1.3)
            has_threshold = True
    if has_sharpness or has_threshold:
        ax.set_ylabel("top Hessian eigenvalue")
        styles_a: list[tuple[Any, str]] = []
        if has_sharpness:
            styles_a.append(("-", f"sharpness  {_SHARPNESS}"))
        if has_threshold:
            styles_a.append(("--", f"threshold  {_THRESHOLD}"))
        _style_legend(ax, styles_a)
    else:
        _no_data(ax, f"{_SHARPNESS}, {_THRESHOLD}")

    # (b) edge ratio
    ax = axes[1]
    ax.set_title("(b) edge ratio: sharpness / threshold  (= lr·λ/2 for SGD)")
    drawn = False
    for run, tags in data.items():
        ratio = _edge_ratio(tags)
        if ratio:
            ax.plot(*_xy(ratio), color=colours[run], linewidth=1.6)
            drawn = True
    if drawn:
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1.4)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, max(hi, 1.1))
        ax.set_ylabel("sharpness / threshold")
        _style_legend(ax, [(":", "1 = edge of stability")])
    else:
        _no_data(ax, f"{_EDGE_RATIO}, or sharpness and threshold")

    # (c) top-k eigenvalues
    ax = axes[2]
    ax.set_title("(c) top-k Hessian eigenvalues (darker = larger)")
    drawn = False
    max_k = 0
    for run, tags in data.items():
        eigs = sorted((int(m.group(1)), t) for t in tags if (m := _EIG_RE.match(t)))
        for j, (i, tag) in enumerate(eigs):
            alpha = max(0.25, 1.0 - 0.75 * j / max(1, len(eigs) - 1))
            ax.plot(*_xy(tags[tag]), color=colours[run], alpha=alpha, linewidth=1.4)
            ax.annotate(
                f"λ{i}",
                xy=tags[tag][-1],
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=7,
                color=colours[run],
                va="center",
            )
            max_k = max(max_k, i)
            drawn = True
    if drawn:
        ax.set_ylabel(f"eigenvalue (k = {max_k})")
    else:
        _no_data(ax, "curvature/eig_{i}")

    # (d) gradient covariance
    ax = axes[3]
    ax.set_title("(d) gradient covariance: condition number (solid), eig_1 (dashed)")
    drawn = False
    for run, tags in data.items():
        for tag, ls in ((_GC_COND, "-"), (_GC_EIG1, "--")):
            pts = [(s, v) for s, v in tags.get(tag, []) if v > 0 and math.isfinite(v)]
            if pts:
                ax.plot(*_xy(pts), color=colours[run], linestyle=ls, linewidth=1.5)
                drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.set_ylabel("log scale")
        _style_legend(ax, [("-", f"λ1/λk  {_GC_COND}"), ("--", f"λ1  {_GC_EIG1}")])
    else:
        _no_data(ax, f"{_GC_COND}, {_GC_EIG1}")

    # (e) learning rate
    ax = axes[4]
    ax.set_title("(e) learning rate")
    drawn = False
    lr_values: list[float] = []
    has_edge_lr = False
    for run, tags in data.items():
        lr_tags = _lr_tags(tags)
        for j, tag in enumerate(lr_tags):
            x, y = _xy(tags[tag])
            ax.plot(
                x,
                y,
                color=colours[run],
                linewidth=1.6,
                alpha=1.0 if j == 0 else 0.6,
                label=f"{run}: {tag}" if len(lr_tags) > 1 else None,
            )
            lr_values += y
            drawn = True
        if _EDGE_LR in tags:
            x, y = _xy(tags[_EDGE_LR])
            ax.plot(x, y, color=colours[run], linestyle="--", linewidth=1.2)
            lr_values += y
            has_edge_lr = drawn = True
    if drawn:
        ax.set_ylabel("lr")
        _maybe_log_y(ax, lr_values)
        styles: list[tuple[Any, str]] = [("-", "lr (lr-*, cdat/lr, curvature/lr)")]
        if has_edge_lr:
            styles.append(("--", f"edge lr  {_EDGE_LR}"))
        _style_legend(ax, styles)
    else:
        _no_data(ax, "lr-*, cdat/lr, curvature/lr")

    # (f) training loss
    ax = axes[5]
    ax.set_title("(f) training loss")
    drawn = False
    loss_values: list[float] = []
    used: set[str] = set()
    for run, tags in data.items():
        loss_tag = _loss_tag(tags)
        if loss_tag is not None:
            x, y = _xy(tags[loss_tag])
            ax.plot(x, y, color=colours[run], linewidth=1.4)
            loss_values += y
            used.add(loss_tag)
            drawn = True
    if drawn:
        ax.set_ylabel(", ".join(sorted(used)))
        _maybe_log_y(ax, loss_values, ratio=20.0)
    else:
        _no_data(ax, ", ".join(_LOSS_TAGS[:4]) + ", ...")

    for ax in axes:
        ax.grid(True, alpha=0.3)
    for ax in axes[4:]:
        ax.set_xlabel("step")
    if run_handles:
        fig.legend(
            handles=run_handles,
            loc="outside lower center",
            ncol=min(len(run_handles), 4),
            title="runs (one colour per run)",
            fontsize="medium",
        )
    if title:
        fig.suptitle(title, fontsize="x-large")
    fig.savefig(path, dpi=100)


def output_problem(out: str | os.PathLike[str]) -> str | None:
    """Why ``out`` cannot be created or written as an output folder, or ``None`` if it can.

    Nothing is created: the nearest existing ancestor must be a writable folder (and ``out`` itself, if it exists).

    Example::

        >>> output_problem(__file__ + "/report")  # doctest: +ELLIPSIS
        "'.../report.py' is a file, not a folder"
    """
    path = Path(out).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"no existing folder above {str(path)!r}"
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(probe)!r} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"permission denied: {str(probe)!r} is not writable"
    return None


def _curvature_runs(data: Scalars) -> list[str]:
    return [run for run, run_tags in data.items() if any(tag_names.is_curvature_tag(t) for t in run_tags)]


def make_report(
    logdirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> list[Path]:
    """Draw the curvature report PNG and write all scalars as CSV.

    Args:
        logdirs: Log directories to read (see :func:`read_scalars`). With more than one, run names are
            prefixed by the logdir's folder name so runs stay distinguishable; event files lying
            directly in a logdir form a run named after that folder.
        out: Output folder (created if needed). If it ends in ``.png``, it is the PNG path instead and
            the CSV is written next to it with the same stem.
        title: Optional figure title.

    Returns:
        ``[png_path, csv_path]``.

    Raises:
        ValueError: If ``logdirs`` is empty, no event files are found below them, or none of their runs holds a
            curvature tag (``curvature/*``, ``grad_cov/*``, ``cdat/*``).
        FileNotFoundError: If a logdir does not exist.
        ImportError: If matplotlib is not installed (``pip install lightning-curvature[demo]``).
        OSError: If ``out`` cannot be written.

    Example::

        >>> make_report(["runs/sgd", "runs/cdat"], out="report")  # doctest: +SKIP
        [PosixPath('report/curvature_report.png'), PosixPath('report/curvature_scalars.csv')]
    """
    if isinstance(logdirs, (str, os.PathLike)):
        logdirs = [logdirs]
    if len(logdirs) == 0:
        raise ValueError("`logdirs` is empty: pass at least one log directory.")
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "The curvature report needs matplotlib: `pip install lightning-curvature[demo]`"
            " (or `pip install matplotlib`)."
        ) from err
    data = _read_many(logdirs)
    where = [str(d) for d in logdirs]
    if not data:
        raise ValueError(f"No TensorBoard event files (*tfevents*) found below {where}.")
    with_curvature = _curvature_runs(data)
    if not with_curvature:
        found = sorted({t for run_tags in data.values() for t in run_tags})
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "no scalars"
        raise ValueError(
            f"No curvature tags (curvature/*, grad_cov/*, cdat/*) in the event files below {where} "
            f"({len(data)} run(s); tags found: {shown}). Were the curvature monitors attached to a Trainer with "
            "a logger?"
        )
    without = [run for run in data if run not in with_curvature]
    if without:
        print(f"(no curvature tags in run(s) {', '.join(without)}: drawn without curvature panels)", file=sys.stderr)

    out_path = Path(out)
    if out_path.suffix.lower() == ".png":
        png_path = out_path
        csv_path = out_path.with_suffix(".csv")
    else:
        png_path = out_path / PNG_NAME
        csv_path = out_path / CSV_NAME
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(data, csv_path)
    _draw(data, png_path, title)
    return [png_path, csv_path]


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command's arguments to ``parser``.

    Args:
        parser: The parser (or sub-parser) to extend.

    Returns:
        The same parser.

    Example::

        >>> p = add_report_arguments(argparse.ArgumentParser(prog="lightning-curvature report"))
        >>> ns = p.parse_args(["logs/a", "logs/b", "--out", "rep"])
        >>> ns.logdirs, ns.out
        (['logs/a', 'logs/b'], 'rep')
    """
    parser.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="TensorBoard log directories to read.")
    parser.add_argument(
        "--out",
        default="curvature_report",
        metavar="DIR",
        help="Output folder for curvature_report.png and curvature_scalars.csv (default: %(default)s).",
    )
    parser.add_argument("--title", default=None, help="Optional figure title.")
    return parser


def report_main(args: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Entry point of ``lightning-curvature report LOGDIR [LOGDIR ...] --out DIR``.

    Args:
        args: Command-line arguments after ``report`` (``None`` reads ``sys.argv[1:]``), or a namespace
            already parsed with :func:`add_report_arguments`.

    Returns:
        The exit code: 0 on success, 1 if no logs (or no curvature tags) were found or a logdir is missing, 2 if
        ``--out`` cannot be written or matplotlib is not installed. The written paths are printed to stdout, each
        error as one ``error:`` line on stderr.

    Example::

        >>> report_main(["/nonexistent/logdir"])  # doctest: +SKIP
        1
    """
    if not isinstance(args, argparse.Namespace):
        parser = add_report_arguments(argparse.ArgumentParser(prog="lightning-curvature report"))
        args = parser.parse_args(None if args is None else list(args))
    out = Path(args.out)
    problem = output_problem(out.parent if out.suffix.lower() == ".png" else out)
    if problem is not None:
        print(f"lightning-curvature report: error: cannot write to --out {str(args.out)!r}: {problem}", file=sys.stderr)
        return 2
    try:
        paths = make_report(args.logdirs, args.out, title=getattr(args, "title", None))
    except (FileNotFoundError, ValueError) as err:
        print(f"lightning-curvature report: error: {err}", file=sys.stderr)
        return 1
    except ImportError as err:
        print(f"lightning-curvature report: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output could not be written after all (disk full, a race)
        print(f"lightning-curvature report: error: cannot write to --out {str(args.out)!r}: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
