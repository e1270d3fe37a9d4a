r"""Gradients of a model whose parameters are shards (FSDP2 ``fully_shard``): the first-order oracle of sharded runs.

Under FSDP the forward pass uses unsharded copies all-gathered by FSDP's hooks, so a double backward with respect to
the shards does not exist; first-order gradients do, through ``loss.backward()``, reduce-scattered into the shards'
``.grad``. :class:`ShardedGradients` evaluates

.. math:: \nabla L(\theta + \alpha s) \quad\text{(local shards)}

by adding :math:`\alpha s` to the parameters' local shards in place, running the forward and backward passes of the
module as training does, reading the sharded gradients, and writing the saved shards and ``.grad`` back bit for bit.
Each process's loss is scaled by :math:`n_r W / N` before the backward pass (:math:`n_r` its examples, :math:`W` the
data-parallel size, :math:`N` the global count), so FSDP's average over processes is the mean over the global batch.
Inner products of shard vectors are summed across the shard group (:func:`shard_space`), so every process computes
the same scalars and the vectors never leave their shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvature.core.vectors import Vector, VectorSpace

__all__ = ["ShardedGradients", "is_sharded", "local_tensor", "reshard", "shard_space"]


def reshard(module: nn.Module) -> None:
    """Return every FSDP2 module in ``module`` to its sharded state.

    A forward pass without a backward (under ``no_grad``) leaves FSDP2 modules unsharded, with plain full-size
    parameters registered in place of the sharded ones; the curvature of the shards is taken with them resharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is a distributed tensor (FSDP2 / DTensor)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (its storage: writing to it writes the parameter), the tensor otherwise."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local()  # type: ignore[attr-defined]
    return t


def shard_space(params: Sequence[Tensor], dtype: torch.dtype) -> VectorSpace:
    """The vector space of the parameters' local shards: inner products summed over the shard group.

    Raises:
        ValueError: for a parameter replicated or sharded over more than one mesh dimension (HSDP, tensor
            parallelism): only one-dimensional FSDP meshes are supported.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    dtensor = _dtensor_type()
    groups = []
    p: Any
    for p in params:
        if dtensor is not None and isinstance(p, dtensor):
            mesh = p.device_mesh
            if mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
                raise ValueError(
                    f"Curvature of sharded parameters supports one-dimensional FSDP meshes (Shard placements); "
                    f"got a {mesh.ndim}-D mesh with placements {p.placements}."
                )
            groups.append(mesh.get_group())
    group = groups[0]

    def reduce_fn(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def localize(i: int, full: Tensor) -> Tensor:
        p: Any = params[i]
        if dtensor is not None and isinstance(p, dtensor):
            return distribute_tensor(full.to(device=p.device), p.device_mesh, p.placements).to_local()
        return full

    locals_ = [local_tensor(p) for p in params]
    return VectorSpace(
        locals_,
        dtype=dtype,
        reduce_fn=reduce_fn,
        localize=localize,
        global_dim=sum(p.numel() for p in params),
        global_shapes=[p.shape for p in params],
    )


class ShardedGradients:
    """Mean gradients of ``loss_fn(module, batch)`` at shifted sharded parameters, restored exactly afterwards.

    Args:
        module: the (FSDP-wrapped) module, called as training calls it.
        loss_fn: ``loss_fn(module, batch) -> scalar`` mean loss of the local batch.
        params: the sharded parameters (their local shards are the vector entries).
        global_count: ``N``, the examples of all processes together.
        world_size: ``W``, the number of processes FSDP averages gradients over.
        prepare_batch: moves a batch to the compute device/dtype.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        params: Sequence[Tensor],
        global_count: float,
        world_size: int,
        prepare_batch: Callable[[Any], Any],
    ) -> None:
        self.module = module
        self.loss_fn = loss_fn
        self.params = list(params)
        self.global_count = float(global_count)
        self.world_size = int(world_size)
        self.prepare_batch = prepare_batch
        self.num_grad = 0

    def gradient(self, batch: Any, local_count: int, shift: Vector | None = None, alpha: float = 0.0) -> Vector:
        """The global-batch mean gradient at ``θ + α·shift`` (local shards), leaving parameters and ``.grad`` as
        they were."""
        shards = [local_tensor(p) for p in self.params]
        saved_values = [s.detach().clone() for s in shards] if shift is not None else None
        saved_grads = [p.grad for p in self.params]
        try:
            with torch.no_grad():
                if shift is not None:
                    for s, d in zip(shards, shift):
                        s.add_(d.to(s.dtype), alpha=alpha)
            for p in self.params:
                p.grad = None
            loss = self.loss_fn(self.module, self.prepare_batch(batch))
            scale = local_count * self.world_size / self.global_count
            (loss * scale).backward()
            reshard(self.module)
            self.num_grad += 1
            out = []
            for p, s in zip(self.params, shards):
                g = p.grad
                out.append(torch.zeros_like(s) if g is None else local_tensor(g).detach().clone())
            return out
        finally:
            with torch.no_grad():
                if saved_values is not None:
                    for s, v in zip(shards, saved_values):
                        s.copy_(v)
            for p, g in zip(self.params, saved_grads):
                p.grad = g
