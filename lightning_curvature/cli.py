"""The ``lightning-curvature`` command: ``demo`` and ``report`` sub-commands.

A thin argparse layer: ``demo`` is :mod:`lightning_curvature.demo`, ``report`` is
:func:`lightning_curvature.report.report_main`. Imports go one way (this module imports them, they never import it),
and the demo module, which imports Lightning, is imported only to run the demo (so ``--help`` stays fast).

Example::

    >>> parser = build_parser()
    >>> parser.parse_args(["report", "logs", "--out", "rep"]).logdirs
    ['logs']
    >>> parser.parse_args(["demo", "--steps", "20"]).steps
    20
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lightning_curvature import __version__
from lightning_curvature.report import add_report_arguments, output_problem, report_main

__all__ = ["add_demo_arguments", "build_parser", "main"]

#: The demo's default learning rates as shown in ``--help`` (the values are ``lightning_curvature.demo.DEFAULT_LR``,
#: not imported here so that ``--help`` does not import Lightning; a test keeps the two equal).
_DEFAULT_LR_HELP = "sgd 1, momentum 0.2, adam 0.01"


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_LR":  # it used to live here; the demo owns it now
        from lightning_curvature.demo import DEFAULT_LR

        return DEFAULT_LR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DESCRIPTION = (
    "See and control loss curvature while a network trains. "
    "Start with `lightning-curvature demo`, then open TensorBoard on the folder it prints."
)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command's options to ``parser``.

    Kept here, not in :mod:`lightning_curvature.demo`, so that ``--help`` does not import Lightning.

    Example::

        >>> add_demo_arguments(argparse.ArgumentParser()).parse_args(["--lr", "0.5"]).lr
        0.5

    Args:
        parser: the parser (or sub-parser) to extend.

    Returns:
        The same parser.
    """
    add = parser.add_argument
    add(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train: auto = cuda if available, else cpu (default: %(default)s)",
    )
    add("--steps", type=int, default=1000, help="optimizer steps (default: %(default)s)")
    add(
        "--out",
        default="curvature_demo",
        metavar="DIR",
        help="folder for TensorBoard logs and the report (default: %(default)s)",
    )
    add(
        "--optimizer",
        choices=("sgd", "momentum", "adam"),
        default="sgd",
        help="base optimizer; momentum is heavy-ball SGD, β=0.9 (default: %(default)s)",
    )
    add(
        "--scheduler",
        choices=("sharpness", "cdat", "constant"),
        default="sharpness",
        help="SharpnessAwareLR, CurvatureDynamicsAwareLR (CDAT, σ=2) or a constant lr (default: %(default)s)",
    )
    add(
        "--lr",
        type=float,
        default=None,
        help=f"base learning rate (default: {_DEFAULT_LR_HELP})",
    )
    add("--seed", type=int, default=0, help="seed of data split, initialisation, shuffling (default: %(default)s)")
    add("--batch-size", type=int, default=128, help="training batch size, 0 = full batch (default: %(default)s)")
    add(
        "--loss",
        choices=("mse", "ce"),
        default="mse",
        help="MSE on one-hot targets (as in the edge-of-stability papers) or cross-entropy (default: %(default)s)",
    )
    add(
        "--every",
        type=int,
        default=10,
        metavar="N",
        help="Hessian measurement every N steps, gradient covariance every 2.5 N (default: %(default)s)",
    )
    add("--no-progress-bar", action="store_true", help="hide the progress bar")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-curvature`` with its ``demo`` and ``report`` sub-commands."""
    parser = argparse.ArgumentParser(prog="lightning-curvature", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small network on digits with the monitors and a curvature-aware scheduler",
        description="Train a tanh MLP on scikit-learn's digits (no download) with HessianEigenvalueMonitor, "
        "GradientCovarianceMonitor and a curvature-aware scheduler; write TensorBoard logs and a PNG report; "
        "print a summary and the `tensorboard --logdir` command.",
    )
    add_demo_arguments(demo)
    report = sub.add_parser(
        "report",
        help="draw the curvature report (PNG + CSV) from TensorBoard logs",
        description="Read the TensorBoard event files below LOGDIR(s) and draw sharpness vs threshold, edge ratio, "
        "top-k eigenvalues, gradient-covariance conditioning, learning rate and loss; several runs overlaid.",
    )
    add_report_arguments(report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-curvature`` with ``argv`` (``None``: ``sys.argv[1:]``).

    Args:
        argv: command-line arguments without the program name.

    Returns:
        The exit code (also raised as ``SystemExit`` by argparse for ``--help`` and usage errors): 2 for bad
        options, including an ``--out`` that cannot be written (one ``error:`` line on stderr).
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command == "demo":
        problem = output_problem(args.out)
        if problem is not None:
            print(f"lightning-curvature demo: error: cannot write to --out {args.out!r}: {problem}", file=sys.stderr)
            return 2
        from lightning_curvature.demo import demo_main

        return demo_main(args)
    if args.command == "report":
        return report_main(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
