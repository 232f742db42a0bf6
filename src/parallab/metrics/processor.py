"""One processor turns a run's raw measurements into the fixed row of bench/result.py."""

from __future__ import annotations

import math
import statistics
import time

from parallab.bench.result import make_row


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def counted_flops_per_sample(family, cfg) -> float | None:
    """Training FLOPs (forward + backward) of one sample, counted on meta (models/flops.py);
    None, with a warning, where the family cannot count (the row is still written)."""
    count = getattr(family, "flops_per_sample", None)
    if count is None:
        return None
    try:
        return count(cfg, training=True)
    except Exception as e:  # noqa: BLE001 - a missing count must not lose the run's row
        from parallab.runtime.dist import get_logger

        get_logger().warning("could not count FLOPs per sample: %s: %s", type(e).__name__, e)
        return None


def train_row(*, spec, args, trainer, gathered: dict, verify: dict, machine: dict) -> dict:
    """The result row of a finished training run (rank 0)."""
    from parallab.config import uses_pipeline
    from parallab.plan.budget import budget_fields

    p, d, t = args.parallel, args.data, args.train
    mb = p.microbatches if uses_pipeline(p.strategy) else 1
    cfg = trainer.cfg
    timed = [x for x in gathered["times"][t.warmup_steps:] if x == x]
    median = statistics.median(timed)
    global_batch = trainer.data.global_batch
    samples_per_s = global_batch / median
    tokens_per_s = samples_per_s * cfg.seq_len
    flops_per_token = trainer.family.flops_per_token(cfg, training=True)
    flops_per_sample = counted_flops_per_sample(trainer.family, cfg)
    peak = spec.peak_flops
    mfu = tokens_per_s * flops_per_token / (peak * p.devices) if peak else None
    dims = trainer.par.dims
    cores = machine.get("cpu_cores") or 1
    # Several nodes: each machine has its own cores (two node agents on one host share them).
    hosts = machine.get("hosts") or [None]
    per_host = (machine.get("devices_per_node") or p.devices) * max(hosts.count(h) for h in hosts)
    oversubscribed = (trainer.info.device.type == "cpu"
                      and per_host * args.runtime.threads_per_device > cores)
    losses = gathered["losses"]
    peak_mem = gathered["peak"]
    static = gathered["params"] + gathered["grads"] + gathered["optim"]
    return make_row(
        run_id=spec.run_id, config_id=spec.config_id, mode="train", status="ok",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        strategy=p.strategy, schedule=(p.schedule if uses_pipeline(p.strategy) else None),
        devices=p.devices, nodes=len(hosts), threads_per_device=args.runtime.threads_per_device,
        oversubscribed=oversubscribed, dp_degree=dims.dp, pp_degree=dims.pp, tp_degree=dims.tp,
        fsdp_degree=dims.dp_shard, model=args.model.name, preset=args.model.preset,
        n_params=trainer.n_params, flops_per_token=flops_per_token,
        flops_per_sample=flops_per_sample, dtype=t.dtype,
        data=d.source, seq_len=cfg.seq_len, global_batch=global_batch,
        per_device_batch=global_batch // dims.dp,
        microbatches=mb, microbatch_size=global_batch // dims.dp // mb,
        scaling=d.scaling, steps=t.steps, warmup_steps=t.warmup_steps, timed_steps=len(timed),
        activation_checkpointing=bool(p.activation_checkpointing),
        step_time_median_s=median, step_time_p90_s=percentile(timed, 90),
        step_time_min_s=min(timed), step_time_max_s=max(timed),
        samples_per_s=samples_per_s, tokens_per_s=tokens_per_s,
        samples_per_s_per_device=samples_per_s / p.devices,
        tokens_per_s_per_device=tokens_per_s / p.devices,
        mfu=mfu, peak_flops_per_device=peak, peak_flops_source=spec.peak_flops_source,
        peak_mem_bytes=peak_mem, peak_mem_per_rank=gathered["peak_per_rank"],
        mem_params_bytes=gathered["params"], mem_grads_bytes=gathered["grads"],
        mem_optim_bytes=gathered["optim"],
        mem_activations_bytes=max(0, peak_mem - static) if peak_mem is not None else None,
        mem_source="cuda-max-allocated" if trainer.info.device.type == "cuda" else "cpu-tracked-tensors",
        cuda_reserved_bytes=gathered["reserved"],
        **budget_fields(args.runtime, peak_mem),  # runtime.device_memory and whether the peak fits
        loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
        losses=losses, backend=trainer.info.backend, **verify, **machine,
    )
