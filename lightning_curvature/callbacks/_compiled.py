"""Modules compiled by Lightning (``trainer.fit(torch.compile(module))``): detect them, and run them eagerly.

Lightning's ``from_compiled`` replaces a LightningModule's ``forward`` and ``*_step`` methods by their compiled
versions and keeps the originals in ``_compiler_ctx``. The engine (:mod:`lightning_curvature.core`) knows nothing of
Lightning: the monitors tell it the module is compiled (``HessianOperator(compiled=True)``, so ``method="auto"``
measures through the compiled code by finite differences), and for exact double-backward products they restore the
eager methods for the measurement only (:func:`lightning_eager`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["lightning_compiled", "lightning_eager"]

#: Methods Lightning's ``from_compiled`` replaces by their compiled versions.
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def lightning_compiled(module: nn.Module) -> bool:
    """Whether Lightning compiled ``module`` (or a submodule)."""
    return any(isinstance(getattr(m, "_compiler_ctx", None), dict) for m in module.modules())


@contextmanager
def lightning_eager(module: nn.Module) -> Iterator[nn.Module]:
    """The eager ``forward``/``*_step`` methods of Lightning-compiled modules for the block; restored on exit."""
    saved: list[tuple[nn.Module, str, object]] = []
    for m in module.modules():
        ctx = getattr(m, "_compiler_ctx", None)
        if isinstance(ctx, dict):
            for name in _COMPILED_METHODS:
                original = ctx.get(f"original_{name}")
                if original is not None and name in m.__dict__:
                    saved.append((m, name, m.__dict__[name]))
                    setattr(m, name, original)
    try:
        yield module
    finally:
        for m, name, value in reversed(saved):
            setattr(m, name, value)
