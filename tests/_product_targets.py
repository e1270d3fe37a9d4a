"""A spy on the accuracy the Hessian monitor asks of its finite-difference products."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_curvature.callbacks import hessian_monitor
from lightning_curvature.core import hvp


def record_product_targets(monkeypatch: pytest.MonkeyPatch) -> list[set[tuple[str, float]]]:
    """Per ``HessianOperator``, in the order of their first finite-difference product, the set of
    ``(phase, fd_target)`` its products ran with: phase ``"trace"`` inside the monitor's trace, else ``"solve"``."""
    seen: list[set[tuple[str, float]]] = []
    in_trace = [False]
    richardson, hutchpp = hvp.HessianOperator._richardson, hessian_monitor.hutchpp_trace

    def spy(self: Any, *args: Any) -> Any:
        if not hasattr(self, "_spy_index"):
            self._spy_index = len(seen)
            seen.append(set())
        seen[self._spy_index].add(("trace" if in_trace[0] else "solve", self.fd_target))
        return richardson(self, *args)

    def trace(*args: Any, **kwargs: Any) -> Any:
        in_trace[0] = True
        try:
            return hutchpp(*args, **kwargs)
        finally:
            in_trace[0] = False

    monkeypatch.setattr(hvp.HessianOperator, "_richardson", spy)
    monkeypatch.setattr(hessian_monitor, "hutchpp_trace", trace)
    return seen
