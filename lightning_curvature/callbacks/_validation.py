"""Argument checks of the callbacks: each returns the value or raises naming the argument and the bad value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_curvature.core._basis import as_basis_device
from lightning_curvature.core._batch import BatchDim, check_batch_dim
from lightning_curvature.core._validation import is_integer

__all__ = [
    "SUPPORTED_STRATEGIES",
    "check_batch_dim_arg",
    "check_bool",
    "check_choice",
    "check_device",
    "check_floating_dtype",
    "check_optional_int",
    "check_overhead",
    "check_positive_float",
    "check_positive_int",
    "check_strategy",
    "is_sharded_strategy",
]

#: What the monitors support, quoted in the error raised for other strategies.
SUPPORTED_STRATEGIES = (
    "single device ('auto', SingleDeviceStrategy), DDP ('ddp', 'ddp_spawn', 'ddp_fork'), and for the Hessian "
    "monitor also FSDP (ModelParallelStrategy with fully_shard, FSDPStrategy)"
)
_UNSUPPORTED = ("DeepSpeedStrategy",)
_SHARDED = ("FSDPStrategy", "ModelParallelStrategy")


# --- argument checks ------------------------------------------------------------------------------------------
def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (NumPy integers accepted; bools, floats and strings are not).

    Raises:
        MisconfigurationException: naming ``name`` and the bad value.

    Example::

        >>> check_positive_int("k", 5)
        5
        >>> check_positive_int("k", 5.0)
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: `k` must be an integer >= 1, got 5.0.
    """
    if not is_integer(value) or value < minimum:
        raise MisconfigurationException(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_optional_int(name: str, value: Any) -> int | None:
    """``value`` as an int (any sign, e.g. a seed) or ``None``.

    Raises:
        MisconfigurationException: naming ``name`` and the bad value.
    """
    if value is None:
        return None
    if not is_integer(value):
        raise MisconfigurationException(f"`{name}` must be an integer or None, got {value!r}.")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``"no"``, ``0`` or ``1.0`` are refused: ``bool("no")`` would be ``True``).

    Raises:
        MisconfigurationException: naming ``name`` and the bad value.

    Example::

        >>> check_bool("log", False)
        False
        >>> check_bool("log", "no")
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: `log` must be True or False, got 'no'.
    """
    if not isinstance(value, bool):
        raise MisconfigurationException(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_batch_dim_arg(value: Any) -> BatchDim:
    """``value`` as a ``batch_dim`` (an int, ``None``, or a tuple/list/dict of these nested like the batch).

    Raises:
        MisconfigurationException: naming the bad value.
    """
    try:
        return check_batch_dim(value)
    except TypeError as err:
        raise MisconfigurationException(str(err)) from None


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a finite float ``> 0``.

    Raises:
        MisconfigurationException: naming ``name`` and the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise MisconfigurationException(f"`{name}` must be a positive finite number, got {value!r}.")
    return float(value)


def check_floating_dtype(name: str, value: Any) -> Any:
    """``value`` if it is ``None`` or a floating-point ``torch.dtype``.

    Raises:
        MisconfigurationException: naming ``name`` and the bad value.
    """
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise MisconfigurationException(f"`{name}` must be a floating-point torch.dtype or None, got {value!r}.")
    return value


def check_device(name: str, value: Any) -> torch.device | None:
    """``value`` as a ``torch.device`` (``None`` stays ``None``; strings such as ``"cpu"`` are parsed).

    Raises:
        MisconfigurationException: naming ``name`` and the bad value.
    """
    try:
        return as_basis_device(value)
    except ValueError:
        raise MisconfigurationException(
            f"`{name}` must be a torch.device, a device string such as 'cpu', or None, got {value!r}."
        ) from None


def check_overhead(value: Any) -> float:
    """``value`` as a float in ``(0, 1]`` (the ``max_overhead`` budget).

    Raises:
        MisconfigurationException: naming ``max_overhead`` and the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise MisconfigurationException(
            f"`max_overhead` must be a fraction of the training time in (0, 1], got {value!r}."
        )
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        MisconfigurationException: naming ``name``, the choices and the bad value.
    """
    if value not in choices:
        raise MisconfigurationException(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
    return str(value)


def _strategy_names(strategy: Any) -> set[str]:
    return {cls.__name__ for cls in type(strategy).__mro__}


def is_sharded_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` shards the parameters (FSDP: ``FSDPStrategy``, ``ModelParallelStrategy``)."""
    return bool(_strategy_names(strategy).intersection(_SHARDED))


def check_strategy(strategy: Any, owner: str, sharded_ok: bool = False) -> None:
    """Reject strategies the monitor cannot measure under.

    Sharded strategies (FSDP) are supported where ``sharded_ok`` (Hessian products by finite differences through
    the shards); DeepSpeed is not (its ZeRO stages partition parameters outside ``torch.distributed.tensor``).

    Raises:
        MisconfigurationException: for DeepSpeed, or a sharded strategy where ``sharded_ok`` is false, naming what
            is supported.
    """
    if _strategy_names(strategy).intersection(_UNSUPPORTED) or (is_sharded_strategy(strategy) and not sharded_ok):
        raise MisconfigurationException(
            f"{owner} does not support the strategy {type(strategy).__name__}; supported are {SUPPORTED_STRATEGIES}."
        )
