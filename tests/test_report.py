"""Tests for ``lightning_curvature.report``: reading event files, CSV round trip and the PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_curvature.report import (
    CSV_NAME,
    PNG_NAME,
    add_report_arguments,
    make_report,
    read_scalars,
    report_main,
)

Points = dict[str, list[tuple[int, float]]]


def _synthetic_run(seed: int, lr: float, steps: range) -> Points:
    """Known values for every panel; floats rounded to float32 as TensorBoard stores them."""
    rng = np.random.default_rng(seed)
    threshold = 2.0 / lr
    sharp = threshold * (1.0 - np.exp(-np.array(steps) / 60.0)) * rng.uniform(0.9, 1.0, len(steps))
    data: Points = {
        "curvature/sharpness": list(zip(steps, sharp)),
        "curvature/stability_threshold": [(s, threshold) for s in steps],
        "grad_cov/condition_number": [(s, 10.0 + 3.0 * s) for s in steps],
        "grad_cov/eig_1": [(s, 0.5 * np.exp(-s / 100.0)) for s in steps],
        "lr-SGD": [(s, lr) for s in steps],
        "train_loss": [(s, 2.3 * np.exp(-s / 80.0) + rng.uniform(0, 0.05)) for s in steps],
    }
    for i in (1, 2, 3):
        data[f"curvature/eig_{i}"] = [(s, v / i) for s, v in zip(steps, sharp)]
    return {tag: [(int(s), float(np.float32(v))) for s, v in pts] for tag, pts in data.items()}


def _write(logdir: Path, data: Points) -> None:
    writer = SummaryWriter(str(logdir))
    for tag, points in data.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, dict[str, Points]]:
    root = tmp_path / "logs"
    runs = {
        "sgd/version_0": _synthetic_run(0, lr=0.05, steps=range(0, 200, 10)),
        "sam/version_0": _synthetic_run(1, lr=0.02, steps=range(0, 150, 5)),
    }
    for name, data in runs.items():
        _write(root / name, data)
    return root, runs


def test_read_scalars_returns_exactly_what_was_written(two_runs: tuple[Path, dict[str, Points]]) -> None:
    root, runs = two_runs
    got = read_scalars(root)
    assert list(got) == sorted(runs)
    for name, data in runs.items():
        assert got[name] == {tag: data[tag] for tag in sorted(data)}


def test_make_report_csv_round_trip_and_png(two_runs: tuple[Path, dict[str, Points]], tmp_path: Path) -> None:
    root, runs = two_runs
    out = tmp_path / "report"
    paths = make_report([root], out)
    assert paths == [out / PNG_NAME, out / CSV_NAME]

    with paths[1].open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["run", "tag", "step", "value"]
        rows = [(run, tag, int(step), float(value)) for run, tag, step, value in reader]
    expected = [(run, tag, s, v) for run, data in runs.items() for tag, pts in data.items() for s, v in pts]
    assert sorted(rows) == sorted(expected)  # exact float equality

    png = paths[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 50_000  # six panels with lines, not a blank canvas
    import matplotlib.image

    image = matplotlib.image.imread(paths[0])
    assert image.shape[0] > 800 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # something is drawn


def test_make_report_several_logdirs_prefixes_runs(tmp_path: Path) -> None:
    steps = range(0, 50, 10)
    _write(tmp_path / "a", _synthetic_run(0, 0.1, steps))
    _write(tmp_path / "b" / "version_0", _synthetic_run(1, 0.1, steps))
    png, csv_path = make_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out" / "figure.png")
    assert png == tmp_path / "out" / "figure.png" and png.is_file()
    assert csv_path == tmp_path / "out" / "figure.csv"
    with csv_path.open(newline="") as f:
        runs = {row["run"] for row in csv.DictReader(f)}
    assert runs == {"a", "b/version_0"}


def test_make_report_missing_panels_and_tf2_scalars(tmp_path: Path) -> None:
    """A run with only a loss and a sharpness (logged TF2-style, as tensors) still gives a PNG; missing panels are
    noted."""
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb

    writer = SummaryWriter(str(tmp_path / "logs"))
    for step in range(5):
        writer._get_file_writer().add_summary(scalar_pb("loss", 1.0 / (step + 1)), step)
        writer._get_file_writer().add_summary(scalar_pb("curvature/sharpness", 2.0 + step), step)
    writer.close()
    expected = [(s, float(np.float32(1.0 / (s + 1)))) for s in range(5)]
    assert read_scalars(tmp_path / "logs") == {
        ".": {"curvature/sharpness": [(s, 2.0 + s) for s in range(5)], "loss": expected}
    }
    png, csv_path = make_report([tmp_path / "logs"], tmp_path / "out")
    with csv_path.open(newline="") as f:
        assert {row["run"] for row in csv.DictReader(f)} == {"logs"}
    assert png.stat().st_size > 10_000


def test_make_report_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_report([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No TensorBoard event files"):
        make_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ValueError, match="empty"):
        make_report([], tmp_path / "out")


def test_logs_without_curvature_tags_are_refused_not_drawn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder of ordinary training logs has event files but no curvature tag: say so, draw nothing."""
    writer = SummaryWriter(str(tmp_path / "logs" / "version_0"))
    for step in range(5):
        writer.add_scalar("train_loss", 1.0 / (step + 1), step)
        writer.add_scalar("lr-SGD", 0.1, step)
    writer.close()
    with pytest.raises(ValueError, match=r"No curvature tags .*lr-SGD, train_loss.*monitors attached"):
        make_report([tmp_path / "logs"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert report_main([str(tmp_path / "logs"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "No curvature tags" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_runs_without_curvature_tags_are_named(two_runs: tuple[Path, dict[str, Points]], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    root, _ = two_runs
    writer = SummaryWriter(str(root / "plain"))
    writer.add_scalar("train_loss", 1.0, 0)
    writer.close()
    make_report([root], tmp_path / "out")
    assert "no curvature tags in run(s) plain" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["file.txt/report", "file.txt/report.png", "file.txt"], ids=str)
def test_unwritable_out_is_one_error_line_and_exit_2(
    two_runs: tuple[Path, dict[str, Points]], tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str
) -> None:
    root, _ = two_runs
    (tmp_path / "file.txt").write_text("not a folder")
    assert report_main([str(root), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lightning-curvature report: error: cannot write to --out")
    assert "is a file" in err or "Not a directory" in err or "File exists" in err


def test_report_main(
    two_runs: tuple[Path, dict[str, Points]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = two_runs
    out = tmp_path / "cli_out"
    assert report_main([str(root), "--out", str(out), "--title", "two runs"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / PNG_NAME), str(out / CSV_NAME)]
    assert report_main([str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err

    import argparse

    ns = add_report_arguments(argparse.ArgumentParser()).parse_args([str(root), "--out", str(out)])
    assert report_main(ns) == 0
