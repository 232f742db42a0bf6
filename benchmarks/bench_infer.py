"""Inference speed, side by side: parallab against a hand-written PyTorch equivalent, 1 and 2
devices, the same total batch.

    .venv/bin/python benchmarks/bench_infer.py [--rounds 2] [--preset small] [--batch 32]

Forward passes (prefill) of the whole batch: single, replicas and the micro-batched pipeline,
for parallab (its real launcher and inference engine) and benchmarks/raw_infer.py, alternating
round after round; then greedy decoding with a KV cache on 1 device and with tensor
parallelism on 2, whose time per output token is reported against the single device's.
Writes a Markdown and a JSON record under benchmarks/results/.
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
from benchlib import attempt, record, run_samples_per_s  # noqa: E402
CASES = [("single", "single", 1), ("replicas", "replicas", 2), ("pipeline", "pipeline", 2)]


def _args(strategy: str, devices: int, a, out: Path, workload: str):
    from parallab.config import InferArgs, InferSection, ModelSection, ParallelSection, RuntimeSection

    return InferArgs(model=ModelSection(preset=a.preset),
                     parallel=ParallelSection(strategy=strategy, devices=devices, microbatches=a.microbatches),
                     infer=InferSection(workloads=(workload,), batch_sizes=(a.batch,), generate_batch=a.gen_batch,
                                        prompt_len=a.prompt_len, new_tokens=a.new_tokens, requests=a.requests),
                     runtime=RuntimeSection(out_dir=str(out)))


def run_parallab(strategy: str, devices: int, a, out: Path, workload: str = "forward") -> dict:
    from parallab.bench.launch import RunFolder
    from parallab.infer.commands import launch_infer
    from parallab.infer.settings import validate_infer

    args = _args(strategy, devices, a, out, workload)
    validate_infer(args)
    folder = RunFolder(out / f"run-{time.monotonic_ns()}").create()
    [row] = launch_infer(args, folder, run_id="bench", reference=None, save_reference=False,
                         peak_flops=None, peak_flops_source=None, timeout_s=900)
    if row["status"] != "ok":
        raise RuntimeError(f"parallab {strategy}-{devices}: {row['status']}: {row['reason']}")
    return row


def run_raw(mode: str, devices: int, a) -> float:
    from parallab.runtime.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(devices), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(HERE / "raw_infer.py"), "--mode", mode,
           "--preset", a.preset, "--batch", str(a.batch), "--microbatches", str(a.microbatches),
           "--requests", str(a.requests)]
    return run_samples_per_s(cmd, mode)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--gen-batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    from parallab.runtime.device import machine_info

    failures: list[str] = []
    results = {c[0]: {"parallab": [], "raw": []} for c in CASES}
    tpot: dict[str, list[float]] = {"single-1": [], "tp-2": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for label, strategy, devices in CASES:
                order = [("parallab", lambda: run_parallab(strategy, devices, a, Path(tmp))["samples_per_s"]),
                         ("raw", lambda: run_raw(strategy, devices, a))]
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    value = attempt(fn, failures, f"round {r + 1} forward {label} {name}")
                    if value is not None:
                        results[label][name].append(value)
                        print(f"round {r + 1}: forward {label:<9} {name:<9} {value:8.2f} samples/s", flush=True)
            for key, (strategy, devices) in {"single-1": ("single", 1), "tp-2": ("tp", 2)}.items():
                row = attempt(lambda: run_parallab(strategy, devices, a, Path(tmp), "generate"), failures,
                              f"round {r + 1} generate {key}")
                if row is not None:
                    tpot[key].append(row["tpot_s"])
                    print(f"round {r + 1}: generate {key:<9} TPOT {tpot[key][-1] * 1e3:.2f} ms", flush=True)

    def median(v):
        return statistics.median(v) if v else float("nan")

    med = {k: {n: median(v) for n, v in d.items()} for k, d in results.items()}
    tp_med = {k: median(v) for k, v in tpot.items()}
    lines = [f"| forward x{a.batch} | devices | parallab samples/s | hand-written samples/s | parallab / hand-written "
             "| parallab speedup | hand-written speedup |", "|---|---|---|---|---|---|---|"]
    for label, _, devices in CASES:
        p, raw = med[label]["parallab"], med[label]["raw"]
        lines.append(f"| {label} | {devices} | {p:.2f} | {raw:.2f} | {p / raw:.3f} | "
                     f"{p / med['single']['parallab']:.2f}x | {raw / med['single']['raw']:.2f}x |")
    lines += ["", f"Greedy decoding, {a.gen_batch} prompts of {a.prompt_len} tokens + {a.new_tokens} new: time per "
              f"output token {tp_med['single-1'] * 1e3:.2f} ms on 1 device, {tp_med['tp-2'] * 1e3:.2f} ms with "
              f"tensor parallelism on 2 ({tp_med['single-1'] / tp_med['tp-2']:.2f}x)."]
    m = machine_info()
    header = (f"# Inference benchmark: parallab vs hand-written PyTorch\n\n{time.strftime('%Y-%m-%d %H:%M')}, "
              f"{m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch_version']}, Python {m['python_version']}, "
              f"parallab git {m['git_rev']}.\nConfiguration: {json.dumps(vars(a))}; 1 thread per device, fp32; "
              f"median over {a.rounds} alternating rounds of the median of {a.requests} timed requests.\n\n")
    record(a.out, f"infer-{a.preset}", header, lines, failures,
           {"machine": m, "config": vars(a), "rounds": results, "medians": med, "tpot_s": tpot})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
