"""The hand-written reference for inference: batched forward passes of the same GPT, written
the way a user would by hand, under torchrun.

    torchrun --nproc-per-node N benchmarks/raw_infer.py --mode {single,replicas,pipeline} ...

replicas: each rank runs its share of the batch. pipeline: two or more stages by layer count,
micro-batches sent stage to stage with isend so that stages overlap. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single", "replicas", "pipeline"], required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()

    from parallab.models.gpt import GPT
    from parallab.models.registry import GPT_PRESETS

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    cfg = GPT_PRESETS[a.preset]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (a.batch, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    if a.mode == "replicas":
        x = x.chunk(world)[rank]
    if a.mode == "pipeline":
        per = cfg.n_layers // world
        keep = {str(i) for i in range(rank * per, (rank + 1) * per)}
        for k in list(model.layers.keys()):
            if k not in keep:
                del model.layers[k]
        if rank != 0:
            model.tok_emb = model.pos_emb = None
        if rank != world - 1:
            model.norm = model.output = None
    micro = x.chunk(a.microbatches) if a.mode == "pipeline" else [x]
    hidden = (x.shape[0] // a.microbatches, cfg.seq_len, cfg.d_model)

    def request() -> None:
        if a.mode != "pipeline":
            model(x)
            return
        sends = []
        for mb in micro:
            inp = mb if rank == 0 else torch.empty(hidden)
            if rank > 0:
                dist.recv(inp, src=rank - 1)
            out = model(inp)
            if rank < world - 1:
                sends.append(dist.isend(out.contiguous(), dst=rank + 1))
        for s in sends:
            s.wait()

    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.requests):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            request()
            times.append(time.perf_counter() - t0)
    timed = torch.tensor(times[a.warmup:], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # a request ends with its slowest rank
    median = statistics.median(timed.tolist())
    if rank == 0:
        print(json.dumps({"mode": a.mode, "world": world, "latency_s": median, "samples_per_s": a.batch / median}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown, as parallab's workers do: gloo's state torn down
    # there sometimes aborts a finished rank under load (runtime/dist.exit_process).
    from parallab.runtime.dist import exit_process

    exit_process(0)
