"""The training loop, identical for every strategy. It runs inside each rank."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallab.config import TrainArgs, global_batch_for
from parallab.data import build_data
from parallab.metrics.memory import TensorMemoryTracker, cuda_memory_stats, state_bytes
from parallab.models.registry import build_meta, count_params, get_family
from parallab.parallel.dims import dims_for
from parallab.parallel.parallelize import Parallelized, parallelize
from parallab.runtime.dist import DistInfo, get_logger

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Trainer:
    """Everything a rank needs to take training steps."""
    args: TrainArgs
    info: DistInfo
    family: object
    cfg: object
    par: Parallelized
    optimizer: torch.optim.Optimizer
    data: object
    n_params: int

    @classmethod
    def build(cls, args: TrainArgs, info: DistInfo, *, cache_dir: Path) -> "Trainer":
        family = get_family(args.model.name)
        cfg = family.config(args.model.preset, args.model.overrides())
        meta = build_meta(family, cfg)
        n_params = count_params(meta)
        dims = dims_for(args.parallel.strategy, info.world_size)
        par = parallelize(meta, family, cfg, dims, device=info.device, seed=args.train.seed,
                          dtype=DTYPES[args.train.dtype], microbatches=args.parallel.microbatches,
                          schedule=args.parallel.schedule)
        # foreach=True: one fused multi-tensor kernel per group instead of a loop over
        # parameters (the default picks it on CUDA only).
        optimizer = torch.optim.AdamW(list(par.parameters()), lr=args.train.lr, foreach=True)
        data = build_data(args.data.source, seq_len=cfg.seq_len, global_batch=global_batch_for(args),
                          seed=args.train.seed, vocab_size=cfg.vocab_size, path=args.data.path,
                          cache_dir=cache_dir)
        return cls(args, info, family, cfg, par, optimizer, data, n_params)

    # ------------------------------------------------------------------ one step

    def step(self, step: int) -> torch.Tensor | None:
        """One optimizer step on the global batch of ``step``; returns this rank's loss
        (None on pipeline stages that do not compute it)."""
        par = self.par
        x, y = self.data.batch(step, rank=par.dp_rank, world=par.dp_size)
        x, y = x.to(self.info.device, non_blocking=True), y.to(self.info.device, non_blocking=True)
        if par.schedule is not None:
            losses: list[torch.Tensor] = []
            # Inputs enter at the first stage, targets are needed where the loss is computed.
            inputs = (x,) if par.is_first_stage else ()
            target = y if par.is_last_stage else None
            par.schedule.step(*inputs, target=target, losses=losses)
            loss = torch.stack(losses).mean().detach() if par.is_last_stage else None
        else:
            logits = par.module(x)
            loss = self.family.loss(logits, y)
            loss.backward()  # DDP all-reduces gradient buckets during this call
            loss = loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        """All steps: warm-up, one memory-tracked step, timed steps. Returns the rank's raw
        measurements (combined over ranks by ``gather_measurements``)."""
        a = self.args.train
        log = get_logger()
        cuda = self.info.device.type == "cuda"
        track_step = min(1, a.warmup_steps - 1) if a.warmup_steps > 0 else -1
        times, losses, mem = [], [], {}
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.info.device)
        for s in range(a.steps):
            if s == track_step and not cuda:
                mem = self._tracked_step(s, losses)
                times.append(float("nan"))
                continue
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = self.step(s)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss) if loss is not None else float("nan"))
            log.info("step %d/%d  %.3fs  loss %s", s + 1, a.steps, times[-1],
                     f"{losses[-1]:.4f}" if loss is not None else "(on last stage)")
        if cuda:
            stats = cuda_memory_stats(self.info.device)
            mem = {"peak": stats["max_allocated"], "reserved": stats["max_reserved"],
                   **self._static_bytes()}
        elif not mem:  # no warm-up step to track: track nothing, report the state only
            mem = {"peak": None, **self._static_bytes()}
        return {"times": times, "losses": losses, "mem": mem}

    def _static_bytes(self) -> dict[str, int]:
        params = list(self.par.parameters())
        return {"params": state_bytes(params),
                "grads": state_bytes(p.grad for p in params if p.grad is not None),
                "optim": state_bytes(v for st in self.optimizer.state.values() for v in st.values()
                                     if isinstance(v, torch.Tensor))}

    def _tracked_step(self, s: int, losses: list[float]) -> dict:
        params = list(self.par.parameters())
        static = {"params": params,
                  "grads": [p.grad for p in params if p.grad is not None],
                  "optim": [v for st in self.optimizer.state.values() for v in st.values()
                            if isinstance(v, torch.Tensor)]}
        with TensorMemoryTracker(static) as tracker:
            loss = self.step(s)
            # DDP's gradient buckets are allocated in C++ when DDP is built (the gradients are
            # views into them): alive through the whole step, yet never seen by the dispatcher.
            tracker.account_persistent(p.grad for p in params if p.grad is not None)
        losses.append(float(loss) if loss is not None else float("nan"))
        static_now = self._static_bytes()
        return {"peak": tracker.peak, **static_now}


def gather_measurements(trainer: Trainer, raw: dict) -> dict:
    """Combine every rank's measurements: step time = the slowest rank's, memory = the
    largest rank's; losses from wherever they were computed (the last pipeline stage),
    averaged over data-parallel replicas."""
    info = trainer.info
    n = len(raw["times"])
    times = torch.tensor(raw["times"], dtype=torch.float64)
    losses = torch.tensor([0.0 if l != l else l for l in raw["losses"]], dtype=torch.float64)
    has_loss = torch.tensor([0.0 if (raw["losses"] and raw["losses"][0] != raw["losses"][0]) else 1.0],
                            dtype=torch.float64)
    mem_keys = ("peak", "params", "grads", "optim", "reserved")
    mem = torch.tensor([float(raw["mem"].get(k) or 0) for k in mem_keys], dtype=torch.float64)
    if info.world_size > 1:
        dev = info.device
        times, losses, has_loss, mem = (t.to(dev) for t in (times, losses, has_loss, mem))
        times = torch.nan_to_num(times, nan=-1.0)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        dist.all_reduce(losses, op=dist.ReduceOp.SUM)
        dist.all_reduce(has_loss, op=dist.ReduceOp.SUM)
        per_rank = [torch.zeros_like(mem) for _ in range(info.world_size)]
        dist.all_gather(per_rank, mem)
        times, losses, has_loss = times.cpu(), losses.cpu(), has_loss.cpu()
        per_rank = torch.stack([t.cpu() for t in per_rank])
        times[times < 0] = float("nan")
    else:
        per_rank = mem[None]
    losses = losses / has_loss.clamp(min=1)
    peak_per_rank = per_rank[:, 0].tolist()
    worst = int(per_rank[:, 0].argmax())
    return {
        "times": times.tolist()[:n],
        "losses": losses.tolist(),
        "peak_per_rank": [int(v) if raw["mem"].get("peak") is not None else None for v in peak_per_rank],
        "peak": int(per_rank[worst, 0]) if raw["mem"].get("peak") is not None else None,
        "params": int(per_rank[:, 1].max()), "grads": int(per_rank[:, 2].max()),
        "optim": int(per_rank[:, 3].max()), "reserved": int(per_rank[:, 4].max()) or None,
    }
