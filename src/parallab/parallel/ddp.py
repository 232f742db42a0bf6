"""Data parallelism: every device holds the whole model; gradients are averaged."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP


def apply_ddp(model: nn.Module, mesh: DeviceMesh, *, device: torch.device,
              bucket_cap_mb: float = 25.0) -> DDP:
    """Wrap ``model`` (already materialized: DDP broadcasts rank 0's weights at construction).

    Gradients are all-reduced in buckets while backward still runs, overlapping communication
    with computation; gradient_as_bucket_view makes the gradients views into those buckets
    instead of a second copy of them.
    """
    return DDP(model, process_group=mesh.get_group(),
               device_ids=[device.index] if device.type == "cuda" else None,
               bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True,
               broadcast_buffers=False)


def allreduce_gradients(params, mesh: DeviceMesh) -> None:
    """Average the gradients of ``params`` over ``mesh`` in one flat all-reduce.

    For data parallelism around pipeline stages: a pipeline schedule runs each stage's backward
    micro-batch by micro-batch inside ``schedule.step``, which DDP's hooks do not fit, so the
    replicas' stage gradients are averaged once after the step. Sum then divide, because
    gloo has no AVG reduction.
    """
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group())
    flat.div_(mesh.size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
