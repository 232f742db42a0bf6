"""Result rows of an inference run: mode "infer", the schema of bench/result.py, one row per
workload and batch size.

forward rows: one batch = one "step"; latency_* and step_time_* are seconds per batch,
  samples_per_s and tokens_per_s the batch's rows and tokens per second.
generate rows: one request (a batch of prompts decoded to new_tokens) = one "step";
  ttft_s = prefill and first token, tpot_s = each further token (medians over requests),
  latency_* = end to end per request; samples_per_s = sequences finished per second,
  tokens_per_s = output_tokens_per_s = generated tokens per second.
"""

from __future__ import annotations

import statistics
import time

from parallab.bench.result import make_row
from parallab.metrics.processor import percentile
from parallab.runtime.nodes import devices_per_host


def base_fields(*, spec, args, engine, info, machine: dict, verify: dict) -> dict:
    """Fields every row of one configuration shares. ``machine``: runtime.device.machine_info
    with every node's host (its node_rank and devices_per_node come into the row with it)."""
    p, s = args.parallel, args.infer
    dims = engine.par.dims
    cores = machine.get("cpu_cores") or 1
    # Several nodes: each machine has its own cores (two node agents on one host share them).
    per_host = devices_per_host(machine, p.devices)
    return dict(
        run_id=spec.run_id, config_id=spec.config_id, mode="infer",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"), strategy=p.strategy,
        devices=p.devices, nodes=len(machine.get("hosts") or [None]),
        threads_per_device=args.runtime.threads_per_device,
        oversubscribed=info.device.type == "cpu" and per_host * args.runtime.threads_per_device > cores,
        dp_degree=dims.dp, pp_degree=dims.pp, tp_degree=dims.tp, fsdp_degree=dims.dp_shard,
        model=args.model.name, preset=args.model.preset, n_params=engine.n_params, dtype=s.dtype,
        data="synthetic", scaling="strong", activation_checkpointing=False,
        warmup_steps=s.warmup, steps=s.warmup + s.requests,
        peak_flops_per_device=spec.peak_flops, peak_flops_source=spec.peak_flops_source,
        mem_source="cuda-max-allocated" if info.device.type == "cuda" else "cpu-tracked-tensors",
        backend=info.backend, **verify, **machine)


def _batch_fields(engine, batch: int) -> dict:
    m = engine.microbatches_for(batch)
    per_device = len(engine.rows(batch)) if engine.strategy != "replicas" else \
        -(-batch // engine.par.dp_size)  # the largest replica's share
    return dict(batch_size=batch, global_batch=batch, per_device_batch=per_device,
                microbatches=m, microbatch_size=batch // m,
                schedule="forward-only" if engine.strategy == "pipeline" else None)


def _memory_fields(peaks: list[float] | None, weights: list[float], budget: int | None,
                   fit: tuple[int, str] | None) -> dict:
    out = dict(mem_params_bytes=int(max(weights)), device_memory_budget_bytes=budget,
               max_batch_fit=fit[0] if fit else None, max_batch_fit_bound=fit[1] if fit else None)
    if peaks:
        peak = max(peaks)
        out.update(peak_mem_bytes=int(peak) if peak != float("inf") else None,
                   peak_mem_per_rank=[int(x) if x != float("inf") else None for x in peaks],
                   mem_activations_bytes=max(0, int(peak - max(weights))) if peak != float("inf") else None,
                   fits_budget=(peak <= budget) if budget is not None else None)
    return out


def _timing_fields(times: list[float]) -> dict:
    median = statistics.median(times)
    return dict(timed_steps=len(times), step_time_median_s=median,
                step_time_p90_s=percentile(times, 90), step_time_min_s=min(times),
                step_time_max_s=max(times), latency_p50_s=median,
                latency_p90_s=percentile(times, 90), latency_p99_s=percentile(times, 99))


def forward_row(base: dict, *, engine, args, batch: int, length: int, times: list[float] | None,
                peaks, weights, budget, fit, status: str = "ok", reason: str | None = None) -> dict:
    row = dict(base, workload="forward", seq_len=length, status=status, reason=reason,
               **_batch_fields(engine, batch), **_memory_fields(peaks, weights, budget, fit))
    if times:
        row.update(_timing_fields(times))
        n = args.parallel.devices
        sps = batch / row["step_time_median_s"]
        row.update(samples_per_s=sps, tokens_per_s=sps * length, samples_per_s_per_device=sps / n,
                   tokens_per_s_per_device=sps * length / n)
        flops = engine.family.flops_per_token(engine.cfg, training=False)
        row["flops_per_token"] = flops
        if base.get("peak_flops_per_device"):
            row["mfu"] = sps * length * flops / (base["peak_flops_per_device"] * n)
    return make_row(**row)


def generate_row(base: dict, *, engine, args, batch: int, ttft: list[float] | None,
                 e2e: list[float] | None, peaks, weights, budget, fit, status: str = "ok",
                 reason: str | None = None) -> dict:
    s = args.infer
    row = dict(base, workload="generate", seq_len=s.prompt_len + s.new_tokens, status=status,
               reason=reason, prompt_len=s.prompt_len, new_tokens=s.new_tokens,
               **_batch_fields(engine, batch), **_memory_fields(peaks, weights, budget, fit))
    if e2e:
        row.update(_timing_fields(e2e))
        n = args.parallel.devices
        med_first = statistics.median(ttft)
        decode = [(e - f) / (s.new_tokens - 1) for f, e in zip(ttft, e2e)] if s.new_tokens > 1 else None
        sps = batch / row["step_time_median_s"]
        out_tps = sps * s.new_tokens
        row.update(ttft_s=med_first, tpot_s=statistics.median(decode) if decode else None,
                   samples_per_s=sps, tokens_per_s=out_tps, output_tokens_per_s=out_tps,
                   samples_per_s_per_device=sps / n, tokens_per_s_per_device=out_tps / n)
    return make_row(**row)


def failed_rows(*, run_id: str, config_id: str, args, status: str, reason: str | None,
                nodes: int = 1) -> list[dict]:
    """The row of a configuration whose processes failed before writing rows (launcher side);
    ``nodes``: the nodes it was launched on."""
    p, s = args.parallel, args.infer
    return [make_row(run_id=run_id, config_id=config_id, mode="infer", status=status, reason=reason,
                     strategy=p.strategy, devices=p.devices, nodes=nodes,
                     threads_per_device=args.runtime.threads_per_device, model=args.model.name,
                     preset=args.model.preset, dtype=s.dtype, data="synthetic",
                     microbatches=p.microbatches if p.strategy == "pipeline" else 1,
                     prompt_len=s.prompt_len, new_tokens=s.new_tokens, scaling="strong",
                     warmup_steps=s.warmup, steps=s.warmup + s.requests)]
