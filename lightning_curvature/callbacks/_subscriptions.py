"""Which configured schedulers a monitor feeds, by optimizer (see :mod:`lightning_curvature.schedules.protocols`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["attach", "pending_feed", "subscribers"]

S = TypeVar("S")


def subscribers(trainer: pl.Trainer, protocol: type[S]) -> dict[int, list[S]]:
    """The schedulers of ``trainer.lr_scheduler_configs`` implementing ``protocol``, keyed by the index of their
    optimizer in ``trainer.optimizers`` (in configuration order).

    Raises:
        MisconfigurationException: for a subscriber built on an optimizer the Trainer does not train.
    """
    out: dict[int, list[S]] = {}
    for config in trainer.lr_scheduler_configs:
        sched = config.scheduler
        if not isinstance(sched, protocol):  # type: ignore[misc]  # runtime_checkable protocols
            continue
        opt = getattr(sched, "optimizer", None)
        index = next((i for i, o in enumerate(trainer.optimizers) if o is opt), None)
        if index is None:
            raise MisconfigurationException(
                f"{type(sched).__name__} is built on an optimizer that is not among the Trainer's optimizers; build "
                "it on the optimizer returned by `configure_optimizers`."
            )
        out.setdefault(index, []).append(sched)
    return out


def attach(
    trainer: pl.Trainer, protocol: type[Any], monitor: pl.Callback, *, lr_set_in_step: bool = True
) -> dict[int, list[Any]]:
    """:func:`subscribers`, each told by ``attach_monitor(monitor)`` that ``monitor`` feeds it.

    With ``lr_set_in_step`` (subscribers whose lrs change only in ``step()``), warns once per scheduler configured
    with ``interval="epoch"``: a measurement would reach the updates only at the next epoch.
    """
    found = subscribers(trainer, protocol)
    by_id = {id(c.scheduler): c for c in trainer.lr_scheduler_configs}
    for scheds in found.values():
        for sched in scheds:
            sched.attach_monitor(monitor)
            config = by_id[id(sched)]
            if lr_set_in_step and config.interval != "step":
                rank_zero_warn(
                    f"{type(sched).__name__} is stepped every {config.interval}: the measurements of "
                    f"{type(monitor).__name__} reach its learning rates only then. Configure it with "
                    '`"interval": "step"` in `configure_optimizers`.'
                )
    return found


def pending_feed(trainer: pl.Trainer, protocol: type[Any]) -> Callable[[], None]:
    """Tell the schedulers implementing ``protocol`` on ``trainer``'s optimizers, from now until the returned function
    is called, that a monitor of this run will feed them (``schedules._fed.register_pending_feeder``): stepped
    before it attaches (the batch-size finder's trial steps, which run without callbacks), they follow their base
    schedule instead of raising for a missing monitor."""
    from lightning_curvature.schedules._fed import register_pending_feeder

    ref = weakref.ref(trainer)

    def check(sched: Any) -> bool:
        t = ref()
        if t is None or not isinstance(sched, protocol):
            return False
        return any(o is getattr(sched, "optimizer", None) for o in t.optimizers)

    return register_pending_feeder(check)
