"""The one place that composes parallelisms, in a fixed order, for every strategy.

    pipeline split -> (tensor parallel) -> (activation checkpointing) -> (FSDP)
    -> materialize and initialize -> DDP

Each step is an ``apply_*`` function taking a mesh and plain values; only this module reads the
run's settings. Which steps run follows from the degrees (``ParallelDims``): pp > 1 splits,
tp > 1 applies tensor parallelism, dp_shard > 1 FSDP, dp_replicate > 1 DDP (or, around
pipeline stages, a gradient all-reduce after each step). Why this order:

* the pipeline split first, so every later technique applies within a stage;
* tensor parallelism before FSDP: FSDP then shards the TP shards again over its own mesh
  dimension (2-D parameters), never the other way round;
* activation checkpointing before FSDP, so FSDP's all-gather hooks sit outside the
  recomputed function and run again for the recomputation;
* FSDP on meta, then materialization: the whole model never exists on one device;
* DDP last: it wraps the finished module and broadcasts materialized weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from parallab.models.registry import ModelFamily, param_generator
from parallab.parallel.ac import apply_ac
from parallab.parallel.ddp import allreduce_gradients, apply_ddp
from parallab.parallel.dims import ParallelDims
from parallab.parallel.pp import MULTI_STAGE, apply_pipeline_stages, build_schedule, partition


@dataclass
class Parallelized:
    """What a rank runs.

    model_parts: the modules whose parameters this rank owns, unwrapped, with the same
      parameter names as the single-device model (what the optimizer, checkpoints and the
      equivalence check use).
    module: what a non-pipeline step calls forward on (a DDP wrapper, or the model itself).
    schedule: the pipeline schedule, when the model is pipelined.
    """
    model_parts: list[nn.Module]
    module: nn.Module | None
    schedule: Any | None
    dims: ParallelDims
    mesh: Any | None
    dp_rank: int = 0
    dp_size: int = 1
    is_first_stage: bool = True
    is_last_stage: bool = True
    stage_layers: list[str] = field(default_factory=list)
    loss_parallel: bool = False
    """Logits come back sharded over the vocabulary (tensor parallelism): the loss and its
    backward run inside ``loss_context()``."""
    autocast_dtype: torch.dtype | None = None
    """bf16 training without FSDP's policy: fp32 weights, forward under torch.autocast."""
    grad_sync_mesh: Any | None = None
    """Set where gradients are averaged by ``sync_gradients`` after backward (data
    parallelism around pipeline stages) instead of by a wrapper during backward."""

    def loss_context(self):
        """Where the loss and its backward run: ``loss_parallel()`` for sharded logits."""
        import contextlib

        if self.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def compute_context(self):
        """Where forward (and the loss) run: autocast to bf16 for mixed-precision training."""
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def sync_gradients(self) -> None:
        """Call after backward, before the optimizer step (a no-op for most strategies)."""
        if self.grad_sync_mesh is not None:
            allreduce_gradients(self.parameters(), self.grad_sync_mesh)

    def parameters(self):
        for part in self.model_parts:
            yield from part.parameters()

    def named_parameters(self):
        for part in self.model_parts:
            yield from part.named_parameters()


def stage_plan(family: ModelFamily, cfg, n_stages: int) -> list[list[str]]:
    """Units per pipeline stage, balanced by estimated FLOPs (not only by layer count)."""
    units = family.pipeline_units(cfg)
    ranges = partition([u.flops_per_token for u in units], n_stages)
    return [[units[i].name for i in r] for r in ranges]


def parallelize(model: nn.Module, family: ModelFamily, cfg, dims: ParallelDims, *,
                device: torch.device, seed: int, dtype: torch.dtype = torch.float32,
                microbatches: int = 1, schedule: str = "1f1b",
                ddp_bucket_cap_mb: float = 25.0, stages_per_device: int = 1,
                fsdp_reshard_after_forward: bool = True, sequence_parallel: bool = False,
                loss_parallel: bool = True, activation_checkpointing: bool = False,
                compile: bool = False, inference: bool = False) -> Parallelized:
    """Turn the single-device model on the meta device into this rank's part of the run.

    ``inference``: forward only, so no pipeline schedule (the inference engine drives its
    stages itself) and no DDP wrapper (no gradients to average; replicas just hold the model).
    """
    mesh = dims.build_mesh(device.type)
    out = Parallelized(model_parts=[model], module=model, schedule=None, dims=dims, mesh=mesh)
    parts = [model]

    # 1. Pipeline split first: every later technique applies within a stage. Multi-stage
    # schedules cut pp * stages_per_device stages and place several on each rank.
    stage_indices: list[int] = []
    n_stages = 0
    if dims.pp > 1:
        per_device = stages_per_device if schedule in MULTI_STAGE else 1
        plan = stage_plan(family, cfg, dims.pp * per_device)
        parts, stage_indices, n_stages = apply_pipeline_stages(
            model, mesh["pp"], stage_units=plan, make_stage=family.make_stage,
            style=MULTI_STAGE.get(schedule, "loop"))
        out.is_first_stage = 0 in stage_indices
        out.is_last_stage = n_stages - 1 in stage_indices
        out.stage_layers = [u for i in stage_indices for u in plan[i]]

    # 2. Tensor parallelism, on meta: weights become DTensors sharded over the tp dimension.
    if dims.tp > 1:
        from parallab.parallel.tp import apply_tp

        for part in parts:
            apply_tp(part, mesh["tp"], plan=family.tp_plan(cfg), sequence_parallel=sequence_parallel,
                     loss_parallel=loss_parallel)
        out.loss_parallel = loss_parallel

    # 3. Activation checkpointing per transformer block.
    if activation_checkpointing:
        for part in parts:
            apply_ac(part)

    # 3b. torch.compile per transformer block (in place: parameter names stay), after
    # checkpointing so the recomputed region is the compiled one, before FSDP so FSDP's
    # communication hooks stay outside the compiled graphs.
    if compile:
        for part in parts:
            for block in getattr(part, "layers", {}).values():
                block.compile()

    # 4. FSDP over the dp_shard dimension, still on meta. On GPUs with bf16 the parameters stay
    # fp32 (the sharded master copy) and FSDP casts its all-gathered copy to bf16 for compute,
    # reducing gradients in fp32; otherwise parameters are stored in the run's dtype.
    # Training in bf16 is mixed precision: fp32 master weights, bf16 compute (torch.autocast in
    # the trainer, or FSDP's mixed-precision policy on GPUs). Inference stores weights in bf16.
    fsdp_mixed = dims.dp_shard > 1 and device.type == "cuda" and dtype == torch.bfloat16
    out.autocast_dtype = dtype if dtype != torch.float32 and not inference and not fsdp_mixed else None
    if dtype != torch.float32 and inference:
        for part in parts:
            part.to(dtype)  # on meta: no memory; initialization below rounds to this dtype
    if dims.dp_shard > 1:
        from parallab.parallel.fsdp import apply_fsdp

        for part in parts:
            apply_fsdp(part, mesh["dp_shard"], reshard_after_forward=fsdp_reshard_after_forward,
                       param_dtype=torch.bfloat16 if fsdp_mixed else None,
                       reduce_dtype=torch.float32 if fsdp_mixed else None)

    # 5. Materialize on this rank's device and initialize from the shared seed: each parameter
    # draws the same values under every strategy (keyed by its stable name), and a sharded
    # parameter keeps only its own slice of them, so runs can be compared number for number
    # with the single-device run.
    init = getattr(family, "init_weights", None)  # a family whose modules lack their own
    for part in parts:
        part.to_empty(device=device)
        init(part, param_generator(seed)) if init else part.init_weights(param_generator(seed))
        if dims.tp > 1 and dims.dp_shard == 1:
            from parallab.parallel.tp import keep_grads_sharded

            keep_grads_sharded(part)
    out.model_parts = parts
    out.module = parts[0]

    # 6. Pipeline schedule over the materialized stage(s).
    if dims.pp > 1 and not inference:
        out.schedule = build_schedule(parts if len(parts) > 1 else parts[0], mesh["pp"],
                                      stage_index=stage_indices if len(parts) > 1 else stage_indices[0],
                                      n_stages=n_stages, device=device, schedule=schedule,
                                      microbatches=microbatches, loss_fn=family.loss)
        out.module = None

    # 7. The data-parallel coordinate: ranks that differ only in their pp or tp coordinate
    # read the same slice of the batch.
    if dims.dp > 1:
        rep = mesh["dp_replicate"].get_local_rank() if dims.dp_replicate > 1 else 0
        shard = mesh["dp_shard"].get_local_rank() if dims.dp_shard > 1 else 0
        out.dp_rank, out.dp_size = rep * dims.dp_shard + shard, dims.dp

    # 8. Replication last: DDP wraps the finished module and averages its gradients during
    # backward; pipeline stages average theirs after the schedule's step instead.
    if dims.dp_replicate > 1 and not inference:
        dp_mesh = mesh["dp_replicate"]
        if out.schedule is None:
            assert len(parts) == 1 and dims.dp_shard == 1 and dims.tp == 1, "DDP wraps plain models"
            out.module = apply_ddp(parts[0], dp_mesh, device=device, bucket_cap_mb=ddp_bucket_cap_mb)
        else:
            out.grad_sync_mesh = dp_mesh
    return out
