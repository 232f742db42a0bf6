"""The GPU check: one short prepared run of the GPU path on one NVIDIA GPU (target: under 8 min
on an H100). It uses parallab's real launcher, trainer and inference engine.

    .venv/bin/python benchmarks/gpu_check.py [--out benchmarks/results] [--preset 1b]

1. the environment (`parallab env`): GPU, memory, CUDA, NCCL, topology;
2. single-device training of a ~1B-parameter preset in bf16 mixed precision (fp32 master
   weights), without and with torch.compile: tokens/s, MFU against the GPU's bf16 peak, CUDA
   max allocated and reserved memory;
3. inference: prefill (forward) tokens/s and decode output tokens/s, time per output token;
4. parity: the same short fp32 run of the debug model on the CPU (gloo) and on the GPU (NCCL),
   losses and final weights compared.
Every number goes into one JSON file, printed at the end. Target: training MFU >= 45% with
compilation.

    .venv/bin/python benchmarks/gpu_check.py --rehearse

runs the same steps on the CPU (gloo, the debug preset, bf16 autocast, inductor's C++ backend)
so that the script itself is proven here before it spends GPU time; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _train_args(tmp: Path, *, preset: str, backend: str, dtype: str, compile: bool, batch: int,
                steps: int, optimizer: str = "adamw", lr: float = 1e-4):
    from parallab.config import (DataSection, ModelSection, ParallelSection, RuntimeSection, TrainArgs,
                                 TrainSection)

    return TrainArgs(model=ModelSection(preset=preset), data=DataSection(source="synthetic", global_batch=batch),
                     parallel=ParallelSection(strategy="single", devices=1, compile=compile),
                     train=TrainSection(steps=steps, warmup_steps=min(3, steps - 1), dtype=dtype,
                                        optimizer=optimizer, lr=lr),
                     runtime=RuntimeSection(out_dir=str(tmp), backend=backend))


def _launch(args, root: Path, name: str, *, reference: Path | None = None, save_reference: bool = False):
    from parallab.bench.launch import RunFolder, launch
    from parallab.config import validate_train

    validate_train(args)
    folder = RunFolder(root / name).create()
    t0 = time.perf_counter()
    row = launch(args, folder, run_id=name, reference=reference, save_reference=save_reference,
                 peak_flops=None, peak_flops_source=None, timeout_s=420)
    print(f"{name}: {row['status']} in {time.perf_counter() - t0:.0f} s"
          + (f" ({row['reason']})" if row["status"] != "ok" else ""), flush=True)
    return row, folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--work", default="/tmp/parallab-gpu-check")
    ap.add_argument("--rehearse", action="store_true",
                    help="run every step on the CPU (gloo, debug preset) to check the script itself")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: eager,compiled,infer,parity")
    a = ap.parse_args()

    import torch

    from parallab.runtime.device import describe_devices

    if a.rehearse:
        backend = "gloo"
        if a.preset == "1b":
            a.preset = "debug"
        a.out = a.work
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; this script checks the GPU path only "
              "(--rehearse runs it on the CPU)", file=sys.stderr)
        return 2
    else:
        backend = "nccl"
    skip = {s for s in a.skip.split(",") if s}
    unknown = skip - {"eager", "compiled", "infer", "parity"}
    if unknown:
        print(f"gpu_check: unknown step(s) in --skip: {sorted(unknown)}; valid: eager, compiled, infer, parity",
              file=sys.stderr)
        return 2
    a.stamp = time.strftime("%Y%m%d-%H%M")
    work = Path(a.work) / time.strftime("%Y%m%d-%H%M%S")
    result: dict = {"env": describe_devices(), "config": vars(a)}
    keep = ("status", "reason", "tokens_per_s", "samples_per_s", "step_time_median_s", "step_time_p90_s",
            "mfu", "peak_flops_per_device", "peak_flops_source", "peak_mem_bytes", "cuda_reserved_bytes",
            "n_params", "flops_per_token", "loss_first", "loss_last", "device_name")

    for compile in (False, True):
        name = "compiled" if compile else "eager"
        if name in skip:
            continue
        row, _ = _launch(_train_args(work, preset=a.preset, backend=backend, dtype="bfloat16", compile=compile,
                                     batch=a.batch, steps=a.steps), work, f"train-bf16-{name}")
        result[f"train_bf16_{name}"] = {k: row.get(k) for k in keep}
        _save(a, result)

    # Inference: prefill and decode of the same preset in bf16 (weights stored in bf16).
    if "infer" not in skip:
        from parallab.bench.launch import RunFolder
        from parallab.config import InferArgs, InferSection, ModelSection, ParallelSection, RuntimeSection
        from parallab.infer.commands import launch_infer
        from parallab.infer.settings import validate_infer

        prompt = 512 if not a.rehearse else 16
        iargs = InferArgs(model=ModelSection(preset=a.preset), parallel=ParallelSection(strategy="single", devices=1),
                          infer=InferSection(batch_sizes=(1, 8), generate_batch=8, prompt_len=prompt,
                                             new_tokens=prompt // 4, requests=3, dtype="bfloat16"),
                          runtime=RuntimeSection(out_dir=str(work), backend=backend))
        validate_infer(iargs)
        t0 = time.perf_counter()
        rows = launch_infer(iargs, RunFolder(work / "infer").create(), run_id="infer", reference=None,
                            save_reference=False, peak_flops=None, peak_flops_source=None, timeout_s=420)
        print(f"infer: {[r['status'] for r in rows]} in {time.perf_counter() - t0:.0f} s", flush=True)
        result["infer_bf16"] = [{k: r.get(k) for k in (
            "status", "reason", "workload", "batch_size", "prompt_len", "new_tokens", "tokens_per_s",
            "output_tokens_per_s", "ttft_s", "tpot_s", "latency_p50_s", "latency_p99_s", "peak_mem_bytes")}
            for r in rows]
        _save(a, result)

    # Parity: the debug model, fp32 and SGD, on the CPU (the reference) and on the GPU.
    if "parity" not in skip:
        cpu_args = _train_args(work, preset="debug", backend="gloo", dtype="float32", compile=False, batch=8,
                               steps=5, optimizer="sgd", lr=0.05)
        reference = work / "parity-cpu" / "reference.pt"
        _launch(cpu_args, work, "parity-cpu", reference=reference, save_reference=True)
        gpu_args = dataclasses.replace(cpu_args, runtime=dataclasses.replace(cpu_args.runtime, backend=backend))
        gpu_row, _ = _launch(gpu_args, work, "parity-gpu", reference=reference)
        result["parity_gpu_vs_cpu"] = {k: gpu_row.get(k) for k in (
            "status", "reason", "backend", "verify_status", "verify_max_loss_rel", "verify_max_weight_rel",
            "verify_tolerance")}

    compiled = result.get("train_bf16_compiled") or {}
    result["target_mfu_0.45_met"] = bool(compiled.get("mfu") and compiled["mfu"] >= 0.45)
    path = _save(a, result)
    print(json.dumps(result, indent=1, default=str))
    print(f"written: {path}")
    return 0


def _save(a, result: dict) -> Path:
    """Write what is known so far (a check cut off by its time limit still leaves its numbers)."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-check-{a.stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
