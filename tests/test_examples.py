"""Every ``examples/*.py`` runs at reduced size (``--fast``) and writes its figure; plus the examples' helpers.

The examples are run as subprocesses, exactly as a user would (``python examples/X.py --fast --out DIR``), with
one thread (``OMP_NUM_THREADS=1``) and the Agg backend. Each should take well under ~20 s on one CPU thread; the
hard limit below only catches runaway scripts on a loaded machine. The helpers (``examples/_digits.py``,
``examples/_training.py``) are imported from the examples folder, as the scripts import them.
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

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES_DIR))

from _digits import (  # noqa: E402
    Init,
    band,
    cross_entropy_loss,
    example_parser,
    load_digits_data,
    make_mlp,
    minibatches,
    mse_loss,
    spread,
    write_json,
)
from _training import hvp, train_cdat, train_constant, train_warmup  # noqa: E402

pytestmark = pytest.mark.integration

EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_"))
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
        "cdat_vs_constant",
        "warmup_emerges",
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
    assert proc.stdout.strip(), "each example prints a summary of what it measured"
    if script.stem in NO_FIGURE:
        return
    pngs = sorted(out.glob("*.png"))
    assert (out / f"{script.stem}.png") in pngs, f"expected {script.stem}.png, got {[p.name for p in pngs]}"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    payloads = {js.stem: json.loads(js.read_text(encoding="utf-8")) for js in out.glob("*.json")}  # no bare NaN
    check = _JSON_CHECKS.get(script.stem)
    if check is not None:
        check(payloads[script.stem])
    print(f"{script.stem}: {elapsed:.1f} s")


# The JSON carries the measurements behind the printed summary (never hard-coded numbers): consistency checks of
# properties the numbers must have whatever they are (bounds, alignment of series, counts).
def _seeds(p: dict[str, Any]) -> int:
    return len(p["config"]["seeds"])


def _check_spread(s: dict[str, Any], n: int) -> None:
    assert len(s["values"]) == n
    if s["n_finite"]:
        assert s["min"] <= s["mean"] <= s["max"] and s["min"] <= s["median"] <= s["max"]


def _check_eos(p: dict[str, Any]) -> None:
    assert len(p["summary"]) == len(p["config"]["lrs"]) >= 2 and _seeds(p) >= 2
    for row in p["summary"]:
        assert row["threshold_2_over_lr"] == pytest.approx(2.0 / row["lr"])
        assert 0 <= row["runs_reaching_edge"] <= _seeds(p)
        _check_spread(row["sharpness_init"], _seeds(p))
        assert row["sharpness_init"]["min"] > 0 and row["num_hvp"] > 0


def _check_warmup(p: dict[str, Any]) -> None:
    grid, n = p["grid"], _seeds(p)
    assert [r["warmup"] for r in p["per_warmup"]] == grid["warmups"]
    for w in grid["warmups"]:
        assert all(0 <= d <= n for d in grid["diverged"][str(w)])
        rows = grid["late_loss"][str(w)]
        assert len(rows) == n and all(len(r) == len(grid["peak_lrs"]) for r in rows)
        for row, diverged in zip(zip(*rows), grid["diverged"][str(w)]):  # per peak lr: diverged runs score null
            assert sum(v is None for v in row) == diverged
    for s in p["series"]:
        assert len(s["steps"]) == len(s["sharpness"]) == len(s["threshold"])


def _check_break_even(p: dict[str, Any]) -> None:
    for s in p["series"]:
        assert len(s["steps"]) == len(s["loss"]) == len(s["lambda_H"]) == len(s["lambda_K"]) == len(s["erank_K"])
        assert all(e >= 1.0 - 1e-9 for e in s["erank_K"])  # tr(K) ≥ λ_1(K)
        assert all(0.0 <= r <= 1.0 for r in s["smallest_ratio_K"])
        spec = s["spectrum_K_at_loss"]
        assert not spec or (spec[0] == pytest.approx(1.0) and spec == sorted(spec, reverse=True))
    for axis in p["summary"].values():
        for v in axis["maxima_ordered"].values():
            assert 0 <= v["pairs_as_conjectured"] <= v["pairs"]


def _check_subspace(p: dict[str, Any]) -> None:
    for row in p["summary"]:
        for key in ("overlap_init", "overlap_second_half", "stability_second_half"):
            assert all(v is None or -1e-6 <= v <= 1 + 1e-6 for v in row[key]["values"])
    for s in p["series"]:
        assert all(v is None or -1e-6 <= v <= 1 + 1e-6 for v in s["overlap"] + s["stability"])
        spec = s["spectrum_final"]
        assert spec == sorted(spec, reverse=True)


def _check_vanishing(p: dict[str, Any]) -> None:
    cfg = p["config"]
    for per_width in p["curvature"].values():
        for rows in per_width.values():
            assert len(rows) == len(cfg["depths"]) and all(len(r) == _seeds(p) for r in rows)
    assert len(p["training_curves"]) == 2 * 2 * len(cfg["train_widths"]) * _seeds(p)


def _check_cdat(p: dict[str, Any]) -> None:
    for s in p["summary"].values():
        assert s["best_constant"] in s["scores"]
        for name in (k for k in s if k.startswith("CDAT")):
            assert 0 <= s[name]["beats_best_constant_on_seeds"] <= _seeds(p)


def _check_warmup_emerges(p: dict[str, Any]) -> None:
    s = p["summary"]
    assert s["best_warmup"] in s["scores"]
    # the cap starts below the base lr: the initial 2/λ_max is below it by construction of the setting
    assert s["sharpness_aware_lr_first"]["max"] < p["config"]["base_lr"]


_JSON_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "eos_gradient_descent": _check_eos,
    "instability_warmup": _check_warmup,
    "break_even_point": _check_break_even,
    "tiny_subspace": _check_subspace,
    "vanishing_curvature": _check_vanishing,
    "cdat_vs_constant": _check_cdat,
    "warmup_emerges": _check_warmup_emerges,
}


# --- the examples' helpers -----------------------------------------------------------------------------------------
def test_digits_split_is_standardised_and_seeded() -> None:
    a = load_digits_data(300, 100, seed=3)
    b = load_digits_data(300, 100, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.labels_test, b.labels_test)
    assert a.x_train.shape == (300, 64) and a.y_train.shape == (300, 10) and a.x_test.shape == (100, 64)
    assert torch.allclose(a.x_train.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.equal(a.y_train.argmax(1), a.labels_train)
    unit = load_digits_data(300, seed=3, standardise=False)
    assert float(unit.x_train.min()) >= 0.0 and float(unit.x_train.max()) <= 1.0
    with pytest.raises(ValueError, match="num_train"):
        load_digits_data(1700, 200)


def _linear(model: torch.nn.Sequential, i: int) -> torch.nn.Linear:
    layer = model[i]
    assert isinstance(layer, torch.nn.Linear)
    return layer


@torch.no_grad()
def test_make_mlp_is_seeded_leaves_global_rng_alone_and_has_the_stated_variances() -> None:
    state = torch.random.get_rng_state()
    m1, m2 = make_mlp(depth=3, width=16, seed=1), make_mlp(depth=3, width=16, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    scaled = make_mlp(depth=3, width=16, seed=1, output_scale=3.0)
    assert torch.allclose(_linear(scaled, -1).weight, 3.0 * _linear(m1, -1).weight)
    # empirical weight variances against 2/fan_in (He), 1/fan_in (LeCun), 1/(3 fan_in) (PyTorch default)
    inits: tuple[Init, ...] = ("he", "lecun", "default")
    wide = {init: _linear(make_mlp(depth=1, width=4000, init=init, seed=0), 0) for init in inits}
    for init, expected in zip(inits, (2 / 64, 1 / 64, 1 / (3 * 64))):
        assert float(wide[init].weight.var()) == pytest.approx(expected, rel=0.03)
    assert float(wide["he"].bias.abs().max()) == 0.0
    with pytest.raises(ValueError, match="activation"):
        make_mlp(activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init"):
        make_mlp(init="xavier")  # type: ignore[arg-type]


def test_minibatches_cover_an_epoch_and_losses_match_their_formulas() -> None:
    data = load_digits_data(64)
    nxt = minibatches(data, 16, seed=0)
    seen = torch.cat([nxt()[2] for _ in range(4)])
    assert sorted(seen.tolist()) == sorted(data.labels_train.tolist())  # one epoch = a permutation
    model = make_mlp(depth=1, width=8)
    x, y, labels = data.train_batch()
    out = model(x)
    torch.testing.assert_close(mse_loss(model, (x, y, labels)), 0.5 * ((out - y) ** 2).sum(1).mean())
    manual = -(out.log_softmax(1).gather(1, labels[:, None])).mean()
    torch.testing.assert_close(cross_entropy_loss(model, (x, y, labels)), manual)


def test_hvp_matches_a_dense_float64_hessian() -> None:
    torch.manual_seed(0)
    model = make_mlp(depth=1, width=3).double()
    data = load_digits_data(20)
    batch = (data.x_train.double(), data.y_train.double(), data.labels_train)
    params = list(model.parameters())
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors, i = {}, 0
        for name, p in model.named_parameters():
            tensors[name] = flat[i : i + p.numel()].view_as(p)
            i += p.numel()
        return mse_loss(lambda x: torch.func.functional_call(model, tensors, (x,)), batch)  # type: ignore[arg-type]

    dense = torch.autograd.functional.hessian(loss_of, flat0)
    v = torch.randn(flat0.numel(), dtype=torch.float64)
    torch.testing.assert_close(hvp(model, mse_loss, batch, v, params), dense @ v)


def test_training_loops_record_what_they_did() -> None:
    data = load_digits_data(100).train_batch()
    const = train_constant(make_mlp(depth=1, width=8), data, 0.1, 30, eval_every=10)
    assert const.lrs == [0.1] * 30 and [s for s, _ in const.evals] == [0, 10, 20, 30]
    assert const.final_loss == const.evals[-1][1] < const.evals[0][1]
    warm = train_warmup(make_mlp(depth=1, width=8), data, 0.1, 10, 20)
    assert warm.lrs[:10] == pytest.approx([0.1 * (t + 1) / 10 for t in range(10)]) and warm.lrs[10:] == [0.1] * 10
    blown = train_constant(make_mlp(depth=1, width=8, output_scale=30.0), data, 50.0, 50)
    assert blown.diverged and math.isinf(blown.final_loss) and math.isinf(blown.late_loss())
    cdat = train_cdat(make_mlp(depth=1, width=8), data, 20, sigma=1.0)
    assert not cdat.diverged and all(lr > 0 for lr in cdat.lrs)


def test_write_json_spread_parser_and_band(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sub" / "x.json", {"a": math.nan, "b": [1.0, math.inf], "t": torch.tensor([2.0])})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "t": [2.0]}
    ns = example_parser("doc", tmp_path).parse_args(["--fast", "--out", "o", "--seed", "3", "--seeds", "4"])
    assert (ns.fast, ns.out, ns.seed, ns.seeds) == (True, "o", 3, 4)
    s = spread([3.0, math.inf, 1.0])
    assert (s["mean"], s["median"], s["min"], s["max"], s["n_finite"]) == (2.0, 2.0, 1.0, 3.0, 2)

    class Axis:  # records what band() draws
        def __init__(self) -> None:
            self.lines: list[tuple[list[float], list[float]]] = []

        def plot(self, x: list[float], y: list[float], **_: Any) -> None:
            self.lines.append((list(x), list(y)))

        def fill_between(self, *_: Any, **__: Any) -> None:
            pass

    ax = Axis()
    band(ax, [0, 1, 2], [[1.0, 2.0, 3.0], [3.0, math.nan], [2.0, 4.0, 5.0]], color="C0", label="x")
    assert ax.lines[-1] == ([0, 1, 2], [2.0, 3.0, 4.0])  # medians; the short/NaN run counts only where finite
    band(ax, [0, 1, 2], [[1.0, 2.0, 3.0], [3.0, math.nan]], color="C0", label="x", require_all=True)
    assert ax.lines[-1] == ([0], [2.0])
