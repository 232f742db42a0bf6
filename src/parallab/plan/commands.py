"""``parallab plan`` and ``parallab bench-comm``: typed settings (parsed by tyro) and one library
function each, for the CLI's command table:

    "plan": (PlanArgs, cmd_plan, False),
    "bench-comm": (CommBenchArgs, cmd_bench_comm, False),
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from parallab.commbench import COLLECTIVES
from parallab.config import ConfigError, ModelSection
from parallab.plan.planner import STRATEGIES
from parallab.plan.profiles import PROFILE_NAMES


@dataclass
class PlanArgs:
    """Which strategy to use: memory per device and step time of every strategy and mix for a
    model on N devices of a given kind, and a recommendation (nothing is launched)."""
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="7b"))
    devices: tuple[int, ...] = (8, 64, 1024)
    """Device counts to plan for (any size: nothing runs)."""
    profile: str = "h100-sxm-nvlink"
    """Device and interconnect: h100-sxm-nvlink, h100-pcie, a100-sxm, a100-pcie, l4-pcie,
    rtx4090-pcie, or cpu-gloo-this-machine (measured here; run bench-comm for its links)."""
    device_memory: str | None = None
    """Memory per device, e.g. 80GiB or 24GB (default: the profile's)."""
    headroom: float = 0.1
    """Fraction of device memory kept free (allocator, CUDA context, fragmentation)."""
    global_batch: int = 512
    """Sequences per step over all devices (seq_len tokens each)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    mixed_precision: bool = True
    """bfloat16 with an fp32 master copy and fp32 AdamW states; false: everything in dtype
    (as parallab's trainer runs)."""
    activation_checkpointing: Literal["auto", "on", "off"] = "auto"
    """auto: try each layout with and without recomputing block activations."""
    strategies: tuple[str, ...] = STRATEGIES
    peak_flops: float | None = None
    """Peak FLOP/s per device for dtype (overrides the profile's)."""
    efficiency: float | None = None
    """Fraction of peak a training step reaches (overrides the profile's, e.g. 0.4)."""
    rate_flops: float | None = None
    """Measured FLOP/s of one device on this model (overrides peak x efficiency)."""
    baseline: str | None = None
    """A run folder or results.jsonl whose 1-device row of this model calibrates the rate."""
    bandwidth: float | None = None
    """Bus bandwidth of every link in bytes/s (overrides the profile's)."""
    latency_us: float | None = None
    """Latency of every collective in microseconds (overrides the profile's)."""
    out_dir: str = "runs"
    run_id: str | None = None
    """Folder for plan.json and plan.md under out_dir (default: plan-<timestamp>)."""
    json: bool = False
    """Print the JSON instead of the tables."""


@dataclass
class CommBenchArgs:
    """Measure all-reduce, all-gather, reduce-scatter and send/recv on this machine's devices
    (torchrun, median time, nccl-tests bus bandwidth) and fit the alpha-beta link profile the
    planner's cpu-gloo-this-machine profile uses."""
    devices: int = 2
    min_size: str = "4KiB"
    """Smallest message (the whole tensor: all-gather's output, reduce-scatter's input)."""
    max_size: str = "64MiB"
    size_factor: int = 4
    """Each size is this many times the previous one."""
    collectives: tuple[str, ...] = COLLECTIVES
    iters: int = 10
    """Timed iterations per size (the median is kept)."""
    warmup: int = 3
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    threads_per_device: int = 1
    out_dir: str = "runs"
    run_id: str | None = None
    timeout_s: float = 600.0
    update_cache: bool = True
    """Save the fit as this machine's measured links (out_dir/.cache)."""
    calibrate_model: str | None = None
    """A gpt preset (e.g. small): also measure TP's and FSDP's cost per block at its width
    (CPUs), which predictions of that model then use (docs/PLAN.md)."""
    calibrate_batch: int = 16
    """Sequences per micro-batch over the devices for calibrate_model (the sweep's global batch)."""


def _rate_from_baseline(path: str, shape, profile) -> float:
    from parallab.bench.result import read_rows
    from parallab.plan.predict import calibrated_rate

    p = Path(path)
    results = p / "results.jsonl" if p.is_dir() else p
    if not results.is_file():
        raise ConfigError(f"baseline '{path}' has no results.jsonl (give a run folder of parallab sweep or train)")
    rows = [r for r in read_rows(results) if r.get("strategy") == "single" and r.get("devices") == 1
            and r.get("status") == "ok" and r.get("preset") == shape.preset and r.get("n_params") == shape.n_params]
    if not rows:
        raise ConfigError(f"baseline '{path}' has no successful 1-device row of model {shape.preset}")
    return calibrated_rate(shape, rows[-1], profile)


def build_plan(args: PlanArgs):
    """The Plan object for ``args`` (validated; ConfigError on a bad value)."""
    from parallab.plan.planner import plan
    from parallab.plan.profiles import CPU_PROFILE, get_profile
    from parallab.plan.shapes import model_shape, parse_bytes

    if args.profile not in PROFILE_NAMES:
        raise ConfigError(f"unknown device profile '{args.profile}' (valid: {', '.join(PROFILE_NAMES)})")
    memory = parse_bytes(args.device_memory, what="device_memory") if args.device_memory else None
    shape = model_shape(args.model.name, args.model.preset, args.model.overrides())
    if args.latency_us is not None and args.latency_us < 0:
        raise ConfigError(f"latency_us={args.latency_us} must be zero or positive")
    if args.rate_flops is not None and args.rate_flops <= 0:
        raise ConfigError(f"rate_flops={args.rate_flops} must be positive (FLOP/s per device)")
    cache = Path(args.out_dir) / ".cache"
    profile = get_profile(args.profile, cache_dir=cache if args.profile == CPU_PROFILE else None,
                          peak_flops=args.peak_flops, bandwidth=args.bandwidth,
                          latency_s=args.latency_us * 1e-6 if args.latency_us is not None else None,
                          memory_bytes=memory, efficiency=args.efficiency, dtype=args.dtype)
    rate = args.rate_flops
    if rate is None and args.baseline:
        rate = _rate_from_baseline(args.baseline, shape, profile)
    ac = {"auto": None, "on": True, "off": False}[args.activation_checkpointing]
    return plan(shape, devices=list(args.devices), profile=profile, memory_bytes=memory,
                global_batch=args.global_batch, dtype=args.dtype, mixed_precision=args.mixed_precision,
                rate=rate, headroom=args.headroom, strategies=tuple(args.strategies), ac=ac)


def cmd_plan(args: PlanArgs) -> int:
    import json
    import time

    from rich.console import Console
    from rich.markup import escape

    from parallab.plan.render import rich_tables, to_json, write_outputs

    result = build_plan(args)
    folder = Path(args.out_dir) / (args.run_id or f"plan-{time.strftime('%Y%m%d-%H%M%S')}")
    paths = write_outputs(result, folder)
    if args.json:
        print(json.dumps(to_json(result), indent=1, default=str))
        return 0
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough for the table
        console = Console(width=160)
    for table in rich_tables(result):
        console.print(table)
    for n, rows in result.results.items():
        rec = result.recommended(n)
        skipped = [f"{r.strategy} ({escape(r.skipped)})" for r in rows if r.skipped and r.best is None]
        line = (f"{n} devices: [bold]{rec.strategy}[/] {escape(rec.best.layout.label.split(' ', 1)[1])}, "
                f"{rec.best.time.total_s:.3g} s/step" if rec else f"{n} devices: [red]nothing fits[/]")
        console.print(line + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
    console.print(f"profile: {result.profile.name}: {result.profile.source}")
    for name, path in paths.items():
        console.print(f"{name}: {path}")
    return 0


def cmd_bench_comm(args: CommBenchArgs) -> int:
    from parallab.commbench import run_comm_bench
    from parallab.plan.shapes import parse_bytes

    lo = parse_bytes(args.min_size, what="min_size")
    hi = parse_bytes(args.max_size, what="max_size")
    if hi < lo:
        raise ConfigError(f"max_size={args.max_size} is smaller than min_size={args.min_size}")
    if args.size_factor < 2:
        raise ConfigError(f"size_factor={args.size_factor} must be at least 2")
    if args.threads_per_device < 1:
        raise ConfigError(f"threads_per_device={args.threads_per_device} must be at least 1")
    block = None
    if args.calibrate_model is not None:
        from parallab.plan.shapes import model_shape

        try:
            shape = model_shape("gpt", args.calibrate_model)
        except ConfigError as e:
            raise ConfigError(f"calibrate_model={args.calibrate_model!r}: {e}") from None
        if args.calibrate_batch < args.devices:
            raise ConfigError(f"calibrate_batch={args.calibrate_batch} must be at least devices={args.devices} "
                              f"(a sequence per device)")
        block = (shape.d_model, shape.n_heads, shape.mlp_ratio, shape.seq_len, args.calibrate_batch)
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s *= args.size_factor
    out = run_comm_bench(devices=args.devices, sizes=tuple(sizes), collectives=tuple(args.collectives),
                         iters=args.iters, warmup=args.warmup, out_dir=args.out_dir, run_id=args.run_id,
                         backend=args.backend, threads=args.threads_per_device, timeout_s=args.timeout_s,
                         cache_dir=Path(args.out_dir) / ".cache", update_cache=args.update_cache, block=block)
    for key in ("results", "profile", "plot"):
        print(f"{key}: {out[key]}")
    return 0
