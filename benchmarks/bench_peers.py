"""Benchmark the peers (and our engine, when it exports the functions) against references.

For each case of :mod:`cases` and each available peer of :mod:`peers`, run top-1 and
top-5 Hessian eigenvalues and the Hessian trace at the peer's default settings and at
settings meant to reach 1e-3 relative error; print a table (peer, case, quantity,
settings, seconds, HVPs, relative error vs the cached reference of :mod:`reference`) and
write ``results/peers.json``. Also time, per case, one gradient and one HVP (graph rebuilt
per product, graph reused across products, and forward-over-reverse) and report ratios.

Settings are data (:data:`SETTINGS`); "ours" is one more entry, used only when
``lightning_curvature`` exports ``hessian_eigenvalues`` and ``hessian_trace``.

Runs with ``torch.set_num_threads(--threads)`` (default 1) in float32 (the references are
float64). A run restricted with ``--cases``/``--peers`` merges its rows into an existing
JSON, replacing rows with the same (peer, case, quantity, label).

Usage::

    python benchmarks/bench_peers.py                      # everything (~10 min, 1 thread)
    python benchmarks/bench_peers.py --peers ours         # add/refresh our engine's rows
    python benchmarks/bench_peers.py --cases mlp_digits --peers pyhessian
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(1, str(_HERE.parent))  # "ours" = the checkout this script sits in

from cases import CASE_NAMES, Case, make_case  # noqa: E402
from peers import (  # noqa: E402
    PEERS,
    PeerResult,
    peer_available,
    peer_hvp,
    peer_top_eigenvalues,
    peer_trace,
    peer_versions,
)
from reference import RESULTS, GraphHVP, load_reference  # noqa: E402

TARGET_REL_ERR = 1e-3

# (label, kind, opts). kind "default" = the peer's own defaults; "target" = settings chosen to
# reach TARGET_REL_ERR; "budget" = fixed HVP budget, comparable across peers.
Setting = tuple[str, str, dict[str, Any]]
SETTINGS: dict[str, dict[str, list[Setting]]] = {
    "pyhessian": {
        "top": [
            ("tol=1e-3,maxIter=100", "default", {}),
            ("tol=1e-4,maxIter=100", "target", {"tol": 1e-4}),
        ],
        "trace": [
            ("hutchinson,maxIter=100,tol=1e-3", "default", {}),
            # tol=-inf: PyHessian stops when (mean - prev)/(prev + 1e-6) < tol, without abs() on
            # the denominator, so a negative running mean stops it at once even with tol=0.
            ("hutchinson,99 probes", "budget", {"maxIter": 99, "tol": float("-inf")}),
        ],
    },
    "eigenthings": {
        "top": [
            ("lanczos,max_iter=2k", "default", {}),
            ("lanczos,max_iter=30", "target", {"max_iter": 30}),
            ("lanczos,max_iter=50", "target", {"max_iter": 50}),
            # above 50 steps eigenthings turns full reorthogonalisation off by default
            ("lanczos,max_iter=60", "target", {"max_iter": 60}),
        ],
        "trace": [
            ("hutch++,num_matvecs=100", "default", {}),
            ("hutchinson,99", "budget", {"method": "hutchinson", "num_matvecs": 99}),
            ("hutch++,300", "budget", {"method": "hutch++", "num_matvecs": 300}),
        ],
    },
    "curvlinops": {
        "top": [
            ("eigsh,tol=0", "default", {}),
            ("eigsh,tol=1e-3", "target", {"tol": 1e-3}),
        ],
        "trace": [
            # curvlinops has no default budget (num_matvecs is required)
            ("hutchinson,99", "budget", {"method": "hutchinson", "num_matvecs": 99}),
            ("hutch++,99", "budget", {"method": "hutch++", "num_matvecs": 99}),
            ("hutch++,300", "budget", {"method": "hutch++", "num_matvecs": 300}),
        ],
    },
    "ours": {
        "top": [
            ("tol=1e-3,max_iter=100", "default", {}),
            ("tol=1e-4", "target", {"tol": 1e-4}),
        ],
        "trace": [
            ("hutch++,num_samples=100", "default", {}),
            ("hutchinson,99", "budget", {"estimator": "hutchinson", "num_samples": 99}),
            ("hutch++,300", "budget", {"estimator": "hutch++", "num_samples": 300}),
        ],
    },
}
REPEATS = {"mlp_digits": 3, "cnn": 1, "transformer": 1}  # timed runs per setting (median kept)
# (case, label) pairs left out to keep a full run under ~10 min on one thread
SKIP = {("cnn", "hutch++,300")}


# --------------------------------------------------------------------------- gradient vs HVP cost


def _median_time(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_grad_hvp(case: Case, reps: int) -> dict[str, float]:
    """Median seconds of one gradient and of one HVP computed three ways."""
    from torch.func import functional_call, grad, jvp

    model, batch = case.model, case.batch
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

    def gradient() -> Any:
        return torch.autograd.grad(case.loss_fn(model, batch), params)

    def build_graph() -> Any:
        return torch.autograd.grad(case.loss_fn(model, batch), params, create_graph=True)

    def hvp_rebuild() -> Any:
        return torch.autograd.grad(build_graph(), params, v)

    g = build_graph()

    def hvp_reuse() -> Any:
        return torch.autograd.grad(g, params, v, retain_graph=True)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pdict = {n: p.detach() for n, p in zip(names, params)}
    vdict = dict(zip(names, v))

    def loss_of(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return case.loss_fn(lambda x: functional_call(model, ps, (x,)), batch)

    def hvp_fwd_rev() -> Any:
        return jvp(grad(loss_of), (pdict,), (vdict,))[1]

    out = {
        "grad_s": _median_time(gradient, reps),
        "create_graph_grad_s": _median_time(build_graph, reps),
        "hvp_rebuild_s": _median_time(hvp_rebuild, reps),
        "hvp_reuse_s": _median_time(hvp_reuse, reps),
        "hvp_fwd_rev_s": _median_time(hvp_fwd_rev, reps),
        "reps": reps,
    }
    for key in ("create_graph_grad", "hvp_rebuild", "hvp_reuse", "hvp_fwd_rev"):
        out[f"{key}_over_grad"] = out[f"{key}_s"] / out["grad_s"]
    return out


def hvp_accuracy(name: str, peers: list[str]) -> dict[str, Any]:
    """Relative error of one float32 HVP per peer against the float64 double-backward HVP,
    overall and for the worst parameter tensor (a wrong block shows up there)."""
    case32, case64 = make_case(name), make_case(name, dtype=torch.float64)
    n = case32.num_params
    v = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = GraphHVP(case64)(v)
    names = [pn for pn, p in case32.model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in case32.model.parameters() if p.requires_grad]
    out: dict[str, Any] = {}
    for peer in peers:
        try:
            hv = peer_hvp(peer, case32.model, case32.loss_fn, case32.batch, v.float(), criterion=case32.criterion)
        except Exception as e:
            out[peer] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        hv = hv.double()
        worst, worst_name, off = 0.0, None, 0
        for pn, size in zip(names, sizes):
            r = ref[off : off + size]
            err = float((hv[off : off + size] - r).norm() / r.norm().clamp_min(1e-30))
            if err > worst:
                worst, worst_name = err, pn
            off += size
        out[peer] = {
            "rel_error": float((hv - ref).norm() / ref.norm()),
            "worst_param_rel_error": worst,
            "worst_param": worst_name,
        }
    return out


# --------------------------------------------------------------------------- errors


def _rel_errors(values: list[float], ref: list[float]) -> list[float] | None:
    if len(values) < len(ref):
        return None
    return [abs(a - b) / abs(b) for a, b in zip(values, ref)]


def score(res: PeerResult, ref: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if res.error is not None and not res.values:
        return out
    if res.quantity.startswith("top"):
        k = int(res.quantity[3:])
        errs = _rel_errors(res.values, ref["top_eigenvalues"][:k])
        out["rel_errors"] = errs
        out["rel_error"] = max(errs) if errs else None
    else:
        tr, se_ref = ref["trace"], ref.get("trace_std_error", 0.0) or 0.0
        est = res.values[0]
        out["rel_error"] = abs(est - tr) / abs(tr)
        out["ref_rel_std_error"] = se_ref / abs(tr)
        if res.std_error:
            out["rel_std_error"] = res.std_error / abs(tr)
            out["z_score"] = (est - tr) / (res.std_error**2 + se_ref**2) ** 0.5
            estimator = res.settings.get("method") or res.settings.get("estimator")
            if estimator == "hutchinson" and res.num_hvp:
                # probes a plain Hutchinson run would need for a standard error of 1e-3·|tr|
                sigma = res.std_error * res.num_hvp**0.5
                out["hutchinson_probes_for_1e-3"] = (sigma / (TARGET_REL_ERR * abs(tr))) ** 2
    if out.get("rel_error") is not None:
        out["reached_1e-3"] = out["rel_error"] <= TARGET_REL_ERR
    return out


# --------------------------------------------------------------------------- runner


def run_one(peer: str, case: Case, quantity: str, opts: dict[str, Any]) -> PeerResult:
    if quantity == "trace":
        return peer_trace(peer, case.model, case.loss_fn, case.batch, criterion=case.criterion, **opts)
    k = int(quantity[3:])
    return peer_top_eigenvalues(peer, case.model, case.loss_fn, case.batch, k, criterion=case.criterion, **opts)


def warm_up(peer: str, case: Case) -> None:
    """One cheap untimed call so one-off costs (imports, allocator, kernels) stay out of timings."""
    opts = {
        "pyhessian": {"maxIter": 3},
        "eigenthings": {"max_iter": 3},
        "curvlinops": {"maxiter": 1, "tol": 1e-1},
        "ours": {"max_iter": 3},
    }[peer]
    run_one(peer, case, "top1", opts)


def run_case(
    name: str, peers: list[str], threads: int, run_peers: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ref = load_reference(name)
    case = make_case(name)
    timing = time_grad_hvp(case, reps=20 if name == "mlp_digits" else 5)
    print(
        f"\n== {name}: {case.num_params:,} params; grad {timing['grad_s'] * 1e3:.1f} ms, "
        f"HVP rebuilt {timing['hvp_rebuild_over_grad']:.2f}x, reused {timing['hvp_reuse_over_grad']:.2f}x, "
        f"fwd-over-rev {timing['hvp_fwd_rev_over_grad']:.2f}x a gradient",
        flush=True,
    )
    hvp_check = hvp_accuracy(name, peers)
    for peer, r in hvp_check.items():
        if "error" in r:
            print(f"   HVP check {peer:11s}: {r['error']}")
        else:
            print(
                f"   HVP check {peer:11s}: rel.err {r['rel_error']:.1e}, worst tensor "
                f"{r['worst_param']} {r['worst_param_rel_error']:.1e}"
            )
    rows: list[dict[str, Any]] = []
    if not run_peers:
        return rows, {"timing": timing, "hvp_check": hvp_check, "reference": _ref_summary(ref)}
    for peer in peers:
        warm_up(peer, case)
        for quantity in ("top1", "top5", "trace"):
            group = "trace" if quantity == "trace" else "top"
            for label, kind, opts in SETTINGS[peer][group]:
                if (name, label) in SKIP:
                    continue
                runs = [run_one(peer, case, quantity, opts) for _ in range(REPEATS.get(name, 1))]
                res = runs[0]
                res.seconds = statistics.median(r.seconds for r in runs)
                res.setup_seconds = statistics.median(r.setup_seconds for r in runs)
                row = {"peer": peer, "case": name, "quantity": quantity, "label": label, "kind": kind}
                row.update(res.to_dict())
                row.update(score(res, ref))
                row["repeats"] = len(runs)
                row["threads"] = threads
                if res.num_hvp:
                    row["hvp_per_grad_equiv"] = res.seconds / timing["grad_s"]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows, {"timing": timing, "hvp_check": hvp_check, "reference": _ref_summary(ref)}


def _ref_summary(ref: dict[str, Any]) -> dict[str, Any]:
    keys = ("top_eigenvalues", "min_eigenvalue", "trace", "trace_std_error", "top_method", "trace_method")
    return {k: ref.get(k) for k in keys}


HEADER = (
    f"{'peer':11s} {'case':11s} {'qty':5s} {'settings':32s} {'sec':>8s} {'setup':>6s} {'HVPs':>5s} "
    f"{'rel.err':>9s}  note"
)


def format_row(row: dict[str, Any]) -> str:
    err = row.get("rel_error")
    err_s = f"{err:9.2e}" if err is not None else f"{'-':>9s}"
    hvp = row.get("num_hvp")
    note = ""
    if row.get("error"):
        note = row["error"][:70]
    elif row.get("rel_std_error") is not None:
        note = f"±{row['rel_std_error']:.1e} (own s.e.)"
    if row.get("reached_1e-3"):
        note = ("ok<=1e-3 " + note).strip()
    hvp_s = str(hvp) if hvp is not None else "-"
    return (
        f"{row['peer']:11s} {row['case']:11s} {row['quantity']:5s} {row['label'][:32]:32s} "
        f"{row['seconds']:8.3f} {row.get('setup_seconds') or 0:6.2f} {hvp_s:>5s} {err_s}  {note}"
    )


def render_table(data: dict[str, Any]) -> str:
    """The whole (merged) result file as text: per case, the cost line, HVP check, then rows."""
    lines = [HEADER]
    for name in CASE_NAMES:
        info = data.get("cases", {}).get(name)
        if info is None:
            continue
        t = info["timing"]
        lines.append(
            f"\n== {name}: grad {t['grad_s'] * 1e3:.1f} ms; one HVP = {t['hvp_rebuild_over_grad']:.2f}x a gradient "
            f"(graph rebuilt), {t['hvp_reuse_over_grad']:.2f}x (graph reused; building it "
            f"{t['create_graph_grad_over_grad']:.2f}x), {t['hvp_fwd_rev_over_grad']:.2f}x (jvp of grad)"
        )
        for peer, r in info.get("hvp_check", {}).items():
            if "error" not in r:
                lines.append(
                    f"   HVP vs float64: {peer:11s} {r['rel_error']:.1e} (worst tensor {r['worst_param']}: "
                    f"{r['worst_param_rel_error']:.1e})"
                )
        for row in data["rows"]:
            if row["case"] == name:
                lines.append(format_row(row))
    return "\n".join(lines)


def environment(threads: int) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "versions": peer_versions(),
        "torch_threads": threads,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "dtype": "float32 (references float64)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmark curvature peers against references.")
    ap.add_argument("--cases", nargs="+", default=list(CASE_NAMES), choices=CASE_NAMES)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    ap.add_argument("--checks-only", action="store_true", help="only the grad/HVP timings and the HVP accuracy check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    peers = [p for p in args.peers if peer_available(p)]
    skipped = sorted(set(args.peers) - set(peers))
    if skipped:
        print(f"not available (skipped): {skipped}")
    t0 = time.perf_counter()
    env = environment(args.threads)
    rows: list[dict[str, Any]] = []
    per_case: dict[str, Any] = {}
    print(HEADER)
    for name in args.cases:
        case_rows, info = run_case(name, peers, args.threads, run_peers=not args.checks_only)
        rows += case_rows
        per_case[name] = info
    env["wall_seconds"] = time.perf_counter() - t0
    env["peers_skipped"] = skipped

    data: dict[str, Any] = {"runs": [], "cases": {}, "rows": []}
    if args.out.exists():
        data = json.loads(args.out.read_text())
    keys = {(r["peer"], r["case"], r["quantity"], r["label"]) for r in rows}
    data["rows"] = [r for r in data.get("rows", []) if (r["peer"], r["case"], r["quantity"], r["label"]) not in keys]
    data["rows"] += rows
    for name, info in per_case.items():  # merge per peer so a partial run keeps other peers' checks
        old = data.setdefault("cases", {}).get(name, {})
        info["hvp_check"] = {**old.get("hvp_check", {}), **info["hvp_check"]}
        data["cases"][name] = {**old, **info}
    data.setdefault("runs", []).append({**env, "cases": args.cases, "peers": peers})
    data["target_rel_error"] = TARGET_REL_ERR
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_name(args.out.stem + "_table.txt").write_text(render_table(data) + "\n")
    print(f"\nwrote {args.out} ({len(rows)} rows, {env['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
