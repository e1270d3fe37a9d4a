r"""Matrix-free Hessian-vector products of ``loss_fn(model, batch)`` on parameter-shaped vectors.

Four ways to compute :math:`Hv` (``method=``):

* ``"double_backward"``: Pearlmutter's trick :math:`Hv = \nabla_\theta(\nabla_\theta L \cdot v)`. The
  ``create_graph`` gradient is built once per measurement and reused for every product; convolutions and ReLUs in
  it are built through :class:`~lightning_curvature.core._lean_double_backward.LeanDoubleBackward` (same values,
  less work). Exact, about 1.3–2 gradients per product. Needs a double backward through every op: not available
  under FSDP, through fused attention kernels or compiled code, and silently wrong through a custom autograd
  function whose backward is not itself differentiable (``@once_differentiable``, detached saved tensors).
* ``"finite_difference"``: differences of first-order gradients,
  :math:`Hv \approx (8(g_{+1} - g_{-1}) - (g_{+2} - g_{-2}))/(12\varepsilon)`, :math:`g_{\pm j} = \nabla
  L(\theta \pm j\varepsilon v)` (the central difference extrapolated by Richardson, error :math:`O(\varepsilon^4)`;
  ``fd_order=2`` for the plain central difference), starting from a step set by the dtype and the size of the
  parameters ``v`` lives in (:func:`finite_difference_step`). No fixed step suits every direction: along the top
  eigenvector of a trained network the loss is far from quadratic and the first step's truncation error can reach
  percents, while a preconditioned direction needs a larger step against rounding. So the two central differences
  the extrapolation uses also estimate its error, and above :data:`FD_TARGET` the step is searched (halved while the
  estimate falls, else doubled; the next product starts from the step found, so the search is paid about once per
  operator); :data:`FD_SAFETY` times the estimate is the product's relative error,
  :attr:`HessianOperator.last_product_error` (the largest so far: :attr:`HessianOperator.product_error`), and the
  eigenvalue solvers never report a bound below a product's error times its norm (nor any finite bound once
  ``product_error`` passes :data:`~.operators.RELIABLE_PRODUCT_ERROR`: ``inf``, not converged). The perturbed
  gradients are evaluated with the ReLU/max-pool pattern of :math:`\theta` (:mod:`._frozen_kinks`): otherwise their
  jumps at the kinks bias the difference by O(1). Works wherever training works; four gradients per product (two
  more per step tried, up to ~20 for the first product of a hard operator; two for ``fd_order=2``, which neither
  searches nor estimates).
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``; no graph is kept between products. Buffers
  a forward updates in place (BatchNorm's running statistics in train mode) are copied inside the transform, which
  forbids updating its captured tensors.
* ``"auto"`` (default): double backward where it exists and is valid, finite differences otherwise. At the first
  measurement of a model (cached per model and loss function) one double-backward product is compared with one
  finite-difference product on the same vector; if they differ by more than :data:`VALIDITY_TOLERANCE` relative,
  double backward is dropping terms and finite differences are used (with a warning). Compiled models use finite
  differences through the compiled code; on CPU the double backward runs under the math attention kernel (the fused
  CPU kernel has none), on accelerators a failing double backward falls back to finite differences with the fused
  kernel. The method used is :attr:`HessianOperator.method`.

The operator evaluates the model through :func:`torch.func.functional_call` on copies of the parameters, so the
caller's parameters and ``.grad`` are never written (even by a forward pass that writes its weights in place, such
as ``nn.Embedding(max_norm=...)``) and a DDP wrapper's gradient reducer never fires. Models held in bf16/fp16 are
evaluated in float32. The curvature batch is one batch, a :class:`~lightning_curvature.core._batch.MultiBatch`, or
any re-iterable of batches (a ``DataLoader``): products are averaged with weights proportional to batch sizes, and
``reduce_fn`` (a SUM all-reduce) extends the average across processes.

Reference: B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6(1), 1994.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_curvature.core._batch import (
    MultiBatch,
    batch_size,
    explain_several_batches,
    is_batch_iterable,
    iter_batches,
    read_if_one_pass,
    to_compute,
)
from lightning_curvature.core._frozen_kinks import FrozenKinks, KinkReplayError
from lightning_curvature.core._lean_double_backward import LeanDoubleBackward
from lightning_curvature.core._state import (
    MeasurementMode,
    check_mode,
    eager_execution,
    math_attention,
    model_devices,
    preserved_model_state,
    seed_generators,
    unwrap_compiled,
)
from lightning_curvature.core.errors import NonFiniteCurvatureError
from lightning_curvature.core.operators import RELIABLE_PRODUCT_ERROR, CurvatureOperator
from lightning_curvature.core.sharded import ShardedGradients, is_sharded, local_tensor, reshard, shard_space
from lightning_curvature.core.vectors import Vector, VectorSpace, add_, contiguous, dot64

__all__ = [
    "VALIDITY_TOLERANCE",
    "HVPMethod",
    "HessianOperator",
    "LossFn",
    "ReduceFn",
    "check_loss",
    "finite_difference_step",
    "hessian_vector_product",
    "select_parameters",
]

LossFn = Callable[[nn.Module, Any], Tensor]
ReduceFn = Callable[[Tensor], Tensor]
HVPMethod = Literal["auto", "double_backward", "finite_difference", "forward_over_reverse"]
_METHODS = ("auto", "double_backward", "finite_difference", "forward_over_reverse")

#: Relative difference between a double-backward and a finite-difference product above which ``"auto"`` decides
#: that the double backward is wrong (finite differences are accurate to about 1e-5 in float32; a dropped
#: second-derivative term changes products by far more).
VALIDITY_TOLERANCE = 1e-2

# model -> {loss function key: method chosen by "auto"}
_AUTO_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, str]] = weakref.WeakKeyDictionary()
# model -> {(loss function key, parameter names): gradients by loss.backward() (see _LossModule)}, once checked
_BACKWARD_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, bool]] = weakref.WeakKeyDictionary()


def select_parameters(model: nn.Module, params: Sequence[Tensor] | None = None) -> list[tuple[str, Tensor]]:
    """The named trainable parameters curvature is taken with respect to.

    Args:
        model: the model.
        params: a subset of ``model.parameters()``; default: every parameter with ``requires_grad``.

    Returns:
        ``(name, parameter)`` pairs, in ``model.named_parameters()`` order.

    Raises:
        ValueError: if there is no trainable parameter, ``params`` is empty, a given parameter is not one of the
            model's, or a parameter of a lazy module is not initialised yet.
        TypeError: if a parameter is not floating point.
    """
    named: list[tuple[str, Tensor]] = [(n, p) for n, p in model.named_parameters()]
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        params = list(params)
        if not params:
            raise ValueError(
                "`params` is empty: pass at least one parameter of the model, or None for all trainable ones."
            )
        wanted = {id(p) for p in params}
        chosen = [(n, p) for n, p in named if id(p) in wanted]
        if len(chosen) != len(wanted):
            raise ValueError("`params` must be parameters of `model`; some given tensors are not.")
    if not chosen:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True; curvature needs at least one."
        )
    for n, p in chosen:
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"Parameter {n!r} is not initialised yet (a lazy module, e.g. nn.LazyLinear): run one forward pass "
                "of the model before measuring its curvature."
            )
        if not p.is_floating_point():
            raise TypeError(f"Parameter {n!r} has dtype {p.dtype}; curvature needs floating-point parameters.")
    return chosen


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models, the parameters' own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_DTYPE_ERROR_HINTS = ("dtype", "scalar type", "same type", "type (")


@contextmanager
def explain_compute_dtype(model_dtype: torch.dtype, compute_dtype: torch.dtype) -> Iterator[None]:
    """Add a note to a dtype-mismatch error raised in the block (the user's forward and loss) when curvature is
    computed in another dtype than the model's (float32 copies of a half-precision model, or ``dtype=``): a
    forward or loss that casts to a fixed dtype (``x.half()``) then meets parameters of the other one."""
    try:
        yield
    except RuntimeError as error:
        if (
            model_dtype != compute_dtype
            and any(h in str(error) for h in _DTYPE_ERROR_HINTS)
            and hasattr(error, "add_note")  # Python >= 3.11
        ):
            error.add_note(
                f"lightning-curvature: the model's {model_dtype} parameters are measured in {compute_dtype} copies, "
                f"and the batch's floating tensors are cast to {compute_dtype} too. A forward or loss_fn that casts "
                "to a fixed dtype (x.half(), x.to(torch.bfloat16)) fails on them: cast to the parameters' dtype "
                "instead (x.to(next(model.parameters()).dtype)), or pass `dtype=` the model's own dtype (products "
                "with that dtype's rounding)."
            )
        raise


#: Finite-difference products whose estimated relative error (:meth:`HessianOperator._richardson`) is above this
#: search for a better step; below it the first step is kept (four gradients per product).
FD_TARGET = 5e-4
#: Halvings (or doublings) of the step one product's search tries at most (the next product starts from the step
#: this one settled on, so the search is paid about once per operator).
FD_SEARCH = 10
#: The reported error is this many times the estimate :math:`t`: where rounding dominates, the extrapolated
#: difference's error is about 1.2 t if the noise of the two differences is independent (its noise is
#: :math:`\sqrt{16.25}/3` of one difference's, :math:`t`'s :math:`\sqrt{1.25}`) and up to 7/3 t if it is the same
#: pattern scaled by the step (:math:`n(2h) = n(h)/2`: :math:`t = |n|/2`, :math:`R`'s noise :math:`7|n|/6`), as on
#: products concentrated on a few coordinates (``benchmarks/bench_fd_closed_form.py``: 2.26 t seen); where
#: truncation dominates, :math:`t` already overestimates it.
FD_SAFETY = 2.5
#: A halving of the step that raises the error estimate more than this many times discards the larger step's
#: estimate (rounding alone raises it about 2x; more means the larger steps did not resolve the loss).
FD_JUMP = 4.0
#: After such a jump from a resolved estimate, a difference at 3/2 of its step agreeing with it to within this many
#: times its estimate shows that the larger steps did resolve the loss (no aliasing): the jump was rounding.
FD_PROBE = 2.0
#: The smallest step the search tries, relative to the initial one (:func:`finite_difference_step`): there the
#: float32 rounding of the perturbed parameters is already about 1% of the perturbation (:math:`u^{2/3}/2` over the
#: ratio), and the differences measure the Hessian along a direction that far from the one asked for.
FD_MIN_RATIO = 2.0**-10
#: An estimate above this (the largest whose reported error, :data:`FD_SAFETY` times it, is still trusted:
#: :data:`~.operators.RELIABLE_PRODUCT_ERROR`) says the step does not resolve the loss along the direction, so a
#: halving (or doubling) that does not lower it proves nothing about rounding: the search goes on.
FD_UNRESOLVED = RELIABLE_PRODUCT_ERROR / FD_SAFETY


def finite_difference_step(dtype: torch.dtype, scale: float, v_norm: float, order: int = 4) -> float:
    r"""Step :math:`\varepsilon` of a finite difference along ``v``: :math:`\varepsilon\|v\| = c\,u^{1/3} s`.

    ``s`` is the size of the parameters ``v`` lives in (:func:`direction_scale`), :math:`u` the unit roundoff, and
    :math:`c` = 2 for the fourth-order stencil (steps :math:`\pm\varepsilon, \pm 2\varepsilon`), 0.5 for the
    central difference. The central difference has truncation error :math:`O(\varepsilon^2)` and rounding error
    :math:`O(u/\varepsilon)`; with no estimate of the higher derivatives the step is a fixed fraction of the
    parameters' scale, and the constants are those that kept the products within 1e-4 of exact ones on the
    benchmark models (``benchmarks/bench_products.py``).
    """
    u = float(torch.finfo(dtype).eps) / 2.0
    c = 2.0 if order == 4 else 0.5
    return c * u ** (1.0 / 3.0) * scale / max(v_norm, 1e-300)


def direction_scale(space: VectorSpace, theta: Vector, v: Vector) -> float:
    r"""The size of the parameters a direction lives in: :math:`\sqrt{P_\text{eff}}\,\bigl(\sum_i \hat v_i^2
    \theta_i^2\bigr)^{1/2}`, :math:`P_\text{eff} = \|v\|_2^4/\|v\|_4^4` the number of entries it spreads over.

    A random direction gets :math:`\approx\|\theta\|`; one concentrated on a layer gets about that layer's norm,
    so every entry is perturbed by a similar fraction of its own size. At least 1e-2 (parameters at zero).
    """
    sums = torch.zeros(3, dtype=torch.float64, device=space.device)
    for vi, ti in zip(v, theta):
        v2 = vi.double().square()
        sums += torch.stack([v2.sum(), v2.square().sum(), (v2 * ti.double().square()).sum()]).to(space.device)
    if space.reduce_fn is not None:
        sums = space.reduce_fn(sums)
    vv, v4, vt = (float(x) for x in sums.cpu())
    if not vv > 0:
        return 1e-2
    return max((vv * vv / max(v4, 1e-300)) ** 0.5 * (vt / vv) ** 0.5, 1e-2)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule runs code compiled by ``torch.compile`` (a wrapper or ``.compile()``)."""
    for m in module.modules():
        if isinstance(getattr(m, "_orig_mod", None), nn.Module):
            return True
        if getattr(m, "_compiled_call_impl", None) is not None:
            return True
    return False


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``functional_call`` can swap the model's parameters.

    With ``wrt`` it also returns the gradient with respect to those tensors, computed inside the call: activation
    checkpointing (``torch.utils.checkpoint``) re-runs parts of the forward during the backward, and that re-run
    must see the same swapped-in parameters as the forward (after ``functional_call`` returns it would see the
    model's own).

    Reentrant checkpointing (``use_reentrant=True``, e.g. older Hugging Face gradient checkpointing) refuses
    ``torch.autograd.grad`` when it reaches a checkpointed segment, and hides the segment's parameters from it
    (they are not inputs of the segment's autograd node: ``grad`` reports them unused, a silent zero). So the
    first refusal, and the first gradient with an unused tensor, raise :class:`_NeedsBackward` (the caller runs
    the call again); that evaluation reads the gradient from ``.grad`` after ``loss.backward()``
    (:func:`_grad_by_backward`), and so do all later ones if it was a refusal or the backward reached a tensor
    ``grad`` had called unused.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.grad_by_backward = False
        self._unused: list[bool] | None = None  # set: the next evaluation checks these unused tensors by backward
        self._unused_checked = False

    def forward(
        self, batch: Any, wrt: Sequence[Tensor] | None = None, create_graph: bool = False
    ) -> Tensor | tuple[Tensor, tuple[Tensor | None, ...]]:
        with explain_several_batches(batch):
            loss = self.loss_fn(self.model, batch)
        if wrt is None:
            return loss
        loss = _checked_loss(loss)
        if self.grad_by_backward or self._unused is not None:
            grads = _grad_by_backward(loss, wrt, create_graph, self.model)
            if self._unused is not None:  # reached by the backward, unused for grad: a hidden (reentrant) path
                self.grad_by_backward = any(u and g is not None for u, g in zip(self._unused, grads))
                self._unused = None
            return loss, grads
        try:
            grads = torch.autograd.grad(loss, wrt, create_graph=create_graph, allow_unused=True)
        except RuntimeError as err:
            if "use_reentrant=True" not in str(err):
                raise
            self.grad_by_backward = True
            raise _NeedsBackward(str(err)) from err
        if not self._unused_checked and any(g is None for g in grads):
            self._unused_checked = True
            self._unused = [g is None for g in grads]
            raise _NeedsBackward("some tensors are unused for torch.autograd.grad: checked by a backward")
        return loss, grads


def call_loss_module(
    module: _LossModule,
    mapping: dict[str, Tensor],
    batch: Any,
    kwargs: dict[str, Any],
    before: Callable[[], None] | None = None,
) -> tuple[Any, bool]:
    """``functional_call(module, mapping, (batch,), kwargs)``, evaluated a second time when the first raised
    :class:`_NeedsBackward` (``before`` runs ahead of each evaluation, e.g. to reseed dropout); returns the result
    and whether it took the second evaluation."""
    for attempt in range(2):
        if before is not None:
            before()
        try:
            return functional_call(module, mapping, (batch,), kwargs, strict=False), attempt == 1
        except _NeedsBackward:
            if attempt:
                raise
    raise AssertionError("unreachable")


class _NeedsBackward(RuntimeError):
    """``torch.autograd.grad`` was refused (reentrant checkpointing) or called a tensor unused: evaluate again; the
    gradient then comes from ``.grad`` after ``loss.backward()``."""


def _grad_by_backward(
    loss: Tensor, wrt: Sequence[Tensor], create_graph: bool, model: nn.Module
) -> tuple[Tensor | None, ...]:
    """The gradient of ``loss`` with respect to the leaves ``wrt`` by ``loss.backward()``.

    Every parameter of ``model`` keeps its very ``.grad`` object, untouched: each is set aside (``None``) for the
    backward, which may reach parameters that were not swapped out, and put back afterwards.
    """
    saved = [(p, p.grad) for p in model.parameters()]
    for p, _ in saved:
        p.grad = None
    for t in wrt:
        t.grad = None
    try:
        with warnings.catch_warnings():  # the leaves' .grad are cleared below: no reference cycle survives
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=create_graph)
        return tuple(t.grad for t in wrt)
    finally:
        for t in wrt:
            t.grad = None
        for p, g in saved:
            p.grad = g


class _Batches:
    """The physical batches of a curvature batch, re-iterable; a one-pass iterator is materialised once."""

    def __init__(self, batch: Any) -> None:
        batch = read_if_one_pass(batch)  # a generator: read it once
        self.source: Any = batch
        if is_batch_iterable(batch) and not isinstance(batch, MultiBatch):
            sampler = getattr(batch, "sampler", None)
            if isinstance(sampler, torch.utils.data.RandomSampler):
                warnings.warn(
                    "The curvature batch is a DataLoader with shuffle=True: it is read again for every product, "
                    "so with drop_last or random augmentations the operator changes between products. Use "
                    "shuffle=False (the order does not matter for the average).",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self.materialised: list[Any] | None = (
            list(iter_batches(batch)) if not is_batch_iterable(self.source) or isinstance(batch, MultiBatch) else None
        )
        if self.materialised is not None:
            if not self.materialised:
                raise ValueError("Got an empty MultiBatch; pass at least one batch.")
            for b in self.materialised:
                batch_size(b)  # raises now for an empty batch or one without tensors

    @property
    def single(self) -> bool:
        return self.materialised is not None and len(self.materialised) == 1

    def __iter__(self) -> Iterator[Any]:
        if self.materialised is not None:
            yield from self.materialised
        else:
            got = False
            for b in self.source:
                got = True
                yield b
            if not got:
                raise ValueError("The curvature batch iterable is empty.")


class HessianOperator(CurvatureOperator):
    r"""The linear map :math:`v \mapsto Hv`, :math:`H = \nabla^2_\theta L`, on parameter-shaped vectors.

    Use it as a context manager: on entry the model state is saved (RNG, buffers, train/eval flags, plain tensor
    attributes) and, for double backward, the gradient graph is built; on exit everything is restored and the graph
    freed. Inside the block autocast is off (a caller's ``torch.autocast`` region would round the products to half
    precision). :meth:`matvec` takes a list of tensors shaped like the parameters (returns one) or a flat vector
    (returns a flat vector).

    Args:
        model: the model; its parameters decide device and dtype (half precision is computed in float32).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch.
        batch: a batch (tensor, tuple/list, dict or dataclass of tensors), a ``MultiBatch``, or a re-iterable of
            batches such as a ``DataLoader`` (read again for every product: a curvature batch larger than memory).
        params: parameters to differentiate with respect to (default: all trainable ones). A parameter the loss
            does not use, or whose gradient does not depend on the parameters, has a zero Hessian row.
        method: ``"auto"`` (default), ``"double_backward"``, ``"finite_difference"`` or ``"forward_over_reverse"``
            (see the module docstring).
        reuse_graph: keep the double-backward graph of every physical batch for all products. Default: reuse for
            a single batch, rebuild per product for several (memory of one physical batch).
        reduce_fn: a SUM all-reduce applied to the weighted local sums (products, gradient, example count), e.g.
            :func:`all_reduce_sum` under ``torch.distributed``; ``None`` for a single process.
        mode: ``"train"`` (model flags as they are: BatchNorm batch statistics, one fixed dropout mask per
            measurement) or ``"eval"``.
        seed: seed of the forked RNG, so dropout masks are the same in every product.
        compiled: whether the model runs compiled code (``"auto"`` then uses finite differences through it); default:
            detected from ``torch.compile`` wrappers and in-place compiled submodules (a framework that compiles
            methods its own way, such as Lightning, says so here).
        lean_double_backward: build double-backward graphs through
            :class:`~lightning_curvature.core._lean_double_backward.LeanDoubleBackward` (same values, less work
            through convolutions and ReLUs). Default: on CPU, where ``benchmarks/bench_engine.py`` measured it;
            off on accelerators, where it has not been measured.
        fd_order: finite-difference stencil: 4 (default; gradients at ±ε and ±2ε combined by Richardson's
            extrapolation, error :math:`O(\varepsilon^4)`, four gradients per product) or 2 (central difference,
            two gradients, about 4x less accurate).
        dtype: the dtype the products are computed in (copies of the parameters, the floating buffers and the
            batch; the model is untouched). Default: the parameters' (float32 for half precision).
            ``torch.float64`` makes finite differences accurate where float32 rounding defeats every step (tens of
            millions of parameters), at the cost of float64 arithmetic; a compiled model recompiles for it. Not for
            sharded parameters.

    Raises:
        ValueError: for an unknown ``method``/``mode``/``fd_order`` or an empty batch.
        TypeError: for non-floating parameters.

    Example::

        >>> lin = nn.Linear(3, 1, bias=False)
        >>> x = torch.randn(8, 3)
        >>> loss_fn = lambda m, b: (m(b) ** 2).mean()  # Hessian 2 XᵀX / n
        >>> with HessianOperator(lin, loss_fn, x) as H:
        ...     hv = H.matvec(torch.ones(3))
        >>> torch.allclose(hv, 2 * x.T @ x @ torch.ones(3) / 8, atol=1e-5)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        params: Sequence[Tensor] | None = None,
        method: HVPMethod = "auto",
        reuse_graph: bool | None = None,
        reduce_fn: ReduceFn | None = None,
        mode: MeasurementMode = "train",
        seed: int | None = 0,
        fd_order: int = 4,
        compiled: bool | None = None,
        lean_double_backward: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"`dtype` must be a floating-point torch.dtype or None, got {dtype!r}.")
        if fd_order not in (2, 4):
            raise ValueError(f"`fd_order` must be 2 or 4, got {fd_order!r}.")
        self.fd_order = fd_order
        #: largest estimated relative error of the finite-difference products so far (0 for exact methods)
        self.product_error = 0.0
        #: the same for the last product alone
        self.last_product_error = 0.0
        #: estimated absolute error of :math:`v^\top Hv` for the last product (0 for exact methods)
        self.form_error = 0.0
        self._error_weight: Vector | None = None
        self.mode = check_mode(mode)
        reshard(model)  # FSDP2 modules left unsharded by a forward without backward: measure the shards
        self.compiled = is_compiled(model) if compiled is None else bool(compiled)
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        self._math_kernel = on_cpu or method in ("double_backward", "forward_over_reverse")
        if lean_double_backward is None:  # measured to pay on CPU (bench_engine.py); untested on accelerators
            lean_double_backward = all(p.device.type == "cpu" for p in model.parameters())
        self.lean_double_backward = bool(lean_double_backward)
        self.model = model
        self.loss_fn = loss_fn
        self.requested_method: str = method
        self.method: str = method
        self.reduce_fn = reduce_fn
        self.seed = seed
        eval_model = unwrap_compiled(model) if method in ("double_backward", "forward_over_reverse") else model
        self._eval_model = eval_model
        self._named = select_parameters(unwrap_compiled(model), params)
        # names as the evaluated module sees them (a torch.compile wrapper adds "_orig_mod."), matched by identity
        names = {id(p): n for n, p in eval_model.named_parameters(remove_duplicate=False)}
        self._names = [f"model.{names[id(p)]}" for _, p in self._named]
        self._prefix = "model."
        self._batches = _Batches(batch)
        self.reuse_graph = self._batches.single if reuse_graph is None else bool(reuse_graph)
        first = self._named[0][1]
        self.dtype_in = first.dtype
        requested_dtype = dtype
        self._explicit_dtype = dtype  # None: each parameter in its own compute dtype (half precision in float32)
        dtype = compute_dtype_for(first.dtype) if dtype is None else dtype
        params_list = [p for _, p in self._named]
        #: the parameters are FSDP shards: products by finite differences through the module's own forward/backward
        self.sharded = is_sharded(params_list)
        if self.sharded:
            if method in ("double_backward", "forward_over_reverse"):
                raise ValueError(
                    f"method={method!r} needs a double backward or forward-mode AD, which do not exist through FSDP's "
                    "sharded parameters; use method='finite_difference' or 'auto'."
                )
            if requested_dtype is not None and requested_dtype != first.dtype:
                raise ValueError(
                    f"dtype={requested_dtype} is not supported for sharded parameters (their products run through "
                    f"FSDP's own forward and backward in {first.dtype})."
                )
            self.method = "finite_difference"
            self.space = shard_space(params_list, first.dtype)
        else:
            dtypes = [compute_dtype_for(p.dtype) if requested_dtype is None else dtype for p in params_list]
            self.space = VectorSpace(params_list, dtypes=dtypes)
        self.shapes = list(self.space.shapes)
        self.numels = list(self.space.numels)
        self.num_matvecs = 0
        self.num_grad = 0
        self._wrapper = _LossModule(eval_model, loss_fn)
        # a half-precision model (or an explicit dtype=): its frozen tensors follow its parameters' compute dtype;
        # full-precision trainable parameters over a frozen half base (adapters) leave the base as it is
        self._upcast_needed = self.space.dtype != self.dtype_in
        known_route = _BACKWARD_CACHE.get(self.model, {}).get(self._route_key())
        if known_route is not None:  # checked by an earlier operator on this model and loss
            self._wrapper.grad_by_backward, self._wrapper._unused_checked = known_route, True
        self._devices = model_devices(model)
        self._stack: ExitStack | None = None
        self._graphs: list[tuple[list[Tensor], list[Tensor], int]] | None = None
        self._graph_losses: list[Tensor] = []  # the loss of each stored graph's batch
        self.num_check_products = 0
        self._gradient: Vector | None = None
        self._kinks: dict[int, list[Any]] = {}
        self._fd_ratio = 1.0  # the step the last finite-difference product settled on, over its initial step
        self._fd_target: float | None = None  # None: FD_TARGET
        #: finite differences replay the ReLU/max-pool pattern of θ (see :mod:`._frozen_kinks`)
        self.freeze_kinks = True

    @property
    def fd_step_ratio(self) -> float:
        """The step the last finite-difference product settled on, over its initial step (1 before any). The next
        product's search starts there; set it on a new operator to start where an earlier one ended (the monitors
        carry it from one measurement to the next)."""
        return self._fd_ratio

    @fd_step_ratio.setter
    def fd_step_ratio(self, ratio: float) -> None:
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"`fd_step_ratio` must be a positive finite number, got {ratio!r}.")
        self._fd_ratio = max(float(ratio), FD_MIN_RATIO)

    @property
    def fd_target(self) -> float:
        """Finite-difference products whose estimated relative error :math:`t` is at most this keep the step they
        start from; above it the step is searched (:data:`FD_TARGET` unless set). A measurement that needs less
        accuracy than a certified solve can raise it and pay fewer searches (the monitors' tracking measurements,
        whose residual bounds are far larger than such products' errors). The reported error is the estimate either
        way."""
        return FD_TARGET if self._fd_target is None else self._fd_target

    @fd_target.setter
    def fd_target(self, target: float) -> None:
        if not (isinstance(target, (int, float)) and 0 < target <= FD_UNRESOLVED):
            raise ValueError(f"`fd_target` must be in (0, {FD_UNRESOLVED:g}], got {target!r}.")
        self._fd_target = float(target)

    @contextmanager
    def fd_target_as(self, target: float | None) -> Iterator[None]:
        """Inside, :attr:`fd_target` is ``target`` (``None``: the default, :data:`FD_TARGET`); restored on exit."""
        saved = self._fd_target
        if target is None:
            self._fd_target = None
        else:
            self.fd_target = target  # validated
        try:
            yield
        finally:
            self._fd_target = saved

    # -- compatibility ----------------------------------------------------------------------------------------------
    @property
    def num_hvp(self) -> int:
        """Products taken so far by callers (the validity check of ``"auto"`` is :attr:`num_check_products`)."""
        return self.num_matvecs

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into one flat vector (a copy)."""
        return self.space.flatten(list(tensors))

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Split a flat vector into parameter-shaped tensors."""
        return self.space.unflatten(v)

    # -- context management -------------------------------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        if self._stack is not None:  # a nested entry would replace the state the outer one restores on exit
            raise RuntimeError(
                "This HessianOperator is already entered; it is not re-entrant. Use the open operator, or create a "
                "second HessianOperator."
            )
        stack = ExitStack()
        stack.enter_context(preserved_model_state(self.model, self.mode, self.seed, eager=False))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        self._stack = stack
        try:
            self._prepare()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._error_weight = None
        self._graphs = None
        self._graph_losses = []
        self._gradient = None
        self._kinks = {}
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _require_open(self) -> None:
        if self._stack is None:
            raise RuntimeError("HessianOperator must be used inside `with HessianOperator(...) as H:`.")

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _exact_context(self) -> Any:
        """Kernels and execution for exact (second-order) products: eager code; the math attention kernel on CPU
        or when double backward was asked for (on an accelerator ``"auto"`` keeps training's fused kernel, whose
        missing double backward then sends it to finite differences: the math kernel's memory is quadratic in the
        sequence length)."""
        stack = ExitStack()
        stack.enter_context(eager_execution(self.model))
        if self._math_kernel:
            stack.enter_context(math_attention())
        return stack

    def parameter_copies(self, shift: Vector | None = None, alpha: float = 0.0) -> list[Tensor]:
        """Copies of the parameters in the compute dtype (never sharing storage), optionally ``θ + α·shift``."""
        out = []
        for i, (_, p) in enumerate(self._named):
            t = p.detach().to(self.space.dtypes[i], copy=True)
            if shift is not None:
                t.add_(shift[i], alpha=alpha)
            out.append(t.requires_grad_(True))
        return out

    def _loss(self, params: Sequence[Tensor], batch: Any, fresh_buffers: bool = False) -> Tensor:
        return _checked_loss(self._call(params, batch, fresh_buffers))

    def _loss_and_grad(
        self, params: Sequence[Tensor], batch: Any, create_graph: bool = False
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """The loss at ``params`` and its gradient with respect to them (the backward inside the parameter swap)."""
        loss, raw = self._call(params, batch, wrt=params, create_graph=create_graph)
        return loss, tuple(None if g is None else strided(g) for g in raw)

    def _call(
        self,
        params: Sequence[Tensor],
        batch: Any,
        fresh_buffers: bool = False,
        wrt: Sequence[Tensor] | None = None,
        create_graph: bool = False,
    ) -> Any:
        mapping: dict[str, Tensor] = dict(zip(self._names, params))
        if self._upcast_needed:
            mapping.update(self._upcast_rest())
        if fresh_buffers:  # copies made here, inside a torch.func transform, may be updated in place (BatchNorm)
            for n, b in self._eval_model.named_buffers():
                key = f"{self._prefix}{n}"
                mapping[key] = mapping.get(key, b).clone()
        batch = to_compute(batch, self.space.device, self.space.dtype)
        kwargs = {} if wrt is None else {"wrt": tuple(wrt), "create_graph": create_graph}

        def reseed() -> None:
            if self.seed is not None:
                seed_generators(self.seed, self._devices)  # the same dropout mask in every evaluation

        with explain_compute_dtype(self.dtype_in, self.space.dtype):
            out, retried = call_loss_module(self._wrapper, mapping, batch, kwargs, before=reseed)
        if retried:  # the route was just decided: later operators on this model and loss reuse it
            _BACKWARD_CACHE.setdefault(self.model, {})[self._route_key()] = self._wrapper.grad_by_backward
        return out

    def _route_key(self) -> Any:
        return (getattr(self.loss_fn, "__code__", self.loss_fn), tuple(self._names))

    def _upcast_rest(self) -> dict[str, Tensor]:
        """The frozen parameters and floating buffers in the compute dtype too (copies): every floating one in an
        explicit ``dtype=``, else the half-precision ones in float32."""
        chosen = set(self._names)
        rest: dict[str, Tensor] = {}
        for n, t in [*self._eval_model.named_parameters(), *self._eval_model.named_buffers()]:
            key = f"{self._prefix}{n}"
            if key in chosen or not t.is_floating_point():
                continue
            target = self._explicit_dtype or compute_dtype_for(t.dtype)
            if t.dtype != target:
                rest[key] = t.detach().to(target)
        return rest

    def _grad_with_graph(
        self, batch: Any, losses: list[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor], int]:
        """Parameter copies, the gradient with its graph, and the batch size; ``losses`` collects the loss."""
        params = self.parameter_copies()
        lean = LeanDoubleBackward() if self.lean_double_backward else nullcontext()
        with lean:  # conv and ReLU double backward without PyTorch's avoidable work
            loss, raw = self._loss_and_grad(params, batch, create_graph=True)
        self._check_finite_loss(loss)
        if losses is not None:
            losses.append(loss.detach())
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(raw, params)]
        self.num_grad += 1
        return params, grads, batch_size(batch)

    def _check_finite_loss(self, loss: Tensor) -> None:
        # With a cross-process reduction a rank must not raise alone (the others would wait in the all-reduce
        # forever): the NaN flows into the reduced products instead and every rank raises at the same point.
        if self.reduce_fn is None and not torch.isfinite(loss):
            raise NonFiniteCurvatureError(f"The loss is not finite ({loss.item()}); no curvature to measure.")

    def _seeded_loss(self, model: nn.Module, batch: Any) -> Tensor:
        if self.seed is not None:
            seed_generators(self.seed, self._devices)  # the same dropout mask in every evaluation
        with explain_several_batches(batch):
            loss = self.loss_fn(model, batch)
        return _checked_loss(loss)

    def _gradient_at(self, batch: Any, shift: Vector | None = None, alpha: float = 0.0) -> Vector:
        """First-order gradient of the batch's mean loss at ``θ + α·shift`` (sharded: its global-mean share)."""
        if self.sharded:
            out = self._sharded_oracle.gradient(batch, batch_size(batch), shift, alpha)
            self.num_grad += 1
            return out
        params = self.parameter_copies(shift, alpha)
        loss, raw = self._loss_and_grad(params, batch)
        self._check_finite_loss(loss)
        self.num_grad += 1
        return [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(raw, params)]

    def _build_graphs(self) -> None:
        losses: list[Tensor] = []
        with self._exact_context():
            self._graphs = [self._grad_with_graph(b, losses) for b in self._batches]
        self._graph_losses = losses

    def _prepare(self) -> None:
        if self.sharded:
            local = sum(batch_size(b) for b in self._batches)
            assert self.space.reduce_fn is not None
            count = self.space.reduce_fn(torch.tensor([float(local)], dtype=torch.float64, device=self.space.device))
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            self._sharded_oracle = ShardedGradients(
                self.model,
                self._seeded_loss,
                [p for _, p in self._named],
                float(count[0]),
                world,
                lambda b: to_compute(b, self.space.device, self.dtype_in),
            )
            return
        if self.method == "auto":
            self.method = self._resolve_auto()
        if self.method == "double_backward" and self.reuse_graph and self._graphs is None:
            self._build_graphs()

    def _finish(
        self, parts: Vector, local_count: float, what: str, extras: tuple[float, ...] = ()
    ) -> tuple[Vector, list[float]]:
        """Divide the weighted sums by the (global) example count; under DDP one all-reduce of count and sums.

        ``extras`` are summed over the processes in the same all-reduce (unchanged without one) and returned."""
        if self.sharded:  # the sharded oracle returns each batch's share of the global mean, already reduced
            return parts, list(extras)
        if self.reduce_fn is None:
            return ([t.div_(local_count) for t in parts] if local_count != 1 else parts), list(extras)
        head = torch.tensor([local_count, *extras], dtype=self.space.dtype, device=self.space.device)
        flat = torch.cat([head] + [t.reshape(-1).to(device=self.space.device) for t in parts])
        flat = self.reduce_fn(flat)
        total = float(flat[0])
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteCurvatureError(f"The reduced {what} is not finite on some process.")
        out = []
        for piece, t in zip(torch.split(flat[head.numel() :], self.space.numels), parts):
            out.append((piece / total).to(device=t.device, dtype=t.dtype).view(t.shape))
        return out, [float(x) for x in flat[1 : head.numel()]]

    # -- products -------------------------------------------------------------------------------------------------
    def _matvec(self, v: Vector) -> Vector:
        self._require_open()
        return self._product(v, self.method)

    def _product(self, v: Vector, method: str) -> Vector:
        acc: Vector | None = None  # weighted sum of the batches' products, built in place (no extra vector)
        count = 0.0
        self.form_error = self.last_product_error = 0.0  # exact products; finite differences set their estimate below
        # one batch in one process: its product is the answer (no weighting, no division)
        alone = self._batches.single and self.reduce_fn is None and not self.sharded
        if method == "double_backward":
            with self._exact_context():
                if self._graphs is not None:
                    for params, grads, n in self._graphs:
                        n = 1 if alone else n
                        acc = _accumulate(acc, self._double_backward(params, grads, v, retain=True), n)
                        count += n
                else:
                    for b in self._batches:
                        params, grads, n = self._grad_with_graph(b)
                        n = 1 if alone else n
                        acc = _accumulate(acc, self._double_backward(params, grads, v, retain=False), n)
                        del params, grads
                        count += n
        elif method == "forward_over_reverse":
            with self._exact_context():
                for b in self._batches:
                    n = 1 if alone else batch_size(b)
                    acc = _accumulate(acc, self._forward_over_reverse(b, v), n)
                    count += n
        else:
            eps = self._fd_step(v)
            rounding: dict[float, float] = {}  # step -> its rounding error along v (the same for every batch)
            abs_error = form = 0.0  # Σ n·(estimated absolute error of the batch's product), Σ n·(of its vᵀHv)
            for i, b in enumerate(self._batches):
                n = 1 if (self.sharded or alone) else batch_size(b)
                if self.fd_order == 2:
                    part = [t.mul_(1.0 / (2.0 * eps)) for t in self._central_difference(i, b, v, eps)]
                else:
                    part, error, form_b = self._richardson(i, b, v, eps, rounding)
                    abs_error += n * FD_SAFETY * error * self._weighted_norm(part)
                    form += n * FD_SAFETY * form_b
                acc = _accumulate(acc, part, n)
                count += n
            assert acc is not None
            # the errors are combined like the products (summed over batches and processes), so that every process
            # holds the same estimate and the solvers take the same decisions everywhere
            out, (abs_error, form, total) = self._finish(acc, count, "Hessian-vector product", (abs_error, form, count))
            if self.fd_order != 2:
                scale = 1.0 if self.sharded else max(total, 1e-300)  # sharded: the batches' shares sum to the mean
                self.last_product_error = abs_error / scale / max(self._weighted_norm(out), 1e-300)
                self.product_error = max(self.product_error, self.last_product_error)
                self.form_error = form / scale
            return out
        assert acc is not None
        return self._finish(acc, count, "Hessian-vector product")[0]

    def _richardson(
        self, i: int, batch: Any, v: Vector, eps: float, rounding: dict[float, float]
    ) -> tuple[Vector, float, float]:
        r"""Richardson's :math:`R(h) = (4D(h) - D(2h))/3` of central differences :math:`D(h) = (g_{+h} - g_{-h})/2h`,
        with the step searched from ``eps`` (see :attr:`fd_target`); returns ``(R, t, f)``, ``f`` =
        :math:`|v^\top(D(h) - D(2h))|` the same estimate for the quadratic form :math:`v^\top Hv`.

        :math:`t = \|D(h) - D(2h)\| / \|R(h)\|` (in the norm of :meth:`error_weight`) estimates the error of the
        product: where truncation dominates it falls 4-fold per halving of :math:`h` and overestimates the error of
        :math:`R`; where rounding dominates it doubles per halving and about equals it.

        The search starts from ``eps`` times the ratio that the previous product of this operator settled on
        (successive products of a solver need similar steps, so four gradients usually suffice after the first).
        Above :attr:`fd_target` the step is halved while :math:`t` falls (not below :data:`FD_MIN_RATIO` of
        ``eps``), else doubled while it falls (at most :data:`FD_SEARCH` times each, two more gradients per try);
        the smallest :math:`t` wins. If the best :math:`t` is still above :data:`FD_UNRESOLVED` after that, the steps
        tried do not resolve the loss and a rise of :math:`t` meant nothing: the search halves on from the smallest
        step tried, past rises. A halving that raises :math:`t` more than
        :data:`FD_JUMP` times (aliasing: a step near a period of the loss along ``v`` gives :math:`D(h) \approx
        D(2h)` far from :math:`Hv`) discards the larger step and goes on halving, unless a difference at
        :math:`3h/2` agrees with :math:`D(h)` to within :data:`FD_PROBE` times its estimate (rounding fluctuating past
        :data:`FD_JUMP`; two more gradients): then the larger step stands, its estimate at least that disagreement.
        ``t`` includes the relative error of the steps the differences actually took (:meth:`_step_rounding`). The
        estimate assumes the step resolves the loss along ``v``; a loss that varies on a scale below every step tried
        can still fool it.
        ``rounding`` caches :meth:`_step_rounding` by step across the batches of one product.
        """

        def slope(h: float) -> Vector:
            if h not in rounding:
                rounding[h] = self._step_rounding(v, h)
            return [t.mul_(0.5 / h) for t in self._central_difference(i, batch, v, h)]

        def spread(a: Vector, b: Vector, ref: Vector) -> tuple[float, float, float]:
            """``‖a − b‖/‖ref‖`` (in the norm of :meth:`error_weight`), ``|vᵀ(a − b)|`` and ``|vᵀref|``, one tensor
            at a time."""
            w = self._error_weight
            sums = torch.zeros(4, dtype=torch.float64, device=self.space.device)
            for j, (x, y, r) in enumerate(zip(a, b, ref)):
                d = x - y
                form, along = dot64(d, v[j]), dot64(r, v[j])
                if w is not None:
                    d.mul_(w[j])
                    r = r * w[j]
                sums += torch.stack([dot64(d, d), dot64(r, r), form, along]).to(sums.device)
                del d, r
            if self.space.reduce_fn is not None:  # sharded vectors: sum over the shard group
                sums = self.space.reduce_fn(sums)
            diff, size, form_diff, form_ref = (float(x) for x in sums.cpu())
            rel = math.sqrt(max(diff, 0.0)) / max(math.sqrt(max(size, 0.0)), 1e-300)
            return rel, abs(form_diff), abs(form_ref)

        def estimate(small: Vector, big: Vector, h: float) -> tuple[Vector, float, float]:
            """``R(h)`` from ``small`` = D(h) and ``big`` = D(2h), with ``t`` and ``f`` (see above) plus the error
            of the steps actually taken, which ``D(h) − D(2h)`` cannot see: the parameters' rounding perturbs both
            steps by one relative amount near the smallest steps, and it cancels there."""
            R = [a.mul(4.0 / 3.0).sub_(c, alpha=1.0 / 3.0) for a, c in zip(small, big)]
            t, f, form = spread(small, big, R)
            rho = (4.0 * rounding[h] + rounding[2.0 * h]) / 3.0
            return R, t + rho, f + rho * form

        def disagreement(a: Vector, b: Vector) -> tuple[float, float]:
            return spread(a, b, a)[:2]

        h = eps * self._fd_ratio
        lo, hi = slope(h), slope(2.0 * h)
        best, t_best, f_best = estimate(lo, hi, h)
        if t_best > self.fd_target:
            best, t_best, f_best, h = self._search_step(
                slope, estimate, disagreement, (best, t_best, f_best), h, eps, lo, hi
            )
        self._fd_ratio = h / eps
        return best, t_best, f_best

    def _search_step(
        self,
        slope: Callable[[float], Vector],
        estimate: Callable[[Vector, Vector, float], tuple[Vector, float, float]],
        disagreement: Callable[[Vector, Vector], tuple[float, float]],
        first: tuple[Vector, float, float],
        h: float,
        eps: float,
        lo: Vector,
        hi: Vector,
    ) -> tuple[Vector, float, float, float]:
        r"""The search of :meth:`_richardson` from a step ``h`` whose estimate missed the target (``lo`` = D(h),
        ``hi`` = D(2h)); returns the best ``(R, t, f)`` and its step.

        The returned ``t`` (and ``f``) of a step the search moved to is at least the disagreement of the last two
        extrapolations, :math:`\|R(h) - R(2h)\|/\|R(h)\|`: where truncation dominates it is far below ``t``, but
        where rounding does, ``t`` alone can undercover when the differences are effectively one-dimensional (their
        rounding and truncation parts cancel in :math:`D(h) - D(2h)`, not at once in :math:`R(h) - R(2h)`).
        """
        best, t_best, f_best = first
        reported = (t_best, f_best)
        target = self.fd_target
        halved = False

        def take(R: Vector, t: float, f: float) -> tuple[float, float]:
            spread, form_spread = disagreement(R, best)
            return max(t, spread), max(f, form_spread)

        # Halve while t falls. Then, if no halving helped, double while it falls (rounding). If the best t is still
        # unresolved after that (above FD_UNRESOLVED: its rises and falls mean nothing), halve on from the smallest
        # step tried, past rises: the smaller steps a smooth direction needs are still untried there.
        step, t_step = h, t_best  # the smallest step tried (``lo`` = D(step)) and its t; ``h`` is the best one's
        for unresolved in (False, True):
            if unresolved and not t_best > FD_UNRESOLVED:
                break
            for _ in range(FD_SEARCH):
                if step / 2.0 < eps * FD_MIN_RATIO:  # below it the perturbation drowns in the parameters' rounding
                    break
                lower = slope(step / 2.0)
                R, t, f = estimate(lower, lo, step / 2.0)
                # rounding raises t about 2x per halving; a larger jump means the larger steps were not resolving
                # the loss (a step near a period of it: D(h) ≈ D(2h) by aliasing), so their t proves nothing
                jump = t > FD_JUMP * t_step
                if jump and step == h and not t_best > FD_UNRESOLVED:
                    # or rounding fluctuating past 4x: a difference at 3h/2, off the doubling ladder, tells them apart
                    # (aliasing gives it another error; rounding and truncation keep it within about t of D(h))
                    t_mid, f_mid = disagreement(lo, slope(1.5 * h))
                    if t_mid <= FD_PROBE * t_best:  # not aliasing: a rise like any other, and a second estimate
                        jump, reported = False, (max(reported[0], t_mid), max(reported[1], f_mid))
                step, lo, t_step = step / 2.0, lower, t
                if not (t < t_best or jump):
                    if unresolved and t_best > FD_UNRESOLVED:
                        continue
                    break
                reported = take(R, t, f)
                best, t_best, f_best, h, halved = R, t, f, step, True
                hi = []  # not needed once a halving was taken (frees a vector)
                if not t_best > target:  # never after a jump: t is then above 4x a t that missed the target
                    return best, *reported, h
            if unresolved or halved:
                continue
            below, up = hi, h  # rounding: larger steps while t falls (below = D(2·up))
            hi = []
            for _ in range(FD_SEARCH):
                higher = slope(4.0 * up)
                R, t, f = estimate(below, higher, 2.0 * up)
                below, up = higher, 2.0 * up
                if not t < t_best:
                    break
                reported = take(R, t, f)
                best, t_best, f_best, h = R, t, f, up
                if not t_best > target:
                    return best, *reported, h
            del below
        return best, *reported, h

    def _step_rounding(self, v: Vector, h: float) -> float:
        r"""Relative error of the step a central difference takes *along* ``v``: :math:`|\langle s - 2hv, 2hv
        \rangle| / \|2hv\|^2` with :math:`s = \mathrm{fl}(\theta + hv) - \mathrm{fl}(\theta - hv)` the
        parameters' actual difference (computed as :meth:`parameter_copies` and the sharded oracle perturb them),
        in the norm of :meth:`error_weight`.

        That part of the rounding scales the product itself (relative error exactly this), and near the smallest
        steps it is often the same relative amount at :math:`h` and :math:`2h` (a perturbation :math:`k` ulps plus
        less than a quarter ulp rounds down at both; coordinates moved by less than half an ulp are not moved by
        either), so :math:`D(h) - D(2h)` does not show it: on a coordinate direction that hid errors up to 1.7x the
        reported ones. The rest of the rounding is spread over the coordinates like noise and is left to ``t``.
        """
        w = self._error_weight
        sums = torch.zeros(2, dtype=torch.float64, device=self.space.device)
        chunk = 1 << 20  # float64 temporaries of at most this many entries
        for j, (_, p) in enumerate(self._named):
            base = (local_tensor(p) if self.sharded else p).detach().reshape(-1)
            dtype = base.dtype if self.sharded else self.space.dtypes[j]
            direction = v[j].reshape(-1)
            for s in range(0, base.numel(), chunk):
                b = base[s : s + chunk].to(dtype)
                d = direction[s : s + chunk]
                dd = d.to(dtype)
                step = torch.add(b, dd, alpha=h).to(torch.float64)  # the same kernel as the perturbations' add_
                step -= torch.add(b, dd, alpha=-h).to(torch.float64)
                exact = d.to(torch.float64) * (2.0 * h)
                step -= exact
                if w is not None:
                    weight = w[j].reshape(-1)[s : s + chunk].to(torch.float64)
                    step *= weight
                    exact *= weight
                sums += torch.stack([(step * exact).sum(), exact.square().sum()]).to(sums.device)
        if self.space.reduce_fn is not None:
            sums = self.space.reduce_fn(sums)
        along, size = (float(x) for x in sums.cpu())
        return abs(along) / max(size, 1e-300)

    def _weighted_norm(self, x: Vector) -> float:
        """``‖Wx‖`` in the norm of :meth:`error_weight` (reduced across shards)."""
        w = self._error_weight
        total = torch.zeros((), dtype=torch.float64, device=self.space.device)
        for j, t in enumerate(x):
            tw = t if w is None else t * w[j]
            total += dot64(tw, tw).to(total.device)
        if self.space.reduce_fn is not None:
            total = self.space.reduce_fn(total)
        return math.sqrt(max(float(total), 0.0))

    @contextmanager
    def error_weight(self, weight: Vector) -> Iterator[None]:
        r"""Judge the accuracy of finite-difference products in the norm :math:`\|Wx\|` for the block (a
        :class:`~lightning_curvature.core.operators.ScaledOperator` passes its diagonal: the accuracy that matters is
        that of :math:`DAD`)."""
        saved, self._error_weight = self._error_weight, weight
        try:
            yield
        finally:
            self._error_weight = saved

    def _kink_pattern(self, i: int, batch: Any) -> list[Any]:
        """The on/off pattern of the piecewise-linear ops at θ for batch ``i`` (recorded once per stored batch)."""
        records = self._kinks.get(i) if self._batches.materialised is not None else None
        if records is None:
            records = []
            with torch.no_grad(), FrozenKinks(records, record=True):
                self._loss_no_grad(batch)
            if self._batches.materialised is not None:
                self._kinks[i] = records
        return records

    def _central_difference(self, i: int, batch: Any, v: Vector, eps: float) -> Vector:
        """``∇L(θ + εv) − ∇L(θ − εv)`` computed in place in the first gradient (two gradient vectors at most)."""
        plus, minus = self._central_pair(i, batch, v, eps)
        for a, b in zip(plus, minus):
            a.sub_(b)
        return plus

    def _central_pair(self, i: int, batch: Any, v: Vector, eps: float) -> tuple[Vector, Vector]:
        """Gradients at θ ± εv, with the activation pattern frozen at θ (see :mod:`._frozen_kinks`)."""
        if self.freeze_kinks:
            try:
                records = self._kink_pattern(i, batch)
                with FrozenKinks(records, record=False):
                    plus = self._gradient_at(batch, v, eps)
                with FrozenKinks(records, record=False):
                    minus = self._gradient_at(batch, v, -eps)
                return plus, minus
            except KinkReplayError as err:
                self.freeze_kinks = False
                warnings.warn(
                    f"The activation pattern could not be replayed ({err}); finite-difference products include the "
                    "curvature of ReLU/max-pool kinks from now on.",
                    RuntimeWarning,
                    stacklevel=5,
                )
        return self._gradient_at(batch, v, eps), self._gradient_at(batch, v, -eps)

    def _loss_no_grad(self, batch: Any) -> None:
        if self.sharded:  # through FSDP's own forward (it all-gathers the shards)
            if self.seed is not None:
                seed_generators(self.seed, self._devices)
            self.loss_fn(self.model, to_compute(batch, self.space.device, self.dtype_in))
            reshard(self.model)
            return
        params = [p.detach().to(d, copy=True) for (_, p), d in zip(self._named, self.space.dtypes)]
        with warnings.catch_warnings():
            # a forward without autograd: reentrant checkpointing warns that nothing will get a gradient
            warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
            self._call(params, batch)

    def _double_backward(self, params: list[Tensor], grads: list[Tensor], v: Vector, retain: bool) -> Vector:
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # a constant gradient has a zero Hessian row
        if not live:
            return [torch.zeros_like(p) for p in params]
        hv = torch.autograd.grad(
            [grads[i] for i in live], params, [v[i] for i in live], retain_graph=retain, allow_unused=True
        )
        return [strided(h.detach()) if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)]

    def _forward_over_reverse(self, batch: Any, v: Vector) -> Vector:
        params = tuple(p.detach().to(self.space.dtypes[i], copy=True) for i, (_, p) in enumerate(self._named))

        def grad_fn(*ps: Tensor) -> tuple[Tensor, ...]:
            return torch.func.grad(lambda *q: self._loss(q, batch, True), argnums=tuple(range(len(ps))))(*ps)

        out = torch.func.jvp(grad_fn, params, tuple(v))[1]
        return [t.detach() for t in out]

    def _fd_step(self, v: Vector) -> float:
        theta = [local_tensor(p).detach() for _, p in self._named]
        scale = direction_scale(self.space, theta, v)
        return finite_difference_step(self.space.coarsest_dtype, scale, float(self.space.norm(v)), self.fd_order)

    # -- the choice of "auto" -------------------------------------------------------------------------------------
    def _auto_key(self) -> Any:
        return getattr(self.loss_fn, "__code__", self.loss_fn)

    def _resolve_auto(self) -> str:
        """Double backward if it runs and agrees with finite differences, else finite differences (cached)."""
        if self.compiled:
            return "finite_difference"
        cache = _AUTO_CACHE.setdefault(self.model, {})
        known = cache.get(self._auto_key())
        if known is not None:
            return known
        probe = self.space.randn(torch.Generator(device="cpu").manual_seed(12345))
        try:
            if self.reuse_graph:
                self._build_graphs()
            exact = self._product(probe, "double_backward")
        except (RuntimeError, NotImplementedError) as err:
            self._graphs = None
            self._raise_if_first_order_fails(err)
            warnings.warn(
                f"Double backward is not available for this model ({type(err).__name__}: {str(err)[:200]}); "
                "curvature is measured with finite-difference products.",
                RuntimeWarning,
                stacklevel=4,
            )
            self._graphs = None
            cache[self._auto_key()] = "finite_difference"
            return "finite_difference"
        # the check compares at VALIDITY_TOLERANCE: its difference needs the default accuracy, whatever a solve asks
        with self.fd_target_as(None):
            approx = self._product(probe, "finite_difference")
        self.product_error = self.form_error = self.last_product_error = 0.0  # the probe is not measured
        self.num_check_products = 2
        diff = self.space.norm([a - b for a, b in zip(exact, approx)])
        scale = torch.maximum(self.space.norm(exact), self.space.norm(approx)).clamp_min(1e-300)
        rel = float(diff / scale)
        if not math.isfinite(rel):
            raise NonFiniteCurvatureError("A Hessian-vector product is not finite.")
        method = "double_backward" if rel <= VALIDITY_TOLERANCE else "finite_difference"
        if method == "finite_difference":
            self._graphs = None
            warnings.warn(
                f"Double-backward Hessian-vector products of this model differ from finite differences by {rel:.1%} "
                "(an op whose backward is not correctly differentiable drops or distorts second-derivative terms: a "
                "custom autograd function, or e.g. PyTorch's weight_norm); "
                "curvature is measured with finite-difference products.",
                RuntimeWarning,
                stacklevel=4,
            )
        cache[self._auto_key()] = method
        return method

    # -- gradient ---------------------------------------------------------------------------------------------------
    def _raise_if_first_order_fails(self, err: BaseException) -> None:
        """Re-raise ``err`` when a first-order gradient fails as well: then the loss or the forward is at fault
        (finite differences would fail the same way), not the double backward."""
        try:
            self._gradient_at(next(iter(self._batches)))
        except (RuntimeError, NotImplementedError):
            raise err from None

    def gradient(self) -> Vector:
        """The mean gradient :math:`\\nabla L` as a parameter-shaped vector (reduced across processes).

        Computed (and all-reduced) once per ``with`` block: the parameters cannot change inside it.
        """
        self._require_open()
        if self._gradient is not None:
            return self._gradient
        if self._graphs is not None and len(self._graphs) == 1 and self.reduce_fn is None:
            self._gradient = contiguous([g.detach() for g in self._graphs[0][1]])  # the graph's own: no copy
            return self._gradient
        acc: Vector | None = None
        count = 0.0
        if self._graphs is not None:
            for _, grads, n in self._graphs:
                acc = _accumulate(acc, [g.detach().clone() for g in grads], n)
                count += n
        else:
            ctx = self._exact_context() if self.method == "double_backward" else nullcontext()
            with ctx:
                for b in self._batches:
                    n = 1 if self.sharded else batch_size(b)
                    acc = _accumulate(acc, self._gradient_at(b), n)
                    count += n
        assert acc is not None
        self._gradient = contiguous(self._finish(acc, count, "gradient")[0])
        return self._gradient

    def loss(self) -> float:
        """The mean loss of this process's curvature batch at :math:`\theta` (weighted by batch size, not reduced
        across processes): read from the double-backward graphs when they are kept, else one forward pass per
        physical batch on copies of the parameters (in the operator's mode, with its dropout seed)."""
        self._require_open()
        if self._graphs is not None and len(self._graph_losses) == len(self._graphs):
            parts = [(value, n) for value, (_, _, n) in zip(self._graph_losses, self._graphs)]
        else:
            parts = []  # with autograd on: the loss is checked to depend on the parameters; its graph is dropped
            for b in self._batches:
                if self.sharded:  # through FSDP's own forward (it all-gathers the shards)
                    value = self._seeded_loss(self.model, to_compute(b, self.space.device, self.dtype_in))
                    reshard(self.model)
                else:
                    value = self._loss(self.parameter_copies(), b)
                parts.append((value.detach(), batch_size(b)))
        total = sum(float(n) for _, n in parts)
        return sum(float(value) * float(n) for value, n in parts) / total

    def parameters_flat(self) -> Tensor:
        """The current parameter values as one flat vector in the compute dtype."""
        return self.space.flatten([p.detach() for _, p in self._named])

    def parameter_values(self) -> Vector:
        """The current parameter values as a vector of the space (copies)."""
        return [p.detach().to(d, copy=True) for (_, p), d in zip(self._named, self.space.dtypes)]


def _accumulate(acc: Vector | None, part: Vector, weight: float) -> Vector:
    """``acc + weight · part``, reusing ``part``'s memory for the first term (it is a fresh product)."""
    if acc is None:
        return [t.mul_(float(weight)) for t in part] if weight != 1 else part
    return add_(acc, part, float(weight))


def strided(t: Tensor) -> Tensor:
    """``t`` as an ordinary (strided) tensor: the sparse gradient of ``nn.Embedding(sparse=True)`` made dense
    (differentiably, so a double backward runs through it)."""
    return t if t.layout == torch.strided else t.to_dense()


def check_loss(loss: Any) -> Tensor:
    """``loss`` if curvature can be taken of it: a floating-point scalar tensor connected to the parameters.

    Raises:
        TypeError: for a non-tensor, a non-scalar or a non-floating loss.
        ValueError: for a loss that does not depend on the parameters (detached, ``no_grad``, ``.item()``).
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}.")
    if loss.numel() != 1:
        raise TypeError(f"`loss_fn` must return a scalar (mean) loss, got a tensor of shape {tuple(loss.shape)}.")
    if not loss.is_floating_point():
        raise TypeError(f"`loss_fn` must return a floating-point loss, got dtype {loss.dtype}.")
    if not loss.requires_grad:
        raise ValueError(
            "`loss_fn` returned a loss that does not depend on the parameters (it was detached, or computed under "
            "torch.no_grad()/inference_mode, or .item() was taken); curvature needs a differentiable loss."
        )
    return loss


def _checked_loss(loss: Any) -> Tensor:
    """``loss`` checked (:func:`check_loss`) as a 0-dim tensor in float32 or wider."""
    loss = check_loss(loss)
    return loss.reshape(()).to(torch.float32 if loss.dtype in (torch.float16, torch.bfloat16) else loss.dtype)


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    vector: Tensor | Sequence[Tensor],
    **kwargs: Any,
) -> Any:
    """One product :math:`Hv`; ``vector`` flat (returns flat) or a list shaped like the parameters (returns one).

    Keyword arguments are those of :class:`HessianOperator`.
    """
    with HessianOperator(model, loss_fn, batch, **kwargs) as H:
        return H.matvec(vector if isinstance(vector, Tensor) else list(vector))


def all_reduce_sum(t: Tensor) -> Tensor:
    """SUM all-reduce over the default ``torch.distributed`` process group (identity when not initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
