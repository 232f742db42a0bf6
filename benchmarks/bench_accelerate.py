"""parallab's DDP against Hugging Face Accelerate's DDP and a hand-written DDP loop: the same
GPT, global batch and step count, 1 thread per device, alternating round after round.

    make bench-accelerate            # creates .venv-bench (the project's pins + accelerate)
    .venv-bench/bin/python benchmarks/bench_accelerate.py [--rounds 2] [--global-batch 64]

Accelerate lives in the benchmark's own environment, not in parallab's: it is only a yardstick.
On CPUs ``accelerate launch --multi_gpu`` with ACCELERATE_USE_CPU=1 is what starts real
multi-process gloo DDP (``--cpu`` alone starts one process without MPI).
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
from bench_train import run_parallab, run_raw  # noqa: E402
from benchlib import attempt, machine_ceiling, record, run_samples_per_s  # noqa: E402


def run_accelerate(devices: int, a) -> float:
    from parallab.runtime.dist import free_port

    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(devices),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(HERE / "accelerate_train.py"),
           "--preset", a.preset, "--global-batch", str(a.global_batch), "--steps", str(a.steps),
           "--warmup", str(a.warmup)]
    return run_samples_per_s(cmd, "accelerate", env={"ACCELERATE_USE_CPU": "1"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    a.microbatches = 1  # run_parallab / run_raw read it; DDP has none

    try:
        import accelerate
    except ImportError:
        print("bench_accelerate: accelerate is not installed in this environment; run "
              "`make bench-accelerate` (it creates .venv-bench)", file=sys.stderr)
        return 2
    from parallab.runtime.device import machine_info

    cases = {"single (hand-written)": lambda tmp: run_raw("single", 1, a),
             "ddp parallab": lambda tmp: run_parallab("ddp", 2, a, tmp),
             "ddp accelerate": lambda tmp: run_accelerate(2, a),
             "ddp hand-written": lambda tmp: run_raw("ddp", 2, a)}
    results: dict[str, list[float]] = {k: [] for k in cases}
    failures: list[str] = []
    ceiling = machine_ceiling()
    print(f"machine ceiling: two single-threaded processes do {ceiling:.2f}x the work of one", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            names = list(cases) if r % 2 == 0 else list(cases)[::-1]
            for name in names:
                value = attempt(lambda: cases[name](Path(tmp)), failures, f"round {r + 1} {name}")
                if value is not None:
                    results[name].append(value)
                    print(f"round {r + 1}: {name:<22} {value:7.2f} samples/s", flush=True)
    med = {k: statistics.median(v) if v else float("nan") for k, v in results.items()}
    base = med["single (hand-written)"]
    lines = ["| run | devices | samples/s | speedup over 1 device | / Accelerate |", "|---|---|---|---|---|"]
    for k, v in med.items():
        lines.append(f"| {k} | {1 if k.startswith('single') else 2} | {v:.2f} | {v / base:.2f}x | "
                     f"{v / med['ddp accelerate']:.3f} |")
    m = machine_info()
    header = (f"# DDP: parallab vs Hugging Face Accelerate vs hand-written\n\n{time.strftime('%Y-%m-%d %H:%M')}, "
            f"{m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch_version']}, accelerate "
            f"{accelerate.__version__}, parallab git {m['git_rev']}.\nConfiguration: {json.dumps(vars(a))}; "
            f"synthetic tokens, fp32, AdamW, 1 thread per device; median over {a.rounds} alternating rounds of "
            f"the median step time of {a.steps - a.warmup} timed steps. Machine ceiling (two independent "
            f"processes against one): {ceiling:.2f}x.\n\n")
    record(a.out, f"accelerate-{a.preset}", header, lines, failures,
           {"machine": m, "config": vars(a), "rounds": results, "medians": med,
            "machine_ceiling_2proc": ceiling, "accelerate": accelerate.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
