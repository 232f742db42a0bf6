"""The same training loop as raw_train.py's DDP, written the Hugging Face Accelerate way
(``Accelerator.prepare`` wraps the model in DDP, ``accelerator.backward``), for a side-by-side
comparison. Started by ``accelerate launch`` (see bench_accelerate.py); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()

    from accelerate import Accelerator

    from parallab.models.gpt import GPT
    from parallab.models.registry import GPT_PRESETS

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    world = accelerator.num_processes
    cfg = GPT_PRESETS[a.preset]
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    model, opt = accelerator.prepare(model, opt)
    g = torch.Generator().manual_seed(1)
    local = a.global_batch // world
    x = torch.randint(0, cfg.vocab_size, (local, cfg.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (local, cfg.seq_len), generator=g)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(0, 1))
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = torch.tensor(times[a.warmup:], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)
    median = statistics.median(timed.tolist())
    if accelerator.is_main_process:
        print(json.dumps({"mode": f"accelerate-ddp-{world}", "world": world, "step_time_median_s": median,
                          "samples_per_s": a.global_batch / median,
                          "distributed_type": str(accelerator.distributed_type)}), flush=True)


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown, as parallab's workers do: gloo's state torn down
    # there sometimes aborts a finished rank under load (runtime/dist.exit_process).
    from parallab.runtime.dist import exit_process

    exit_process(0)
