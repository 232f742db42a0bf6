"""Typed settings: dataclass sections, read from a TOML file and overridden on the command line
(through tyro), and validated before any process is launched.

``validate_*`` raise ``ConfigError`` (a ``ValueError``) with one line that names the value and
what would be valid; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

STRATEGIES = ("single", "ddp", "pipeline")
SCHEDULES = ("gpipe", "1f1b")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A user's mistake in the settings: one line, the value, what would be valid."""


@dataclass
class ModelSection:
    """Which model: a family, a preset, and optional overrides of the preset's shape."""
    name: str = "gpt"
    preset: str = "small"
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    seq_len: int | None = None
    vocab_size: int | None = None
    tie_embeddings: bool | None = None

    def overrides(self) -> dict[str, Any]:
        skip = {"name", "preset"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip and v is not None}


@dataclass
class DataSection:
    """Where batches come from and how big they are."""
    source: Literal["synthetic", "text", "stdlib"] = "synthetic"
    path: str | None = None
    """Text file or folder for source=text."""
    global_batch: int = 16
    """Samples per step over all devices (strong scaling keeps it fixed)."""
    scaling: Literal["strong", "weak"] = "strong"
    """strong: the same global batch at every device count; weak: global_batch is per device."""


@dataclass
class ParallelSection:
    """How the model is spread over devices."""
    strategy: str = "single"
    devices: int = 1
    microbatches: int = 8
    """Pipeline micro-batches per step (1 = the naive layer split)."""
    schedule: str = "1f1b"


@dataclass
class TrainSection:
    steps: int = 7
    warmup_steps: int = 2
    """Steps excluded from timing (their count is reported)."""
    lr: float = 1e-3
    seed: int = 0
    dtype: str = "float32"


@dataclass
class RuntimeSection:
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    threads_per_device: int = 1
    """Intra-op threads of each CPU rank (a CPU 'device' is one process with this many threads)."""
    collective_timeout_s: float = 300.0
    """A collective that waits longer than this fails instead of hanging."""
    out_dir: str = "runs"
    run_id: str | None = None
    """Name of the run folder under out_dir (default: a timestamp)."""


@dataclass
class SweepSection:
    strategies: tuple[str, ...] = ("ddp", "pipeline:1f1b", "pipeline:naive")
    """strategy[:schedule]; schedule 'naive' = one micro-batch."""
    device_counts: tuple[int, ...] = (1, 2, 4)
    config_timeout_s: float = 900.0
    """Wall-clock limit of one configuration's torchrun."""


@dataclass
class TrainArgs:
    """One training run."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)


@dataclass
class SweepArgs(TrainArgs):
    """A scaling study: every strategy x device count, one isolated torchrun each."""
    sweep: SweepSection = field(default_factory=SweepSection)


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build a (nested) settings dataclass from plain data, refusing unknown keys."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting {where}{unknown[0]!s} (valid in {where or 'top level'}: "
                          f"{', '.join(names)})")
    kwargs = {}
    for key, value in data.items():
        f = names[key]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[key] = from_dict(sub, value, f"{where}{key}.")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def load_toml(cls: type[T], path: str | os.PathLike) -> T:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist (give a TOML file)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from None
    return from_dict(cls, data)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# ---------------------------------------------------------------- validation


def parse_strategy(spec: str) -> tuple[str, str | None, int | None]:
    """'ddp' | 'pipeline' | 'pipeline:gpipe' | 'pipeline:1f1b' | 'pipeline:naive'
    -> (strategy, schedule, microbatches override)."""
    name, _, sched = spec.partition(":")
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{spec}' (valid: {', '.join(STRATEGIES)}, "
                          f"pipeline:<{'|'.join(SCHEDULES)}|naive>)")
    if not sched:
        return name, None, None
    if name != "pipeline":
        raise ConfigError(f"strategy '{spec}': only pipeline takes a schedule after ':'")
    if sched == "naive":
        return name, "gpipe", 1
    if sched not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule '{sched}' in '{spec}' "
                          f"(valid: {', '.join(SCHEDULES)}, naive)")
    return name, sched, None


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_train(args: TrainArgs, *, check_output: bool = True):
    """Check every setting of one run; returns the resolved model config."""
    from parallab.models.registry import get_family

    m, d, p, t, r = args.model, args.data, args.parallel, args.train, args.runtime
    try:
        family = get_family(m.name)
        cfg = family.config(m.preset, m.overrides())
    except ValueError as e:
        raise ConfigError(str(e)) from None

    _check(p.strategy in STRATEGIES, f"unknown strategy '{p.strategy}' (valid: {', '.join(STRATEGIES)})")
    _check(p.devices >= 1, f"devices={p.devices} must be at least 1")
    _check(p.strategy != "single" or p.devices == 1,
           f"strategy single runs on 1 device, not devices={p.devices} (use ddp or pipeline)")
    _check(p.microbatches >= 1, f"microbatches={p.microbatches} must be at least 1")
    _check(p.schedule in SCHEDULES, f"unknown pipeline schedule '{p.schedule}' (valid: {', '.join(SCHEDULES)})")
    _check(d.global_batch >= 1, f"global_batch={d.global_batch} must be at least 1")
    if p.strategy == "pipeline":
        _check(p.devices >= 2, f"pipeline needs at least 2 devices, got devices={p.devices} "
                               "(use strategy single for 1)")
        _check(p.devices <= cfg.n_layers, f"a pipeline of {p.devices} stages needs at least {p.devices} "
                                          f"layers; model {m.preset} has n_layers={cfg.n_layers}")
        if getattr(cfg, "tie_embeddings", False):
            raise ConfigError("pipeline needs untied embeddings (the first and last stage would "
                              "share a weight): set model.tie_embeddings=false")
    batch = global_batch_for(args)
    dp = data_parallel_degree(p.strategy, p.devices)
    mb = p.microbatches if p.strategy == "pipeline" else 1
    _check(batch % (dp * mb) == 0,
           f"global batch {batch} is not divisible by data-parallel degree {dp} x micro-batches {mb} "
           f"= {dp * mb} (choose a global_batch that is a multiple of {dp * mb})")
    _check(t.steps >= 1, f"steps={t.steps} must be at least 1")
    _check(0 <= t.warmup_steps < t.steps,
           f"warmup_steps={t.warmup_steps} must be in [0, steps={t.steps}) so that a step is timed")
    _check(t.lr > 0, f"lr={t.lr} must be positive")
    _check(t.dtype in DTYPES, f"dtype '{t.dtype}' is not supported (valid: {', '.join(DTYPES)})")
    _check(r.threads_per_device >= 1, f"threads_per_device={r.threads_per_device} must be at least 1")
    _check(r.collective_timeout_s > 0, f"collective_timeout_s={r.collective_timeout_s} must be positive")
    if r.backend == "nccl":
        import torch

        _check(torch.cuda.is_available(), "backend nccl needs CUDA GPUs and none is visible (use gloo or auto)")
    from parallab.data import validate_data_source

    try:
        validate_data_source(d.source, d.path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if d.source != "synthetic" and cfg.vocab_size < 256:
        raise ConfigError(f"model vocab_size={cfg.vocab_size} is smaller than the byte tokenizer's 256 "
                          f"(needed by data source '{d.source}')")
    if check_output:
        check_writable(r.out_dir)
    return cfg


def global_batch_for(args: TrainArgs) -> int:
    """The global batch of a run: fixed (strong scaling) or per device x data-parallel degree."""
    d, p = args.data, args.parallel
    if d.scaling == "weak":
        return d.global_batch * data_parallel_degree(p.strategy, p.devices)
    return d.global_batch


def data_parallel_degree(strategy: str, devices: int) -> int:
    return devices if strategy == "ddp" else 1


def check_writable(out_dir: str) -> None:
    path = Path(out_dir)
    probe = path
    while not probe.exists():
        probe = probe.parent
    _check(probe.is_dir(), f"output folder '{out_dir}': '{probe}' is not a folder")
    _check(os.access(probe, os.W_OK | os.X_OK), f"output folder '{out_dir}' is not writable "
                                                f"(choose runtime.out_dir in a folder you can write)")


def validate_sweep(args: SweepArgs) -> list[TrainArgs]:
    """Check the sweep and every configuration it expands to; return them, baseline first."""
    s = args.sweep
    _check(len(s.strategies) > 0, "sweep.strategies is empty (give at least one, e.g. ddp)")
    _check(len(s.device_counts) > 0, "sweep.device_counts is empty (give e.g. 1 2 4)")
    for n in s.device_counts:
        _check(isinstance(n, int) and n >= 1, f"device count {n!r} in sweep.device_counts must be an integer >= 1")
    _check(s.config_timeout_s > 0, f"config_timeout_s={s.config_timeout_s} must be positive")
    specs = [parse_strategy(spec) for spec in s.strategies]
    configs = [with_parallel(args, "single", 1, None, None)]
    for name, sched, mb in specs:
        for n in sorted(set(s.device_counts)):
            if n == 1:
                continue  # the single-device run is every strategy's 1-device point
            configs.append(with_parallel(args, name, n, sched, mb))
    for c in configs:
        validate_train(c)
    return configs


def with_parallel(args: TrainArgs, strategy: str, devices: int, schedule: str | None,
                  microbatches: int | None) -> TrainArgs:
    par = dataclasses.replace(args.parallel, strategy=strategy, devices=devices,
                              schedule=schedule or args.parallel.schedule,
                              microbatches=microbatches or args.parallel.microbatches)
    return TrainArgs(model=args.model, data=args.data, parallel=par, train=args.train, runtime=args.runtime)


def config_id(args: TrainArgs) -> str:
    """A stable, readable label: 'single-1', 'ddp-2', 'pipeline-1f1b-m8-4', 'pipeline-naive-2'."""
    p = args.parallel
    if p.strategy == "pipeline":
        sched = "naive" if p.microbatches == 1 else f"{p.schedule}-m{p.microbatches}"
        return f"pipeline-{sched}-{p.devices}"
    return f"{p.strategy}-{p.devices}"
