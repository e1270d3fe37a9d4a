"""A small byte-level GPT on the Python standard library's own sources: the transformer workload of the examples.

Shared by ``examples/warmup_free_gpt.py`` and the transformer benchmarks (import it with ``examples/`` on
``sys.path``). Nothing is downloaded.

* **Model** (:class:`GPT`): a GPT-2-style decoder. Learned token and position embeddings; ``n_layer`` pre-LayerNorm
  blocks of causal self-attention (``F.scaled_dot_product_attention`` with ``is_causal=True``) and a GELU MLP of
  width ``4·d_model``, both with biases and residual connections; a final LayerNorm; the output head *tied* to
  the token embedding (the GPT-2 choice; it saves ``256·d_model`` parameters). Initialisation as GPT-2:
  ``N(0, 0.02)`` for weights and embeddings, the two residual projections of each block scaled by
  ``1/sqrt(2·n_layer)``, zero biases. :data:`PRESETS` has the sizes used here (``"0.4M"``, the study) and by the
  benchmarks (``"3M"``, ``"25M"``, ``"85M"``); any ``GPTConfig`` works.
* **Data** (:func:`stdlib_corpus`): every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` except the test
  suites (``test``, ``tests``, ``idle_test`` folders) and ``site-packages``, sorted by relative path, read as
  bytes (vocabulary 256). File ``i`` of that order goes to the held-out split when ``i % 10 == 0``, to the
  training split otherwise; files are joined with a blank line. The corpus therefore depends on the Python
  version (CPython 3.11.7 here: 734 files, 12.1 MB, 10.2 MB of it in the 660 training files).
* **Batches**: ``(x, y)`` int64 ``(B, T)`` windows with ``y`` the next bytes; training windows start at
  uniformly random offsets (a seeded generator), held-out windows at evenly spaced offsets (the same every run).
  :func:`gpt_loss` is the mean next-byte cross-entropy (nats) with the engine's ``loss_fn(model, batch)``
  signature.
* **Optimizer** (:func:`make_adamw`): AdamW, betas (0.9, 0.95), weight decay 0.1 on the matrices and
  embeddings, none on biases and LayerNorm (two parameter groups, as nanoGPT).
* **Training**: :class:`GPTModule` + :class:`GPTDataModule` for Lightning (the learning-rate schedule is a
  constructor argument), :func:`train` for a plain PyTorch loop.

Run ``python examples/_gpt.py --fast --out DIR`` to train the smallest preset for a few steps and plot its loss.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GPT",
    "PRESETS",
    "Corpus",
    "GPTConfig",
    "GPTDataModule",
    "GPTModule",
    "TrainResult",
    "evaluate",
    "gpt_loss",
    "held_out_batches",
    "linear_warmup",
    "make_adamw",
    "random_batch",
    "stdlib_corpus",
    "train",
]

Batch = tuple[Tensor, Tensor]
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


# --------------------------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class GPTConfig:
    """Size of a :class:`GPT`: layers, width, attention heads, context length (bytes), vocabulary."""

    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    context: int = 64
    vocab: int = 256

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "context", "vocab"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}.")

    @property
    def num_params(self) -> int:
        """Parameter count (tied head): ``12·L·d² + 13·L·d + 2d + (vocab + context)·d``."""
        d, L = self.d_model, self.n_layer
        return 12 * L * d * d + 13 * L * d + 2 * d + (self.vocab + self.context) * d


#: Sizes: the study's (~0.44M parameters) and the transformer benchmarks' (~3M, ~25M, ~85M).
PRESETS: dict[str, GPTConfig] = {
    "0.4M": GPTConfig(n_layer=2, d_model=128, n_head=4, context=64),
    "3M": GPTConfig(n_layer=4, d_model=256, n_head=4, context=128),
    "25M": GPTConfig(n_layer=8, d_model=512, n_head=8, context=256),
    "85M": GPTConfig(n_layer=12, d_model=768, n_head=12, context=256),
}


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT-2-style decoder with a tied output head; ``forward(idx) -> logits (B, T, vocab)``."""

    def __init__(self, cfg: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        gen = torch.Generator().manual_seed(seed)  # the global RNG is left alone
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.cfg.context:
            raise ValueError(f"Sequence of length {T} exceeds the context {self.cfg.context}.")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def gpt_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean next-byte cross-entropy in nats (``loss_fn(model, batch)`` of the curvature engine)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95): decay on matrices and embeddings (group 0), none on biases/LayerNorm (group 1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def linear_warmup(warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of a linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps (then constant)."""
    w = max(1, int(warmup_steps))
    return lambda step: min(1.0, (step + 1) / w)


# --------------------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Corpus:
    """The byte streams of the two splits (uint8 tensors) and the files behind them."""

    train: Tensor
    held_out: Tensor
    train_files: tuple[str, ...]
    held_out_files: tuple[str, ...]


@lru_cache(maxsize=2)
def stdlib_corpus(root: str | None = None, held_out_every: int = 10) -> Corpus:
    """The standard library's ``*.py`` sources as bytes, split by file (see the module docstring).

    Args:
        root: folder to read (default: ``sysconfig.get_paths()["stdlib"]``).
        held_out_every: file ``i`` of the sorted list is held out when ``i % held_out_every == 0``.

    Raises:
        FileNotFoundError: if the folder has no Python sources.
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in base.rglob("*.py") if not (_EXCLUDED_DIRS & set(p.relative_to(base).parts)) and p.is_file()
    )
    if not files:
        raise FileNotFoundError(f"No Python sources under {base}.")
    train_parts: list[bytes] = []
    held_parts: list[bytes] = []
    train_names: list[str] = []
    held_names: list[str] = []
    for i, path in enumerate(files):
        name = str(path.relative_to(base))
        if i % held_out_every == 0:
            held_parts.append(path.read_bytes())
            held_names.append(name)
        else:
            train_parts.append(path.read_bytes())
            train_names.append(name)

    def stream(parts: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"\n\n".join(parts)), dtype=torch.uint8).clone()

    return Corpus(stream(train_parts), stream(held_parts), tuple(train_names), tuple(held_names))


def _windows(data: Tensor, starts: Tensor, context: int) -> Batch:
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def random_batch(data: Tensor, batch_size: int, context: int, generator: torch.Generator) -> Batch:
    """``batch_size`` windows of ``context`` bytes (and their next bytes) at random offsets drawn from ``generator``."""
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
    return _windows(data, starts, context)


def held_out_batches(data: Tensor, num_windows: int, context: int, batch_size: int = 64) -> list[Batch]:
    """``num_windows`` evenly spaced windows of the held-out stream, in batches: the same every run."""
    starts = torch.linspace(0, data.numel() - context - 2, num_windows).long()
    return [_windows(data, s, context) for s in starts.split(batch_size)]


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> float:
    """Mean cross-entropy over ``batches`` (weighted by size), in eval mode (the model's flags are restored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += float(gpt_loss(model, (x, y))) * x.shape[0]
        count += x.shape[0]
    model.train(was_training)
    return total / count


# --------------------------------------------------------------------------------------------------------------
# plain PyTorch training


@dataclass
class TrainResult:
    """Per-step training loss and lr (of the batch each update used), final train/held-out loss, wall time."""

    losses: list[float]
    lrs: list[float]
    final_train: float
    final_held_out: float
    seconds: float
    diverged: bool


def train(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    corpus: Corpus | None = None,
    scheduler: Any = None,
    before_step: Callable[[int, Batch], None] | None = None,
    after_backward: Callable[[int, Batch, float], None] | None = None,
    eval_windows: int = 256,
    diverge_at: float = 50.0,
) -> TrainResult:
    """Train ``model`` for ``steps`` AdamW steps on random training windows; evaluate at the end.

    Order per step: draw the batch; ``before_step(step, batch)`` (parameters of update ``step``, nothing computed
    yet: where a monitor measures); zero grads, forward, backward; ``after_backward(step, batch, loss)`` (gradients
    present: where CDAT measures); ``optimizer.step()``; ``scheduler.step()``. The lr recorded for a step is the
    one its update used. A non-finite loss or one above ``diverge_at`` stops the run (``diverged=True``).

    The final training loss is measured on 256 fresh windows of the training split (a generator seeded with
    ``seed + 10_000``), the held-out loss on ``eval_windows`` fixed windows of the held-out split.
    """
    corpus = corpus or stdlib_corpus()
    context = model.cfg.context
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    lrs: list[float] = []
    diverged = False
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = random_batch(corpus.train, batch_size, context, gen)
        if before_step is not None:
            before_step(step, batch)
        optimizer.zero_grad(set_to_none=True)
        loss = gpt_loss(model, batch)
        loss.backward()
        value = float(loss.detach())
        if after_backward is not None:
            after_backward(step, batch, value)
        losses.append(value)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        if not math.isfinite(value) or value > diverge_at:
            diverged = True
            break
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    seconds = time.perf_counter() - t0
    eval_gen = torch.Generator().manual_seed(seed + 10_000)
    train_eval = [random_batch(corpus.train, 64, context, eval_gen) for _ in range(4)]
    final_train = evaluate(model, train_eval)
    final_held = evaluate(model, held_out_batches(corpus.held_out, eval_windows, context))
    return TrainResult(losses, lrs, final_train, final_held, seconds, diverged)


# --------------------------------------------------------------------------------------------------------------
# Lightning


def _lightning() -> Any:
    import lightning.pytorch as pl

    return pl


class _RandomWindows(torch.utils.data.IterableDataset):
    """``num_batches`` random training batches from a generator seeded once per iteration (``seed``)."""

    def __init__(self, data: Tensor, batch_size: int, context: int, num_batches: int, seed: int) -> None:
        super().__init__()
        self.data, self.batch_size, self.context = data, batch_size, context
        self.num_batches, self.seed = num_batches, seed

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.num_batches):
            yield random_batch(self.data, self.batch_size, self.context, gen)

    def __len__(self) -> int:
        return self.num_batches


def GPTDataModule(
    cfg: GPTConfig, *, batch_size: int = 32, steps: int = 200, seed: int = 0, eval_windows: int = 256
) -> Any:
    """A ``LightningDataModule``: ``steps`` random training batches (one epoch), fixed held-out windows."""
    pl = _lightning()

    class _DataModule(pl.LightningDataModule):
        def train_dataloader(self) -> Any:
            corpus = stdlib_corpus()
            ds = _RandomWindows(corpus.train, batch_size, cfg.context, steps, seed)
            return torch.utils.data.DataLoader(ds, batch_size=None)

        def val_dataloader(self) -> Any:
            corpus = stdlib_corpus()
            return held_out_batches(corpus.held_out, eval_windows, cfg.context)

    return _DataModule()


def GPTModule(
    cfg: GPTConfig,
    *,
    lr: float,
    seed: int = 0,
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    weight_decay: float = 0.1,
) -> Any:
    """A ``LightningModule`` training :class:`GPT` with :func:`make_adamw`.

    Args:
        cfg: model size.
        lr: peak learning rate (the optimizer's lr).
        seed: initialisation seed.
        make_scheduler: ``optimizer -> LRScheduler`` stepped every optimizer step, e.g.
            ``lambda opt: LambdaLR(opt, linear_warmup(10))`` or ``SharpnessAwareLR``; ``None`` for a constant lr.
        weight_decay: AdamW decay of group 0.
    """
    pl = _lightning()

    class _Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = GPT(cfg, seed=seed)

        def forward(self, idx: Tensor) -> Tensor:
            return self.model(idx)

        def curvature_loss(self, batch: Batch) -> Tensor:
            return gpt_loss(self.model, batch)

        def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
            loss = gpt_loss(self.model, batch)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch: Batch, batch_idx: int) -> None:
            self.log("val_loss", gpt_loss(self.model, batch))

        def configure_optimizers(self) -> Any:
            opt = make_adamw(self.model, lr, weight_decay)
            if make_scheduler is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), "interval": "step"}}

    return _Module()


# --------------------------------------------------------------------------------------------------------------
# smoke run


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the byte-level GPT briefly and plot its loss.")
    parser.add_argument("--fast", action="store_true", help="30 steps (a few seconds)")
    parser.add_argument("--out", default="examples/figures")
    parser.add_argument("--preset", default="0.4M", choices=sorted(PRESETS))
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = PRESETS[args.preset]
    steps = 30 if args.fast else 200
    model = GPT(cfg, seed=args.seed)
    res = train(model, make_adamw(model, args.lr), steps, seed=args.seed, eval_windows=64 if args.fast else 256)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(res.losses, label="training loss (batch)")
    ax.axhline(res.final_held_out, color="k", ls="--", label=f"held-out {res.final_held_out:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(f"GPT {args.preset} ({cfg.num_params:,} parameters), AdamW lr {args.lr:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "_gpt.png", dpi=110)
    print(
        f"_gpt: {cfg.num_params:,} parameters, {steps} steps in {res.seconds:.1f} s; loss {res.losses[0]:.3f} -> "
        f"train {res.final_train:.3f}, held-out {res.final_held_out:.3f}. Wrote {out / '_gpt.png'}."
    )


if __name__ == "__main__":
    main()
