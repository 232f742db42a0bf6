"""Pipeline model parallelism: the model cut into consecutive stages, one per device, run by a
``torch.distributed.pipelining`` schedule over micro-batches.

With one micro-batch this is the naive layer split: one device works while the others wait.
Micro-batching lets stage s work on micro-batch i while stage s+1 works on i-1; the idle
fraction (the bubble) is (p-1)/(m+p-1) for p stages and m micro-batches.

Multi-stage schedules give each device several smaller stages ("virtual stages"): interleaved
1F1B places stage s on device s % p (looped), which shrinks the bubble by the stages per
device; the zero-bubble schedules also split each backward into the input-gradient part (on the
critical path) and the weight-gradient part (scheduled into the bubbles); ZBV places two stages
per device in a V (device r holds stages r and 2p-1-r), so the first device also computes the
loss. Activations and gradients move between neighbouring stages by point-to-point send/recv.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                         ScheduleGPipe, ScheduleInterleaved1F1B,
                                         ScheduleInterleavedZeroBubble, ScheduleLoopedBFS,
                                         ScheduleZBVZeroBubble)

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
                    "interleaved1f1b": ScheduleInterleaved1F1B, "loopedbfs": ScheduleLoopedBFS,
                    "interleavedzb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble,
                    "dualpipev": ScheduleDualPipeV}
# Schedules driving a list of stages per device, and how they place stages on devices.
MULTI_STAGE = {"interleaved1f1b": "loop", "loopedbfs": "loop", "interleavedzb": "loop", "zbv": "v",
               "dualpipev": "v"}


def stage_placement(pp: int, stages_per_device: int, *, style: str = "loop") -> list[list[int]]:
    """Stage indices held by each pipeline rank. 'loop': stage s on rank s % pp; 'v': down and
    back up again (rank r holds r, 2pp-1-r, 2pp+r, ...), so consecutive stages at the turn share
    a rank and the first rank holds the last stage."""
    n = pp * stages_per_device
    if style == "loop":
        return [list(range(r, n, pp)) for r in range(pp)]
    if style == "v":
        ranks: list[list[int]] = [[] for _ in range(pp)]
        for s in range(n):
            lap, i = divmod(s, pp)
            ranks[i if lap % 2 == 0 else pp - 1 - i].append(s)
        return ranks
    raise ValueError(f"unknown stage placement style '{style}' (valid: loop, v)")


def partition(costs: Sequence[float], n_stages: int) -> list[range]:
    """Cut ``costs`` into ``n_stages`` consecutive non-empty ranges minimizing the largest
    stage cost (the pipeline's speed is its slowest stage). Exact dynamic programme,
    O(n^2 * stages), trivial for layer counts."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {n_stages} non-empty pipeline stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest possible max-stage-cost of the first i units in k stages.
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(k, n - (n_stages - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                # Ties go to the later cut, putting more layers on earlier stages, which also
                # hold fewer in-flight activations under 1F1B than they could.
                if cost <= best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    ranges, i = [], n
    for k in range(n_stages, 0, -1):
        j = cut[k][i]
        ranges.append(range(j, i))
        i = j
    return ranges[::-1]


def apply_pipeline(model: nn.Module, mesh: DeviceMesh, *, stage_units: list[list[str]],
                   make_stage: Callable[..., nn.Module]) -> tuple[nn.Module, int, int]:
    """This rank's stage of ``model`` (still on meta): (stage module, stage index, stages)."""
    modules, indices, n_stages = apply_pipeline_stages(model, mesh, stage_units=stage_units,
                                                       make_stage=make_stage)
    return modules[0], indices[0], n_stages


def apply_pipeline_stages(model: nn.Module, mesh: DeviceMesh, *, stage_units: list[list[str]],
                          make_stage: Callable[..., nn.Module], style: str = "loop"
                          ) -> tuple[list[nn.Module], list[int], int]:
    """This rank's stages of ``model`` (still on meta), len(stage_units) stages placed over the
    pipeline ranks by ``style``: (stage modules, their stage indices, number of stages)."""
    n_stages = len(stage_units)
    pp = mesh.size()
    if n_stages % pp:
        raise ValueError(f"{n_stages} pipeline stages cannot be spread evenly over {pp} ranks")
    indices = stage_placement(pp, n_stages // pp, style=style)[mesh.get_local_rank()]
    modules = [make_stage(model, stage_units[i], first=i == 0, last=i == n_stages - 1)
               for i in indices]
    return modules, indices, n_stages


def build_schedule(module: nn.Module | list[nn.Module], mesh: DeviceMesh, *,
                   stage_index: int | list[int], n_stages: int, device: torch.device,
                   schedule: str, microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The pipeline schedule driving this rank's (materialized) stage, or stages for the
    multi-stage schedules (a list of modules with their stage indices).

    Stage inputs and outputs are inferred on the first step. The schedule divides gradients
    by the micro-batch count (scale_grads), so a step equals the full-batch step.
    """
    modules = module if isinstance(module, list) else [module]
    indices = stage_index if isinstance(stage_index, list) else [stage_index]
    stages = [PipelineStage(m, i, n_stages, device, group=mesh.get_group())
              for m, i in zip(modules, indices)]
    cls = SCHEDULE_CLASSES[schedule]
    if schedule in MULTI_STAGE:
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn)
    if len(stages) != 1:
        raise ValueError(f"schedule '{schedule}' runs one stage per rank, got {len(stages)}")
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
