r"""Matrix-free Hessian-vector products of ``loss_fn(model, batch)``.

Pearlmutter's trick gives :math:`Hv = \nabla_\theta (\nabla_\theta L \cdot v)` at the cost of roughly two
gradients. Two implementations:

* ``"double_backward"`` (default): the ``create_graph`` gradient is built once per measurement and its graph is
  reused for every product (``autograd.grad(g, θ, v, retain_graph=True)``); on CPU this beat forward-over-reverse
  in both time and memory. Convolutions and ReLUs in that gradient are built through
  :class:`~lightning_curvature.core._lean_double_backward.LeanDoubleBackward`, whose double backward skips work that
  PyTorch's formulas do and then discard (same values; products about 15% cheaper on the benchmark CNN).
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``; no graph is kept between products.
  It fails through BatchNorm in train mode (in-place buffer updates).

The operator evaluates the model through :func:`torch.func.functional_call` on detached parameter copies, so
the caller's ``.grad`` is never written and a DDP wrapper's gradient reducer never fires. Models held in
bf16/fp16 are evaluated in float32. Products of a :class:`~lightning_curvature.core._batch.MultiBatch` are
averaged with weights proportional to batch sizes; ``reduce_fn`` (a SUM all-reduce) extends the average
across processes.

Reference: B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6(1), 1994.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_curvature.core._batch import batch_size, iter_batches, to_compute
from lightning_curvature.core._lean_double_backward import LeanDoubleBackward
from lightning_curvature.core._state import (
    MeasurementMode,
    check_mode,
    math_attention,
    model_devices,
    preserved_model_state,
    seed_generators,
    unwrap_compiled,
)
from lightning_curvature.core.errors import NonFiniteCurvatureError

__all__ = [
    "HVPMethod",
    "HessianOperator",
    "LossFn",
    "ReduceFn",
    "hessian_vector_product",
    "select_parameters",
]

LossFn = Callable[[nn.Module, Any], Tensor]
ReduceFn = Callable[[Tensor], Tensor]
HVPMethod = Literal["double_backward", "forward_over_reverse"]
_METHODS = ("double_backward", "forward_over_reverse")


def select_parameters(model: nn.Module, params: Sequence[Tensor] | None = None) -> list[tuple[str, Tensor]]:
    """The named trainable parameters curvature is taken with respect to.

    Args:
        model: the model.
        params: a subset of ``model.parameters()``; default: every parameter with ``requires_grad``.

    Returns:
        ``(name, parameter)`` pairs, in ``model.named_parameters()`` order.

    Raises:
        ValueError: if there is no trainable parameter, or a given parameter is not one of the model's.
        TypeError: if a parameter is not floating point.
    """
    named: list[tuple[str, Tensor]] = [(n, p) for n, p in model.named_parameters()]
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        wanted = {id(p) for p in params}
        chosen = [(n, p) for n, p in named if id(p) in wanted]
        if len(chosen) != len(wanted):
            raise ValueError("`params` must be parameters of `model`; some given tensors are not.")
    if not chosen:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True; curvature needs at least one."
        )
    for n, p in chosen:
        if not p.is_floating_point():
            raise TypeError(f"Parameter {n!r} has dtype {p.dtype}; curvature needs floating-point parameters.")
    return chosen


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models, the parameters' own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class HessianOperator:
    r"""The linear map :math:`v \mapsto Hv`, :math:`H = \nabla^2_\theta L`, on flat parameter vectors.

    Use it as a context manager: on entry the model state is saved (RNG, buffers, train/eval flags) and the
    gradient graph is built; on exit everything is restored and the graph freed.

    Args:
        model: the model; its parameters decide device and dtype (half precision is computed in float32).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch.
        batch: a batch (tensor, tuple/list or dict of tensors), or a ``MultiBatch`` of several.
        params: parameters to differentiate with respect to (default: all trainable ones).
        method: ``"double_backward"`` or ``"forward_over_reverse"``.
        reuse_graph: keep the ``create_graph`` gradient of every batch for all products (double backward only).
            Default: reuse for a single batch, rebuild per product for a ``MultiBatch`` (bounded memory).
        reduce_fn: a SUM all-reduce applied to the weighted local sums (products, gradient, example count), e.g.
            :func:`all_reduce_sum` under ``torch.distributed``; ``None`` for a single process.
        mode: ``"train"`` (model flags as they are: BatchNorm batch statistics, one fixed dropout mask per
            measurement) or ``"eval"``.
        seed: seed of the forked RNG, so dropout masks are the same in every product.

    Raises:
        ValueError: for an unknown ``method``/``mode`` or an empty batch.
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
        method: HVPMethod = "double_backward",
        reuse_graph: bool | None = None,
        reduce_fn: ReduceFn | None = None,
        mode: MeasurementMode = "train",
        seed: int | None = 0,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
        self.mode = check_mode(mode)
        model = unwrap_compiled(model)  # compiled code cannot be differentiated twice
        self.model = model
        self.loss_fn = loss_fn
        self.method = method
        self.reduce_fn = reduce_fn
        self.seed = seed
        self._named = select_parameters(model, params)
        self._batches = list(iter_batches(batch))
        self._sizes = [batch_size(b) for b in self._batches]
        self.reuse_graph = (len(self._batches) == 1) if reuse_graph is None else bool(reuse_graph)
        first = self._named[0][1]
        self.device = first.device
        self.dtype = compute_dtype_for(first.dtype)
        self.shapes = [p.shape for _, p in self._named]
        self.numels = [p.numel() for _, p in self._named]
        self.dim = sum(self.numels)
        self.num_hvp = 0
        self.num_grad = 0
        self._wrapper = _LossModule(model, loss_fn)
        self._devices = model_devices(model)
        self._stack: ExitStack | None = None
        self._graphs: list[tuple[list[Tensor], list[Tensor]]] | None = None
        self._total: float | None = None
        self._gradient: Tensor | None = None

    # -- context management -------------------------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        stack = ExitStack()
        stack.enter_context(preserved_model_state(self.model, self.mode, self.seed))
        stack.enter_context(math_attention())
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
        self._graphs = None
        self._gradient = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _require_open(self) -> None:
        if self._stack is None:
            raise RuntimeError("HessianOperator must be used inside `with HessianOperator(...) as H:`.")

    # -- evaluation --------------------------------------------------------------------------------------------
    def parameter_copies(self) -> list[Tensor]:
        """Detached copies of the parameters in the compute dtype, requiring grad."""
        return [p.detach().to(self.dtype).requires_grad_(True) for _, p in self._named]

    def _loss(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        mapping: dict[str, Tensor] = {f"model.{n}": t for (n, _), t in zip(self._named, params)}
        if self.dtype != self._named[0][1].dtype:
            # half-precision model: evaluate buffers in float32 too
            for n, b in self.model.named_buffers():
                if b.is_floating_point():
                    mapping[f"model.{n}"] = b.detach().to(self.dtype)
        batch = to_compute(batch, self.device, self.dtype)
        if self.seed is not None:
            seed_generators(self.seed, self._devices)  # the same dropout mask in every evaluation
        loss = functional_call(self._wrapper, mapping, (batch,), strict=False)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                f"`loss_fn` must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}."
            )
        loss = loss.reshape(())
        if not loss.is_floating_point():
            raise TypeError(f"`loss_fn` must return a floating-point loss, got dtype {loss.dtype}.")
        return loss.to(self.dtype)

    def _grad_with_graph(self, batch: Any) -> tuple[list[Tensor], list[Tensor]]:
        params = self.parameter_copies()
        with LeanDoubleBackward():  # conv and ReLU double backward without PyTorch's avoidable work
            loss = self._loss(params, batch)
        # With a cross-process reduction, a rank must not raise alone (the others would wait in the all-reduce
        # forever): the NaN flows into the reduced products instead and every rank raises at the same point.
        if self.reduce_fn is None and not torch.isfinite(loss):
            raise NonFiniteCurvatureError(f"The loss is not finite ({loss.item()}); no curvature to measure.")
        raw = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(raw, params)]
        self.num_grad += 1
        return params, grads

    def _prepare(self) -> None:
        n = torch.tensor(float(sum(self._sizes)), dtype=torch.float64, device=self.device)
        if self.reduce_fn is not None:
            n = self.reduce_fn(n)
        self._total = float(n.item())
        if self.method == "double_backward" and self.reuse_graph:
            self._graphs = [self._grad_with_graph(b) for b in self._batches]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Split a flat vector into parameter-shaped views."""
        return [c.view(s) for c, s in zip(torch.split(v, self.numels), self.shapes)]

    def _finish(self, local_sum: Tensor, what: str) -> Tensor:
        if self.reduce_fn is not None:
            local_sum = self.reduce_fn(local_sum)
        assert self._total is not None
        out = local_sum / self._total
        if self.reduce_fn is not None and not bool(torch.isfinite(out).all()):
            raise NonFiniteCurvatureError(f"The reduced {what} is not finite on some process.")
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Hv` for a flat vector ``v`` (any dtype; computed and returned in the compute dtype).

        Raises:
            RuntimeError: outside the ``with`` block.
            ValueError: if ``v`` has the wrong size.
        """
        self._require_open()
        if v.shape != (self.dim,):
            raise ValueError(f"Expected a flat vector of size {self.dim}, got shape {tuple(v.shape)}.")
        v = v.to(device=self.device, dtype=self.dtype)
        vs = self.unflatten(v)
        self.num_hvp += 1
        if len(self._batches) == 1 and self.reduce_fn is None:
            return self._batch_hvp(0, vs)  # one batch, one process: no weighting needed
        out = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        for i, n in enumerate(self._sizes):
            out.add_(self._batch_hvp(i, vs), alpha=float(n))
        return self._finish(out, "Hessian-vector product")

    def _batch_hvp(self, i: int, vs: Sequence[Tensor]) -> Tensor:
        """The product with the Hessian of physical batch ``i``'s mean loss, flat and detached."""
        if self.method == "forward_over_reverse":
            return self._hvp_forward_over_reverse(self._batches[i], vs).detach()
        if self._graphs is not None:
            params, grads = self._graphs[i]
            retain = True
        else:
            params, grads = self._grad_with_graph(self._batches[i])
            retain = False
        hv_parts = torch.autograd.grad(grads, params, vs, retain_graph=retain, allow_unused=True)
        return self.flatten([h if h is not None else torch.zeros_like(p) for h, p in zip(hv_parts, params)]).detach()

    __call__ = matvec

    def _hvp_forward_over_reverse(self, batch: Any, vs: Sequence[Tensor]) -> Tensor:
        params = tuple(p.detach().to(self.dtype) for _, p in self._named)

        def grad_fn(*ps: Tensor) -> tuple[Tensor, ...]:
            return torch.func.grad(lambda *q: self._loss(q, batch), argnums=tuple(range(len(ps))))(*ps)

        out = torch.func.jvp(grad_fn, params, tuple(vs))
        return self.flatten(out[1])

    def gradient(self) -> Tensor:
        """The mean gradient :math:`\\nabla L` as a flat vector (reduced across processes).

        Computed (and all-reduced) once per ``with`` block: the parameters cannot change inside it.
        """
        self._require_open()
        if self._gradient is not None:
            return self._gradient
        out = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        for i, (b, n) in enumerate(zip(self._batches, self._sizes)):
            if self._graphs is not None:
                g = self.flatten(self._graphs[i][1]).detach()
            else:
                params = self.parameter_copies()
                loss = self._loss(params, b)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                g = self.flatten([x if x is not None else torch.zeros_like(p) for x, p in zip(grads, params)])
                self.num_grad += 1
            out.add_(g, alpha=float(n))
        self._gradient = self._finish(out, "gradient")
        return self._gradient

    def parameters_flat(self) -> Tensor:
        """The current parameter values as one flat vector in the compute dtype."""
        return self.flatten([p.detach().to(self.dtype) for _, p in self._named])


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    vector: Tensor | Sequence[Tensor],
    **kwargs: Any,
) -> Tensor:
    """One product :math:`Hv`; ``vector`` flat or a list shaped like the parameters. Returns a flat vector.

    Keyword arguments are those of :class:`HessianOperator`.
    """
    with HessianOperator(model, loss_fn, batch, **kwargs) as H:
        v = vector if isinstance(vector, Tensor) else H.flatten(vector)
        return H.matvec(v)


def all_reduce_sum(t: Tensor) -> Tensor:
    """SUM all-reduce over the default ``torch.distributed`` process group (identity when not initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
