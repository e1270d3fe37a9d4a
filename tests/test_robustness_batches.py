"""Batches Lightning trains on: every container ``apply_to_collection`` walks, sequence-first layouts (read along
``B``, not ``T``, or refused when ambiguous), ``batch_dim``, and loaders without a length (issue 10)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _reference import ce_loss, per_example_grads
from conftest import make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset

from lightning_curvature import GradientCovarianceMonitor, HessianEigenvalueMonitor
from lightning_curvature.core._batch import (
    BatchLayoutError,
    LayoutLoss,
    as_batch_first,
    batch_size,
    infer_batch_layout,
    restore_batch,
    slice_batch,
    to_compute,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --- containers ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    x: Tensor
    y: Tensor
    note: str = "meta"
    size: int = dataclasses.field(init=False, default=-1)

    @functools.cached_property
    def doubled(self) -> Tensor:
        return self.x * 2


Pair = namedtuple("Pair", ["x", "y"])


def test_dataclass_batches_are_walked_like_lightning_does() -> None:
    b = Batch(torch.arange(12.0).reshape(6, 2), torch.arange(6))
    b.size = 6
    _ = b.doubled  # cached on the instance
    assert batch_size(b) == 6
    part = slice_batch(b, 1, 3)
    assert isinstance(part, Batch) and part.note == "meta" and part.size == 6  # non-init field kept
    assert torch.equal(part.x, b.x[1:3]) and torch.equal(part.y, b.y[1:3])
    assert torch.equal(part.doubled, b.x[1:3] * 2)  # the cached property was recomputed
    moved = to_compute(b, torch.device("cpu"), torch.float64)
    assert moved.x.dtype == torch.float64 and moved.y.dtype == torch.long and b.x.dtype == torch.float32


def test_mappings_and_sequences_keep_their_types() -> None:
    dd: defaultdict[str, Any] = defaultdict(list, {"x": torch.zeros(4, 2), "y": [torch.ones(4), "tag"]})
    od = OrderedDict([("b", torch.zeros(4)), ("a", Pair(torch.ones(4, 3), torch.zeros(4)))])
    for batch in (dd, od):
        part = slice_batch(batch, 0, 2)
        assert type(part) is type(batch) and list(part) == list(batch)
        assert batch_size(part) == 2
    assert slice_batch(dd, 0, 2).default_factory is list and slice_batch(dd, 0, 2)["y"][1] == "tag"
    assert isinstance(slice_batch(od, 1, 3)["a"], Pair)


def test_disagreeing_leading_sizes_warn_in_the_engine() -> None:
    with pytest.warns(UserWarning, match=r"batch\[1\] of shape \(4,\) are not split.*batch_dim"):
        assert batch_size((torch.zeros(7, 4, 2), torch.zeros(4))) == 7


# --- the batch dimension: inference and naming ------------------------------------------------------------------
def test_explicit_batch_dim_like_vmap_in_dims() -> None:
    x, y, w = torch.zeros(5, 8, 3), torch.zeros(8), torch.ones(3)
    assert infer_batch_layout((x, y, w), batch_dim=(1, 0, None))[0].dims == (1, 0, None)
    assert infer_batch_layout({"x": x, "y": y}, batch_dim={"x": 1, "y": 0})[0].dims == (1, 0)
    assert infer_batch_layout(Pair(x, y), batch_dim={"x": -2, "y": -1})[0].dims == (1, 0)
    assert infer_batch_layout((x, x), batch_dim=1)[0].dims == (1, 1)
    with pytest.raises(BatchLayoutError, match=r"batch\[1\] has shape \(8,\), which has no dimension 1"):
        infer_batch_layout((x, y), batch_dim=1)
    with pytest.raises(BatchLayoutError, match="disagree on the number of examples"):
        infer_batch_layout((x, y), batch_dim=0)
    with pytest.raises(BatchLayoutError, match=r"missing \['y'\]"):
        infer_batch_layout({"x": x, "y": y}, batch_dim={"x": 1})
    with pytest.raises(BatchLayoutError, match="has 2 entries but batch has 3"):
        infer_batch_layout((x, y, w), batch_dim=(1, 0))


def test_batch_dim_with_a_dataloader_or_a_generator_of_sequence_first_batches() -> None:
    """``batch_dim`` with an iterable of batches failed ("Expected a batch holding at least one tensor, got
    generator"): each batch is now put in the engine's form as it is read. Reference: the same examples as one
    batch-first batch, through a loss written for that layout."""
    from lightning_curvature import gradient_covariance, hessian_eigenvalues, hessian_trace

    torch.manual_seed(0)
    x, y = torch.randn(5, 24, 6, dtype=torch.float64), torch.randint(0, 3, (5, 24))
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def seq_first(m: nn.Module, b: Any) -> Tensor:
        return nn.functional.cross_entropy(m(b[0]).reshape(-1, 3), b[1].reshape(-1))

    def batch_first(m: nn.Module, b: Any) -> Tensor:
        return seq_first(m, (b[0].transpose(0, 1), b[1].transpose(0, 1)))

    ref = hessian_eigenvalues(net, batch_first, (x.transpose(0, 1), y.T), k=2, tol=1e-9)
    ref_cov = gradient_covariance(net, batch_first, (x.transpose(0, 1), y.T), k=3)
    ref_trace = hessian_trace(net, batch_first, (x.transpose(0, 1), y.T), num_samples=9).estimate

    def loader() -> DataLoader:
        def collate(items: list) -> tuple[Tensor, Tensor]:
            return torch.stack([a for a, _ in items], 1), torch.stack([b for _, b in items], 1)

        return DataLoader([(x[:, i], y[:, i]) for i in range(24)], batch_size=5, collate_fn=collate)

    for batches in (loader(), ((x[:, i : i + 7], y[:, i : i + 7]) for i in range(0, 24, 7))):
        res = hessian_eigenvalues(net, seq_first, batches, k=2, tol=1e-9, batch_dim=1)
        torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-8, atol=0)
    cov = gradient_covariance(net, seq_first, loader(), k=3, batch_dim=1)
    torch.testing.assert_close(cov.eigenvalues, ref_cov.eigenvalues, rtol=1e-9, atol=1e-14)
    assert hessian_trace(net, seq_first, loader(), num_samples=9, batch_dim=1).estimate == pytest.approx(ref_trace)


def test_inferred_batch_dim_from_the_loaders_batch_size() -> None:
    x, y = torch.zeros(35, 8, 4), torch.zeros(8, dtype=torch.long)
    with pytest.raises(BatchLayoutError, match="disagree on their leading size.*batch_dim="):
        infer_batch_layout((x, y))  # nothing settles it: refuse, do not cut along T
    layout, note = infer_batch_layout((x, y), expected_size=8)
    assert layout.dims == (1, 0) and note is not None and "dimension 1" in note
    # every tensor sequence-first (a language model's tokens and targets): the leading sizes agree on T
    tokens = torch.zeros(35, 8, dtype=torch.long)
    assert infer_batch_layout((tokens, tokens))[0].dims == (0, 0)  # undetectable without the hint
    assert infer_batch_layout((tokens, tokens), expected_size=8)[0].dims == (1, 1)
    # a constant carried in the batch (class weights): not split, said once
    layout, note = infer_batch_layout((torch.zeros(8, 4), torch.zeros(8), torch.ones(10)), expected_size=8)
    assert layout.dims == (0, 0, None) and note is not None and "not split into examples" in note
    # more examples than a batch holds (a collate making two views per example): dimension 0, with a note
    layout, note = infer_batch_layout((torch.zeros(16, 3, 8, 8),), expected_size=8)
    assert layout.dims == (0,) and note is not None and "reading 16 examples along dimension 0" in note
    # a smaller last batch that could be sequence-first: ambiguous
    with pytest.raises(BatchLayoutError, match="fewer than the 8 examples"):
        infer_batch_layout((torch.zeros(5, 8),), expected_size=8)
    # a smaller last batch with no dimension of the expected size: the leading one
    assert infer_batch_layout((torch.zeros(5, 3), torch.zeros(5)), expected_size=8)[0].dims == (0, 0)


def test_engine_form_round_trip_and_vmap() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y, w = torch.randn(5, 6, 3, generator=gen), torch.randn(6, generator=gen), torch.rand(3, generator=gen)
    batch = Batch(x, y)
    batch.size = 6
    rnn = nn.Linear(3, 2)  # applied at every time step (vmap has no batching rule for nn.RNN; the engine loops)

    def loss(model: nn.Module, b: Any) -> Tensor:
        out = torch.tanh(model(b.x)).sum(0)  # (T, B, 2) -> (B, 2)
        return ((out.sum(1) - b.y) ** 2).mean() + 0.0 * w.sum()

    layout, _ = infer_batch_layout(batch, batch_dim={"x": 1, "y": 0})
    flat = layout.to_engine(batch)
    assert batch_size(flat) == 6 and flat[0].shape == (6, 5, 3)
    restored = restore_batch(flat)
    assert isinstance(restored, Batch) and restored.size == 6 and torch.equal(restored.x, x)
    # the engine's per-example route: vmap over dimension 0 of the engine form, one example as a batch of one
    wrapped = LayoutLoss(loss)

    def one(example: Any) -> Tensor:
        return wrapped(rnn, tuple(t.unsqueeze(0) if isinstance(t, Tensor) else t for t in example))

    per_example = torch.func.vmap(one)(flat)
    reference = torch.stack([loss(rnn, Batch(x[:, i : i + 1], y[i : i + 1])) for i in range(6)])
    torch.testing.assert_close(per_example, reference)
    fb, fl = as_batch_first(batch, loss, {"x": 1, "y": 0})
    torch.testing.assert_close(fl(rnn, slice_batch(fb, 2, 4)), loss(rnn, Batch(x[:, 2:4], y[2:4])))


# --- the monitors on containers ----------------------------------------------------------------------------------
def _data(n: int = 48, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()


def _wrap(kind: str, x: Tensor, y: Tensor) -> Any:
    if kind == "tuple":
        return (x, y)
    if kind == "dict":
        return {"inputs": {"x": x}, "y": [y]}
    if kind == "namedtuple":
        return Pair(x, y)
    return Batch(x, y)


def _unwrap(kind: str, b: Any) -> tuple[Tensor, Tensor]:
    if kind == "dict":
        return b["inputs"]["x"], b["y"][0]
    if kind in ("namedtuple", "dataclass"):
        return b.x, b.y
    return b


class _ContainerModel(pl.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = _unwrap(self.kind, batch)
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _container_run(tmp_path: Path, kind: str) -> dict[str, list[float]]:
    x, y = _data()
    items = list(zip(x, y))
    loader = DataLoader(items, batch_size=16, collate_fn=lambda ex: _wrap(kind, *map(torch.stack, zip(*ex))))
    monitors = {
        "hessian_fixed": HessianEigenvalueMonitor(every_n_steps=1, k=2, tol=1e-6, num_examples=24),
        "hessian_current": HessianEigenvalueMonitor(every_n_steps=1, k=1, tol=1e-6, batch="current"),
        "covariance": GradientCovarianceMonitor(every_n_steps=1, k=2, num_examples=24),
    }
    trainer = make_trainer(tmp_path / kind, max_steps=3, callbacks=list(monitors.values()))
    trainer.fit(_ContainerModel(kind), loader)
    return {name: [v for _, v in m.history] for name, m in monitors.items()}


@pytest.mark.parametrize("kind", ["dict", "namedtuple", "dataclass"])
def test_monitors_measure_any_container_like_a_tuple(tmp_path: Path, kind: str) -> None:
    reference = _container_run(tmp_path, "tuple")
    got = _container_run(tmp_path, kind)
    for name, values in reference.items():
        assert len(got[name]) == 3 and all(math.isfinite(v) for v in got[name]), name
        assert got[name] == pytest.approx(values, rel=1e-6), name


# --- sequence-first batches ----------------------------------------------------------------------------------------
T, F_IN, HIDDEN = 5, 3, 4


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, T, F_IN, generator=gen)
        self.y = (self.x.sum((1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def _seq_first_collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    seqs, labels = zip(*items)
    return pad_sequence(list(seqs)), torch.stack(labels)  # (T, B, F), (B,): pad_sequence's default layout


class _SeqFirstRNN(pl.LightningModule):
    """``nn.RNN(batch_first=False)`` classifier on the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.rnn = nn.RNN(F_IN, HIDDEN)
            self.head = nn.Linear(HIDDEN, 2)

    def curvature_loss(self, batch: Any) -> Tensor:
        x, y = batch
        _, h = self.rnn(x)
        return nn.functional.cross_entropy(self.head(h[-1]), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.curvature_loss(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _dense_reference(model: _SeqFirstRNN, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 Hessian eigenvalues and per-example gradients of the examples ``x[:, i]`` (independent of ours)."""
    ref = _SeqFirstRNN().double()
    ref.load_state_dict(model.state_dict())
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in ref.named_parameters()])

    def loss(flat: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return torch.func.functional_call(ref, params, ((xb, yb),), strict=True)

    def call(flat: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return loss(flat, xb, yb)

    ref.forward = ref.curvature_loss  # type: ignore[method-assign]
    x, y = x.double(), y
    hess = torch.func.hessian(call)(theta, x, y)
    grads = torch.stack([torch.func.grad(call)(theta, x[:, i : i + 1], y[i : i + 1]) for i in range(x.shape[1])])
    return torch.linalg.eigvalsh(hess).flip(0), grads


def _cov_spectrum(grads: Tensor) -> Tensor:
    centred = grads - grads.mean(0)
    return torch.linalg.eigvalsh(centred @ centred.T / grads.shape[0]).flip(0)


class _DrawnBatch(pl.Callback):
    """Keeps a monitor's fixed curvature batch (the monitor releases it at teardown)."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.batch: Any = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.batch = self.monitor._source._batch


def _seq_run(
    tmp_path: Path, hessian: bool = True, **monitor_kwargs: Any
) -> tuple[_SeqFirstRNN, Any, Any, Any, _DrawnBatch]:
    model = _SeqFirstRNN()
    initial = _SeqFirstRNN()
    initial.load_state_dict(model.state_dict())
    cov = GradientCovarianceMonitor(every_n_steps=10, k=2, num_examples=8, **monitor_kwargs)
    cov_now = GradientCovarianceMonitor(every_n_steps=10, k=2, batch="current", **monitor_kwargs)
    hess = HessianEigenvalueMonitor(every_n_steps=10, k=2, tol=1e-7, num_examples=8) if hessian else None
    drawn = _DrawnBatch(cov)
    loader = DataLoader(_Sequences(), batch_size=16, collate_fn=_seq_first_collate)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[m for m in (hess, cov, cov_now, drawn) if m])
    trainer.fit(model, loader)
    return initial, hess, cov, cov_now, drawn


def test_sequence_first_batches_are_read_along_the_batch(tmp_path: Path) -> None:
    """pad_sequence's (T, B, F) with (B,) targets: the curvature batch is the first 8 *sequences*, not time steps."""
    inferred = r"inferred from the 16 examples.*batch\[0\] of shape \(5, 16, 3\): dimension 1"
    with pytest.warns(UserWarning, match=inferred):
        initial, hess, cov, cov_now, drawn = _seq_run(tmp_path)
    data = _Sequences()
    x, y = data.x.transpose(0, 1), data.y  # (T, N, F)
    eig, grads = _dense_reference(initial, x[:, :8], y[:8])
    assert drawn.batch[0].shape == (T, 8, F_IN) and drawn.batch[1].shape == (8,)
    assert torch.equal(drawn.batch[0], x[:, :8]) and torch.equal(drawn.batch[1], y[:8])
    assert hess.last_metrics["curvature/eig_1"] == pytest.approx(float(eig[0]), rel=1e-4)
    assert hess.last_metrics["curvature/eig_2"] == pytest.approx(float(eig[1]), rel=1e-4)
    # covariance of the 8 sequences' gradients (ratios: independent of the 1/N or 1/(N-1) convention)
    spec = _cov_spectrum(grads)
    m = cov.last_metrics
    assert m["grad_cov/eig_1"] / m["grad_cov/trace"] == pytest.approx(float(spec[0] / spec.sum()), rel=1e-4)
    assert m["grad_cov/eig_1"] / m["grad_cov/eig_2"] == pytest.approx(float(spec[0] / spec[1]), rel=1e-4)
    _, grads16 = _dense_reference(initial, x[:, :16], y[:16])  # batch="current": the 16 sequences of step 0
    spec16 = _cov_spectrum(grads16)
    m = cov_now.last_metrics
    assert m["grad_cov/eig_1"] / m["grad_cov/trace"] == pytest.approx(float(spec16[0] / spec16.sum()), rel=1e-4)


def test_named_batch_dim_gives_the_same_values_without_a_warning(tmp_path: Path) -> None:
    import warnings

    _, _, cov_a, now_a, _ = _seq_run(tmp_path / "inferred", hessian=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, _, cov_b, now_b, _ = _seq_run(tmp_path / "named", hessian=False, batch_dim=(1, 0))
    assert not [w for w in record if "batch dimension" in str(w.message)]
    for a, b in ((cov_a, cov_b), (now_a, now_b)):
        a_metrics = {k: v for k, v in a.last_metrics.items() if not k.endswith("overhead")}
        assert a_metrics == pytest.approx({k: b.last_metrics[k] for k in a_metrics}, rel=1e-6)


def test_hessian_monitor_takes_batch_dim() -> None:
    monitor = HessianEigenvalueMonitor(batch_dim=(1, 0))  # type: ignore[call-arg]
    assert monitor.batch_dim == (1, 0)


class _NoBatchSize:
    """Yields sequence-first batches without saying how many examples they hold (no ``batch_size``)."""

    def __init__(self) -> None:
        self.loader = DataLoader(_Sequences(), batch_size=16, collate_fn=_seq_first_collate)

    def __iter__(self) -> Any:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def test_ambiguous_batch_dimension_is_refused_not_guessed(tmp_path: Path) -> None:
    monitor = HessianEigenvalueMonitor(every_n_steps=10, k=1, batch=_NoBatchSize(), num_examples=8)  # type: ignore[arg-type]
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[monitor])
    with pytest.raises(MisconfigurationException, match=r"disagree on their leading size.*batch_dim=\(1, 0\)"):
        trainer.fit(_SeqFirstRNN(), DataLoader(_Sequences(), batch_size=16, collate_fn=_seq_first_collate))
    for bad in ("1", 1.5, (1, "0"), True):
        with pytest.raises(MisconfigurationException, match="batch_dim"):
            GradientCovarianceMonitor(batch_dim=bad)


# --- loaders without a length ----------------------------------------------------------------------------------------
class _Endless(IterableDataset):
    """An endless stream (safety stop far beyond any test's needs, so a regression fails instead of hanging)."""

    def __init__(self) -> None:
        self.drawn = 0

    def __iter__(self) -> Any:
        gen = torch.Generator().manual_seed(0)
        while True:
            self.drawn += 1
            if self.drawn > 5_000:
                raise RuntimeError("read far too many examples from an endless stream")
            x = torch.randn(6, generator=gen)
            yield x, (x[:3].sum() > 0).long()


def test_endless_loader_with_num_examples_none_is_refused_at_construction(tmp_path: Path) -> None:
    endless = DataLoader(_Endless(), batch_size=8)
    for monitor_cls in (HessianEigenvalueMonitor, GradientCovarianceMonitor):
        with pytest.raises(MisconfigurationException, match="IterableDataset.*has no length.*num_examples="):
            monitor_cls(batch=endless, num_examples=None)
    monitor = GradientCovarianceMonitor(every_n_steps=10, k=2, batch=endless, num_examples=16)
    drawn = _DrawnBatch(monitor)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[monitor, drawn])
    trainer.fit(_ContainerModel("tuple"), DataLoader(_Endless(), batch_size=8))
    assert [len(b[1]) for b in drawn.batch] == [8, 8]  # two physical batches of the stream, 16 examples
    # the first 16 examples of the stream, and their covariance (1/N) by a per-example loop at the initial weights
    stream = iter(_Endless())
    xs, ys = zip(*(next(stream) for _ in range(16)))
    x, y = torch.stack(xs), torch.stack(ys)
    assert torch.equal(torch.cat([b[0] for b in drawn.batch]), x) and torch.equal(
        torch.cat([b[1] for b in drawn.batch]), y
    )
    G = per_example_grads(_ContainerModel("tuple").net.double(), ce_loss, x.double(), y)
    centred = G - G.mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred / 16).flip(0)
    assert monitor.last_metrics["grad_cov/eig_1"] == pytest.approx(float(eig[0]), rel=1e-4)
    assert monitor.last_metrics["grad_cov/eig_2"] == pytest.approx(float(eig[1]), rel=1e-4)
