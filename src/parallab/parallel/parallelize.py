"""The one place that composes parallelisms, in a fixed order, for every strategy.

    pipeline split -> (tensor parallel) -> (activation checkpointing) -> (FSDP)
    -> materialize and initialize -> DDP

Each step is an ``apply_*`` function taking a mesh and plain values; only this module reads the
run's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from parallab.models.registry import ModelFamily, param_generator
from parallab.parallel.ddp import apply_ddp
from parallab.parallel.dims import ParallelDims
from parallab.parallel.pp import apply_pipeline, build_schedule, partition


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
                ddp_bucket_cap_mb: float = 25.0) -> Parallelized:
    """Turn the single-device model on the meta device into this rank's part of the run."""
    mesh = dims.build_mesh(device.type)
    out = Parallelized(model_parts=[model], module=model, schedule=None, dims=dims, mesh=mesh)

    # 1. Pipeline split first: every later technique applies within a stage.
    stage_index = n_stages = 0
    if dims.pp > 1:
        plan = stage_plan(family, cfg, dims.pp)
        model, stage_index, n_stages = apply_pipeline(model, mesh["pp"], stage_units=plan,
                                                      make_stage=family.make_stage)
        out.is_first_stage = stage_index == 0
        out.is_last_stage = stage_index == n_stages - 1
        out.stage_layers = plan[stage_index]

    # 2. Materialize on this rank's device and initialize from the shared seed: each parameter
    # draws the same values under every strategy (keyed by its stable name), so runs can be
    # compared number for number with the single-device run.
    model.to_empty(device=device)
    model.init_weights(param_generator(seed))
    if dtype != torch.float32:
        model.to(dtype)
    out.model_parts = [model]
    out.module = model

    # 3. Pipeline schedule over the materialized stage.
    if dims.pp > 1:
        out.schedule = build_schedule(model, mesh["pp"], stage_index=stage_index, n_stages=n_stages,
                                      device=device, schedule=schedule, microbatches=microbatches,
                                      loss_fn=family.loss)
        out.module = None

    # 4. Data parallelism last: DDP wraps the finished module and averages its gradients.
    if dims.dp_replicate > 1:
        dp_mesh = mesh["dp_replicate"]
        out.dp_rank, out.dp_size = dp_mesh.get_local_rank(), dp_mesh.size()
        if out.schedule is None:
            out.module = apply_ddp(model, dp_mesh, device=device, bucket_cap_mb=ddp_bucket_cap_mb)
    return out
