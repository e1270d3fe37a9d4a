"""Every ``examples/*.py`` runs at reduced size (``--fast``) and writes its figure; plus the shared digits helpers.

The examples are run as subprocesses, exactly as a user would (``python examples/X.py --fast --out DIR``), with
one thread (``OMP_NUM_THREADS=1``) and the Agg backend. Each should take well under ~20 s on one CPU thread; the
hard limit below only catches runaway scripts on a loaded machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_curvature._digits import (
    ResidualMLP,
    example_parser,
    load_digits_data,
    make_mlp,
    minibatch_loader,
    mse_loss,
    write_json,
)

pytestmark = pytest.mark.integration

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HARD_LIMIT_S = 180.0
#: Examples that only print (plain-PyTorch loop demonstrations); every other example must write ``<name>.png``.
NO_FIGURE = {"plain_pytorch_cdat", "plain_pytorch_sharpness_aware"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


def test_examples_are_found() -> None:
    names = {p.stem for p in EXAMPLES}
    expected = {
        "eos_gradient_descent",
        "instability_warmup",
        "break_even_point",
        "tiny_subspace",
        "vanishing_curvature",
        "lightning_cli",
    }
    assert expected <= names, f"missing examples: {sorted(expected - names)}"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_fast_and_writes_its_figure(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--fast", "--out", str(out)],
        cwd=tmp_path,  # anything written relative to the working directory (logs) stays in tmp_path
        env=_env(),
        capture_output=True,
        text=True,
        timeout=HARD_LIMIT_S,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, (
        f"{script.name} failed ({elapsed:.1f} s):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    pngs = sorted(out.glob("*.png"))
    if script.stem in NO_FIGURE:
        assert proc.stdout.strip()
        return
    assert pngs, f"{script.name} wrote no PNG into --out; stdout:\n{proc.stdout[-2000:]}"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert (out / f"{script.stem}.png") in pngs, f"expected {script.stem}.png, got {[p.name for p in pngs]}"
    payloads = {js.stem: json.loads(js.read_text(encoding="utf-8")) for js in out.glob("*.json")}  # no bare NaN
    check = _JSON_CHECKS.get(script.stem)
    if check is not None:
        check(payloads[script.stem])
    assert proc.stdout.strip(), "each example prints a summary of what it measured"
    print(f"{script.stem}: {elapsed:.1f} s")


# The JSON carries the measurements behind the printed summary (never hard-coded numbers): consistency checks.
def _check_eos(p: dict[str, Any]) -> None:
    assert len(p["summary"]) == len(p["config"]["lrs"]) >= 2
    for row in p["summary"]:
        assert row["threshold_2_over_lr"] == pytest.approx(2.0 / row["lr"])
        assert row["sharpness_init"] > 0 and row["num_hvp"] > 0 and row["final_loss"] < 0.5


def _check_warmup(p: dict[str, Any]) -> None:
    rows = p["summary"]
    assert [r["warmup_steps"] for r in rows] == p["config"]["warmups"]
    assert all(r["edge_ratio_init"] > 0 for r in rows)


def _check_break_even(p: dict[str, Any]) -> None:
    assert [r["lr"] for r in p["summary"]["runs"]] == p["config"]["lrs"]
    for series in p["series"]:
        assert len(series["steps"]) == len(series["lambda_H"]) == len(series["cond_K"])
        assert all(c >= 1.0 for c in series["cond_K"])


def _check_subspace(p: dict[str, Any]) -> None:
    for row in p["summary"]:
        assert 0.0 <= row["overlap_full_init"] <= 1.0
        assert 0.0 <= row["overlap_full_second_half_mean"] <= 1.0
        assert row["random_baseline_k_over_P"] == pytest.approx(10 / 8970)


def _check_vanishing(p: dict[str, Any]) -> None:
    assert set(p["curvature"]) == {"plain tanh", "plain relu", "residual tanh", "residual relu"}
    for rows in p["curvature"].values():
        assert len(rows["first_layer"]) == len(p["config"]["depths"])


_JSON_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "eos_gradient_descent": _check_eos,
    "instability_warmup": _check_warmup,
    "break_even_point": _check_break_even,
    "tiny_subspace": _check_subspace,
    "vanishing_curvature": _check_vanishing,
}


# --- the shared digits helpers -----------------------------------------------------------------------------------
def test_digits_split_is_standardised_and_seeded() -> None:
    a = load_digits_data(300, 100, seed=3)
    b = load_digits_data(300, 100, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.labels_test, b.labels_test)
    assert a.x_train.shape == (300, 64) and a.y_train.shape == (300, 10) and a.x_test.shape == (100, 64)
    assert torch.allclose(a.x_train.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.equal(a.y_train.argmax(1), a.labels_train)
    with pytest.raises(ValueError, match="num_train"):
        load_digits_data(1700, 200)


def test_make_mlp_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    m1, m2 = make_mlp(depth=3, width=16, seed=1), make_mlp(depth=3, width=16, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    scaled = make_mlp(depth=3, width=16, seed=1, output_scale=3.0)
    assert torch.allclose(scaled[-1].weight, 3.0 * m1[-1].weight)  # type: ignore[index]
    res = make_mlp(depth=4, width=16, residual=True, activation="relu", seed=0)
    assert isinstance(res, ResidualMLP) and len(res.blocks) == 3
    assert res(torch.zeros(5, 64)).shape == (5, 10)
    with pytest.raises(ValueError, match="activation"):
        make_mlp(activation="gelu")  # type: ignore[arg-type]


def test_minibatch_loader_and_loss() -> None:
    data = load_digits_data(64, 0)
    batches = list(minibatch_loader(data, 16, seed=0))
    assert len(batches) == 4 and batches[0][0].shape == (16, 64)
    model = make_mlp(depth=1, width=8)
    x, y, _ = data.train_batch()
    expected = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
    torch.testing.assert_close(mse_loss(model, data.train_batch()), expected)


def test_write_json_and_example_parser(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sub" / "x.json", {"a": math.nan, "b": [1.0, math.inf], "t": torch.tensor([2.0])})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "t": [2.0]}
    ns = example_parser("doc", tmp_path).parse_args(["--fast", "--out", "o", "--seed", "3"])
    assert (ns.fast, ns.out, ns.seed) == (True, "o", 3)
