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
    a = ap.parse_args()

    import torch

    from parallab.runtime.device import describe_devices

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; this script checks the GPU path only", file=sys.stderr)
        return 2
    work = Path(a.work) / time.strftime("%Y%m%d-%H%M%S")
    result: dict = {"env": describe_devices(), "config": vars(a)}
    keep = ("status", "reason", "tokens_per_s", "samples_per_s", "step_time_median_s", "step_time_p90_s",
            "mfu", "peak_flops_per_device", "peak_flops_source", "peak_mem_bytes", "cuda_reserved_bytes",
            "n_params", "flops_per_token", "loss_first", "loss_last", "device_name")

    for compile in (False, True):
        row, _ = _launch(_train_args(work, preset=a.preset, backend="nccl", dtype="bfloat16", compile=compile,
                                     batch=a.batch, steps=a.steps), work, f"train-bf16-{'compiled' if compile else 'eager'}")
        result[f"train_bf16_{'compiled' if compile else 'eager'}"] = {k: row.get(k) for k in keep}

    # Inference: prefill and decode of the same preset in bf16 (weights stored in bf16).
    from parallab.bench.launch import RunFolder
    from parallab.config import InferArgs, InferSection, ModelSection, ParallelSection, RuntimeSection
    from parallab.infer.commands import launch_infer
    from parallab.infer.settings import validate_infer

    iargs = InferArgs(model=ModelSection(preset=a.preset), parallel=ParallelSection(strategy="single", devices=1),
                      infer=InferSection(batch_sizes=(1, 8), generate_batch=8, prompt_len=512, new_tokens=128,
                                         requests=3, dtype="bfloat16"),
                      runtime=RuntimeSection(out_dir=str(work), backend="nccl"))
    validate_infer(iargs)
    rows = launch_infer(iargs, RunFolder(work / "infer").create(), run_id="infer", reference=None,
                        save_reference=False, peak_flops=None, peak_flops_source=None, timeout_s=420)
    result["infer_bf16"] = [{k: r.get(k) for k in ("status", "reason", "workload", "batch_size", "tokens_per_s",
                                                   "output_tokens_per_s", "ttft_s", "tpot_s", "latency_p50_s",
                                                   "peak_mem_bytes")} for r in rows]

    # Parity: the debug model, fp32 and SGD, on the CPU (reference) and on the GPU.
    cpu_args = _train_args(work, preset="debug", backend="gloo", dtype="float32", compile=False, batch=8,
                           steps=5, optimizer="sgd", lr=0.05)
    cpu_row, cpu_folder = _launch(cpu_args, work, "parity-cpu", save_reference=True)
    gpu_args = dataclasses.replace(cpu_args, runtime=dataclasses.replace(cpu_args.runtime, backend="nccl"))
    gpu_row, _ = _launch(gpu_args, work, "parity-gpu", reference=cpu_folder.root / "reference.pt")
    result["parity_gpu_vs_cpu"] = {k: gpu_row.get(k) for k in ("status", "reason", "verify_status",
                                                               "verify_max_loss_rel", "verify_max_weight_rel",
                                                               "verify_tolerance")}
    compiled = result["train_bf16_compiled"]
    result["target_mfu_0.45_met"] = bool(compiled.get("mfu") and compiled["mfu"] >= 0.45)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-check-{time.strftime('%Y%m%d-%H%M')}.json"
    text = json.dumps(result, indent=1, default=str)
    path.write_text(text)
    print(text)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
