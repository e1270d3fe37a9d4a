"""``lightning-curvature demo``: a short run writes what a user inspects.

One demo run (module-scoped, 30 steps) is shared by the checks of its TensorBoard event files (curvature tags,
custom-scalars layout), of the report (PNG + CSV), of the printed summary and of a real TensorBoard server
serving the run; other optimizer/scheduler combinations get a shorter run each.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _tensorboard import tensorboard_server
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_curvature import cli
from lightning_curvature.demo import DEFAULT_LR, DemoResult, format_summary, run_demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVATURE_TAGS = {
    "curvature/sharpness",
    "curvature/stability_threshold",
    "curvature/edge_ratio",
    *(f"curvature/eig_{i}" for i in range(1, 6)),
    "grad_cov/eig_1",
    "grad_cov/condition_number",
    "grad_cov/trace",
    "grad_cov/noise_scale",
}
STEPS = 30


pytestmark = pytest.mark.integration


def _args(out: Path, *extra: str) -> list[str]:
    return ["--steps", str(STEPS), "--every", "5", "--out", str(out), "--no-progress-bar", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    """Run ``demo_main`` once (SGD + SharpnessAwareLR); return the out folder, stdout and wall time."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["demo", *_args(out)])
    elapsed = time.perf_counter() - t0
    assert code == 0
    return out, buf.getvalue(), elapsed


def _accumulator(run_dir: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def test_demo_writes_curvature_tags(demo_run: tuple[Path, str, float]) -> None:
    out, _, _ = demo_run
    run_dir = out / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    acc = _accumulator(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert tags >= CURVATURE_TAGS, f"missing {sorted(CURVATURE_TAGS - tags)}"
    assert "train_loss" in tags and "lr-SGD" in tags
    sharp = acc.Scalars("curvature/sharpness")
    assert [e.step for e in sharp] == list(range(0, STEPS, 5))  # step 0 and every 5 steps
    assert all(math.isfinite(e.value) and e.value > 0 for e in sharp)
    lr = {e.step: e.value for e in acc.Scalars("lr-SGD")}
    thr = {e.step: e.value for e in acc.Scalars("curvature/stability_threshold")}
    for step, value in thr.items():  # SharpnessAwareLR: the threshold is 2/lr of the lr in force at that step
        if step in lr:
            assert value == pytest.approx(2.0 / lr[step], rel=1e-5)


def test_demo_writes_custom_scalars_layout(demo_run: tuple[Path, str, float]) -> None:
    out, _, _ = demo_run
    acc = _accumulator(out / "version_0")
    events = acc.Tensors("custom_scalars__config__")
    assert len(events) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    charts = {(cat.title, ch.title): ch for cat in layout.category for ch in cat.chart}
    chart = charts[("curvature", "sharpness vs stability threshold")]
    assert list(chart.multiline.tag) == ["curvature/sharpness", "curvature/stability_threshold"]


def test_demo_writes_report(demo_run: tuple[Path, str, float]) -> None:
    out, _, _ = demo_run
    png, csv_path = out / "version_0" / "curvature_report.png", out / "version_0" / "curvature_scalars.csv"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 50_000
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"run", "tag", "step", "value"}
    assert {r["tag"] for r in rows} >= {"curvature/sharpness", "grad_cov/condition_number", "lr-SGD"}


def test_demo_prints_summary_and_tensorboard_command(demo_run: tuple[Path, str, float]) -> None:
    out, stdout, elapsed = demo_run
    for row in ("final training loss", "final sharpness", "stability threshold 2/lr", "edge ratio",
                "grad-cov condition number", "measurements (Hessian / grad-cov)", "wall time"):  # fmt: skip
        assert row in stdout, f"summary lacks {row!r}:\n{stdout}"
    assert f"tensorboard --logdir {out}" in stdout.splitlines()[-1]
    measured = re.search(r"measurements \(Hessian / grad-cov\)\s+(\d+) / (\d+)", stdout)
    assert measured is not None and measured.groups() == ("6", "3")  # steps 0,5,...,25 and 0,12,24
    assert "curvature_report.png" in stdout
    print(f"demo ({STEPS} steps): {elapsed:.1f} s")


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "lr_tag"),
    [("adam", "cdat", "lr-Adam"), ("momentum", "constant", "lr-SGD"), ("sgd", "cdat", "lr-SGD")],
    ids=lambda v: str(v),
)
def test_demo_other_optimizers_and_schedulers(tmp_path: Path, optimizer: str, scheduler: str, lr_tag: str) -> None:
    args = cli.build_parser().parse_args(["demo", *_args(tmp_path, "--optimizer", optimizer, "--scheduler", scheduler)])
    args.steps = 12
    result = run_demo(args)
    assert isinstance(result, DemoResult)
    m = result.metrics
    assert m["steps"] == 12 and m["hessian_measurements"] == 3
    assert math.isfinite(m["final_loss"]) and m["sharpness"] > 0 and m["threshold"] > 0
    tags = set(_accumulator(result.log_dir).Tags()["scalars"])
    assert lr_tag in tags and "curvature/sharpness" in tags
    if scheduler == "cdat":
        assert {"cdat/lr", "cdat/edge_lr"} <= tags
    text = format_summary(result)
    assert ("preconditioned" in text) == (optimizer == "adam")
    assert f"{optimizer} + {scheduler}" in text


def test_demo_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda", "--steps", "1", "--out", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--scheduler", "greedy"])
    assert DEFAULT_LR == {"sgd": 1.0, "momentum": 0.2, "adam": 0.01}


def test_python_dash_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_curvature", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "report" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_curvature", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--device", "--steps", "--out", "--optimizer", "--scheduler", "--lr", "--seed"):
        assert option in proc.stdout


# --- the demo's log, served by a real TensorBoard ---------------------------------------------------------------
def test_tensorboard_serves_the_demo_run(demo_run: tuple[Path, str, float], tmp_path: Path) -> None:
    out, _, _ = demo_run
    with tensorboard_server(out, tmp_path / "tensorboard.log") as server:
        tags = server.wait_for_tag("version_0", "grad_cov/condition_number")
        assert set(tags["version_0"]) >= CURVATURE_TAGS
        layout = server.get_json("/data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert "curvature" in titles and "grad_cov" in titles
