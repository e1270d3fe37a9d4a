"""Which batch a curvature measurement uses, drawn without disturbing training.

* ``"fixed"``: ``num_examples`` examples drawn once, at ``on_train_start``, from ``trainer.train_dataloader``
  (under DDP each process draws ``num_examples / world_size`` from its own shard of the distributed sampler);
* ``"current"``: the training batch passed to the hook;
* a ``DataLoader`` (any re-iterable of batches): up to ``num_examples`` examples per process (all of them with
  ``num_examples=None``), drawn once at ``on_train_start``. It is used as given on every process: shard it
  yourself (e.g. a ``DistributedSampler``) to make the curvature batch global under DDP.

Drawing never changes the training run: the global torch (CPU and accelerator), ``random`` and NumPy RNG
streams and the generators of the loader and its sampler are restored afterwards (creating a loader iterator
draws a seed even with a sequential sampler), the draw itself is seeded so that a resumed run draws the same
batch, and a loader with worker processes is read through a single-process twin so its (persistent) workers
are not touched. Batches go through the same preparation as training batches (precision plugin's
``convert_input``, the module's batch-transfer hooks, the strategy's device transfer). Several physical
batches form a :class:`~lightning_curvature.core.MultiBatch`, averaged with weights proportional to size.

**Containers and the batch dimension.** Any container Lightning trains on works (tuples, lists, dicts, named
tuples, dataclasses, nested). The examples are found along each tensor's batch dimension
(:func:`~lightning_curvature.core._batch.infer_batch_layout`): ``batch_dim`` names it (an int for every tensor, or
one entry per element, ``None`` for a tensor that is not split into examples); without it the leading dimension is
used when every tensor agrees on its size, cross-checked against the training DataLoader's ``batch_size``, so that a
sequence-first batch ``(T, B, ...)`` is read along ``B`` (with a warning saying so) and an ambiguous one raises
instead of being cut along time. The layout found on the first batch is kept for later batches of the same
structure (a smaller last batch included). The engine receives every batch with its examples along dimension 0
and the loss sees the user's own layout again (:class:`~lightning_curvature.core._batch.LayoutLoss`).

**Loaders without a length.** ``num_examples=None`` takes every example of a ``DataLoader`` given as ``batch``;
one without a length (an ``IterableDataset``, possibly infinite) is refused at construction instead of being read
until memory runs out.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from lightning_curvature.core import MultiBatch
from lightning_curvature.core._batch import (
    BatchDim,
    BatchLayout,
    BatchLayoutError,
    check_batch_dim,
    infer_batch_layout,
    iter_batches,
)
from lightning_curvature.core._validation import is_integer

__all__ = ["BATCH_CHOICES", "BatchSource", "LayoutCache", "draw_examples", "expected_batch_size", "preserved_rng"]

BATCH_CHOICES = ("fixed", "current")
_DRAW_SEED = 0


def _generators_of(loader: Any) -> list[torch.Generator]:
    """Generators a loader draws from (its own, its sampler's, its batch sampler's sampler's)."""
    objs = [
        loader,
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]
    gens: list[torch.Generator] = []
    for obj in objs:
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


@contextmanager
def preserved_rng(loader: Any = None, device: torch.device | None = None, seed: int | None = None) -> Iterator[None]:
    """Restore every RNG stream a draw from ``loader`` could consume; optionally seed the forked streams.

    Covers the global torch CPU generator (and ``device``'s when it is an accelerator), Python's ``random``,
    NumPy's global generator, the loader's ``generator`` and its samplers' generators, and a
    ``DistributedSampler``'s epoch.
    """
    devices = [device] if device is not None and device.type != "cpu" else []
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global stream is what we protect)
    gens = _generators_of(loader) if loader is not None else []
    gen_states = [g.get_state() for g in gens]
    samplers = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    epochs = [(s, s.epoch) for s in samplers if s is not None and isinstance(getattr(s, "epoch", None), int)]
    with ExitStack() as stack:
        device_type = devices[0].type if devices else "cuda"
        stack.enter_context(torch.random.fork_rng(devices=devices, device_type=device_type))
        try:
            if seed is not None:
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)  # noqa: NPY002
                for g in gens:
                    g.manual_seed(seed)
                for s, _ in epochs:
                    s.epoch = 0
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002
            for g, st in zip(gens, gen_states):
                g.set_state(st)
            for s, e in epochs:
                s.epoch = e


def _single_process_twin(loader: DataLoader) -> DataLoader:
    """A ``num_workers=0`` loader yielding the same batches (same dataset, sampler, collate function)."""
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return DataLoader(
            dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, collate_fn=loader.collate_fn
        )
    if loader.batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return DataLoader(dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn)


def prepare_batch(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """Convert and move ``batch`` the way the training loop does before ``training_step``."""
    batch = trainer.precision_plugin.convert_input(batch)
    before = getattr(pl_module, "_on_before_batch_transfer", None)
    batch = before(batch, dataloader_idx=0) if callable(before) else pl_module.on_before_batch_transfer(batch, 0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def expected_batch_size(loader: Any) -> int | None:
    """Examples a batch of ``loader`` holds (its ``batch_size``, at most its sampler's length), ``None`` if unknown."""
    size = getattr(loader, "batch_size", None)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return None
    if not getattr(loader, "drop_last", False):
        try:
            size = min(size, len(loader.sampler))
        except (TypeError, AttributeError):  # an iterable dataset's sampler has no length
            pass
    return size


class LayoutCache:
    """The batch layout of the latest batch, reused while batches keep its structure (see the module docstring).

    An inferred layout that is not the plain leading dimension is explained once with a warning.

    Args:
        batch_dim: the user's ``batch_dim`` (``None``: infer).
    """

    def __init__(self, batch_dim: BatchDim = None) -> None:
        self.batch_dim = batch_dim
        self.layout: BatchLayout | None = None
        self._noted = False

    def layout_for(self, batch: Any, expected_size: int | None = None) -> BatchLayout:
        """The layout of ``batch`` (the cached one if it fits).

        Raises:
            BatchLayoutError: if the batch dimension is ambiguous or inconsistent (see
                :func:`~lightning_curvature.core._batch.infer_batch_layout`).
        """
        if self.layout is not None and self.layout.fits(batch):
            return self.layout
        layout, note = infer_batch_layout(batch, self.batch_dim, expected_size)
        if note is not None and not self._noted:
            self._noted = True
            rank_zero_warn(note)
        self.layout = layout
        return layout

    def to_engine(self, batch: Any, expected_size: int | None = None) -> Any:
        """``batch`` (or each physical batch of a ``MultiBatch``) in the engine's form."""
        parts = [self.layout_for(b, expected_size).to_engine(b) for b in iter_batches(batch)]
        return MultiBatch(parts) if isinstance(batch, MultiBatch) else parts[0]


def draw_examples(
    loader: Iterable[Any],
    num_examples: int | None,
    *,
    cache: LayoutCache | None = None,
    expected_size: int | None = None,
) -> list[Any]:
    """The first ``num_examples`` examples of ``loader`` (all with ``None``) as a list of physical batches.

    Examples are counted and cut along each batch's batch dimension (``cache``: the layout rule; default: infer).

    Raises:
        BatchLayoutError: if a batch's batch dimension is ambiguous.
    """
    cache = cache if cache is not None else LayoutCache()
    batches: list[Any] = []
    taken = 0
    for b in loader:
        if num_examples is not None and taken >= num_examples:
            break
        layout = cache.layout_for(b, expected_size)
        n = layout.size(b)
        if num_examples is not None and taken + n > num_examples:
            b = layout.slice(b, 0, num_examples - taken)
            n = num_examples - taken
        batches.append(b)
        taken += n
    return batches


class BatchSource:
    """Where the curvature batch comes from (see the module docstring).

    Args:
        batch: ``"fixed"``, ``"current"`` or a ``DataLoader`` (any re-iterable of batches).
        num_examples: examples of the fixed batch (all processes together) or taken from the loader (per
            process; ``None``: all).
        batch_dim: the batch dimension (see the module docstring; ``None``: inferred).

    Raises:
        MisconfigurationException: for another ``batch`` value, a ``num_examples`` below 1, ``None`` with
            ``batch="fixed"`` or with a loader that has no length, or a malformed ``batch_dim``.
    """

    def __init__(self, batch: Any, num_examples: int | None, batch_dim: BatchDim = None) -> None:
        if isinstance(batch, str):
            if batch not in BATCH_CHOICES:
                raise MisconfigurationException(
                    f"`batch` must be one of {BATCH_CHOICES} or a DataLoader, got {batch!r}."
                )
            self.kind = batch
        elif isinstance(batch, Iterable) and not isinstance(batch, (torch.Tensor, dict, tuple, list)):
            self.kind = "loader"
        else:
            raise MisconfigurationException(
                f"`batch` must be one of {BATCH_CHOICES} or a DataLoader, got {type(batch).__name__}: {batch!r}."
            )
        if num_examples is not None and (not is_integer(num_examples) or num_examples < 1):
            raise MisconfigurationException(f"`num_examples` must be an integer >= 1 or None, got {num_examples!r}.")
        num_examples = None if num_examples is None else int(num_examples)
        if num_examples is None and self.kind == "fixed":
            raise MisconfigurationException("`num_examples` must be an integer >= 1 with batch='fixed', got None.")
        if num_examples is None and self.kind == "loader":
            try:
                len(batch)
            except TypeError:
                dataset = getattr(batch, "dataset", None)
                what = (
                    f"its {type(dataset).__name__} (an IterableDataset) has no length"
                    if isinstance(dataset, IterableDataset)
                    else f"{type(batch).__name__} has no length"
                )
                raise MisconfigurationException(
                    f"`num_examples=None` takes every example of the `batch` loader, but {what}: it may never end. "
                    "Pass `num_examples=` (the examples to draw per process)."
                ) from None
        try:
            check_batch_dim(batch_dim)
        except TypeError as err:
            raise MisconfigurationException(str(err)) from None
        self.loader = batch if self.kind == "loader" else None
        self.num_examples = num_examples
        self.batch_dim = batch_dim
        self._batch: Any = None
        self._engine_batch: Any = None
        self._layouts = LayoutCache(batch_dim)
        self._expected: int | None = None

    @property
    def key(self) -> str:
        """Identity for ``state_key``: the choice, or ``"dataloader"``."""
        return "dataloader" if self.kind == "loader" else self.kind

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the fixed batch (``"fixed"`` or a loader); nothing for ``"current"``.

        Raises:
            MisconfigurationException: if the training dataloader is not a single ``DataLoader``, no example
                could be drawn, or the batch dimension of the drawn batches is ambiguous.
        """
        self._expected = expected_batch_size(trainer.train_dataloader)
        if self.kind == "current":
            return
        if self.kind == "fixed":
            loader = trainer.train_dataloader
            if not isinstance(loader, DataLoader):
                raise MisconfigurationException(
                    "batch='fixed' draws from a single training DataLoader, but `trainer.train_dataloader` is "
                    f"{type(loader).__name__}. Pass a DataLoader as `batch=` instead."
                )
            ws, rank = max(1, trainer.world_size), trainer.global_rank
            assert self.num_examples is not None
            need: int | None = self.num_examples // ws + (1 if rank < self.num_examples % ws else 0)
            source: Iterable[Any] = _single_process_twin(loader) if loader.num_workers > 0 else loader
        else:
            assert self.loader is not None
            loader, need, source = self.loader, self.num_examples, self.loader
        expected = expected_batch_size(loader)
        try:
            with preserved_rng(loader, trainer.strategy.root_device, seed=_DRAW_SEED), torch.no_grad():
                raw = draw_examples(source, need, cache=self._layouts, expected_size=expected)
                batches = [prepare_batch(trainer, pl_module, b) for b in raw]
            sizes = [self._layouts.layout_for(b, expected).size(b) for b in batches]
        except BatchLayoutError as err:
            raise MisconfigurationException(f"Cannot read the curvature batch: {err}") from None
        got = sum(sizes)
        if got == 0:
            raise MisconfigurationException("Could not draw any example for the curvature batch: the loader is empty.")
        if need is not None and got < need:
            rank_zero_warn(f"The curvature batch has only {got} examples per process ({need} requested).")
        self._batch = batches[0] if len(batches) == 1 else MultiBatch(batches)
        self._engine_batch = self._layouts.to_engine(self._batch, expected)

    def get(self, current: Any) -> Any:
        """The batch to measure on; ``current`` is the training batch of the hook (``None`` at epoch end).

        Raises:
            RuntimeError: if no batch is available (``"current"`` before any training batch, or a fixed batch
                that was not drawn yet).
        """
        if self.kind == "current":
            if current is None:
                raise RuntimeError("batch='current' has no training batch to measure on yet.")
            return current
        if self._batch is None:
            raise RuntimeError("The curvature batch is drawn at `on_train_start`; it is not available yet.")
        return self._batch

    def get_for_engine(self, current: Any) -> Any:
        """:meth:`get` in the engine's form: examples along dimension 0 (see the module docstring).

        Use it with a loss wrapped in :class:`~lightning_curvature.core._batch.LayoutLoss`.

        Raises:
            RuntimeError: see :meth:`get`.
            BatchLayoutError: if the batch dimension of the training batch is ambiguous.
        """
        if self.kind == "current":
            return self._layouts.to_engine(self.get(current), self._expected)
        self.get(current)
        return self._engine_batch

    def release(self) -> None:
        """Drop the drawn batch (frees its memory after fit)."""
        self._batch = None
        self._engine_batch = None
