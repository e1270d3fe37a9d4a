"""The cost of the Hessian monitors on a real transformer: per measurement, in Lightning, tracking, and under FSDP2.

The workload is ``bench_scale.py``'s GPT (pre-LayerNorm, causal ``F.scaled_dot_product_attention``, GELU MLP, tied
embedding) on windows of 64 bytes of the Python standard library's sources, trained with AdamW (betas 0.9/0.95,
weight decay 0.1, lr 1e-3) in float32 on this CPU, one thread per process. Sizes (``--sizes``), as
(d_model, layers, training batch of 64-byte windows):

* ``3M``: (256, 4, 16), 3.2M parameters;
* ``25M``: (512, 8, 8), 25.3M parameters;
* ``85M``: (768, 12, 4), 85.0M parameters.

Parts (``--parts``):

* ``measure``: one measurement of the preconditioned sharpness as the monitor computes it for AdamW
  (``preconditioner_parts`` of the optimizer + ``hessian_eigenvalues(..., preconditioner=P)``, ``method="auto"``),
  top-1 and top-5 at tol 1e-3, after 20 training steps (at initialisation the top eigenvalues are clustered), on a
  held-out curvature batch as large as a training batch. Per size, in a fresh subprocess each, ``eager`` (the
  20 steps and the measurement eager: ``auto`` chooses double backward, math attention kernel) and ``compiled``
  (``torch.compile(model)`` with inductor for the 20 steps and the measurement: ``auto`` chooses finite
  differences, four gradients per product, through the compiled code; the first compiled measurement, which
  compiles the ``functional_call`` path, is reported apart from the steady state). Reported: products, seconds,
  seconds per product, seconds in training steps (median of steps 10-19), the peak resident set the measurement
  adds (``VmHWM`` reset right before it, as in ``bench_scale``) plus the parameters, in parameters' bytes, and
  ``res.method``. ``--variants compiled-f64`` (not in the default run): compiled, with the products in float64
  (``dtype=torch.float64``), where float32 differences are too inaccurate. Top-5 uses ``max_vectors=12`` at 25M
  and 85M (unbounded it would hold ~40 parameter-sized vectors); at 3M both. The eager first-use check of
  ``method="auto"`` (one double-backward and one finite-difference product, cached per model) is timed apart.
  ``--skip-85m-compiled-top5`` (default on in the default run) leaves out the slowest cell; the per-product time of
  the compiled 85M top-1 says what it costs.
* ``lightning``: a 200-step ``trainer.fit`` of the 3M GPT (``--lightning-sizes`` for more), batch 16, with no
  monitor, with ``HessianEigenvalueMonitor()`` at its defaults (adaptive cadence, 5% budget, k=5, tol 1e-3)
  and in tracking mode (``every_n_steps=1, tracking_products=2, k=1, cold_start_every=25``), both monitors on a
  fixed curvature batch of ``--curvature-examples`` windows (default 8, half a training batch; the monitor's own
  default of 256 windows would make one product cost 16 training steps here). Eager, and compiled
  (``trainer.fit(torch.compile(module))``) unless ``--no-compiled``. Reported: wall-time overhead per step
  against the no-monitor fit, the monitor's measuring share (``measure_time_s / train_time_s``), measurements,
  products per step; for the default cadence the plan at the end (gap, steady-state overhead); for tracking the
  error of the tracked sharpness against a cold certified reference (double backward, tol 1e-6, same
  preconditioner, same curvature batch, every 10th step; its time excluded from every timing).
* ``fsdp``: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` per
  block and at the root, 2 processes (gloo, one thread each), the 3M GPT, global batch 16: a 100-step fit without
  and with ``HessianEigenvalueMonitor()`` (defaults, curvature batch of ``--curvature-examples`` windows in total),
  per-measurement products and seconds, realised and planned overhead, per-rank peak memory of a measurement
  against a single-process unsharded measurement of the same monitor (``method="finite_difference"``, the only
  method under FSDP2) on a curvature batch of the same global size.

Every timing runs with nothing else on the CPU (take ``/work/cpu.lock``). Run::

    flock /work/cpu.lock python benchmarks/bench_transformer.py          # all parts, ~45 min: results/transformer.json
    flock /work/cpu.lock python benchmarks/bench_transformer.py --quick  # 3M, short fits (~8 min): transformer_quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _transformer_common import (
    CONTEXT,
    SIZES,
    FitClock,
    GPTModule,
    MemoryProbedMonitor,
    Recorder,
    adamw,
    gpt_loss,
    num_params,
    peak_bytes,
    reset_peak,
    rss_bytes,
    text_windows,
    threads,
    trim,
)
from bench_scale import GPT

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_STEPS = 20
CURVATURE_START = 300_000  # byte offset of the held-out curvature batch (training windows come from the start)


# --- part 1: one measurement -------------------------------------------------------------------------------------
def _measure_once(
    net: torch.nn.Module,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: Any,
    k: int,
    mv: int | None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """One preconditioned top-k measurement as the monitor makes it; time and the resident set it adds."""
    from lightning_curvature import hessian_eigenvalues
    from lightning_curvature.core.preconditioner import preconditioner_parts

    trim()
    base = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    P = preconditioner_parts(opt, params)
    res = hessian_eigenvalues(
        net, gpt_loss, batch, k=k, tol=1e-3, max_iter=300, preconditioner=P, max_vectors=mv, dtype=dtype,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    added = peak_bytes() - base
    n = num_params(model)
    return {
        "k": k,
        "max_vectors": mv,
        "num_hvp": res.num_hvp,
        "seconds": seconds,
        "seconds_per_product": seconds / max(res.num_hvp, 1),
        "method": res.method,
        "converged": res.converged,
        "eigenvalues": res.eigenvalues.tolist(),
        "error_bounds": res.error_bounds.tolist(),
        "peak_vectors": res.peak_vectors,
        "peak_bytes_over_params": added / (4 * n) + 1.0,
    }


def measure_size(size: str, variant: str, skip_top5: bool) -> dict[str, Any]:
    """Train 20 steps (eager or compiled), then the measurements of part 1, in this process."""
    from lightning_curvature.core.hvp import HessianOperator

    threads()
    d, layers, bsz = SIZES[size]
    torch.manual_seed(0)
    model = GPT(d, layers, context=CONTEXT)
    net: torch.nn.Module = torch.compile(model) if variant.startswith("compiled") else model
    dtype = torch.float64 if variant == "compiled-f64" else None  # float64 products of the float32 model
    opt = adamw(model.parameters())
    step_s = []
    for i in range(TRAIN_STEPS):
        batch = text_windows(bsz, start=i * bsz * (CONTEXT + 1))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        gpt_loss(net, batch).backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
    for p in model.parameters():
        p.grad = None
    step = statistics.median(step_s[10:])
    cbatch = text_windows(bsz, start=CURVATURE_START)
    out: dict[str, Any] = {
        "size": size,
        "variant": variant,
        "num_params": num_params(model),
        "d_model": d,
        "layers": layers,
        "batch": [bsz, CONTEXT],
        "train_step_s": step,
        "first_train_step_s": step_s[0],
        "rows": [],
    }
    if variant == "eager":
        t0 = time.perf_counter()
        with HessianOperator(model, gpt_loss, cbatch) as H:  # the first-use check of method="auto" (cached)
            out["auto_choice"] = H.method
        out["auto_check_s"] = time.perf_counter() - t0
        plan = [(1, None, "")]
    else:
        plan = [(1, None, "first (compiles)"), (1, None, "")]
    if not skip_top5:
        plan += [(5, 12, "")] if size != "3M" else [(5, None, ""), (5, 12, "")]
    for k, mv, note in plan:
        row = _measure_once(net, model, opt, cbatch, k, mv, dtype)
        row["note"] = note
        row["seconds_over_step"] = row["seconds"] / step
        out["rows"].append(row)
        print(json.dumps({"progress": [size, variant, k, mv, round(row["seconds"], 1), row["num_hvp"]]}),
              file=sys.stderr, flush=True)  # fmt: skip
    return out


def part_measure(sizes: list[str], variants: list[str], skip_85m_compiled_top5: bool) -> list[dict[str, Any]]:
    results = []
    for size in sizes:
        for variant in variants:
            skip = skip_85m_compiled_top5 and size == "85M" and variant == "compiled"
            cmd = [sys.executable, __file__, "--one", size, variant, "skip" if skip else "all"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                results.append({"size": size, "variant": variant, "error": proc.stderr[-2000:]})
                print(f"{size} {variant}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["subprocess_s"] = time.perf_counter() - t0
            if skip:
                res["skipped"] = "top-5 (see the per-product time of top-1)"
            results.append(res)
            for row in res["rows"]:
                print(
                    f"{size:4s} {variant:8s} {res['num_params']:>11,d} k={row['k']} mv={row['max_vectors']!s:4s} "
                    f"{row['num_hvp']:4d} products {row['seconds']:8.1f} s "
                    f"({row['seconds_per_product']:5.2f} s/product, {row['seconds_over_step']:6.1f} steps of "
                    f"{res['train_step_s']:.2f} s) "
                    f"peak {row['peak_bytes_over_params']:5.1f}x params {row['method']} {row['note']}",
                    flush=True,
                )
            if "auto_check_s" in res:
                check = f"{res['auto_check_s']:.1f} s -> {res['auto_choice']}"
                print(f"{size:4s} eager    first-use check of method='auto': {check}", flush=True)
    return results


# --- part 2: Lightning overhead ----------------------------------------------------------------------------------
def _fit(size: str, config: str, compiled: bool, steps: int, curv: int) -> dict[str, Any]:
    import lightning.pytorch as pl
    from _transformer_common import curvature_loss
    from torch.utils.data import DataLoader, TensorDataset

    threads()
    d, layers, bsz = SIZES[size]
    x, y = text_windows(steps * bsz)
    loader = DataLoader(TensorDataset(x, y), batch_size=bsz, shuffle=True, generator=torch.Generator().manual_seed(0))
    module = GPTModule(d, layers)
    clock = FitClock()
    callbacks: list[Any] = [clock]
    monitor = recorder = None
    common = {"loss_fn": curvature_loss, "num_examples": curv, "log_histogram": False, "prog_bar": False}
    if config == "default":
        monitor = MemoryProbedMonitor(**common)
    elif config == "tracking":
        monitor = MemoryProbedMonitor(every_n_steps=1, tracking_products=2, k=1, cold_start_every=25, **common)
    if monitor is not None:
        recorder = Recorder(monitor, ref_every=10 if config == "tracking" else None)
        callbacks = [clock, monitor, recorder]  # the clock first: it must start before a step-0 measurement
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
    )  # fmt: skip
    fit_module: Any = torch.compile(module) if compiled else module
    t0 = time.perf_counter()
    trainer.fit(fit_module, loader)
    out: dict[str, Any] = {"size": size, "config": config, "compiled": compiled, "steps": steps}
    out["whole_fit_s"] = time.perf_counter() - t0
    wall = out["fit_s"] = clock.seconds  # the training loop, monitors included, without the Trainer's setup
    if monitor is not None and recorder is not None:
        out.update(
            fit_s=wall - recorder.reference_s,
            reference_s=recorder.reference_s,
            measure_time_s=monitor.measure_time_s,
            train_time_s=monitor.train_time_s,
            measuring_share=monitor.measure_time_s / monitor.train_time_s,
            num_measurements=monitor.num_measurements,
            total_hvp=sum(r["num_hvp"] or 0 for r in monitor.records),
            step_time_ema_s=monitor.step_time_s,
            next_step=monitor.next_step,
            last_measure_s=monitor._last_measure_s,
            measurements=monitor.records,
            recorded=recorder.rows,
            curvature_examples=curv,
        )
    return out


def _summarise_fit(row: dict[str, Any], base: dict[str, Any]) -> None:
    steps = row["steps"]
    row["overhead"] = row["fit_s"] / base["fit_s"] - 1.0
    row["overhead_per_step_s"] = (row["fit_s"] - base["fit_s"]) / steps
    if "measurements" not in row:
        return
    row["products_per_step"] = row["total_hvp"] / steps
    base_step = base["fit_s"] / steps
    if row["config"] == "default":
        gap = row["next_step"] - row["measurements"][-1]["step"]
        row["planned_gap"] = gap
        row["planned_overhead"] = row["last_measure_s"] / (gap * base_step)
    refs = [r for r in row["recorded"] if "reference" in r]
    if refs:
        errs = [abs(r["sharpness"] - r["reference"]) / abs(r["reference"]) for r in refs]
        row["tracking_error"] = {
            "steps": [r["step"] for r in refs],
            "relative_errors": errs,
            "median": statistics.median(errs),
            "max": max(errs),
            "error_bound_over_error": [
                (r["error_bound"] / abs(r["reference"])) / e if e > 0 else None for r, e in zip(refs, errs)
            ],
        }
        cold = [m for m in row["measurements"] if (m["num_hvp"] or 0) > 2]
        row["cold_measurements"] = [[m["step"], m["num_hvp"], round(m["seconds"], 2)] for m in cold]
        warm = [m for m in row["measurements"] if (m["num_hvp"] or 0) <= 2]
        if warm:
            row["warm_measure_s_median"] = statistics.median(m["seconds"] for m in warm)


def part_lightning(sizes: list[str], steps: int, curv: int, variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        for compiled in [v == "compiled" for v in variants]:
            group = []
            for config in ("none", "default", "tracking"):
                cmd = [sys.executable, __file__, "--fit", size, config, str(int(compiled)), str(steps), str(curv)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(f"{size} {config} compiled={compiled}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                    group.append({"size": size, "config": config, "compiled": compiled, "error": proc.stderr[-2000:]})
                    continue
                group.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            base = next((r for r in group if r["config"] == "none" and "error" not in r), None)
            for row in group:
                if base is not None and "error" not in row:
                    _summarise_fit(row, base)
                    _print_fit(row)
            rows += group
    return rows


def _print_fit(row: dict[str, Any]) -> None:
    tag = f"{row['size']:4s} {'compiled' if row['compiled'] else 'eager':8s} {row['config']:8s}"
    line = f"{tag} fit {row['fit_s']:7.1f} s  overhead {100 * row['overhead']:6.1f}%"
    line += f" ({row['overhead_per_step_s']:.3f} s/step)"
    if "measurements" in row:
        line += (
            f"  share {100 * row['measuring_share']:6.1f}%  {row['num_measurements']} measurements, "
            f"{row['products_per_step']:.2f} products/step"
        )
    if "planned_overhead" in row:
        line += f"  next gap {row['planned_gap']} steps -> steady {100 * row['planned_overhead']:.1f}%"
    if "tracking_error" in row:
        te = row["tracking_error"]
        line += f"  tracking error median {te['median']:.2e} max {te['max']:.2e} ({len(te['steps'])} references)"
    print(line, flush=True)


# --- part 3: FSDP2 ---------------------------------------------------------------------------------------------
def part_fsdp(steps: int, curv: int) -> dict[str, Any]:
    worker = Path(__file__).resolve().parent / "_transformer_fsdp.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, str(worker), str(out), str(steps), str(curv)],
            capture_output=True, text=True, check=False, env=env, cwd=tmp,
        )  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            print(f"fsdp: FAILED\n{proc.stderr[-3000:]}", flush=True)
            return {"error": proc.stderr[-3000:]}
        res = json.loads(out.read_text())
    cmd = [sys.executable, str(worker), "--unsharded", str(curv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"unsharded: FAILED\n{proc.stderr[-2000:]}", flush=True)
        res["unsharded_error"] = proc.stderr[-2000:]
        return res
    res["unsharded"] = json.loads(proc.stdout.strip().splitlines()[-1])
    un = res["unsharded"]["measurement"]
    for rank in res["ranks"]:
        first = rank["measurements"][0]
        rank["added_bytes_over_unsharded"] = first["added_bytes"] / un["added_bytes"]
    r0 = res["ranks"][0]
    res["overhead"] = r0["fit_s_monitor"] / r0["fit_s_base"] - 1.0
    m0 = r0["measurements"][0]
    print(
        f"fsdp 2 ranks  fit {r0['fit_s_base']:.1f} s -> {r0['fit_s_monitor']:.1f} s with the monitor "
        f"(overhead {100 * res['overhead']:.1f}%, share {100 * r0['measuring_share']:.1f}%, "
        f"{r0['num_measurements']} measurements; next gap {r0['planned_gap']} steps -> steady "
        f"{100 * r0['planned_overhead']:.1f}%)",
        flush=True,
    )
    print(
        f"fsdp first measurement: {m0['num_hvp']:.0f} products, {m0['seconds']:.1f} s "
        f"({m0['seconds'] / r0['step_s']:.0f} steps of {r0['step_s']:.3f} s), {m0['method']}, "
        f"sharpness {m0['sharpness']:.5g}; unsharded: {un['num_hvp']:.0f} products, {un['seconds']:.1f} s, "
        f"sharpness {un['sharpness']:.5g}",
        flush=True,
    )
    for rank in res["ranks"]:
        m = rank["measurements"][0]
        print(
            f"fsdp rank {rank['rank']}: measurement adds {m['added_bytes'] / 2**20:.0f} MiB = "
            f"{rank['added_bytes_over_unsharded']:.2f}x the unsharded measurement's "
            f"{un['added_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    return res


# --- driver ------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--parts", nargs="+", default=["measure", "lightning", "fsdp"],
                        choices=["measure", "lightning", "fsdp"])  # fmt: skip
    parser.add_argument("--sizes", nargs="+", default=["3M", "25M", "85M"], choices=list(SIZES),
                        help="sizes of the measure part")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=["eager", "compiled"],
                        choices=["eager", "compiled", "compiled-f64"],
                        help="variants of the measure part (compiled-f64: products in float64)")  # fmt: skip
    parser.add_argument("--lightning-sizes", nargs="+", default=["3M"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=200, help="steps of each Lightning fit")
    parser.add_argument("--fsdp-steps", type=int, default=100, help="steps of each FSDP2 fit")
    parser.add_argument("--curvature-examples", type=int, default=8, help="windows in the monitors' curvature batch")
    parser.add_argument("--no-compiled", action="store_true", help="Lightning part: eager only")
    parser.add_argument(
        "--lightning-variants",
        nargs="+",
        default=["eager", "compiled"],
        choices=["eager", "compiled"],
        help="Lightning part: which fits (a partial re-run keeps the others' rows)",
    )
    parser.add_argument("--with-85m-compiled-top5", action="store_true", help="also the slowest cell (~10 min)")
    parser.add_argument("--quick", action="store_true", help="3M only, 60-step fits, eager Lightning: ~8 min")
    parser.add_argument("--out", type=Path, default=RESULTS / "transformer.json")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--fit", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, variant, top5 = args.one
        print(json.dumps(measure_size(size, variant, skip_top5=top5 == "skip")))
        return
    if args.fit:
        size, config, compiled, steps, curv = args.fit
        print(json.dumps(_fit(size, config, compiled == "1", int(steps), int(curv))))
        return
    if args.quick:
        args.sizes, args.lightning_sizes, args.steps, args.fsdp_steps, args.no_compiled = ["3M"], ["3M"], 60, 30, True
        if args.out == RESULTS / "transformer.json":
            args.out = RESULTS / "transformer_quick.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    report: dict[str, Any] = {}
    partial = set(args.parts) != {"measure", "lightning", "fsdp"} or args.sizes != list(SIZES) or len(args.variants) < 2
    if args.out.exists() and partial:
        report = json.loads(args.out.read_text())  # a partial re-run replaces only its parts
    report |= {
        "torch": torch.__version__,
        "threads": int(os.environ["OMP_NUM_THREADS"]),
        "dtype": "float32",
        "context": CONTEXT,
        "sizes": {s: dict(zip(("d_model", "layers", "batch"), SIZES[s])) for s in SIZES},
    }
    report.setdefault("argv", {})[",".join(args.parts)] = sys.argv[1:]
    t_all = time.perf_counter()

    def save() -> None:
        report.setdefault("seconds", {})[",".join(args.parts)] = time.perf_counter() - t_all
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))

    if "measure" in args.parts:
        new = part_measure(args.sizes, args.variants, not args.with_85m_compiled_top5)
        done = {(r["size"], r["variant"]) for r in new}
        keep = [r for r in report.get("measure", []) if (r["size"], r["variant"]) not in done]  # a partial re-run
        order = ["eager", "compiled", "compiled-f64"]
        report["measure"] = sorted(keep + new, key=lambda r: (list(SIZES).index(r["size"]), order.index(r["variant"])))
        save()
    if "lightning" in args.parts:
        variants = ["eager"] if args.no_compiled else args.lightning_variants
        new = part_lightning(args.lightning_sizes, args.steps, args.curvature_examples, variants)
        done = {(r["size"], r["compiled"]) for r in new}
        keep = [r for r in report.get("lightning", []) if (r["size"], r["compiled"]) not in done]  # partial re-run
        report["lightning"] = keep + new
        save()
    if "fsdp" in args.parts:
        report["fsdp"] = part_fsdp(args.fsdp_steps, args.curvature_examples)
        save()
    save()
    print(f"wrote {args.out} ({(time.perf_counter() - t_all) / 60:.1f} min)")


if __name__ == "__main__":
    main()
