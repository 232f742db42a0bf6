"""The inference engine: one model served by one strategy on this rank.

Every rank is given the same global batch and runs its part of it:

* single: all of it;
* replicas: its own rows (``rows``), with the whole model; no communication at all;
* pipeline: its stage, on every row; the forward workload runs through
  ``torch.distributed.pipelining``'s forward-only schedule over micro-batches, generation
  through ``generate.pipeline_generate``; outputs exist on the last stage only;
* tp: all rows on 1/tp of every weight matrix (the family's tensor-parallel plan), the KV cache
  holding this rank's heads only; the logits come back whole on every rank.

The model is built by ``parallel.parallelize`` (meta, split/shard, materialize with the same
seed weights as training) with ``inference=True``: no training schedule, no DDP wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from parallab.infer.generate import greedy_generate, local_logits, pipeline_generate
from parallab.models.registry import build_meta, count_params
from parallab.parallel.dims import ParallelDims, dims_for
from parallab.parallel.parallelize import Parallelized, parallelize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def infer_dims(strategy: str, devices: int) -> ParallelDims:
    """The parallel degrees of an inference strategy: the training layouts, with replicas laid
    out as data parallelism (each device holds the whole model)."""
    return dims_for("ddp" if strategy == "replicas" else strategy, devices)


def _forward_only_schedule():
    """``_ScheduleForwardOnly`` is private; GPipe without a loss function runs the same
    forward-only pass, should a torch version not have it."""
    try:
        from torch.distributed.pipelining.schedules import _ScheduleForwardOnly
        return _ScheduleForwardOnly
    except ImportError:  # pragma: no cover - depends on the torch version
        from torch.distributed.pipelining import ScheduleGPipe
        return ScheduleGPipe


def _has_dtensor(par: Parallelized) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in par.parameters())


@dataclass
class InferEngine:
    strategy: str
    family: object
    cfg: object
    par: Parallelized
    device: torch.device
    microbatches: int
    n_params: int
    _schedule: tuple | None = field(default=None, repr=False)  # (key, schedule): one at a time

    @classmethod
    def build(cls, *, family, cfg, strategy: str, devices: int, device: torch.device, seed: int,
              dtype: str = "float32", microbatches: int = 1) -> "InferEngine":
        meta = build_meta(family, cfg)
        n_params = count_params(meta)
        dims = infer_dims(strategy, devices)
        # Tensor parallelism for inference: whole logits on every rank (no loss-parallel
        # vocabulary shards), and the sequence whole through every block (a decode step has
        # one token, nothing to split).
        par = parallelize(meta, family, cfg, dims, device=device, seed=seed, dtype=DTYPES[dtype],
                          inference=True, loss_parallel=False, sequence_parallel=False)
        if dims.tp > 1 and not _has_dtensor(par):
            raise RuntimeError("parallel.parallelize did not apply tensor parallelism (tp=%d)" % dims.tp)
        for part in par.model_parts:
            part.eval()
        return cls(strategy, family, cfg, par, device, max(1, microbatches), n_params)

    # ------------------------------------------------------------------ layout

    @property
    def module(self) -> nn.Module:
        return self.par.model_parts[0]

    @property
    def tp(self) -> int:
        return self.par.dims.tp

    @property
    def pp_group(self):
        return self.par.mesh["pp"].get_group()

    @property
    def stage_index(self) -> int:
        return self.par.mesh["pp"].get_local_rank() if self.strategy == "pipeline" else 0

    def rows(self, batch: int) -> range:
        """The rows of a global batch this rank serves: a contiguous share under replicas
        (the first ``batch % n`` replicas take one more), every row otherwise."""
        if self.strategy != "replicas":
            return range(batch)
        n, r = self.par.dp_size, self.par.dp_rank
        base, extra = divmod(batch, n)
        start = r * base + min(r, extra)
        return range(start, start + base + (r < extra))

    def holds_output(self, batch: int) -> bool:
        """Whether this rank ends up with outputs (logits, tokens) for some rows."""
        if self.strategy == "pipeline":
            return self.par.is_last_stage
        return len(self.rows(batch)) > 0

    def microbatches_for(self, batch: int) -> int:
        """Micro-batches used for a batch: the configured count where it divides the batch,
        else the largest divisor of both (a batch of 1 runs as the naive split)."""
        return math.gcd(self.microbatches, batch) if self.strategy == "pipeline" else 1

    def _heads(self) -> tuple[int, int]:
        """(KV-cache heads on this rank, head dim): tensor parallelism splits the heads."""
        return self.cfg.n_heads // self.tp, self.cfg.head_dim

    # ------------------------------------------------------------------ workloads

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Global tokens [B, T] -> logits [b, T, V] of this rank's rows (None where it holds no
        outputs: a replica without rows, a pipeline stage before the last)."""
        tokens = tokens.to(self.device)
        if self.strategy == "pipeline":
            return self._pipeline_forward(tokens)
        r = self.rows(tokens.shape[0])
        if len(r) == 0:
            return None
        # tp: the embedding all-reduces, every block all-reduces twice (after wo and w2), the
        # output layer all-gathers the vocabulary shards.
        return local_logits(self.module(tokens[r.start:r.stop]))

    def _pipeline_forward(self, tokens: torch.Tensor) -> torch.Tensor | None:
        from torch.distributed.pipelining import PipelineStage

        m = self.microbatches_for(tokens.shape[0])
        key = (tuple(tokens.shape), m)
        if self._schedule is None or self._schedule[0] != key:
            # A stage sizes its receive buffers from the first micro-batch it sees, so a new
            # batch shape needs a new stage; only one is kept (its buffers are real memory).
            self._schedule = None
            stage = PipelineStage(self.module, self.stage_index, self.par.dims.pp, self.device,
                                  group=self.pp_group)
            self._schedule = (key, _forward_only_schedule()(stage, n_microbatches=m))
        schedule = self._schedule[1]
        # Stage s receives micro-batch i's activations from s-1 while s+1 works on i-1; the last
        # stage concatenates the micro-batch logits.
        out = schedule.step(tokens) if self.par.is_first_stage else schedule.step()
        return out if self.par.is_last_stage else None

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, new_tokens: int, *, cache_len: int | None = None,
                 on_first_token=None) -> torch.Tensor | None:
        """Global prompts [B, P] -> greedy tokens [b, N] of this rank's rows (None where it
        holds no outputs)."""
        prompts = prompts.to(self.device)
        B, P = prompts.shape
        heads, head_dim = self._heads()
        if self.strategy == "pipeline":
            return pipeline_generate(
                self.module, prompts if self.par.is_first_stage else None, new_tokens, batch=B,
                prompt_len=P, stage_index=self.stage_index, n_stages=self.par.dims.pp,
                group=self.pp_group, microbatches=self.microbatches_for(B), heads=heads,
                head_dim=head_dim, d_model=self.cfg.d_model, cache_len=cache_len,
                device=self.device, on_first_token=on_first_token)
        r = self.rows(B)
        if len(r) == 0:
            if on_first_token is not None:
                on_first_token()
            return None
        return greedy_generate(self.module, prompts[r.start:r.stop], new_tokens, heads=heads,
                               head_dim=head_dim, cache_len=cache_len, on_first_token=on_first_token)

    def parameters(self):
        return self.par.parameters()
