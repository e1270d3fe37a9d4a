"""Argument checks shared by the plain-PyTorch functions."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["is_integer"]


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer: a Python or NumPy integer (``numbers.Integral``), never a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
