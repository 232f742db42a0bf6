"""Entry point of every rank of an inference run: ``python -m parallab.infer.worker SPEC.json``
under torchrun (the spec is parallab.worker.WorkerSpec with InferArgs as its args). Rank 0
computes the configuration's rows, a JSON list, and writes them to the spec's result path (on
several nodes, the first worker of every node writes them into its own node's folder)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from parallab.config import InferArgs, from_dict
from parallab.worker import WorkerSpec, start_rank, write_result


def serve(engine, args: InferArgs, base: dict) -> list[dict]:
    """Measure the selected workloads under the memory budget; one row per workload point.

    Every rank runs this with the same settings and takes the same branches (memory and
    times are combined over ranks before any decision), since the workloads communicate."""
    from parallab.infer.measure import (MemoryProbe, make_tokens, search_max_batch, time_forward,
                                        time_generate, weight_bytes)
    from parallab.infer.rows import forward_row, generate_row
    from parallab.infer.settings import format_bytes, parse_bytes

    s, cfg = args.infer, engine.cfg
    budget = parse_bytes(s.device_memory)
    weights = weight_bytes(engine)
    length = s.forward_len or cfg.seq_len
    common = dict(engine=engine, args=args, weights=weights, budget=budget)
    rows: list[dict] = []
    if budget is not None and max(weights) > budget:
        # Not even the weights fit: nothing is served here (the sweep serves it on more devices).
        reason = (f"weights need {format_bytes(int(max(weights)))} on the fullest device, more than "
                  f"the budget infer.device_memory={s.device_memory}")
        fit, bad = (0, "exact"), dict(status="does_not_fit", reason=reason)
        if "forward" in s.workloads:
            rows += [forward_row(base, batch=b, length=length, times=None, peaks=None, fit=fit,
                                 **common, **bad) for b in s.batch_sizes]
        if "generate" in s.workloads:
            rows.append(generate_row(base, batch=s.generate_batch, ttft=None, e2e=None, peaks=None,
                                     fit=fit, **common, **bad))
        return rows

    def too_big(batch: int, peak: float, fit) -> dict:
        need = "more than the GPU has" if peak == float("inf") else format_bytes(int(peak))
        return dict(status="does_not_fit",
                    reason=f"batch {batch} needs {need} per device, more than the budget "
                           f"infer.device_memory={s.device_memory} (largest batch that fits: {fit[0]})")

    if "forward" in s.workloads:
        probe = MemoryProbe(engine, "forward", seed=s.seed, length=length)
        fit = search_max_batch(lambda b: probe.fits(b, budget), s.max_batch_search) if budget else None
        for b in s.batch_sizes:
            peaks = probe(b)
            if budget is not None and max(peaks) > budget:
                rows.append(forward_row(base, batch=b, length=length, times=None, peaks=peaks,
                                        fit=fit, **common, **too_big(b, max(peaks), fit)))
                continue
            tokens = make_tokens(s.seed, b, length, cfg.vocab_size, salt=3)
            times = time_forward(engine, tokens, warmup=s.warmup, requests=s.requests)
            rows.append(forward_row(base, batch=b, length=length, times=times, peaks=peaks,
                                    fit=fit, **common))
    if "generate" in s.workloads:
        probe = MemoryProbe(engine, "generate", seed=s.seed, length=length, prompt_len=s.prompt_len,
                            new_tokens=s.new_tokens)
        fit = search_max_batch(lambda b: probe.fits(b, budget), s.max_batch_search) if budget else None
        b = s.generate_batch
        peaks = probe(b)
        if budget is not None and max(peaks) > budget:
            rows.append(generate_row(base, batch=b, ttft=None, e2e=None, peaks=peaks, fit=fit,
                                     **common, **too_big(b, max(peaks), fit)))
        else:
            prompts = make_tokens(s.seed, b, s.prompt_len, cfg.vocab_size, salt=4)
            ttft, e2e = time_generate(engine, prompts, s.new_tokens, warmup=s.warmup,
                                      requests=s.requests)
            rows.append(generate_row(base, batch=b, ttft=ttft, e2e=e2e, peaks=peaks, fit=fit,
                                     **common))
    return rows


def run_infer_worker(spec: WorkerSpec) -> int:
    from parallab.infer.engine import InferEngine
    from parallab.infer.rows import base_fields
    from parallab.infer.verify import run_verification
    from parallab.models.registry import get_family
    from parallab.runtime.device import gpu_peak_flops, machine_info
    from parallab.runtime.dist import get_logger, shutdown
    from parallab.runtime.nodes import REFERENCE_NOT_SHARED, gather_hosts, reference_where

    args = from_dict(InferArgs, spec.args)
    info = start_rank(args)
    log = get_logger()
    try:
        s = args.infer
        family = get_family(args.model.name)
        cfg = family.config(args.model.preset, args.model.overrides())
        engine = InferEngine.build(family=family, cfg=cfg, strategy=args.parallel.strategy,
                                   devices=info.world_size, device=info.device, seed=s.seed,
                                   dtype=s.dtype, microbatches=args.parallel.microbatches)
        log.info("%s: %s, %d parameters, %d device(s), %s", spec.config_id, args.model.preset,
                 engine.n_params, info.world_size, info.backend)
        # Correctness first, independent of the budget: the single-device run saves its
        # outputs even where it cannot serve within the budget, so the others can be checked.
        # On several nodes the reference may be on node 0's disk only: compared where every
        # rank sees it (all ranks take the same branch: the comparison has collectives).
        ref = Path(spec.reference_path) if spec.reference_path else None
        where = "all" if spec.save_reference else reference_where(ref, info.device, spec.config_id)
        verify = run_verification(engine, seed=s.seed, prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                                  dtype=s.dtype, save=spec.save_reference, is_main=info.is_main,
                                  reference=ref if where == "all" else None)
        if where == "some":
            verify["verify_status"] = REFERENCE_NOT_SHARED
        log.info("%s: verify %s", spec.config_id, verify.get("verify_status"))
        machine = machine_info(hosts=gather_hosts())  # several nodes: a collective
        if info.device.type == "cuda" and spec.peak_flops is None:
            spec.peak_flops, spec.peak_flops_source = gpu_peak_flops(machine["device_name"], s.dtype)
        base = base_fields(spec=spec, args=args, engine=engine, info=info, machine=machine,
                           verify=verify)
        # Every rank builds the rows (the workloads communicate); rank 0's are the result.
        rows = write_result(spec, serve(engine, args, base), info)
        if info.is_main:
            for r in rows:
                log.info("%s %s batch %s: %s %s", spec.config_id, r["workload"], r["batch_size"],
                         r["status"], f"{r['samples_per_s']:.2f} samples/s" if r["samples_per_s"]
                         else (r["reason"] or ""))
        return 0
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m parallab.infer.worker SPEC.json", file=sys.stderr)
        return 2
    try:
        return run_infer_worker(WorkerSpec.read(argv[0]))
    except Exception:
        # The launcher reads this line as the failure's reason.
        traceback.print_exc()
        exc = sys.exc_info()[1]
        print(f"PARALLAB-ERROR rank {os.environ.get('RANK', '0')}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    from parallab.runtime.dist import worker_entry

    worker_entry(main)
