"""Pipeline model parallelism: the model cut into consecutive stages, one per device, run by a
``torch.distributed.pipelining`` schedule over micro-batches.

With one micro-batch this is the naive layer split: one device works while the others wait.
Micro-batching lets stage s work on micro-batch i while stage s+1 works on i-1; the idle
fraction (the bubble) is (p-1)/(m+p-1) for p stages and m micro-batches.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


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
    n_stages = mesh.size()
    stage_index = mesh.get_local_rank()
    module = make_stage(model, stage_units[stage_index], first=stage_index == 0,
                        last=stage_index == n_stages - 1)
    return module, stage_index, n_stages


def build_schedule(module: nn.Module, mesh: DeviceMesh, *, stage_index: int, n_stages: int,
                   device: torch.device, schedule: str, microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The pipeline schedule driving this rank's (materialized) stage.

    Stage inputs and outputs are inferred on the first step. The schedule divides gradients
    by the micro-batch count (scale_grads), so a step equals the full-batch step.
    """
    stage = PipelineStage(module, stage_index, n_stages, device, group=mesh.get_group())
    cls = SCHEDULE_CLASSES[schedule]
    return cls(stage, n_microbatches=microbatches, loss_fn=loss_fn)
