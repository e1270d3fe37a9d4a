"""What both curvature-fed schedulers share: the monitor handshake, one warning for bad values, setting lrs."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler

#: Checks registered by monitors of a run being set up (Lightning: from their ``setup`` to their ``teardown``): each
#: says whether that run will feed the given scheduler. A scheduler stepped before any monitor attached to it is
#: then not an error: Lightning's batch-size finder runs trial steps with every callback removed.
_PENDING_FEEDERS: list[Callable[[FedScheduler], bool]] = []


def register_pending_feeder(check: Callable[[FedScheduler], bool]) -> Callable[[], None]:
    """Register ``check`` (see :data:`_PENDING_FEEDERS`); returns the function that removes it."""
    _PENDING_FEEDERS.append(check)

    def remove() -> None:
        if check in _PENDING_FEEDERS:
            _PENDING_FEEDERS.remove(check)

    return remove


class FedScheduler(LRScheduler):
    """An ``LRScheduler`` whose learning rates come from measurements fed by a callback or a plain loop.

    Subclasses set ``warn_missing``, ``num_observations`` and call :meth:`_init_feed` before
    ``super().__init__``.
    """

    warn_missing: bool
    num_observations: int
    _monitor_attached: bool
    _warned_bad: bool

    def _init_feed(self) -> None:
        self._warned_bad = False
        self._monitor_attached = False

    def attach_monitor(self, monitor: object) -> None:
        """Record that a monitor will feed this scheduler (called by the monitor at fit start)."""
        del monitor
        self._monitor_attached = True

    @property
    def monitor_attached(self) -> bool:
        """Whether a monitor called :meth:`attach_monitor`."""
        return self._monitor_attached

    def _warn_bad_once(self, message: str) -> None:
        """Warn about an ignored measurement the first time only."""
        if not self._warned_bad:
            self._warned_bad = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _raise_if_never_fed(self, message: str) -> None:
        """Raise ``RuntimeError(message)`` if stepped with no monitor attached and no measurement ever observed."""
        if self.warn_missing and not self._monitor_attached and self.num_observations == 0:
            if any(check(self) for check in list(_PENDING_FEEDERS)):
                return  # a monitor of this run will attach (a tuner's trial steps run without callbacks)
            raise RuntimeError(message)

    def _adopt_new_groups(self) -> None:
        """Parameter groups added to the optimizer after construction (``optimizer.add_param_group``, e.g. by
        Lightning's ``BackboneFinetuning``) join with the lr they were added with as their initial lr."""
        groups = self.optimizer.param_groups
        for i in range(len(self.base_lrs), len(groups)):
            g = groups[i]
            lr = g["lr"]
            g.setdefault("initial_lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)
            self.base_lrs.append(g["initial_lr"])
            self._adopt_group(i, g)
            self._last_lr = [*self._last_lr, float(lr)][: len(groups)]

    def _adopt_group(self, index: int, group: dict) -> None:
        """Extend the subclass's per-group state for the added group ``index``."""

    def _apply(self, lrs: list[float]) -> None:
        """Write ``lrs`` into the parameter groups (tensor lrs are filled in place)."""
        for g, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        self._last_lr = list(lrs)
