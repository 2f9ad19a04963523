"""What the ops and modules need to know about DTensors (torch.distributed.tensor): FSDP2's fully_shard and tensor
parallelism hand them DTensor parameters, and a norm or a head count read from a local shard is only right when no
vector or head is split across ranks.

Importable on a torch built without torch.distributed: ``DTensor`` is then the empty tuple, so ``isinstance(x,
DTensor)`` is False for every x and the single-device paths run unchanged (nothing else here is reached then).
"""

import torch
from torch import Tensor

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard  # FSDP2 over TP shards a dim twice with it
else:
    DTensor = ()
    Partial = Replicate = Shard = _StridedShard = None


def mesh_dims_splitting(t: "DTensor", dim: int) -> tuple[int, ...]:
    """The mesh dims along which ``t`` is sharded on its tensor dim ``dim`` (any Shard placement, FSDP's strided
    ones included): a vector along ``dim`` is whole on one rank only when this is empty."""
    dim %= t.dim()
    return tuple(m for m, p in enumerate(t.placements)
                 if isinstance(p, (Shard, _StridedShard)) and p.dim % t.dim() == dim)


def check_not_partial(op: str, name: str, t: "DTensor") -> None:
    """A Partial DTensor holds summands, not values: a norm of its local tensor means nothing."""
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"{op}: {name} is a DTensor with a Partial placement {t.placements}: its local tensors are "
                         f"summands, not values; redistribute it to Shard or Replicate first")


def local(t: Tensor | None) -> Tensor | None:
    """The local tensor of a DTensor (differentiable; under no_grad the storage itself, so in-place updates reach the
    DTensor), else t as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def from_local(t: Tensor, mesh, placement, shape: tuple[int, ...]) -> "DTensor":
    """A 1-D-mesh DTensor of global ``shape`` (contiguous) from this rank's ``t``: the shape is given, not inferred,
    so that uneven shards (torch.chunk's split of a size the mesh does not divide) get the right global size."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)
