"""Training speed, side by side: parallab against a hand-written PyTorch loop, 1 and 2 devices.

    .venv/bin/python benchmarks/bench_train.py [--rounds 2] [--preset small] [--microbatches 8]

Runs parallab (through its real launcher and trainer) and benchmarks/raw_train.py alternately,
round after round, so both see the same machine noise; reports medians over rounds, the ratio
parallab / hand-written for each strategy, and the 2-device speedups. Writes a Markdown and a
JSON record under benchmarks/results/ with the machine, versions and full configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchlib import attempt, machine_ceiling, record, run_samples_per_s  # noqa: E402

# (label, parallab strategy, devices, raw mode)
CASES = [("single", "single", 1, "single"), ("ddp", "ddp", 2, "ddp"), ("fsdp", "fsdp", 2, "fsdp"),
         ("tp", "tp", 2, "tp"), ("1f1b", "pipeline", 2, "1f1b")]


def run_parallab(strategy: str, devices: int, a, out: Path) -> float:
    from parallab.bench.launch import RunFolder, launch
    from parallab.config import (DataSection, ModelSection, ParallelSection, RuntimeSection, TrainArgs,
                                 TrainSection, validate_train)

    args = TrainArgs(model=ModelSection(preset=a.preset),
                     data=DataSection(source="synthetic", global_batch=a.global_batch),
                     parallel=ParallelSection(strategy=strategy, devices=devices, microbatches=a.microbatches,
                                              schedule="1f1b"),
                     train=TrainSection(steps=a.steps, warmup_steps=a.warmup),
                     runtime=RuntimeSection(out_dir=str(out), threads_per_device=1))
    validate_train(args)
    folder = RunFolder(out / f"run-{time.monotonic_ns()}").create()
    row = launch(args, folder, run_id="bench", reference=None, save_reference=False, peak_flops=None,
                 peak_flops_source=None, timeout_s=900)
    if row["status"] != "ok":
        raise RuntimeError(f"parallab {strategy}-{devices}: {row['status']}: {row['reason']}")
    return row["samples_per_s"]


def run_raw(mode: str, devices: int, a) -> float:
    from parallab.runtime.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(HERE / "raw_train.py"),
           "--mode", mode, "--preset", a.preset, "--global-batch", str(a.global_batch),
           "--microbatches", str(a.microbatches), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    return run_samples_per_s(cmd, mode)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", nargs="*", default=[c[0] for c in CASES],
                    help="which strategies (single is always run: the speedups need it)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    from parallab.runtime.device import machine_info

    cases = [c for c in CASES if c[0] == "single" or c[0] in a.cases]
    results: dict[str, dict[str, list[float]]] = {c[0]: {"parallab": [], "raw": []} for c in cases}
    failures: list[str] = []
    ceiling = machine_ceiling()
    print(f"machine ceiling: two single-threaded processes do {ceiling:.2f}x the work of one", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for label, strategy, devices, mode in cases:
                # Alternate which goes first each round, so neither always runs on a warmer machine.
                order = [("parallab", lambda: run_parallab(strategy, devices, a, Path(tmp))),
                         ("raw", lambda: run_raw(mode, devices, a))]
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    value = attempt(fn, failures, f"round {r + 1} {label} {name}")
                    if value is None:
                        continue
                    results[label][name].append(value)
                    print(f"round {r + 1}: {label:<7} {name:<9} {value:7.2f} samples/s", flush=True)

    med = {k: {n: statistics.median(v) if v else float("nan") for n, v in d.items()} for k, d in results.items()}
    lines = ["| strategy | devices | parallab samples/s | hand-written samples/s | parallab / hand-written |",
             "|---|---|---|---|---|"]
    for label, _, devices, _ in cases:
        p, raw = med[label]["parallab"], med[label]["raw"]
        lines.append(f"| {label} | {devices} | {p:.2f} | {raw:.2f} | {p / raw:.3f} |")
    speedups = {f"{label} speedup at 2 devices": {n: med[label][n] / med["single"][n] for n in ("parallab", "raw")}
                for label, _, d, _ in cases if d == 2}
    lines += ["", "| 2-device speedup over 1 device | parallab | hand-written |", "|---|---|---|"]
    for k, v in speedups.items():
        lines.append(f"| {k.split()[0]} | {v['parallab']:.2f}x | {v['raw']:.2f}x |")
    machine = machine_info()
    config = vars(a)
    header = (f"# Training benchmark: parallab vs hand-written PyTorch\n\n"
              f"{time.strftime('%Y-%m-%d %H:%M')}, {machine['cpu_model']}, {machine['cpu_cores']} cores, "
              f"torch {machine['torch_version']}, Python {machine['python_version']}, parallab git "
              f"{machine['git_rev']}.\nConfiguration: {json.dumps(config)}; 1 thread per device, "
              f"synthetic tokens, fp32, AdamW; median over {a.rounds} alternating rounds of the median "
              f"step time of {a.steps - a.warmup} timed steps.\n\n")
    lines += ["", f"Machine ceiling measured before the runs: two independent single-threaded matmul "
              f"processes together do {ceiling:.2f}x the work of one (2.00x on two free cores); no "
              f"2-device speedup here can exceed it."]
    record(a.out, f"train-{a.preset}", header, lines, failures,
           {"machine": machine, "config": config, "rounds": results, "medians": med, "speedups": speedups,
            "machine_ceiling_2proc": ceiling})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
