"""``lightning-curvature demo``: train a small network on digits and watch its curvature.

A tanh MLP is trained on scikit-learn's digits (no download) with Lightning, with both monitors
(:class:`~lightning_curvature.HessianEigenvalueMonitor`, :class:`~lightning_curvature.GradientCovarianceMonitor`)
and a curvature-aware scheduler (:class:`~lightning_curvature.SharpnessAwareLR`, or
:class:`~lightning_curvature.CurvatureDynamicsAwareLR` fed by
:class:`~lightning_curvature.DirectionalCurvatureMonitor`, or a constant learning rate). It writes TensorBoard logs
(with ``LearningRateMonitor``) and the PNG/CSV report of :func:`~lightning_curvature.report.make_report`, and
prints a summary table and the ``tensorboard --logdir`` command.

The LightningModule and DataModule here are also what ``examples/lightning_cli.py`` configures from YAML. The
module is self-contained (the digits data and the MLP are defined here); its command line lives in
:mod:`lightning_curvature.cli`, which imports this module, never the other way round.

Example::

    >>> model = DemoModule(optimizer="adam")  # what `lightning-curvature demo --optimizer adam` trains
    >>> model.lr, [type(m).__name__ for m in model.net]
    (0.01, ['Linear', 'Tanh', 'Linear', 'Tanh', 'Linear'])
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

__all__ = [
    "DEFAULT_LR",
    "DemoModule",
    "DemoResult",
    "DigitsData",
    "DigitsDataModule",
    "DigitsModel",
    "demo_main",
    "format_summary",
    "load_digits_data",
    "run_demo",
]

LossName = Literal["mse", "ce"]
OptimizerName = Literal["sgd", "momentum", "adam"]
SchedulerName = Literal["sharpness", "cdat", "constant"]
#: ``(x, y_onehot, labels)``
Batch = tuple[Tensor, Tensor, Tensor]

#: Default (base) learning rate of the demo per optimizer: large enough that the curvature-aware schedulers have
#: work to do.
DEFAULT_LR: dict[str, float] = {"sgd": 1.0, "momentum": 0.2, "adam": 0.01}

_THRESHOLD_TEXT = {"sgd": "2/lr", "momentum": "(2+2β)/lr", "adam": "(2+2β₁)/((1−β₁)lr)"}


# --- digits data and the MLP (no download: scikit-learn ships the 1797 images) -------------------------------------
@dataclass
class DigitsData:
    """Standardised 8×8 digits features with one-hot and integer targets, split into train and test.

    Attributes:
        x_train: ``(N, 64)`` float features.
        y_train: ``(N, 10)`` one-hot targets.
        labels_train: ``(N,)`` integer classes.
        x_test: held-out features (standardised with the training statistics).
        y_test: held-out one-hot targets.
        labels_test: held-out integer classes.
    """

    x_train: Tensor
    y_train: Tensor
    labels_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labels_test: Tensor

    def train_batch(self) -> Batch:
        """The whole training split as one batch ``(x, y_onehot, labels)``."""
        return self.x_train, self.y_train, self.labels_train

    def test_batch(self) -> Batch:
        """The whole test split as one batch ``(x, y_onehot, labels)``."""
        return self.x_test, self.y_test, self.labels_test

    def train_dataset(self) -> TensorDataset:
        """The training split as a ``TensorDataset`` of ``(x, y_onehot, labels)``."""
        return TensorDataset(self.x_train, self.y_train, self.labels_train)

    def test_dataset(self) -> TensorDataset:
        """The test split as a ``TensorDataset`` of ``(x, y_onehot, labels)``."""
        return TensorDataset(self.x_test, self.y_test, self.labels_test)


def load_digits_data(num_train: int = 1297, num_test: int = 500, *, seed: int = 0) -> DigitsData:
    """scikit-learn's digits, shuffled with ``seed``, split, standardised with the training statistics.

    Args:
        num_train: training examples.
        num_test: held-out examples (``num_train + num_test <= 1797``).
        seed: seed of the shuffle.

    Returns:
        :class:`DigitsData` (float32 features and one-hot targets).

    Raises:
        ValueError: if the splits are empty or exceed the 1797 examples.
        ImportError: without scikit-learn (``pip install lightning-curvature[demo]``).

    Example::

        >>> data = load_digits_data(100, 50)
        >>> data.x_train.shape, data.y_train.shape, data.labels_test.shape
        (torch.Size([100, 64]), torch.Size([100, 10]), torch.Size([50]))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError("The digits data needs scikit-learn: `pip install lightning-curvature[demo]`.") from err
    raw = load_digits()
    x_all = torch.as_tensor(raw.data, dtype=torch.float64)
    labels_all = torch.as_tensor(raw.target, dtype=torch.long)
    n = x_all.shape[0]
    if num_train < 1 or num_test < 0 or num_train + num_test > n:
        raise ValueError(f"Expected 1 <= num_train and num_train + num_test <= {n}, got {num_train} and {num_test}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = perm[:num_train], perm[num_train : num_train + num_test]
    mean = x_all[train_idx].mean(0)
    std = x_all[train_idx].std(0).clamp_min(1e-3)  # some corner pixels are constant
    x_all = (x_all - mean) / std
    onehot = nn.functional.one_hot(labels_all, 10).to(torch.float64)
    f32 = torch.float32
    return DigitsData(
        x_train=x_all[train_idx].to(f32),
        y_train=onehot[train_idx].to(f32),
        labels_train=labels_all[train_idx],
        x_test=x_all[test_idx].to(f32),
        y_test=onehot[test_idx].to(f32),
        labels_test=labels_all[test_idx],
    )


def _tanh_mlp(depth: int, width: int, seed: int) -> nn.Sequential:
    """64 → ``width`` (× ``depth``, tanh) → 10 with PyTorch's default initialisation drawn from ``seed``.

    The global RNG is left as it was.
    """
    if depth < 1 or width < 1:
        raise ValueError(f"`depth` and `width` must be >= 1, got depth={depth}, width={width}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        d_in = 64
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.Tanh()]
            d_in = width
        layers.append(nn.Linear(d_in, 10))
        return nn.Sequential(*layers)


def mse_loss(model: nn.Module, batch: Batch) -> Tensor:
    r"""Half squared error on one-hot targets, summed over classes and averaged over examples.

    .. math:: L = \frac{1}{2N} \sum_i \|f(x_i) - y_i\|^2

    (the loss of Cohen et al. 2021's MSE experiments, arXiv 2103.00065).
    """
    x, y, _ = batch
    return 0.5 * (model(x) - y).pow(2).sum(1).mean()


def cross_entropy_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of the logits against the integer labels."""
    x, _, labels = batch
    return nn.functional.cross_entropy(model(x), labels)


@torch.no_grad()
def accuracy(model: nn.Module, batch: Batch) -> float:
    """Share of examples whose arg-max output is the label."""
    x, _, labels = batch
    return float((model(x).argmax(1) == labels).float().mean())


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits as standardised ``(x, y_onehot, label)`` batches; nothing is downloaded.

    Args:
        batch_size: training batch size (``0``: full batch).
        num_train: training examples (the rest of the 1797, up to ``num_val``, are held out).
        num_val: validation examples.
        seed: seed of the split and of the shuffling.
        num_steps: if given, one training "epoch" is ``num_steps`` batches (consecutive shuffles of the data), so
            that a single progress bar covers a run of ``max_steps=num_steps``.

    Raises:
        ValueError: for a negative ``batch_size`` or a ``num_steps`` below 1.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_train: int = 1297,
        num_val: int = 500,
        seed: int = 0,
        num_steps: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 0:
            raise ValueError(f"`batch_size` must be >= 0 (0: full batch), got {batch_size}.")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"`num_steps` must be >= 1, got {num_steps}.")
        self.batch_size = batch_size
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.num_steps = num_steps
        self.data = load_digits_data(num_train, num_val, seed=seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled mini-batches (or the full batch) drawn with their own seeded generator."""
        dataset = self.data.train_dataset()
        n = len(dataset)
        size = self.batch_size or n
        gen = torch.Generator().manual_seed(self.seed)
        if size >= n:
            return DataLoader(dataset, batch_size=n)
        num_samples = size * self.num_steps if self.num_steps is not None else n
        sampler = RandomSampler(dataset, num_samples=num_samples, generator=gen)
        return DataLoader(dataset, batch_size=size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """The held-out split as one batch."""
        return DataLoader(self.data.test_dataset(), batch_size=max(1, int(self.data.x_test.shape[0])))


class DigitsModel(pl.LightningModule):
    """A tanh MLP classifier for digits, without optimizer configuration (LightningCLI supplies it).

    Defines ``curvature_loss(batch)``, the hook the curvature callbacks use (a pure function of the batch, so
    ``training_step`` is never re-run for a measurement).

    Args:
        depth: hidden layers.
        width: hidden units per layer.
        loss: ``"mse"`` (half squared error on one-hot targets, as in the edge-of-stability papers) or ``"ce"``.
        seed: seed of the initialisation.
    """

    def __init__(self, depth: int = 2, width: int = 64, loss: LossName = "mse", seed: int = 0) -> None:
        super().__init__()
        if loss not in ("mse", "ce"):
            raise ValueError(f"`loss` must be 'mse' or 'ce', got {loss!r}.")
        self.save_hyperparameters()
        self.loss_name = loss
        self.net = _tanh_mlp(depth=depth, width=width, seed=seed)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (or regression outputs for MSE) of ``x``."""
        return self.net(x)

    def curvature_loss(self, batch: Batch) -> Tensor:
        """Scalar mean loss of ``batch``: what is trained, measured by the curvature callbacks."""
        fn = mse_loss if self.loss_name == "mse" else cross_entropy_loss
        return fn(self, batch)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Loss of the batch, logged as ``train_loss``."""
        loss = self.curvature_loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Held-out loss and accuracy."""
        self.log("val_loss", self.curvature_loss(batch), prog_bar=False)
        self.log("val_acc", accuracy(self, batch), prog_bar=True)


class DemoModule(DigitsModel):
    """:class:`DigitsModel` with the demo's optimizer and curvature-aware scheduler.

    Args:
        optimizer: ``"sgd"``, ``"momentum"`` (heavy ball, β = 0.9) or ``"adam"``.
        scheduler: ``"sharpness"`` (:class:`~lightning_curvature.SharpnessAwareLR`), ``"cdat"``
            (:class:`~lightning_curvature.CurvatureDynamicsAwareLR`, σ = 2) or ``"constant"`` (none).
        lr: base learning rate (``None``: :data:`DEFAULT_LR` of the optimizer).
        safety: fraction of the largest stable learning rate allowed by ``SharpnessAwareLR``.
        depth: hidden layers.
        width: hidden units per layer.
        loss: ``"mse"`` or ``"ce"``.
        seed: seed of the initialisation.
    """

    def __init__(
        self,
        optimizer: OptimizerName = "sgd",
        scheduler: SchedulerName = "sharpness",
        lr: float | None = None,
        safety: float = 0.9,
        depth: int = 2,
        width: int = 64,
        loss: LossName = "mse",
        seed: int = 0,
    ) -> None:
        super().__init__(depth=depth, width=width, loss=loss, seed=seed)
        if optimizer not in DEFAULT_LR:
            raise ValueError(f"`optimizer` must be one of {sorted(DEFAULT_LR)}, got {optimizer!r}.")
        if scheduler not in ("sharpness", "cdat", "constant"):
            raise ValueError(f"`scheduler` must be 'sharpness', 'cdat' or 'constant', got {scheduler!r}.")
        self.optimizer_name = optimizer
        self.scheduler_name = scheduler
        self.lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"`lr` must be positive and finite, got {lr!r}.")
        self.safety = safety

    def configure_optimizers(self) -> Any:
        """The optimizer, with the curvature-aware scheduler stepped every optimizer step."""
        from lightning_curvature import CurvatureDynamicsAwareLR, SharpnessAwareLR

        opt: torch.optim.Optimizer
        if self.optimizer_name == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            momentum = 0.9 if self.optimizer_name == "momentum" else 0.0
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=momentum)
        if self.scheduler_name == "constant":
            return opt
        sched: torch.optim.lr_scheduler.LRScheduler
        if self.scheduler_name == "sharpness":
            sched = SharpnessAwareLR(opt, safety=self.safety)
        else:
            sched = CurvatureDynamicsAwareLR(opt, sigma=2.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@dataclass
class DemoResult:
    """What the demo measured; printed by :func:`format_summary`.

    Attributes:
        log_dir: the run's TensorBoard folder.
        out: the ``--out`` folder (give it to ``tensorboard --logdir``).
        report: ``[png, csv]`` written by the report (empty if matplotlib is missing).
        metrics: summary values by name.
        settings: the demo's options.
    """

    log_dir: Path
    out: Path
    report: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def _accelerator(device: str) -> str:
    """Lightning accelerator for ``--device``.

    Raises:
        ValueError: for ``cuda`` without an available GPU, or an unknown device.
    """
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu or auto.")
        return "gpu"
    if device == "cpu":
        return "cpu"
    raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}.")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up banner and the warnings that do not apply to in-memory digits."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # tiny in-memory tensors: worker processes would only slow the loaders down
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        logger.setLevel(level)


def run_demo(args: argparse.Namespace) -> DemoResult:
    """Train, log, report; return what was measured (see :func:`format_summary`).

    Args:
        args: options of ``lightning-curvature demo`` (:func:`lightning_curvature.cli.add_demo_arguments`).

    Returns:
        :class:`DemoResult`.

    Raises:
        ValueError: for bad options (steps, every, batch size, device, lr, an ``--out`` that cannot be written).
    """
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_curvature import DirectionalCurvatureMonitor, GradientCovarianceMonitor, HessianEigenvalueMonitor

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}.")
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}.")
    accelerator = _accelerator(args.device)
    out = Path(args.out)
    from lightning_curvature.report import output_problem

    problem = output_problem(out)
    if problem is not None:
        raise ValueError(f"cannot write to --out {str(args.out)!r}: {problem}")
    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(batch_size=args.batch_size, seed=args.seed, num_steps=args.steps)
    model = DemoModule(optimizer=args.optimizer, scheduler=args.scheduler, lr=args.lr, loss=args.loss, seed=args.seed)
    hessian = HessianEigenvalueMonitor(every_n_steps=args.every, k=5, num_examples=256, log_histogram=True)
    covariance = GradientCovarianceMonitor(every_n_steps=max(1, round(2.5 * args.every)), k=10, num_examples=128)
    callbacks: list[pl.Callback] = [hessian, covariance, LearningRateMonitor(logging_interval="step")]
    if args.scheduler == "cdat":
        callbacks.append(DirectionalCurvatureMonitor())
    logger = TensorBoardLogger(save_dir=str(out), name="", default_hp_metric=False)
    with _quiet_lightning():
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=args.steps,
            max_epochs=-1,
            logger=logger,
            callbacks=callbacks,
            log_every_n_steps=min(10, args.every),
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=not args.no_progress_bar,
        )
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0
    log_dir = Path(logger.log_dir)
    logger.finalize("success")

    model.eval()
    device = next(model.parameters()).device
    train_batch = tuple(t.to(device) for t in data.data.train_batch())
    test_batch = tuple(t.to(device) for t in data.data.test_batch())
    with torch.no_grad():
        final_loss = float(model.curvature_loss(train_batch))  # type: ignore[arg-type]
    metrics: dict[str, float] = {
        "final_loss": final_loss,
        "train_accuracy": accuracy(model, train_batch),  # type: ignore[arg-type]
        "test_accuracy": accuracy(model, test_batch),  # type: ignore[arg-type]
        "final_lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
        "sharpness": float(hessian.last_metrics.get("curvature/sharpness", math.nan)),
        "threshold": float(hessian.last_metrics.get("curvature/stability_threshold", math.nan)),
        "edge_ratio": float(hessian.last_metrics.get("curvature/edge_ratio", math.nan)),
        "grad_cov_condition_number": float(covariance.last_metrics.get("grad_cov/condition_number", math.nan)),
        "grad_cov_eig_1": float(covariance.last_metrics.get("grad_cov/eig_1", math.nan)),
        "hessian_measurements": float(hessian.num_measurements),
        "covariance_measurements": float(covariance.num_measurements),
        "curvature_time_s": hessian.measure_time_s + covariance.measure_time_s,
        "wall_time_s": wall,
        "steps": float(trainer.global_step),
    }
    if not math.isfinite(metrics["edge_ratio"]) and metrics["threshold"] > 0:
        metrics["edge_ratio"] = metrics["sharpness"] / metrics["threshold"]
    report: list[Path] = []
    try:
        from lightning_curvature.report import make_report

        title = f"lightning-curvature demo: {args.optimizer} + {args.scheduler}, digits, {trainer.global_step} steps"
        report = make_report([log_dir], log_dir, title=title)
    except ImportError as err:
        print(f"(no report: {err})", file=sys.stderr)
    settings = {
        "device": accelerator,
        "optimizer": args.optimizer,
        "scheduler": args.scheduler,
        "lr": model.lr,
        "loss": args.loss,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    return DemoResult(log_dir=log_dir, out=out, report=report, metrics=metrics, settings=settings)


def format_summary(result: DemoResult) -> str:
    """The summary table and the ``tensorboard --logdir`` command.

    Args:
        result: what :func:`run_demo` returned.

    Returns:
        Multi-line text.
    """
    m, s = result.metrics, result.settings
    adaptive = s["optimizer"] == "adam"
    sharp_name = "final sharpness (preconditioned)" if adaptive else "final sharpness λ_max"
    loss = (
        f"{m['final_loss']:.4g}  ({s['loss']}, train acc {m['train_accuracy']:.3f}, test acc {m['test_accuracy']:.3f})"
    )
    cond = f"{m['grad_cov_condition_number']:.4g}  (λ1/λ10, λ1 = {m['grad_cov_eig_1']:.3g})"
    rows = [
        ("final training loss", loss),
        (sharp_name, f"{m['sharpness']:.4g}"),
        (f"stability threshold {_THRESHOLD_TEXT[s['optimizer']]}", f"{m['threshold']:.4g}"),
        ("edge ratio sharpness/threshold", f"{m['edge_ratio']:.3f}  (1 = edge of stability)"),
        ("final learning rate", f"{m['final_lr']:.4g}  (base {s['lr']:g})"),
        ("grad-cov condition number", cond),
        ("measurements (Hessian / grad-cov)", f"{m['hessian_measurements']:.0f} / {m['covariance_measurements']:.0f}"),
        ("wall time", f"{m['wall_time_s']:.1f} s  (curvature {m['curvature_time_s']:.1f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    head = (
        f"lightning-curvature demo: {s['optimizer']} + {s['scheduler']} (base lr {s['lr']:g}), "
        f"{int(m['steps'])} steps on {s['device']}"
    )
    lines = [head, "-" * len(head)]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"TensorBoard logs: {result.log_dir}")
    if result.report:
        lines.append("Report: " + ", ".join(str(p) for p in result.report))
    lines.append("Inspect the run with:")
    lines.append(f"  tensorboard --logdir {shlex.quote(os.fspath(result.out))}")
    return "\n".join(lines)


def demo_main(args: argparse.Namespace) -> int:
    """Run the demo with options parsed by ``lightning-curvature demo`` and print the summary.

    (The command line is :func:`lightning_curvature.cli.main`: ``main(["demo", "--steps", "50"])``.)

    Args:
        args: parsed options (:func:`lightning_curvature.cli.add_demo_arguments`).

    Returns:
        Exit code: 0 on success, 2 for bad options or an output folder that cannot be written (one ``error:``
        line on stderr).
    """
    try:
        result = run_demo(args)
    except (ValueError, OSError) as err:
        print(f"lightning-curvature demo: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0
