"""Which loss the curvature callbacks differentiate: ``loss_fn(model, batch) -> Tensor``.

Resolution order (:func:`resolve_loss_fn`):

1. an explicit ``loss_fn(pl_module, batch)`` given to the callback or scheduler;
2. a method ``curvature_loss(self, batch) -> Tensor`` on the LightningModule (the recommended hook: a pure
   function of the batch, no logging, no metric updates);
3. ``training_step(batch, 0)`` re-run with ``self.log``/``self.log_dict`` turned into no-ops and the states of
   torchmetrics metrics restored afterwards, taking ``out["loss"]`` when a dict is returned.

Re-running ``training_step`` naively is wrong: each ``self.log`` call creates a second result that overwrites the
real value in the loggers, the CSV and ``callback_metrics``, and metric objects accumulate the extra batches.

**Side effects of a re-run.** What the monitors undo: logging (suppressed), torchmetrics states, every RNG stream
the step may draw from (torch's CPU and accelerator generators are forked by the engine; Python's ``random`` and
NumPy's global stream are restored after every measurement by :func:`forked_host_rng`, and seeded before every
re-run of the step by :class:`HostRNGForkedLoss`, which gives every evaluation of one measurement the same draws, so
a mixup or jitter drawn in the step is one fixed function of the parameters), the module's buffers and train/eval
flags. What cannot be undone: anything else the step changes, such as an EMA of
the weights or a counter updated inside ``training_step``, attributes of objects outside the module, files or
prints. A warning says so once per module when the fallback is used; define ``curvature_loss`` (or pass
``loss_fn=``) to measure without them.

The returned callable always calls the module it is *given* (never a captured one): the engine passes the
LightningModule itself and swaps its parameters in with :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

__all__ = [
    "CURVATURE_LOSS_METHOD",
    "HostRNGForkedLoss",
    "LossFn",
    "forked_host_rng",
    "is_training_step_fallback",
    "resolve_loss_fn",
    "suppressed_logging",
]

LossFn = Callable[[nn.Module, Any], Tensor]

#: Name of the optional LightningModule method ``curvature_loss(self, batch) -> Tensor`` (scalar mean loss).
CURVATURE_LOSS_METHOD = "curvature_loss"

_LOG_METHODS = ("log", "log_dict")
_MISSING = object()


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


_SEEDED_STATES: dict[int, tuple[Any, Any]] = {}


def _seeded_host_states(seed: int) -> tuple[Any, Any]:
    """The states of Python's ``random`` and NumPy's global stream right after seeding them with ``seed``."""
    states = _SEEDED_STATES.get(seed)
    if states is None:
        states = _SEEDED_STATES[seed] = (random.Random(seed).getstate(), np.random.RandomState(seed).get_state())
    return states


@contextmanager
def forked_host_rng(seed: int | None = None) -> Iterator[None]:
    """Restore Python's ``random`` and NumPy's global stream on exit; with ``seed``, start the block seeded.

    (Torch's generators are forked by the engine: :func:`~lightning_curvature.core.preserved_model_state`.)

    Example::

        >>> before = random.random(), np.random.rand()  # doctest: +SKIP
        >>> state = random.getstate()
        >>> with forked_host_rng(seed=0):
        ...     _ = random.random(), np.random.rand()
        >>> random.getstate() == state
        True
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global stream is what training code draws from)
    try:
        if seed is not None:
            py_seeded, np_seeded = _seeded_host_states(seed)
            random.setstate(py_seeded)
            np.random.set_state(np_seeded)  # noqa: NPY002
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


class HostRNGForkedLoss:
    """``loss_fn`` evaluated with Python's ``random`` and NumPy's global stream seeded, and restored afterwards.

    Every evaluation starts from the same seeded states, so draws made inside the loss (mixup, jitter) are the same
    in every Hessian-vector product of a measurement, and none of them reaches the training run.

    Args:
        loss_fn: ``loss_fn(model, batch) -> Tensor``.
        seed: seed of both streams at the start of every evaluation.
    """

    def __init__(self, loss_fn: LossFn, seed: int = 0) -> None:
        self.loss_fn = loss_fn
        self.seed = seed

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        with forked_host_rng(self.seed):
            return self.loss_fn(model, batch)

    def __repr__(self) -> str:
        return f"HostRNGForkedLoss({self.loss_fn!r}, seed={self.seed})"


_WARNED_FALLBACK: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _warn_training_step_fallback(pl_module: nn.Module) -> None:
    """Say once per module that ``training_step`` is re-run, what is undone and what is not."""
    if pl_module in _WARNED_FALLBACK:
        return
    _WARNED_FALLBACK.add(pl_module)
    rank_zero_warn(
        f"The curvature monitors re-run `{type(pl_module).__name__}.training_step` to get the loss: its logging is "
        "suppressed, and metric states, buffers and every RNG stream (torch, NumPy, Python's `random`) are restored, "
        "but other side effects of the step are replayed at every loss evaluation (e.g. an EMA or a counter updated "
        f"inside it). Define `{CURVATURE_LOSS_METHOD}(self, batch)` on the module (a pure function returning the "
        "mean loss) or pass `loss_fn=` to the monitors."
    )


@contextmanager
def suppressed_logging(module: nn.Module) -> Iterator[None]:
    """Turn ``module.log`` and ``module.log_dict`` into no-ops for the block (instance attributes, restored)."""
    saved = {name: module.__dict__.get(name, _MISSING) for name in _LOG_METHODS}
    try:
        for name in _LOG_METHODS:
            object.__setattr__(module, name, _noop)
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, value)


@contextmanager
def preserved_metric_states(module: nn.Module) -> Iterator[None]:
    """Restore the accumulated state of every torchmetrics ``Metric`` inside ``module`` on exit."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        yield
        return
    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    saved = [
        (
            m,
            m._copy_state_dict(),
            {a: m.__dict__.get(a) for a in ("_update_count", "_computed", "_forward_cache")},
        )
        for m in metrics
    ]
    try:
        yield
    finally:
        for m, states, extra in saved:
            for attr, value in states.items():
                setattr(m, attr, value)
            for attr, extra_value in extra.items():
                m.__dict__[attr] = extra_value


def _extract_loss(out: Any) -> Tensor:
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise MisconfigurationException(
            "Re-running `training_step` for a curvature measurement returned "
            f"{type(out).__name__}; expected a loss tensor or a dict with a 'loss' tensor. "
            f"Define `{CURVATURE_LOSS_METHOD}(self, batch)` on the LightningModule or pass `loss_fn=`."
        )
    return out


def _curvature_loss(model: nn.Module, batch: Any) -> Tensor:
    return getattr(model, CURVATURE_LOSS_METHOD)(batch)


def _training_step_loss(model: nn.Module, batch: Any) -> Tensor:
    step: Callable[..., Any] = model.training_step  # type: ignore[assignment]
    with suppressed_logging(model), preserved_metric_states(model):
        if is_param_in_hook_signature(step, "batch_idx", min_args=2):
            out = step(batch, 0)
        else:
            out = step(batch)
    return _extract_loss(out)


def is_training_step_fallback(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` is the ``training_step`` re-run returned by :func:`resolve_loss_fn`."""
    return loss_fn is _training_step_loss


def resolve_loss_fn(pl_module: nn.Module, loss_fn: LossFn | None = None) -> LossFn:
    """The ``loss_fn(model, batch) -> scalar Tensor`` a curvature measurement differentiates.

    Args:
        pl_module: the LightningModule (used to pick the fallback; the returned callable calls the module it
            receives, which the engine passes with its parameters swapped in).
        loss_fn: an explicit ``loss_fn(pl_module, batch)``; returned unchanged.

    Returns:
        ``loss_fn`` if given; else a callable using ``pl_module.curvature_loss(batch)`` if that method exists;
        else one re-running ``training_step(batch, 0)`` with logging suppressed and metric states restored (with
        a warning, once per module, about the side effects a re-run cannot undo).

    Raises:
        MisconfigurationException: if ``loss_fn`` is not callable, or the module uses manual optimization
            (its ``training_step`` steps optimizers) and defines no ``curvature_loss``.

    Example::

        >>> import torch
        >>> from lightning.pytorch import LightningModule
        >>> class Net(LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(2, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         self.log("train_loss", 1.0)  # suppressed during the re-run
        ...         return {"loss": self.lin(batch).pow(2).mean()}
        >>> net = Net()
        >>> loss = resolve_loss_fn(net)(net, torch.ones(4, 2))
        >>> loss.shape
        torch.Size([])
    """
    if loss_fn is not None:
        if not callable(loss_fn):
            raise MisconfigurationException(
                f"`loss_fn` must be callable as loss_fn(pl_module, batch), got {loss_fn!r}."
            )
        return loss_fn
    if callable(getattr(pl_module, CURVATURE_LOSS_METHOD, None)):
        return _curvature_loss
    if not getattr(pl_module, "automatic_optimization", True):
        raise MisconfigurationException(
            f"{type(pl_module).__name__} uses manual optimization, so its `training_step` cannot be re-run for a "
            f"curvature measurement. Define `{CURVATURE_LOSS_METHOD}(self, batch)` or pass `loss_fn=`."
        )
    if not callable(getattr(pl_module, "training_step", None)):
        raise MisconfigurationException(
            f"{type(pl_module).__name__} has no `training_step`; define `{CURVATURE_LOSS_METHOD}(self, batch)` "
            "or pass `loss_fn=`."
        )
    _warn_training_step_fallback(pl_module)
    return _training_step_loss
