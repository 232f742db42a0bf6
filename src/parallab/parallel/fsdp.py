"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``): data
parallelism where each of the N devices keeps only 1/N of every parameter, gradient and
optimizer state (dim-0 shards, as DTensors).

Communication per transformer block (each block is its own FSDP unit, so these overlap with
the neighbouring block's compute):

* forward: all-gather the block's parameters just before it runs; with
  ``reshard_after_forward=True`` (ZeRO-3-like) the gathered copy is freed right after;
* backward: all-gather again (only when resharded after forward; ZeRO-2-like keeps the forward's
  copy until backward, more memory, one all-gather fewer), then reduce-scatter the gradients so
  each device receives the average of its own shard.

The root unit holds what is left outside the blocks (embeddings, final norm, output layer).
Averaging is FSDP's default; a custom divide factor would reduce with PREMUL_SUM, which gloo
rejects, so none is set.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def mixed_precision(*, param_dtype: torch.dtype | None,
                    reduce_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """bf16 parameters for compute with fp32 gradient reduction is the usual GPU choice: the
    sharded master copy and the optimizer stay in fp32."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` (on meta, after tensor parallelism if any) over the 1-D ``mesh``.

    Each entry of ``model.layers`` becomes one FSDP unit (wrapped by activation checkpointing
    or not), the model itself the root unit. Parameters already sharded by tensor parallelism
    (DTensors on the sibling ``tp`` mesh) become 2-D sharded: dim 0 over ``mesh`` as well.
    """
    mp = mixed_precision(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values()) if hasattr(model, "layers") else []
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward: keeping them
        # gathered saves one all-gather for free (the root's are kept the same way).
        reshard = reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    return model
