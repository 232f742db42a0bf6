"""The hand-written reference: a plain PyTorch training loop of the same GPT, batch and strategy,
with none of parallab's machinery (no config, no trainer, no metrics processor).

    torchrun --nproc-per-node N benchmarks/raw_train.py --mode {single,ddp,1f1b,gpipe} ...

Prints one JSON line (rank 0): the median step time and samples/s over the timed steps.
The model class is parallab's (it is plain single-device PyTorch); everything around it is
written here the way a user would write it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single", "ddp", "fsdp", "tp", "1f1b", "gpipe"], required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pin", action="store_true",
                    help="bind each rank to its own core(s) (measured: no faster, docs/TORCH-NOTES-parallab.md)")
    a = ap.parse_args()
    if a.pin:  # before gloo's threads exist, so that they inherit the mask
        cores = sorted(os.sched_getaffinity(0))
        lr = int(os.environ.get("LOCAL_RANK", 0))
        os.sched_setaffinity(0, set(cores[lr * a.threads % len(cores):][:a.threads]))

    from parallab.models.gpt import GPT
    from parallab.models.registry import GPT_PRESETS

    torch.set_num_threads(a.threads)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    cfg = GPT_PRESETS[a.preset]
    torch.manual_seed(0)
    model = GPT(cfg)
    local_batch = a.global_batch // (world if a.mode in ("ddp", "fsdp") else 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (local_batch, cfg.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (local_batch, cfg.seq_len), generator=g)

    def loss_fn(logits, target):
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))

    schedule = None
    loss_ctx = None
    if a.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    elif a.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif a.mode == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, loss_parallel,
                                                       parallelize_module)

        mesh = init_device_mesh("cpu", (world,))
        plan = {"output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
        for i in model.layers:
            plan.update({f"layers.{i}.attn.wq": ColwiseParallel(), f"layers.{i}.attn.wk": ColwiseParallel(),
                         f"layers.{i}.attn.wv": ColwiseParallel(), f"layers.{i}.attn.wo": RowwiseParallel(),
                         f"layers.{i}.mlp.w1": ColwiseParallel(), f"layers.{i}.mlp.w2": RowwiseParallel()})
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate())
        parallelize_module(model, mesh, plan)
        # Norms and the position embedding stay whole on every rank: their gradients are
        # partial sums of the sequence-replicated activations and need no reduction here
        # because the row-wise layers already all-reduce the residual stream.
        loss_ctx = loss_parallel
    elif a.mode in ("1f1b", "gpipe"):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        # Split the layers evenly by count, embeddings on the first stage, head on the last.
        per = cfg.n_layers // world
        keep = {str(i) for i in range(rank * per, (rank + 1) * per)}
        for k in list(model.layers.keys()):
            if k not in keep:
                del model.layers[k]
        if rank != 0:
            model.tok_emb = model.pos_emb = None
        if rank != world - 1:
            model.norm = model.output = None
        stage = PipelineStage(model, rank, world, torch.device("cpu"))
        cls = Schedule1F1B if a.mode == "1f1b" else ScheduleGPipe
        schedule = cls(stage, n_microbatches=a.microbatches, loss_fn=loss_fn)
    # foreach kernels take tensors of one kind: sharded (DTensor) and plain parameters of the
    # tensor-parallel model get an optimizer each.
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                          [p for p in params if not isinstance(p, DTensor)]) if g]
    opts = [torch.optim.AdamW(g, lr=1e-3, foreach=True) for g in groups]

    times = []
    for step in range(a.steps):
        t0 = time.perf_counter()
        if schedule is None and loss_ctx is not None:
            with loss_ctx():
                loss_fn(model(x), y).backward()
        elif schedule is None:
            loss_fn(model(x), y).backward()
        elif rank == 0:
            schedule.step(x, target=y if world == 1 else None)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = torch.tensor(times[a.warmup:], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    median = statistics.median(timed.tolist())
    if rank == 0:
        print(json.dumps({"mode": a.mode, "world": world, "step_time_median_s": median,
                          "samples_per_s": a.global_batch / median}), flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown, as parallab's workers do: gloo's state torn down
    # there sometimes aborts a finished rank under load (runtime/dist.exit_process).
    from parallab.runtime.dist import exit_process

    exit_process(0)
