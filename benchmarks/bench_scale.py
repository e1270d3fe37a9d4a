"""Peak memory and time of top-1 and top-5 (tol 1e-3) against the parameter count, with and without max_vectors.

Two model families at ~1M, ~20M and ~100M parameters on this CPU (float32):

* ``mlp``: tanh MLP 64 -> W -> W -> 10 on 128 digits examples;
* ``gpt``: a pre-LayerNorm GPT (causal ``scaled_dot_product_attention``, GELU MLP, tied embedding) on 4 sequences of
  64 bytes of the Python standard library's sources, measured after 20 AdamW steps (at initialisation its top
  eigenvalues sit within 5% of each other and top-5 takes ~120 products; after 20 steps 16).

Each measurement runs in a fresh subprocess. Memory: the peak resident set during the measurement (``VmHWM``,
reset through ``/proc/self/clear_refs`` after model building and training, with the optimizer and ``.grad`` freed)
minus the resident set before it, plus the parameters themselves, as a multiple of the parameters' bytes:
everything the measurement adds is included (the gradient graph, the parameter copies, the Lanczos vectors, the
allocator's slack).
``max_vectors=12`` bounds the solver's vectors (thick restart). Configurations whose projected unbounded basis
would not fit in memory (top-5 at 100M: about 50 vectors of 400 MB) are skipped and marked so.

    OMP_NUM_THREADS=2 python benchmarks/bench_scale.py                 # results/scale.json (tens of minutes)
    python benchmarks/bench_scale.py --sizes 1M --families mlp         # a quick subset
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --sizes 1M --method double_backward \
        --out benchmarks/results/scale_1m_double_backward.json        # without auto's first-use probe
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"
MLP_WIDTH = {"1M": 990, "20M": 4440, "100M": 9980}
GPT_SHAPE = {"1M": (128, 4), "20M": (512, 6), "100M": (768, 14)}  # (d_model, layers)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(att)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, d: int, layers: int, context: int = 64, vocab: int = 256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, max(1, d // 64)) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T


def text_batch(num: int = 4, context: int = 64, start: int = 0) -> tuple[Tensor, Tensor]:
    """``num`` windows of ``context`` bytes (and their next bytes) from the standard library's sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(root.glob("*.py"))[:40])
    tokens = torch.tensor(list(data[:400_000]), dtype=torch.long)
    starts = start + torch.arange(num) * 997
    x = torch.stack([tokens[s : s + context] for s in starts])
    y = torch.stack([tokens[s + 1 : s + context + 1] for s in starts])
    return x, y


def gpt_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


def mlp_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Reset the kernel's peak resident set (``VmHWM``) of this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one(family: str, size: str, k: int, max_vectors: int | None, method: str = "auto") -> dict:
    """Run one measurement in this process and return its figures."""
    from lightning_curvature import hessian_eigenvalues

    torch.manual_seed(0)
    if family == "mlp":
        from sklearn.datasets import load_digits

        d = load_digits()
        batch = (torch.tensor(d.data[:128] / 16.0, dtype=torch.float32), torch.tensor(d.target[:128]))
        loss_fn = mlp_loss
    else:
        batch = text_batch()
        loss_fn = gpt_loss
    if family == "mlp":
        w = MLP_WIDTH[size]
        model = nn.Sequential(nn.Linear(64, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 10))
    else:
        d_model, layers = GPT_SHAPE[size]
        model = GPT(d_model, layers)
        train = text_batch(num=8, start=50_000)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(20):
            opt.zero_grad()
            gpt_loss(model, train).backward()
            opt.step()
        del opt
        for p in model.parameters():
            p.grad = None
    num_params = sum(p.numel() for p in model.parameters())
    # load every code path first (library pages count in the resident set): one measurement of a tiny model
    tiny = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)) if family == "mlp" else GPT(32, 1)
    hessian_eigenvalues(tiny, loss_fn, batch, k=k, tol=1e-3, max_iter=60, max_vectors=max_vectors, method=method)
    del tiny
    gc.collect()
    base = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    res = hessian_eigenvalues(
        model, loss_fn, batch, k=k, tol=1e-3, max_iter=200, max_vectors=max_vectors, method=method
    )
    seconds = time.perf_counter() - t0
    peak = peak_bytes()
    return {
        "family": family,
        "size": size,
        "num_params": num_params,
        "k": k,
        "max_vectors": max_vectors,
        "eigenvalues": res.eigenvalues.tolist(),
        "error_bounds": res.error_bounds.tolist(),
        "converged": res.converged,
        "num_hvp": res.num_hvp,
        "method": res.method,
        "peak_vectors": res.peak_vectors,
        "seconds": seconds,
        "peak_bytes_over_params": (peak - base) / (4 * num_params) + 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["mlp", "gpt"])
    parser.add_argument("--sizes", nargs="+", default=["1M", "20M", "100M"])
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--method", default="auto", help="product method (auto includes its first-use probe)")
    parser.add_argument("--one", nargs=4, metavar=("FAMILY", "SIZE", "K", "MAX_VECTORS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.one:
        family, size, k, mv = args.one
        print(json.dumps(one(family, size, int(k), None if mv == "none" else int(mv), args.method)))
        return
    rows = []
    for family in args.families:
        for size in args.sizes:
            for k in (1, 5):
                for mv in (None, 12):
                    if size == "100M" and k == 5 and mv is None:
                        rows.append({"family": family, "size": size, "k": k, "max_vectors": None, "skipped":
                                     "projected ~50 vectors x 400 MB"})  # fmt: skip
                        continue
                    cmd = [sys.executable, __file__, "--one", family, size, str(k), "none" if mv is None else str(mv),
                           "--method", args.method]  # fmt: skip
                    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if out.returncode != 0:
                        rows.append({"family": family, "size": size, "k": k, "max_vectors": mv,
                                     "error": out.stderr[-400:]})  # fmt: skip
                        print(rows[-1])
                        continue
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(
                        f"{family:4s} {size:5s} {row['num_params']:>11,d} k={k} max_vectors={mv!s:5s} "
                        f"{row['seconds']:8.1f} s {row['num_hvp']:4d} HVPs peak {row['peak_bytes_over_params']:5.1f}x "
                        f"params, {row['peak_vectors']} vectors, λ1 {row['eigenvalues'][0]:.5g}",
                        flush=True,
                    )
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    # agreement of the bounded and unbounded runs (the same tol)
    for row in rows:
        if row.get("max_vectors") == 12 and "eigenvalues" in row:
            free = next(
                (r for r in rows if r.get("max_vectors") is None and r["family"] == row["family"]
                 and r["size"] == row["size"] and r["k"] == row["k"] and "eigenvalues" in r), None,
            )  # fmt: skip
            if free is not None:
                diff = max(abs(a - b) / abs(b) for a, b in zip(row["eigenvalues"], free["eigenvalues"]))
                row["relative_difference_to_unbounded"] = diff
                assert math.isfinite(diff)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
