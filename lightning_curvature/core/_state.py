"""Leave the caller's model exactly as it was: RNG streams, buffers, train/eval flags, plain tensor attributes.

Every measurement runs inside :func:`preserved_model_state`. Gradients are taken with ``torch.autograd.grad`` /
``torch.func`` on detached parameter copies, so ``.grad`` is never written; where reentrant activation checkpointing
refuses ``grad``, by ``loss.backward()`` with every parameter's ``.grad`` set aside and put back untouched
(:func:`~lightning_curvature.core.hvp._grad_by_backward`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from torch import nn

__all__ = ["MeasurementMode", "eager_execution", "math_attention", "preserved_model_state", "unwrap_compiled"]

MeasurementMode = Literal["train", "eval"]

_MODES = ("train", "eval")


def check_mode(mode: str) -> MeasurementMode:
    """Validate a measurement mode string.

    Raises:
        ValueError: if ``mode`` is not ``"train"`` or ``"eval"``.
    """
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
    return mode  # type: ignore[return-value]


def _devices_of(module: nn.Module) -> list[torch.device]:
    devices = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    return [d for d in devices if d.type != "cpu"]


@contextmanager
def preserved_model_state(
    module: nn.Module, mode: MeasurementMode = "train", seed: int | None = 0, eager: bool = True
) -> Iterator[nn.Module]:
    """Run a block that evaluates ``module`` without leaving any trace on it.

    On exit, every submodule gets back its own ``training`` flag, every buffer its value (BatchNorm running
    statistics, ``num_batches_tracked``), every plain tensor attribute its tensor (the ``weight`` a pruning hook
    recomputes in the forward), and the global CPU and accelerator RNG streams their state. Inside, autocast is off
    (a caller's ``torch.autocast`` region would round every product to half precision), and the
    module runs eagerly even if it was compiled (:func:`eager_execution`), unless ``eager=False``.

    Args:
        module: the model to protect.
        mode: ``"train"`` keeps the submodules' current flags (BatchNorm in train mode uses batch statistics,
            dropout is active), ``"eval"`` switches every submodule to eval mode for the block.
        seed: if not ``None``, the (forked) global RNG is seeded with it on entry, so the dropout masks of a
            measurement are a deterministic function of ``seed``.
        eager: run compiled code eagerly inside the block.

    Yields:
        ``module`` itself.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> before = net[1].running_mean.clone()
        >>> with preserved_model_state(net, mode="train"):
        ...     _ = net(torch.randn(4, 2))
        >>> torch.equal(net[1].running_mean, before) and net.training
        True
    """
    check_mode(mode)
    flags = {m: m.training for m in module.modules()}
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    attributes = {m: _tensor_attributes(m) for m in module.modules()}
    devices = _devices_of(module)
    with ExitStack() as stack:
        for device_type in sorted({"cpu", *(d.type for d in devices)}):
            # curvature in the parameters' (compute) dtype: a caller's autocast region would round every product
            # to bf16/fp16, below what the error bounds account for
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        stack.enter_context(torch.random.fork_rng(devices=devices, device_type=_device_type(devices)))
        if seed is not None:
            seed_generators(seed, devices)
        if eager:
            stack.enter_context(eager_execution(module))
        if mode == "eval":
            module.eval()
        try:
            yield module
        finally:
            for m, was_training in flags.items():
                m.training = was_training
            for m, saved_attributes in attributes.items():
                _restore_tensor_attributes(m, saved_attributes)
            with torch.no_grad():
                for name, b in module.named_buffers():
                    saved = buffers.get(name)
                    if saved is not None and saved.shape == b.shape:
                        b.copy_(saved)


def _tensor_attributes(m: nn.Module) -> dict[str, torch.Tensor]:
    """``m``'s plain tensor attributes (neither parameters nor buffers), e.g. the ``weight`` that a pruning
    (``torch.nn.utils.prune``) forward pre-hook recomputes from ``weight_orig`` at every forward."""
    return {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}


def _restore_tensor_attributes(m: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the very tensors :func:`_tensor_attributes` saw (the block's would hold its parameter copies and
    their graph, and a finite-difference shift); drop tensor attributes the block added."""
    for k, v in list(vars(m).items()):
        if isinstance(v, torch.Tensor) and saved.get(k) is not v:
            if k in saved:
                m.__dict__[k] = saved[k]
            else:
                del m.__dict__[k]


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, or ``model`` itself.

    Its parameters are the same tensors, so results and ``params`` subsets carry over unchanged.
    """
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
    return model


@contextmanager
def eager_execution(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` and its submodules eagerly for the block, whichever way they were compiled.

    Code compiled by ``torch.compile`` (AOTAutograd) cannot be differentiated twice ("torch.compile with
    aot_autograd does not currently support double backward"), so a double-backward product through it fails. For
    the block, submodules compiled in place (``nn.Module.compile()``) use their eager call; the compiled ones are
    restored on exit. The values are those of the same code without compilation. (A ``torch.compile`` wrapper,
    ``OptimizedModule``, is unwrapped by the callers instead; Lightning's own compilation is undone by the callbacks,
    :mod:`lightning_curvature.callbacks._compiled`.)
    """
    saved: list[tuple[nn.Module, str, object]] = []
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            saved.append((m, "_compiled_call_impl", m._compiled_call_impl))
            m._compiled_call_impl = None
    try:
        yield module
    finally:
        for m, name, value in reversed(saved):
            setattr(m, name, value)


def seed_generators(seed: int, devices: list[torch.device]) -> None:
    """Seed the default CPU generator and those of ``devices`` only (``torch.manual_seed`` seeds every device)."""
    torch.default_generator.manual_seed(seed)
    for d in devices:
        if d.type == "cuda":
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        else:  # other accelerators: their module-level seeding
            torch.get_device_module(d.type).manual_seed(seed)


def model_devices(module: nn.Module) -> list[torch.device]:
    """The non-CPU devices holding ``module``'s parameters or buffers."""
    return _devices_of(module)


def _device_type(devices: list[torch.device]) -> str:
    return devices[0].type if devices else "cuda"


@contextmanager
def math_attention() -> Iterator[None]:
    """Select the math scaled-dot-product-attention kernel for the block.

    Double backward and forward-mode AD are not implemented for the fused CPU flash-attention kernel; the math
    kernel supports both, so every measurement runs under it.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
