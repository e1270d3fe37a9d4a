"""Tests for ``lightning_curvature.tensorboard``: layout written and read back, writer lookup, images."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

import lightning_curvature.tensorboard as lct
from lightning_curvature.tensorboard import (
    LAYOUT_TAG,
    add_curvature_layout,
    curvature_layout,
    find_summary_writer,
    log_density_figure,
    log_spectrum_histogram,
)

CONTRACT_TAGS = [
    "curvature/sharpness",
    "curvature/stability_threshold",
    "grad_cov/eig_1",
    "grad_cov/condition_number",
    "grad_cov/trace",
    "grad_cov/noise_scale",
    "curvature/edge_ratio",
    "curvature/trace",
    "curvature/subspace_overlap",
    "grad_cov/frobenius_norm",
    "cdat/lr",
    "cdat/edge_lr",
    "cdat/numerator",
    "cdat/denominator",
]


def _accumulator(logdir: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def _read_layouts(logdir: Path) -> list[layout_pb2.Layout]:
    acc = _accumulator(logdir)
    layouts = []
    for event in acc.Tensors(LAYOUT_TAG):
        proto = layout_pb2.Layout()
        proto.ParseFromString(event.tensor_proto.string_val[0])
        layouts.append(proto)
    return layouts


def _charts(layout: layout_pb2.Layout) -> dict[tuple[str, str], Any]:
    return {(cat.title, chart.title): chart for cat in layout.category for chart in cat.chart}


def test_layout_round_trip_sharpness_chart(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    assert add_curvature_layout(writer, k=4) is True
    assert add_curvature_layout(writer, k=4) is False  # written once per writer
    writer.add_scalar("curvature/sharpness", 1.0, 0)
    writer.close()

    layouts = _read_layouts(tmp_path)
    assert len(layouts) == 1
    charts = _charts(layouts[0])
    chart = charts[("curvature", "sharpness vs stability threshold")]
    assert chart.WhichOneof("content") == "multiline"
    assert list(chart.multiline.tag) == ["curvature/sharpness", "curvature/stability_threshold"]
    assert [c.title for c in layouts[0].category] == ["curvature", "grad_cov", "cdat"]
    assert list(charts[("curvature", "top-4 eigenvalues")].multiline.tag) == [r"curvature/eig_\d+$"]
    all_tags = {t for c in charts.values() for t in c.multiline.tag}
    missing = [t for t in CONTRACT_TAGS if t not in all_tags]
    assert not missing, f"layout lacks {missing}"


def test_layout_regexes_select_the_eigenvalue_tags() -> None:
    import re

    layout = curvature_layout(k=3)
    (eig_regex,) = layout["curvature"]["top-3 eigenvalues"][1]
    assert all(re.match(eig_regex, f"curvature/eig_{i}") for i in (1, 2, 10))
    assert not re.match(eig_regex, "curvature/eig_1_residual")
    assert not re.match(eig_regex, "curvature/sharpness")


def test_layout_options_and_extra() -> None:
    layout = curvature_layout(
        k=1,
        include_grad_cov=False,
        include_cdat=False,
        extra={
            "curvature": {"trace": ["Multiline", ["curvature/trace", "curvature/trace_std"]]},
            "loss": {"train": ["Margin", ["loss", "loss_lo", "loss_hi"]]},
        },
    )
    assert list(layout) == ["curvature", "loss"]
    assert layout["curvature"]["trace"] == ["Multiline", ["curvature/trace", "curvature/trace_std"]]
    # A fresh dict each call: mutating one must not leak into the next.
    layout["curvature"].clear()
    assert "sharpness vs stability threshold" in curvature_layout()["curvature"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"k": 0}, ValueError),
        ({"k": 2.5}, ValueError),
        ({"extra": {"c": {"t": ["Bar", ["x"]]}}}, ValueError),
        ({"extra": {"c": {"t": ["Margin", ["x", "y"]]}}}, ValueError),
        ({"extra": {"c": {"t": ["Multiline", []]}}}, ValueError),
        ({"extra": {"c": {"t": ["Multiline", "x"]}}}, TypeError),
        ({"extra": {"c": ["Multiline", ["x"]]}}, TypeError),
        ({"extra": ["c"]}, TypeError),
    ],
    ids=["k=0", "k=2.5", "unknown-type", "margin-2-tags", "no-tags", "tags-str", "charts-list", "extra-list"],
)
def test_layout_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        curvature_layout(**kwargs)


class _FakeTrainer:
    def __init__(self, loggers: list[Any], global_rank: int = 0) -> None:
        self.loggers = loggers
        self.global_rank = global_rank


class _FakeLogger:
    def __init__(self, experiment: Any) -> None:
        self._experiment = experiment

    @property
    def experiment(self) -> Any:
        return self._experiment


class _BrokenLogger:
    @property
    def experiment(self) -> Any:
        raise RuntimeError("cannot connect")


def test_find_summary_writer_duck_typed(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    try:
        other = _FakeLogger(experiment=object())  # e.g. CSVLogger's experiment
        assert find_summary_writer(_FakeTrainer([other, _BrokenLogger(), _FakeLogger(writer)])) is writer
        assert find_summary_writer(_FakeTrainer([_FakeLogger(writer)], global_rank=1)) is None
        assert find_summary_writer(_FakeTrainer([other])) is None
        assert find_summary_writer(_FakeTrainer([])) is None
    finally:
        writer.close()


def test_find_summary_writer_with_lightning_loggers(tmp_path: Path) -> None:
    from lightning.fabric.loggers.logger import _DummyExperiment
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tb = TensorBoardLogger(str(tmp_path), name="tb")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    writer = find_summary_writer(_FakeTrainer([csv_logger, tb]))
    assert writer is tb.experiment
    assert isinstance(writer, SummaryWriter)
    # Lightning's stand-in for non-zero ranks answers every attribute: it must not pass as a writer.
    assert find_summary_writer(_FakeTrainer([_FakeLogger(_DummyExperiment())])) is None
    tb.finalize("success")


def test_spectrum_histogram_drops_non_finite(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    eig = torch.tensor([5.0, 3.0, float("nan"), 1.0, -0.5, float("inf")], dtype=torch.float64)
    assert log_spectrum_histogram(writer, "curvature/spectrum", eig, step=7) is True
    assert log_spectrum_histogram(writer, "curvature/empty", torch.tensor([float("nan")]), step=7) is False
    assert log_spectrum_histogram(None, "curvature/spectrum", eig, step=7) is False
    with pytest.raises(TypeError):
        log_spectrum_histogram(writer, "curvature/spectrum", [1.0, 2.0], step=0)  # type: ignore[arg-type]
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["histograms"] == ["curvature/spectrum"]
    (event,) = acc.Histograms("curvature/spectrum")
    assert event.step == 7
    assert event.histogram_value.num == 4
    assert event.histogram_value.min == -0.5
    assert event.histogram_value.max == 5.0


def test_density_figure_logged_as_image(tmp_path: Path) -> None:
    import matplotlib.image

    writer = SummaryWriter(str(tmp_path))
    grid = torch.linspace(-1.0, 30.0, 101)
    density = torch.exp(-grid.abs())
    ok = log_density_figure(
        writer, "curvature/density", grid, density, step=3, markers={"2/lr": 20.0, "ignored": float("nan")}
    )
    assert ok is True
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    (event,) = acc.Images("curvature/density")
    assert event.step == 3
    image = matplotlib.image.imread(io.BytesIO(event.encoded_image_string), format="png")
    assert image.shape[0] == event.height > 100
    assert image.shape[1] == event.width > 100


def test_density_figure_validates_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        log_density_figure(None, "d", [0.0, 1.0], [1.0], step=0)
    with pytest.raises(ValueError, match="empty"):
        log_density_figure(None, "d", [], [], step=0)


def test_density_figure_without_matplotlib_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lct, "_warned_no_matplotlib", False)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import raise ImportError
    writer = SummaryWriter(str(tmp_path))
    try:
        with pytest.warns(UserWarning, match="matplotlib is not installed"):
            assert log_density_figure(writer, "d", [0.0, 1.0], [1.0, 2.0], step=0) is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert log_density_figure(writer, "d", [0.0, 1.0], [1.0, 2.0], step=1) is False
    finally:
        writer.close()


def test_tag_names_have_one_source() -> None:
    """``tags.py`` defines every name; ``tensorboard.py`` re-exports them under the old names, the report reads them."""
    from lightning_curvature import report, tags

    exported = [n for n in lct.__all__ if n.isupper() and n != "LAYOUT_TAG"]
    assert exported and all(getattr(lct, n) is getattr(tags, n) for n in exported)
    assert lct.eig_tag is tags.eig_tag and lct.grad_cov_eig_tag is tags.grad_cov_eig_tag
    assert (report._SHARPNESS, report._GC_COND, report._EIG_RE) == (tags.SHARPNESS, tags.GRAD_COV_CONDITION_NUMBER,
                                                                    tags.EIG_TAG_RE)  # fmt: skip
    for name in tags.__all__:
        value = getattr(tags, name)
        if isinstance(value, str):
            assert tags.is_curvature_tag(value), name
    with pytest.raises(ValueError, match="1-based"):
        tags.eig_tag(0)
