"""What the transformer benchmark's parts share: the corpus windows, the Lightning GPT, memory probes, a recorder.

The model (:class:`bench_scale.GPT`: pre-LayerNorm, causal ``F.scaled_dot_product_attention``, GELU MLP, tied
embedding) and the corpus (the first 400 KB of the Python standard library's ``*.py`` sources, bytes as tokens) are
those of ``bench_scale.py``; :func:`text_windows` extends its ``text_batch`` to many non-overlapping windows (a
training set for a Lightning run).
"""

from __future__ import annotations

import ctypes
import gc
import os
import sysconfig
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from bench_scale import GPT, gpt_loss, peak_bytes, reset_peak, rss_bytes
from torch import Tensor, nn

from lightning_curvature import HessianEigenvalueMonitor, hessian_eigenvalues
from lightning_curvature.callbacks._common import _MeasuringClock, measured_parameters, step_axis
from lightning_curvature.callbacks._compiled import lightning_eager
from lightning_curvature.callbacks.hessian_monitor import ERROR_BOUND, NUM_HVP
from lightning_curvature.core.preconditioner import preconditioner_parts
from lightning_curvature.tensorboard import SHARPNESS

#: (d_model, layers, training batch) per size; context 64 everywhere
SIZES = {"3M": (256, 4, 16), "25M": (512, 8, 8), "85M": (768, 12, 4)}
CONTEXT = 64
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
LR = 1e-3


def trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS (``malloc_trim``), so that the resident set read
    next is what is in use: glibc raises its mmap threshold after the first large free, so later parameter-sized
    tensors come from the heap, whose freed pages would otherwise stay resident and be reused unseen by ``VmHWM``."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def corpus() -> Tensor:
    """The bytes of ``bench_scale.text_batch``'s corpus (first 400 KB of 40 stdlib sources) as a long tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(root.glob("*.py"))[:40])
    return torch.tensor(list(data[:400_000]), dtype=torch.long)


def text_windows(num: int, context: int = CONTEXT, start: int = 0) -> tuple[Tensor, Tensor]:
    """``num`` non-overlapping windows of ``context`` bytes from ``start`` on, and their next bytes."""
    tokens = corpus()
    stride = context + 1
    if start + num * stride > tokens.numel():
        raise ValueError(f"{num} windows of {context} from {start} exceed the corpus ({tokens.numel()} bytes).")
    w = tokens[start : start + num * stride].view(num, stride)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def adamw(params: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def adamw_step(model: nn.Module, net: nn.Module, opt: torch.optim.Optimizer, step: int, batch: int) -> None:
    """One optimizer step of ``net`` (``model`` or its compiled module) on the ``step``-th batch of ``batch`` corpus
    windows; the gradients are freed after it."""
    opt.zero_grad(set_to_none=True)
    gpt_loss(net, text_windows(batch, start=step * batch * (CONTEXT + 1))).backward()
    opt.step()
    for p in model.parameters():
        p.grad = None


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class GPTModule(pl.LightningModule):
    """The GPT trained with AdamW (betas 0.9/0.95, weight decay 0.1) on byte windows."""

    def __init__(self, d: int, layers: int, context: int = CONTEXT) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = GPT(d, layers, context=context)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return curvature_loss(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self.parameters())


def curvature_loss(module: nn.Module, batch: Any) -> Tensor:
    """The training loss, through the module's own ``forward`` (compiled if Lightning compiled it)."""
    x, y = batch
    return torch.nn.functional.cross_entropy(module(x).reshape(-1, 256), y.reshape(-1))


class MemoryProbedMonitor(HessianEigenvalueMonitor):
    """``HessianEigenvalueMonitor`` that records, per measurement, its wall time and peak resident set (``VmHWM``).

    The peak is reset through ``/proc/self/clear_refs`` right before the measurement; ``peak - rss_before`` is what
    the measurement added (graph, vectors, parameter copies, allocator slack).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, current_batch: Any, step: int, prog_bar: bool
    ) -> dict[str, float]:
        trim()
        base = rss_bytes()
        reset_peak()
        t0 = time.perf_counter()
        metrics = super().measure(trainer, pl_module, current_batch, step, prog_bar)
        seconds = time.perf_counter() - t0
        self.records.append(
            {
                "step": step,
                "seconds": seconds,
                "added_bytes": peak_bytes() - base,
                "num_hvp": metrics.get(NUM_HVP),
                "sharpness": metrics.get(SHARPNESS),
                "error_bound": metrics.get(ERROR_BOUND),
                "method": self.last_method,
            }
        )
        return metrics


class Recorder(pl.Callback):
    """Placed after a monitor: records each of its measurements; optionally a cold certified reference at some steps.

    The reference is ``hessian_eigenvalues(k=1, tol=ref_tol)`` by double backward on the eager module, with the
    monitor's curvature batch (``monitor._source.get(None)``) and the preconditioner read from the same optimizer
    state, at the same parameters (both run in ``on_train_batch_start``). Its time is added to the monitors' shared
    measuring clock, so the monitor's step-time average and ``train_time_s`` exclude it, and is reported so the fit
    time can exclude it too.
    """

    def __init__(self, monitor: HessianEigenvalueMonitor, ref_every: int | None = None, ref_tol: float = 1e-6) -> None:
        self.monitor = monitor
        self.ref_every = ref_every
        self.ref_tol = ref_tol
        self.rows: list[dict[str, Any]] = []
        self.reference_s = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = step_axis(trainer)
        if self.monitor.last_step != step or (self.rows and self.rows[-1]["step"] == step):
            return
        m = self.monitor.last_metrics
        row: dict[str, Any] = {
            "step": step,
            "sharpness": m.get(SHARPNESS),
            "num_hvp": m.get(NUM_HVP),
            "error_bound": m.get(ERROR_BOUND),
        }
        if self.ref_every and step > 0 and step % self.ref_every == 0:
            t0 = time.perf_counter()
            opt = trainer.optimizers[0]
            params = measured_parameters(pl_module, opt)
            P = preconditioner_parts(opt, params)
            with lightning_eager(pl_module):
                ref = hessian_eigenvalues(
                    pl_module, curvature_loss, self.monitor._source.get(None), k=1, tol=self.ref_tol, max_iter=400,
                    preconditioner=P, params=params, method="double_backward",
                )  # fmt: skip
            row["reference"] = float(ref.eigenvalues[0])
            row["reference_converged"] = bool(ref.converged)
            row["reference_num_hvp"] = ref.num_hvp
            dt = time.perf_counter() - t0
            self.reference_s += dt
            _MeasuringClock.total_s += dt  # not training time for the monitor's clock either
        self.rows.append(row)


class FitClock(pl.Callback):
    """Wall time of the training loop (``on_train_start`` to ``on_train_end``): no process-group or Trainer setup."""

    def __init__(self) -> None:
        self.t0 = self.seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


def threads() -> None:
    """One thread per process (the machine is shared)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


__all__ = [
    "CONTEXT",
    "SIZES",
    "FitClock",
    "GPTModule",
    "MemoryProbedMonitor",
    "Recorder",
    "adamw",
    "corpus",
    "curvature_loss",
    "gpt_loss",
    "num_params",
    "peak_bytes",
    "reset_peak",
    "rss_bytes",
    "text_windows",
    "threads",
    "trim",
]
