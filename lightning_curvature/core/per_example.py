r"""Per-example gradients :math:`g_i = \nabla_\theta \ell(\theta; x_i)`, in chunks of bounded memory.

``torch.func.vmap(torch.func.grad(...))`` over the examples of a chunk (each example is passed to
``loss_fn`` as a batch of one); where ``vmap`` cannot trace the model (data-dependent control flow,
``.item()``, unsupported in-place ops) a micro-batch loop of one ``autograd.grad`` per example is used, with a
warning. Running out of memory is raised, never answered by the (slower) loop: pass a smaller ``chunk_size``.
BatchNorm in train mode mixes the examples of a batch, so per-example gradients do not exist there: that
case raises (as BackPACK does) unless the measurement runs in eval mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_curvature.core._batch import _map_tensors, batch_size, iter_batches, slice_batch, to_compute
from lightning_curvature.core.hvp import (
    LossFn,
    _LossModule,
    call_loss_module,
    compute_dtype_for,
    select_parameters,
    strided,
)

__all__ = ["check_per_example_safe", "default_chunk_size", "per_example_gradient_chunks"]


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


PerExampleStrategy = Literal["auto", "vmap", "loop"]


def check_per_example_safe(model: nn.Module) -> None:
    """Raise if a BatchNorm layer is in train mode (its output mixes the examples of the batch).

    Raises:
        ValueError: naming the offending module.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"BatchNorm layer {name or type(m).__name__!r} is in train mode: its batch statistics mix the "
                "examples, so per-example gradients are meaningless. Measure with mode='eval' (running statistics)."
            )


def default_chunk_size(num_params: int, num_examples: int, max_memory_bytes: float, itemsize: int) -> int:
    """Examples per chunk so that one chunk of per-example gradients fits in ``max_memory_bytes``."""
    per = max(1, num_params * itemsize * 3)  # gradients + vmap intermediates, roughly
    return int(max(1, min(num_examples, max_memory_bytes // per)))


def _unsqueeze(batch: Any) -> Any:
    """One example (its batch dimension removed by ``vmap``) as a batch of one."""
    return _map_tensors(batch, lambda t: t.unsqueeze(0))


def per_example_gradient_chunks(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    params: Sequence[Tensor] | None = None,
    chunk_size: int | None = None,
    max_memory_bytes: float = 512e6,
    strategy: PerExampleStrategy = "auto",
) -> Iterator[Tensor]:
    """Yield ``(c, P)`` float tensors of per-example gradients, chunk by chunk, in example order.

    Must run inside :func:`~lightning_curvature.core._state.preserved_model_state` (the callers do).

    Raises:
        ValueError: for a bad ``chunk_size``/``strategy`` or BatchNorm in train mode.
    """
    if strategy not in ("auto", "vmap", "loop"):
        raise ValueError(f"`strategy` must be 'auto', 'vmap' or 'loop', got {strategy!r}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}.")
    check_per_example_safe(model)
    named = select_parameters(model, params)
    first = named[0][1]
    device, dtype = first.device, compute_dtype_for(first.dtype)
    num_params = sum(p.numel() for _, p in named)
    wrapper = _LossModule(model, loss_fn)
    # copies: a forward that writes its weights in place (nn.Embedding(max_norm=...)) must not touch the parameters;
    # each in its own compute dtype (a float64 head over a float32 body stays so)
    pvals = tuple(p.detach().to(compute_dtype_for(p.dtype), copy=True) for _, p in named)
    names = [f"model.{n}" for n, _ in named]
    rest: dict[str, Tensor] = {}
    if dtype != first.dtype:  # half-precision model: frozen parameters and buffers in the compute dtype too
        chosen = set(names)
        for key, t in [*model.named_parameters(), *model.named_buffers()]:
            if f"model.{key}" not in chosen and t.is_floating_point() and t.dtype != dtype:
                rest[f"model.{key}"] = t.detach().to(dtype)

    def loss_of(ps: tuple[Tensor, ...], example_batch: Any) -> Tensor:
        out = functional_call(wrapper, {**rest, **dict(zip(names, ps))}, (example_batch,), strict=False)
        return out.reshape(()).to(dtype)

    def grad_of(ps: tuple[Tensor, ...], example_batch: Any) -> tuple[Tensor | None, ...]:
        # the backward inside the parameter swap (activation checkpointing re-runs the forward during it)
        (_, raw), _ = call_loss_module(wrapper, {**rest, **dict(zip(names, ps))}, example_batch, {"wrt": ps})
        return tuple(None if g is None else strided(g) for g in raw)

    def one(ps: tuple[Tensor, ...], example: Any) -> tuple[Tensor, ...]:
        return torch.func.grad(loss_of)(ps, _unsqueeze(example))

    vmapped = torch.func.vmap(one, in_dims=(None, 0), randomness="different")
    use_vmap = strategy in ("auto", "vmap")
    for b in iter_batches(batch):
        b = to_compute(b, device, dtype)
        n = batch_size(b)
        c = chunk_size or default_chunk_size(num_params, n, max_memory_bytes, torch.finfo(dtype).bits // 8)
        for start in range(0, n, c):
            sub = slice_batch(b, start, min(n, start + c))
            grads = None
            if use_vmap:
                try:
                    grads = vmapped(pvals, sub)
                except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
                    if strategy == "vmap" or _is_out_of_memory(err):
                        raise  # out of memory is not a tracing problem: a smaller chunk_size is the remedy
                    use_vmap = False  # vmap cannot trace this model: a per-example loop for the rest
                    warnings.warn(
                        f"torch.func.vmap cannot compute per-example gradients of this model "
                        f"({type(err).__name__}: {str(err)[:160]}); using a per-example loop (much slower). Pass "
                        "strategy='loop' to skip the attempt.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            if grads is not None:
                yield torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1).detach()
                continue
            rows = []
            for i in range(batch_size(sub)):
                ps = tuple(p.detach().requires_grad_(True) for p in pvals)
                gs = grad_of(ps, slice_batch(sub, i, i + 1))
                rows.append(
                    torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, ps)])
                )
            yield torch.stack(rows)
