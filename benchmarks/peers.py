"""Uniform adapters around the peer libraries (and, when present, our own engine).

Every adapter takes ``(model, loss_fn, batch)`` like ``lightning_curvature`` does, plus
``criterion`` for the peers that need the ``criterion(model(x), y)`` form, and returns a
:class:`PeerResult`::

    res = peer_top_eigenvalues("pyhessian", model, loss_fn, batch, k=5, criterion=crit, tol=1e-4)
    values, num_hvp, seconds = res  # unpacks like a tuple
    res = peer_trace("curvlinops", model, loss_fn, batch, criterion=crit, method="hutch++", num_matvecs=99)

Peers (versions are recorded by :func:`peer_versions`):

``pyhessian`` (PyPI ``pyhessian==0.1``)
    ``hessian(model, criterion, data=(x, y), cuda=False)``; power iteration with
    deflation (``.eigenvalues(top_n, tol, maxIter)``), Hutchinson with a relative-change
    stopping rule (``.trace(maxIter, tol)``). Its HVPs reuse one ``create_graph`` gradient
    built in the constructor. HVPs are counted by wrapping
    ``pyhessian.hessian.hessian_vector_product`` for the duration of the call.
    Workarounds (in the adapter, not in PyHessian):

    * its constructor calls ``model.eval()`` and ``loss.backward(create_graph=True)``,
      which leaves graph-holding ``.grad`` tensors on the parameters; the adapter restores
      the train/eval flags and the previous ``.grad`` afterwards;
    * it draws probes with ``torch.randn(p.size())`` in the *default* dtype, so a float64
      model fails with a dtype mismatch; the adapter sets the default dtype to the model's
      for the call;
    * it draws from the global RNG; the adapter seeds it inside ``torch.random.fork_rng``.

``eigenthings`` (PyPI ``hessian-eigenthings==1.0.0a5``)
    ``HessianOperator(model, [batch], loss_fn)`` + ``lanczos(op, k, max_iter, which)``
    (full reorthogonalisation for ``max_iter <= 50``; default ``max_iter = 2k``) and
    ``trace(op, num_matvecs, method)`` (default Hutch++, 100 matvecs, of which 99 are
    used). Each HVP rebuilds the graph (forward + ``create_graph`` gradient + backward).
    HVPs are counted by wrapping ``op.matvec``.

``curvlinops`` (PyPI ``curvlinops-for-pytorch`` 3.x)
    ``HessianLinearOperator(model, criterion, params, [(x, y)])`` (forward-over-reverse
    HVPs, ``torch.func.jvp`` of ``jacrev``, vmapped over columns) + ``scipy.sparse.linalg
    .eigsh`` on ``.to_scipy()``, and ``hutchinson_trace`` / ``hutchpp_trace``. HVPs are
    counted by wrapping the operator instance's ``_matmat_batch`` (one per column).
    Workarounds:

    * ``to_scipy()`` defaults to a float64 SciPy operator; on a float32 model ARPACK then
      asks for float64 accuracy with the default ``tol=0`` from a float32 HVP and may
      never converge, so the adapter exports in the model's dtype;
    * its trace estimators multiply the operator onto all probes at once (a vmap over
      ``num_matvecs`` columns): for the 1M-parameter CNN that holds ~100 copies of the
      activations. The adapter splits ``_matmat_batch`` into column chunks
      (``max_columns``, default 16); results are identical up to rounding;
    * its constructor runs ``check_deterministic`` (2 gradients + 2 HVPs); this is timed
      separately as ``setup_seconds``/``setup_hvp``.

``ours``
    ``lightning_curvature.hessian_eigenvalues`` / ``hessian_trace`` if the installed
    package exports them; otherwise :func:`peer_available` is False for it.

Every adapter leaves the model's train/eval flags, ``.grad`` and the global RNG state as
it found them, and returns eigenvalues sorted in decreasing (algebraic) order.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

PEERS: tuple[str, ...] = ("pyhessian", "eigenthings", "curvlinops", "ours")
_MODULES = {
    "pyhessian": "pyhessian",
    "eigenthings": "hessian_eigenthings",
    "curvlinops": "curvlinops",
    "ours": "lightning_curvature",
}
_DISTRIBUTIONS = {
    "pyhessian": "pyhessian",
    "eigenthings": "hessian-eigenthings",
    "curvlinops": "curvlinops-for-pytorch",
    "ours": "lightning-curvature",
}


@dataclass
class PeerResult:
    """Outcome of one peer call. ``values`` are eigenvalues (decreasing) or ``[trace]``."""

    peer: str
    quantity: str
    settings: dict[str, Any]
    values: list[float] = field(default_factory=list)
    num_hvp: int | None = None
    seconds: float = float("nan")
    setup_seconds: float = 0.0
    setup_hvp: int | None = None
    std_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.values, self.num_hvp, self.seconds))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- availability


def peer_available(name: str) -> bool:
    """True if ``name``'s package imports (and, for ``ours``, exports the two functions)."""
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception:
        return False
    if name == "ours":
        return hasattr(mod, "hessian_eigenvalues") and hasattr(mod, "hessian_trace")
    return True


def peer_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name, dist in {**_DISTRIBUTIONS, "torch": "torch", "scipy": "scipy", "numpy": "numpy"}.items():
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def preserve_model(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``.training`` flag and every parameter's ``.grad``."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.grad for p in model.parameters()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, g in grads.items():
            p.grad = g


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _patched(obj: Any, attr: str, new: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, new)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _model_dtype(model: nn.Module) -> torch.dtype:
    return _params(model)[0].dtype


def _sorted_desc(values: Any) -> list[float]:
    return sorted((float(v) for v in values), reverse=True)


def _need_criterion(name: str, criterion: nn.Module | None, batch: Any) -> nn.Module:
    if criterion is None:
        raise ValueError(f"peer {name!r} needs criterion(output, target); got criterion=None")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"peer {name!r} needs batch=(inputs, targets), got {type(batch).__name__}")
    return criterion


class _Timer:
    def __enter__(self) -> _Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------- pyhessian


def _pyhessian_module() -> Any:
    # ``pyhessian/__init__`` re-exports the class ``hessian`` under the submodule's name, so
    # ``import pyhessian.hessian as ph`` yields the class; fetch the module itself.
    import sys

    import pyhessian  # noqa: F401

    return sys.modules["pyhessian.hessian"]


def _pyhessian_setup(model: nn.Module, criterion: nn.Module, batch: Any) -> Any:
    # PyHessian calls loss.backward(create_graph=True): torch warns about the .grad <-> graph
    # reference cycle, which preserve_model() breaks by restoring the previous .grad.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        return _pyhessian_module().hessian(model, criterion, data=tuple(batch), cuda=False)


def _pyhessian_counting(counter: list[int]) -> contextlib.AbstractContextManager[None]:
    ph = _pyhessian_module()
    original = ph.hessian_vector_product

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(*args, **kwargs)

    return _patched(ph, "hessian_vector_product", counted)


def _pyhessian_top(model, loss_fn, batch, k, *, criterion=None, tol=1e-3, maxIter=100, seed=0):
    criterion = _need_criterion("pyhessian", criterion, batch)
    settings = {"tol": tol, "maxIter": maxIter}
    res = PeerResult("pyhessian", f"top{k}", settings)
    counter = [0]
    with preserve_model(model), _seeded(seed), _default_dtype(_model_dtype(model)), _pyhessian_counting(counter):
        with _Timer() as t_setup:
            h = _pyhessian_setup(model, criterion, batch)
        with _Timer() as t:
            values, _ = h.eigenvalues(maxIter=maxIter, tol=tol, top_n=k)
        del h
    res.values = _sorted_desc(values)
    res.extra["order_found"] = [float(v) for v in values]
    res.num_hvp, res.seconds = counter[0], t.seconds
    res.setup_seconds, res.setup_hvp = t_setup.seconds, 0
    res.extra["setup_note"] = "one forward + create_graph backward"
    return res


def _pyhessian_trace(model, loss_fn, batch, *, criterion=None, maxIter=100, tol=1e-3, seed=0):
    criterion = _need_criterion("pyhessian", criterion, batch)
    res = PeerResult("pyhessian", "trace", {"method": "hutchinson", "maxIter": maxIter, "tol": tol})
    counter = [0]
    with preserve_model(model), _seeded(seed), _default_dtype(_model_dtype(model)), _pyhessian_counting(counter):
        with _Timer() as t_setup:
            h = _pyhessian_setup(model, criterion, batch)
        with _Timer() as t:
            samples = h.trace(maxIter=maxIter, tol=tol)
        del h
    s = np.asarray(samples, dtype=np.float64)
    res.values = [float(s.mean())]
    res.std_error = float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else None
    res.num_hvp, res.seconds = counter[0], t.seconds
    res.setup_seconds, res.setup_hvp = t_setup.seconds, 0
    return res


# --------------------------------------------------------------------------- hessian-eigenthings


def _eigenthings_operator(model, loss_fn, batch):
    from hessian_eigenthings import HessianOperator

    op = HessianOperator(model, [batch], loss_fn)
    counter = [0]
    original = op.matvec

    def counted(v: Tensor) -> Tensor:
        counter[0] += 1
        return original(v)

    op.matvec = counted  # type: ignore[method-assign]
    return op, counter


def _eigenthings_top(model, loss_fn, batch, k, *, criterion=None, max_iter=None, which="LA", seed=0, tol=1e-4):
    from hessian_eigenthings import lanczos

    settings = {"max_iter": max_iter if max_iter is not None else f"default(2k={2 * k})", "which": which}
    res = PeerResult("eigenthings", f"top{k}", settings)
    with preserve_model(model), _seeded(seed):
        with _Timer() as t_setup:
            op, counter = _eigenthings_operator(model, loss_fn, batch)
        with _Timer() as t:
            out = lanczos(op, k=k, max_iter=max_iter, which=which, seed=seed, tol=tol)
    res.values = _sorted_desc(out.eigenvalues.tolist())
    res.num_hvp, res.seconds, res.setup_seconds, res.setup_hvp = counter[0], t.seconds, t_setup.seconds, 0
    res.extra["converged"] = [bool(c) for c in out.converged.tolist()]
    res.extra["iterations"] = out.iterations
    return res


def _eigenthings_trace(model, loss_fn, batch, *, criterion=None, num_matvecs=100, method="hutch++", seed=0):
    from hessian_eigenthings import trace

    res = PeerResult("eigenthings", "trace", {"method": method, "num_matvecs": num_matvecs})
    with preserve_model(model), _seeded(seed):
        op, counter = _eigenthings_operator(model, loss_fn, batch)
        with _Timer() as t:
            out = trace(op, num_matvecs=num_matvecs, method=method, seed=seed)
    res.values = [float(out.estimate)]
    res.std_error = float(out.stderr)
    res.num_hvp, res.seconds, res.setup_hvp = counter[0], t.seconds, 0
    return res


# --------------------------------------------------------------------------- curvlinops


def _curvlinops_operator(model, criterion, batch, *, max_columns=16, check_deterministic=True):
    from curvlinops import HessianLinearOperator

    counter = [0]
    op = HessianLinearOperator(
        model, criterion, _params(model), [tuple(batch)], check_deterministic=check_deterministic
    )
    setup_hvp = 2 if check_deterministic else 0
    original = op._matmat_batch

    def counted(X: Any, y: Tensor, M: list[Tensor]) -> list[Tensor]:
        ncol = M[0].shape[-1]
        counter[0] += ncol
        if ncol <= max_columns:
            return original(X, y, M)
        chunks = [original(X, y, [m[..., i : i + max_columns] for m in M]) for i in range(0, ncol, max_columns)]
        return [torch.cat(parts, dim=-1) for parts in zip(*chunks)]

    op._matmat_batch = counted  # type: ignore[method-assign]
    return op, counter, setup_hvp


def _curvlinops_top(model, loss_fn, batch, k, *, criterion=None, tol=0.0, which="LA", maxiter=None, ncv=None, seed=0):
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    criterion = _need_criterion("curvlinops", criterion, batch)
    settings = {"solver": "scipy.eigsh", "tol": tol, "which": which, "maxiter": maxiter, "ncv": ncv}
    res = PeerResult("curvlinops", f"top{k}", settings)
    np_dtype = np.float32 if _model_dtype(model) == torch.float32 else np.float64
    with preserve_model(model), _seeded(seed):
        with _Timer() as t_setup:
            op, counter, setup_hvp = _curvlinops_operator(model, criterion, batch)
            counter[0] = 0
            A = op.to_scipy(dtype=np_dtype)
        v0 = np.random.default_rng(seed).standard_normal(A.shape[0]).astype(np_dtype)
        with _Timer() as t:
            try:
                values = eigsh(A, k=k, which=which, tol=tol, v0=v0, maxiter=maxiter, ncv=ncv, return_eigenvectors=False)
            except ArpackNoConvergence as e:
                values = e.eigenvalues
                res.error = f"ArpackNoConvergence: {len(values)} of {k} converged"
    res.values = _sorted_desc(values)
    res.num_hvp, res.seconds = counter[0], t.seconds
    res.setup_seconds, res.setup_hvp = t_setup.seconds, setup_hvp
    return res


def _curvlinops_trace(
    model, loss_fn, batch, *, criterion=None, num_matvecs=99, method="hutch++", seed=0, max_columns=16
):
    from curvlinops import hutchinson_trace, hutchpp_trace

    criterion = _need_criterion("curvlinops", criterion, batch)
    res = PeerResult("curvlinops", "trace", {"method": method, "num_matvecs": num_matvecs})
    fn = {"hutch++": hutchpp_trace, "hutchinson": hutchinson_trace}[method]
    with preserve_model(model), _seeded(seed):
        with _Timer() as t_setup:
            op, counter, setup_hvp = _curvlinops_operator(model, criterion, batch, max_columns=max_columns)
            counter[0] = 0
        with _Timer() as t:
            est = fn(op, num_matvecs=num_matvecs)
    res.values = [float(est)]
    res.num_hvp, res.seconds = counter[0], t.seconds
    res.setup_seconds, res.setup_hvp = t_setup.seconds, setup_hvp
    res.extra["note"] = "curvlinops returns no standard error"
    return res


# --------------------------------------------------------------------------- ours


def _ours_top(model, loss_fn, batch, k, *, criterion=None, **opts):
    import lightning_curvature as lc

    res = PeerResult("ours", f"top{k}", {"tol": 1e-3, "max_iter": 100, **opts})  # API defaults
    with preserve_model(model):
        with _Timer() as t:
            out = lc.hessian_eigenvalues(model, loss_fn, batch, k=k, **opts)
    res.values = _sorted_desc(torch.as_tensor(out.eigenvalues).tolist())
    res.num_hvp, res.seconds = getattr(out, "num_hvp", None), t.seconds
    conv = getattr(out, "converged", None)
    res.extra["converged"] = torch.as_tensor(conv).tolist() if conv is not None else None
    return res


def _ours_trace(model, loss_fn, batch, *, criterion=None, **opts):
    import lightning_curvature as lc

    settings = {"estimator": "hutch++", "num_samples": 100, **opts}  # API defaults, made explicit
    res = PeerResult("ours", "trace", settings)
    with preserve_model(model):
        with _Timer() as t:
            out = lc.hessian_trace(model, loss_fn, batch, **opts)
    res.values = [float(out.estimate)]
    res.std_error = float(out.std_error) if getattr(out, "std_error", None) is not None else None
    res.num_hvp, res.seconds = getattr(out, "num_hvp", None), t.seconds
    return res


# --------------------------------------------------------------------------- single HVP


def peer_hvp(
    name: str,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    v: Tensor,
    *,
    criterion: nn.Module | None = None,
) -> Tensor:
    """One product ``H v`` (flat ``v``, parameter order) through peer ``name``'s own HVP code.

    Raises:
        ValueError: if ``name`` is not a known peer.
    """
    _check_name(name)
    with preserve_model(model), torch.no_grad():
        if name == "pyhessian":
            criterion = _need_criterion(name, criterion, batch)
            with torch.enable_grad(), _default_dtype(_model_dtype(model)):
                h = _pyhessian_setup(model, criterion, batch)
                parts, off = [], 0
                for p in h.params:
                    parts.append(v[off : off + p.numel()].view_as(p))
                    off += p.numel()
                hv = _pyhessian_module().hessian_vector_product(h.gradsH, h.params, parts)
                out = torch.cat([t.reshape(-1) for t in hv]).detach()
                del h
            return out
        if name == "eigenthings":
            with torch.enable_grad():
                op, _ = _eigenthings_operator(model, loss_fn, batch)
                return op.matvec(v).detach()
        if name == "curvlinops":
            criterion = _need_criterion(name, criterion, batch)
            op, _, _ = _curvlinops_operator(model, criterion, batch, check_deterministic=False)
            return (op @ v).detach()
        import lightning_curvature as lc

        with torch.enable_grad():
            return lc.hessian_vector_product(model, loss_fn, batch, v).detach()


# --------------------------------------------------------------------------- public entry points

_TOP: dict[str, Callable[..., PeerResult]] = {
    "pyhessian": _pyhessian_top,
    "eigenthings": _eigenthings_top,
    "curvlinops": _curvlinops_top,
    "ours": _ours_top,
}
_TRACE: dict[str, Callable[..., PeerResult]] = {
    "pyhessian": _pyhessian_trace,
    "eigenthings": _eigenthings_trace,
    "curvlinops": _curvlinops_trace,
    "ours": _ours_trace,
}


def _check_name(name: str) -> None:
    if name not in _TOP:
        raise ValueError(f"unknown peer {name!r}, expected one of {PEERS}")


def peer_top_eigenvalues(
    name: str,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    k: int,
    *,
    criterion: nn.Module | None = None,
    **opts: Any,
) -> PeerResult:
    """Top-``k`` (algebraic) Hessian eigenvalues of ``loss_fn(model, batch)`` by peer ``name``.

    ``opts`` are the peer's own knobs (``tol``/``maxIter`` for PyHessian, ``max_iter`` for
    eigenthings, ``tol``/``maxiter``/``ncv`` for curvlinops+eigsh, anything
    ``hessian_eigenvalues`` accepts for ours). Exceptions are caught and stored in
    ``result.error`` so one failing peer does not stop a benchmark.

    Raises:
        ValueError: if ``name`` is not a known peer.
    """
    _check_name(name)
    try:
        return _TOP[name](model, loss_fn, batch, k, criterion=criterion, **opts)
    except Exception as e:  # a peer's failure is a result, not a crash
        return PeerResult(name, f"top{k}", dict(opts), error=f"{type(e).__name__}: {e}"[:500])


def peer_trace(
    name: str,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    criterion: nn.Module | None = None,
    **opts: Any,
) -> PeerResult:
    """Hessian trace estimate of ``loss_fn(model, batch)`` by peer ``name`` (see module doc).

    Raises:
        ValueError: if ``name`` is not a known peer.
    """
    _check_name(name)
    try:
        return _TRACE[name](model, loss_fn, batch, criterion=criterion, **opts)
    except Exception as e:
        return PeerResult(name, "trace", dict(opts), error=f"{type(e).__name__}: {e}"[:500])
