"""The training loop, identical for every strategy. It runs inside each rank."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallab.config import TrainArgs, global_batch_for, parallel_dims, stages_per_device
from parallab.data import build_data
from parallab.metrics.memory import TensorMemoryTracker, cuda_memory_stats, state_bytes
from parallab.plan.budget import MemoryBudget
from parallab.models.registry import build_meta, count_params, get_family
from parallab.parallel.parallelize import Parallelized, parallelize
from parallab.runtime.dist import DistInfo, get_logger

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_optimizer(name: str, params: list, *, lr: float, device_type: str = "cpu") -> torch.optim.Optimizer:
    """The update is elementwise, so it is the same computation on a whole parameter and on a
    shard of it. On GPUs: the fused kernels (one launch for all parameters); on CPUs foreach
    (one multi-tensor op per group instead of a loop over parameters)."""
    kind = {"fused": True} if device_type == "cuda" else {"foreach": True}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, **kind)
    return torch.optim.AdamW(params, lr=lr, **kind)


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
    step_log: object | None = None  # metrics/live.StepLog on rank 0, when the launcher asks
    last_grad_bytes: int = 0  # this rank's gradient bytes (local shards) before they were freed

    @classmethod
    def build(cls, args: TrainArgs, info: DistInfo, *, cache_dir: Path) -> "Trainer":
        family = get_family(args.model.name)
        cfg = family.config(args.model.preset, args.model.overrides())
        meta = build_meta(family, cfg)
        n_params = count_params(meta)
        p = args.parallel
        dims = parallel_dims(p)
        assert dims.world_size == info.world_size, (dims, info.world_size)
        par = parallelize(meta, family, cfg, dims, device=info.device, seed=args.train.seed,
                          dtype=DTYPES[args.train.dtype], microbatches=p.microbatches,
                          schedule=p.schedule, stages_per_device=stages_per_device(p),
                          fsdp_reshard_after_forward=p.fsdp_reshard_after_forward,
                          sequence_parallel=p.sequence_parallel,
                          activation_checkpointing=p.activation_checkpointing, compile=p.compile)
        optimizer = make_optimizer(args.train.optimizer, list(par.parameters()), lr=args.train.lr,
                                   device_type=info.device.type)
        # A family with batches of its own (images, a user's batch maker) provides them;
        # token models read synthetic tokens or a corpus.
        make_data = getattr(family, "make_data", None)
        data = make_data(cfg, global_batch_for(args), args.train.seed) if make_data else None
        if data is None:
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
            with par.compute_context():
                par.schedule.step(*inputs, target=target, losses=losses)
            loss = torch.stack(losses).mean().detach() if par.is_last_stage else None
        else:
            # Under tensor parallelism the logits are sharded over the vocabulary, and the
            # loss and its backward run inside loss_parallel (see Parallelized.loss_context).
            with par.loss_context():
                with par.compute_context():
                    logits = par.module(x)
                    loss = self.family.loss(logits, y)
                loss.backward()  # DDP all-reduces / FSDP reduce-scatters gradients during this
            loss = loss.detach()
            if hasattr(loss, "full_tensor"):  # a replicated DTensor: its local value is the loss
                loss = loss.full_tensor()
        par.sync_gradients()  # data parallelism around pipeline stages: averaged here
        self.optimizer.step()
        self.last_grad_bytes = state_bytes(p.grad for p in par.parameters() if p.grad is not None)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    # ------------------------------------------------------------------ the run

    def run(self, *, start_step: int = 0, before_step=None, after_step=None) -> dict:
        """All steps: warm-up, one memory-tracked step, timed steps. Returns the rank's raw
        measurements (combined over ranks by ``gather_measurements``).

        ``start_step``: first step to run (a resumed run, see train/checkpoint.py): the steps
        before it are untimed and have no loss here, and the first warm-up steps after it are
        untimed again (a fresh process is cold). ``before_step(s)`` and
        ``after_step(s, losses so far)`` run on every rank around each step (fault hooks,
        progress, checkpoints), outside the timed region."""
        a = self.args.train
        log = get_logger()
        cuda = self.info.device.type == "cuda"
        # runtime.device_memory: GPUs cap the allocator, CPUs check the tracked peak (plan/budget.py)
        budget = MemoryBudget.for_run(self.args.runtime, self.info)
        track_step = min(1, a.warmup_steps - 1) if a.warmup_steps > 0 else -1
        times, losses, mem = [float("nan")] * start_step, [], {}
        cold_until = start_step + min(a.warmup_steps, a.steps - start_step - 1) if start_step else 0
        if start_step:  # a resumed run tracks memory on its first (untimed) step, if it has one
            track_step = start_step if track_step >= 0 and cold_until > start_step else -1
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.info.device)
        for s in range(start_step, a.steps):
            if before_step is not None:
                before_step(s)
            if s == track_step and not cuda:
                mem = self._tracked_step(s, losses)
                budget.check_tracked(mem["peak"])  # over the budget: DoesNotFit on every rank
                times.append(float("nan"))
            else:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with budget.guard():  # CUDA out of memory under a budget -> DoesNotFit
                    loss = self.step(s)
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                times.append(elapsed if s >= cold_until else float("nan"))
                losses.append(float(loss) if loss is not None else float("nan"))
                if self.step_log is not None:
                    timed = s >= a.warmup_steps and s >= cold_until
                    self.step_log.write(s, elapsed, losses[-1], "timed" if timed else "warm-up")
                log.info("step %d/%d  %.3fs  loss %s", s + 1, a.steps, elapsed,
                         f"{losses[-1]:.4f}" if loss is not None else "(on last stage)")
            if after_step is not None:
                after_step(s, losses)
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
                # Gradients are freed after every step: report them as they stood before.
                "grads": state_bytes(p.grad for p in params if p.grad is not None) or self.last_grad_bytes,
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
