"""LightningCLI with the curvature callbacks and a curvature-aware scheduler configured from YAML.

``examples/lightning_cli.yaml`` adds ``HessianEigenvalueMonitor``, ``GradientCovarianceMonitor`` and
``LearningRateMonitor`` to ``trainer.callbacks`` and sets ``lr_scheduler`` to ``SharpnessAwareLR``; the model
(:class:`~lightning_curvature.demo.DigitsModel`, a tanh MLP on scikit-learn's digits) has no
``configure_optimizers``: the CLI builds the optimizer and the scheduler, stepped every optimizer step.

Run the CLI as usual::

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml [--trainer.max_steps=...]

or, as the other examples, ``python examples/lightning_cli.py [--fast] [--out DIR] [--logs LOGDIR]``: it then
runs ``fit`` with that YAML, logs into ``LOGDIR`` (default: the YAML's ``lightning_cli_logs``) and draws
``DIR/lightning_cli.png`` (and ``.csv``) with :func:`lightning_curvature.report.make_report`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeUnion
from torch.optim import Optimizer

from lightning_curvature import HessianEigenvalueMonitor
from lightning_curvature.demo import DigitsDataModule, DigitsModel

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "lightning_cli.yaml"
NAME = "lightning_cli"


class CurvatureCLI(LightningCLI):
    """LightningCLI whose scheduler is stepped every optimizer step (LightningCLI's default is every epoch)."""

    @staticmethod
    def configure_optimizers(
        lightning_module: LightningModule, optimizer: Optimizer, lr_scheduler: LRSchedulerTypeUnion | None = None
    ) -> Any:
        """The optimizer and, if configured, the scheduler with ``interval="step"``."""
        if lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}


def cli(args: list[str] | None = None) -> CurvatureCLI:
    """Build and run the CLI on ``args`` (``None``: ``sys.argv[1:]``)."""
    return CurvatureCLI(DigitsModel, DigitsDataModule, args=args)


def main(argv: list[str] | None = None) -> int:
    """``--fast``/``--out`` mode (fit with the YAML, then draw the report), or a plain LightningCLI call."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("fit", "validate", "test", "predict"):
        cli(argv)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="30 steps instead of the YAML's 600")
    parser.add_argument(
        "--out", default=str(HERE / "figures"), metavar="DIR", help="output folder (default: %(default)s)"
    )
    parser.add_argument("--logs", default=None, metavar="LOGDIR", help="TensorBoard folder (default: the YAML's)")
    ns, rest = parser.parse_known_args(argv)
    out = Path(ns.out)
    args = ["fit", "--config", str(CONFIG)]
    if ns.logs is not None:
        args.append(f"--trainer.logger.init_args.save_dir={ns.logs}")
    if ns.fast:
        args += ["--trainer.max_steps=30", "--trainer.enable_progress_bar=false"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter.*")
        run = cli(args + rest)
    from lightning_curvature.report import make_report

    log_dir = run.trainer.logger.log_dir if run.trainer.logger is not None else None
    if log_dir is None:
        raise RuntimeError("The configuration has no logger; the report needs TensorBoard event files.")
    png, csv = make_report(
        [log_dir], out / f"{NAME}.png", title="LightningCLI + lightning_cli.yaml: SGD + SharpnessAwareLR"
    )
    hessian = next(c for c in run.trainer.callbacks if isinstance(c, HessianEigenvalueMonitor))  # type: ignore[attr-defined]
    sharpness = hessian.last_metrics.get("curvature/sharpness", float("nan"))
    threshold = hessian.last_metrics.get("curvature/stability_threshold", float("nan"))
    lr = run.trainer.optimizers[0].param_groups[0]["lr"]
    print(
        f"LightningCLI run of {run.trainer.global_step} steps configured by {CONFIG.name}: final sharpness "
        f"{sharpness:.3g} vs stability threshold {threshold:.3g}, {hessian.num_measurements} Hessian measurements, "
        f"final lr {lr:.3g} (SharpnessAwareLR, base 1.0). Logs in {log_dir}; wrote {png} and {csv}."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
