"""The ``lightning-curvature`` command line: sub-commands, help, the ``report`` path, entry points."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_curvature import __version__, cli


def _write_run(logdir: Path) -> None:
    writer = SummaryWriter(str(logdir / "run_a"))
    for step in range(0, 50, 10):
        writer.add_scalar("curvature/sharpness", 1.0 + step / 10, step)
        writer.add_scalar("curvature/stability_threshold", 20.0, step)
        writer.add_scalar("train_loss", 1.0 / (1 + step), step)
    writer.close()


def test_parser_subcommands() -> None:
    parser = cli.build_parser()
    ns = parser.parse_args(["demo", "--steps", "7", "--optimizer", "adam", "--scheduler", "cdat", "--lr", "0.1"])
    assert (ns.command, ns.steps, ns.optimizer, ns.scheduler, ns.lr) == ("demo", 7, "adam", "cdat", 0.1)
    ns = parser.parse_args(["demo"])
    assert (ns.device, ns.out, ns.optimizer, ns.scheduler, ns.lr, ns.seed) == (
        "auto", "curvature_demo", "sgd", "sharpness", None, 0,
    )  # fmt: skip
    ns = parser.parse_args(["report", "a", "b", "--out", "rep", "--title", "t"])
    assert (ns.command, ns.logdirs, ns.out, ns.title) == ("report", ["a", "b"], "rep", "t")


@pytest.mark.parametrize(
    "argv",
    [["demo", "--device", "tpu"], ["demo", "--optimizer", "lbfgs"], ["demo", "--steps", "x"], ["report"]],
    ids=lambda a: " ".join(a),
)
def test_parser_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_no_subcommand_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "demo" in err and "report" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_report_subcommand_writes_png_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "logs")
    out = tmp_path / "report"
    assert cli.main(["report", str(tmp_path / "logs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    png, csv_path = out / "curvature_report.png", out / "curvature_scalars.csv"
    assert printed == [str(png), str(csv_path)]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "curvature/sharpness" in csv_path.read_text()


def test_report_subcommand_missing_logdir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_demo_subcommand_dispatches(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_curvature.demo as demo

    seen = {}

    def fake_demo_main(args: object) -> int:
        seen["args"] = args
        return 0

    monkeypatch.setattr(demo, "demo_main", fake_demo_main)
    assert cli.main(["demo", "--steps", "3"]) == 0
    assert seen["args"].steps == 3  # type: ignore[attr-defined]


def test_help_does_not_import_lightning() -> None:
    """``--help`` stays fast: the CLI imports Lightning only to run the demo."""
    code = (
        "import sys\n"
        "from lightning_curvature import cli\n"
        "try:\n    cli.main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'lightning.pytorch' not in sys.modules, 'lightning imported by --help'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--optimizer" in proc.stdout


def test_demo_and_cli_import_one_way_and_demo_is_self_contained() -> None:
    """cli -> demo, never back; the demo does not use the examples' scaffolding (``_digits``)."""
    code = (
        "import sys\n"
        "import lightning_curvature.demo\n"
        "bad = [m for m in ('lightning_curvature.cli', 'lightning_curvature._digits') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_help_shows_the_demos_default_learning_rates() -> None:
    from lightning_curvature.demo import DEFAULT_LR

    shown = ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
    assert cli._DEFAULT_LR_HELP == shown
    assert cli.DEFAULT_LR is DEFAULT_LR  # still importable from its old place


@pytest.mark.parametrize("command", ["demo", "report"])
def test_unwritable_out_is_one_error_line_and_exit_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_run(tmp_path / "logs")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    argv = [command, "--out", str(tmp_path / "file.txt" / "out")]
    argv += ["--steps", "1", "--no-progress-bar"] if command == "demo" else [str(tmp_path / "logs")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lightning-curvature {command}: error: cannot write to --out")
    assert "is a file, not a folder" in err


def test_console_script_entry_point() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lightning-curvature") == "lightning_curvature.cli:main"
    exe = shutil.which("lightning-curvature") or str(Path(sys.executable).parent / "lightning-curvature")
    if not Path(exe).exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([exe, "report", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "LOGDIR" in proc.stdout
