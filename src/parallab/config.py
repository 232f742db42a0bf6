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

STRATEGIES = ("single", "ddp", "fsdp", "tp", "fsdp+tp", "pipeline", "pipeline+ddp")
SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "loopedbfs", "interleavedzb", "zbv", "dualpipev")
# Schedules with several stages per device (parallel.stages_per_device, 0 = this default).
MULTI_STAGE_SCHEDULES = {"interleaved1f1b": 2, "loopedbfs": 2, "interleavedzb": 2, "zbv": 2,
                         "dualpipev": 2}
# Schedules refused on gloo before launch, with the reason (observed: docs/TORCH-NOTES-parallab.md).
GLOO_UNSUPPORTED_SCHEDULES: dict[str, str] = {}
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
    entry: str | None = None
    """Model user: package.module:build or path/to/file.py:build (docs/MODELS.md)."""
    path: str | None = None
    """Model hf: a folder with config.json and *.safetensors weights, loaded by name."""
    hf_config: str | None = None
    """Models hf*: Hugging Face config keys, a JSON file or an inline JSON object."""

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
    """Pipeline schedule: gpipe, 1f1b, interleaved1f1b, interleavedzb (zero bubble), zbv."""
    stages_per_device: int = 0
    """Pipeline stages per device for interleaved1f1b / interleavedzb (zbv: exactly 2);
    0 = 2 for those, 1 for gpipe and 1f1b."""
    tp: int = 0
    """Tensor-parallel degree of fsdp+tp (0 = 2, FSDP over the rest); for tp, all devices."""
    pp: int = 0
    """Pipeline degree of pipeline+ddp (0 = 2, data parallel over the rest); for pipeline, all devices."""
    fsdp_reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (ZeRO-3-like) or keep them until
    backward (ZeRO-2-like, more memory, one all-gather fewer)."""
    sequence_parallel: bool = False
    """Tensor parallelism: also split norms and the residual stream over the sequence."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of storing them."""
    compile: bool = False
    """torch.compile each transformer block (parameter names unchanged)."""
    mesh_order: tuple[str, ...] = ()
    """Device-mesh dimensions outermost first, each of pp dp_replicate dp_shard tp once
    (empty: that default, which keeps tp and dp_shard inside a node; docs/MULTI-NODE.md)."""


@dataclass
class TrainSection:
    steps: int = 7
    warmup_steps: int = 2
    """Steps excluded from timing (their count is reported)."""
    lr: float = 1e-3
    seed: int = 0
    dtype: str = "float32"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw for training; sgd (momentum 0.9) for equivalence checks: Adam is invariant to the
    gradient's scale, so it would hide a wrong averaging factor that SGD shows."""
    checkpoint_every: int = 0
    """Save a checkpoint (torch.distributed.checkpoint) every N steps and at the end; 0 = none."""
    checkpoint_dir: str | None = None
    """Folder of the checkpoints, one sub-folder per configuration (default: <run folder>/checkpoints)."""
    checkpoint_keep: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in checkpoint_dir (needs runtime.run_id or
    train.checkpoint_dir to find it)."""
    resume_from: str | None = None
    """Continue from this checkpoint (a step-N folder, or a checkpoint folder: its newest),
    saved by any strategy at any device count (with train.resume: when the run has none yet)."""


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
    max_restarts: int = 0
    """Times torchrun restarts the workers after a rank dies (they resume from the newest
    checkpoint)."""
    port: int | None = None
    """Rendezvous port on 127.0.0.1 (default: a free one)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU, overriding the GPU table (and the CPU
    calibration); unset: the table by GPU name and dtype, or no MFU for an unknown GPU."""
    tensorboard: bool = False
    """Also write per-step metrics as TensorBoard scalars under runs/<id>/tensorboard/ (needs the
    tensorboard package; the per-step CSV in runs/<id>/logs/ is always written)."""
    # Several machines (docs/MULTI-NODE.md): the same command on every node, node_rank aside.
    nnodes: int | str = 1
    """Nodes (machines) of the run, or an elastic range MIN:MAX such as 1:4 (train only);
    above 1, the run meets at rdzv_endpoint through torchrun's c10d rendezvous."""
    node_rank: int = 0
    """This node's index, 0 .. nnodes-1; node 0 hosts the rendezvous and writes the results."""
    rdzv_endpoint: str | None = None
    """host:port of the rendezvous: node 0's address and a free port, the same on every node."""
    rdzv_id: str | None = None
    """The run's name on every node (e.g. $SLURM_JOB_ID): rendezvous id, and the run folder's
    name unless run_id is set (default: run_id)."""
    rdzv_timeout_s: float = 600.0
    """How long a node waits for the others to join before the run fails."""
    device_memory: str | None = None
    """Per-device memory budget of a training run, e.g. 24GiB or 512MiB (GiB = 2^30, GB = 10^9):
    GPUs cap their allocator at it, CPUs compare the tracked peak after the tracked warm-up step;
    over it, the run ends with status does_not_fit. Unset: no budget."""
    nproc_per_node: int = 0
    """Devices (processes) per node; 0 = the node's GPUs, or on CPUs devices / nnodes."""


@dataclass
class SweepSection:
    strategies: tuple[str, ...] = ("ddp", "pipeline:1f1b", "pipeline:naive")
    """strategy[:schedule]; schedule 'naive' = one micro-batch."""
    device_counts: tuple[int, ...] = (1, 2, 4)
    config_timeout_s: float = 900.0
    """Wall-clock limit of one configuration's torchrun."""
    modes: tuple[str, ...] = ("train", "infer")
    """What the sweep measures: training, inference or both."""
    infer_strategies: tuple[str, ...] = ("replicas", "pipeline", "pipeline:naive", "tp")
    """Strategies of the inference part (single, replicas, pipeline[:naive|:m<N>], tp)."""


@dataclass
class TrainArgs:
    """One training run."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)


# Inference (validated by parallab.infer.settings: validate_infer, validate_infer_sweep).
INFER_STRATEGIES = ("single", "replicas", "pipeline", "tp")
INFER_WORKLOADS = ("forward", "generate")


@dataclass
class InferSection:
    """What an inference run measures: batched forward passes and/or greedy KV-cache generation."""
    workloads: tuple[str, ...] = ("forward", "generate")
    """forward: batched prefill/scoring passes; generate: greedy decoding with a KV cache."""
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    """Global batch sizes of the forward workload (split over replicas)."""
    forward_len: int | None = None
    """Tokens per sample of the forward workload (default: the model's seq_len)."""
    generate_batch: int = 4
    """Prompts per generation request, over all devices."""
    prompt_len: int = 16
    new_tokens: int = 16
    requests: int = 5
    """Timed repetitions of each measurement (forward batches per batch size, generation requests)."""
    warmup: int = 1
    """Untimed repetitions before the timed ones."""
    device_memory: str | None = None
    """Per-device memory budget, e.g. 64MiB or 2GB (plain number: bytes); unset: no fit search."""
    max_batch_search: int = 1024
    """Largest batch the fit search tries (a fit there is reported as a lower bound)."""
    seed: int = 0
    dtype: str = "float32"


@dataclass
class InferArgs:
    """One inference run: parallel.strategy in single, replicas, pipeline, tp."""
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=lambda: ParallelSection(microbatches=4))
    infer: InferSection = field(default_factory=InferSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)


@dataclass
class InferSweepArgs(InferArgs):
    """Inference scaling study: every strategy x device count against one device."""
    sweep: SweepSection = field(default_factory=lambda: SweepSection(
        strategies=("replicas", "pipeline", "pipeline:naive", "tp"), device_counts=(1, 2, 4)))


@dataclass
class SweepArgs(TrainArgs):
    """A scaling study: training and inference, every strategy x device count, one isolated
    torchrun each."""
    sweep: SweepSection = field(default_factory=SweepSection)
    infer: InferSection = field(default_factory=InferSection)
    """The inference part (sweep.modes includes infer)."""
    resume: str | None = None
    """Finish an interrupted sweep: RUN_DIR's own settings (sweep.json), only the configurations
    missing from its results.jsonl."""


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
        # A factory may be a lambda giving a section with other defaults (InferArgs.parallel,
        # VerifyArgs.sweep): start from its instance and override only the given keys.
        proto = sub() if sub is not None and isinstance(value, dict) else None
        if dataclasses.is_dataclass(proto):
            parsed = from_dict(type(proto), value, f"{where}{key}.")
            kwargs[key] = dataclasses.replace(proto, **{k: getattr(parsed, k) for k in value})
        else:
            _check_type(cls, key, value, where)
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _type_ok(value, tp) -> bool:
    import types
    import typing

    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)  # a section given as a plain value
    if origin is Literal:
        return value in targs
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in targs)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, targs[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    return True  # anything else is checked by validation


def _check_type(cls, key: str, value, where: str) -> None:
    """A value from a file (TOML, JSON) must have its setting's type: a wrong one is a one-line
    ConfigError here, not a TypeError deep in validation."""
    import typing

    tp = typing.get_type_hints(cls).get(key)
    if tp is None or _type_ok(value, tp):
        return
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "unset"}
    if typing.get_origin(tp) is Literal:
        valid = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    else:
        valid = " or ".join(names.get(a, getattr(a, "__name__", str(a)))
                            for a in (typing.get_args(tp) or (tp,)))
    raise ConfigError(f"setting {where}{key} = {value!r} has the wrong type (give {valid})")


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


def uses_pipeline(strategy: str) -> bool:
    return strategy in ("pipeline", "pipeline+ddp")


def uses_tp(strategy: str) -> bool:
    return strategy in ("tp", "fsdp+tp")


def uses_fsdp(strategy: str) -> bool:
    return strategy in ("fsdp", "fsdp+tp")


def parse_strategy(spec: str) -> tuple[str, str | None, int | None]:
    """'ddp' | 'fsdp' | 'tp' | 'fsdp+tp' | 'pipeline[+ddp]' | 'pipeline[+ddp]:<schedule>' |
    'pipeline[+ddp]:naive' -> (strategy, schedule, microbatches override)."""
    name, _, sched = spec.partition(":")
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{spec}' (valid: {', '.join(STRATEGIES)}, "
                          f"pipeline:<{'|'.join(SCHEDULES)}|naive>)")
    if not sched:
        return name, None, None
    if not uses_pipeline(name):
        raise ConfigError(f"strategy '{spec}': only pipeline and pipeline+ddp take a schedule after ':'")
    if sched == "naive":
        return name, "gpipe", 1
    if sched not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule '{sched}' in '{spec}' "
                          f"(valid: {', '.join(SCHEDULES)}, naive)")
    return name, sched, None


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def resolve_model(m: ModelSection, p: ParallelSection, *, mode: str, strategies: tuple[str, ...]):
    """(family, model config) of the settings, with the family's own refusals for a known
    strategy (models/*.py); a user's mistake becomes a ConfigError."""
    from parallab.models.registry import get_family

    try:
        family = get_family(m.name)
        cfg = family.config(m.preset, m.overrides())
        if hasattr(family, "check") and p.strategy in strategies:
            family.check(cfg, mode=mode, parallel=p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return family, cfg


def validate_train(args: TrainArgs, *, check_output: bool = True):
    """Check every setting of one run; returns the resolved model config."""
    m, d, p, t, r = args.model, args.data, args.parallel, args.train, args.runtime
    family, cfg = resolve_model(m, p, mode="train", strategies=STRATEGIES)

    _check(p.strategy in STRATEGIES, f"unknown strategy '{p.strategy}' (valid: {', '.join(STRATEGIES)})")
    _check(p.devices >= 1, f"devices={p.devices} must be at least 1")
    _check(p.strategy != "single" or p.devices == 1,
           f"strategy single runs on 1 device, not devices={p.devices} (use ddp or pipeline)")
    _check(p.microbatches >= 1, f"microbatches={p.microbatches} must be at least 1")
    _check(p.schedule in SCHEDULES, f"unknown pipeline schedule '{p.schedule}' (valid: {', '.join(SCHEDULES)})")
    _check(d.global_batch >= 1, f"global_batch={d.global_batch} must be at least 1")
    validate_parallel(p, cfg, preset=m.preset, backend=r.backend)
    batch = global_batch_for(args)
    dp = data_parallel_degree(p.strategy, p.devices, tp=p.tp, pp=p.pp)
    mb = p.microbatches if uses_pipeline(p.strategy) else 1
    _check(batch % (dp * mb) == 0,
           f"global batch {batch} is not divisible by data-parallel degree {dp} x micro-batches {mb} "
           f"= {dp * mb} (choose a global_batch that is a multiple of {dp * mb})")
    _check(t.steps >= 1, f"steps={t.steps} must be at least 1")
    _check(0 <= t.warmup_steps < t.steps,
           f"warmup_steps={t.warmup_steps} must be in [0, steps={t.steps}) so that a step is timed")
    _check(t.lr > 0, f"lr={t.lr} must be positive")
    _check(t.dtype in DTYPES, f"dtype '{t.dtype}' is not supported (valid: {', '.join(DTYPES)})")
    if r.tensorboard:
        from parallab.metrics.live import tensorboard_available

        _check(tensorboard_available(), "runtime.tensorboard=true needs the tensorboard package "
                                        "(pip install tensorboard), or set runtime.tensorboard=false")
    _check(r.peak_tflops is None or r.peak_tflops > 0, f"runtime.peak_tflops={r.peak_tflops} must be positive")
    _check(r.threads_per_device >= 1, f"threads_per_device={r.threads_per_device} must be at least 1")
    check_nodes(r)
    _check(r.collective_timeout_s > 0, f"collective_timeout_s={r.collective_timeout_s} must be positive")
    if r.device_memory is not None:
        from parallab.plan.budget import budget_bytes

        budget_bytes(r.device_memory)  # ConfigError naming a zero, negative or unparsable value
    if r.backend == "nccl":
        import torch

        _check(torch.cuda.is_available(), "backend nccl needs CUDA GPUs and none is visible (use gloo or auto)")
    from parallab.data import validate_data_source

    try:
        validate_data_source(d.source, d.path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(d.source == "synthetic" or getattr(cfg, "vocab_size", None) is not None,
           f"model {m.name} makes its own synthetic batches: data.source must be synthetic, "
           f"not '{d.source}'")
    if d.source != "synthetic" and cfg.vocab_size < 256:
        raise ConfigError(f"model vocab_size={cfg.vocab_size} is smaller than the byte tokenizer's 256 "
                          f"(needed by data source '{d.source}')")
    if check_output:
        check_writable(r.out_dir)
    from parallab.preflight import check_train

    check_train(args, cfg, check_output=check_output)  # seed, checkpoints, data length, disk, port
    return cfg


def global_batch_for(args: TrainArgs) -> int:
    """The global batch of a run: fixed (strong scaling) or per device x data-parallel degree."""
    d, p = args.data, args.parallel
    if d.scaling == "weak":
        return d.global_batch * data_parallel_degree(p.strategy, p.devices, tp=p.tp, pp=p.pp)
    return d.global_batch


def parallel_dims(p: ParallelSection):
    """The run's ``ParallelDims`` (ConfigError naming every degree when they do not multiply
    to the device count). Settings for a technique the strategy does not use are ignored."""
    from parallab.parallel.dims import dims_for

    from parallab.runtime.layout import with_order

    try:
        dims = dims_for(p.strategy, p.devices, tp=p.tp if uses_tp(p.strategy) else 0,
                        pp=p.pp if uses_pipeline(p.strategy) else 0)
    except ValueError as e:
        raise ConfigError(f"strategy {p.strategy} on devices={p.devices}: {e}") from None
    try:
        return with_order(dims, p.mesh_order)  # the mesh's layout over nodes (runtime/layout.py)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_nodes(r: RuntimeSection) -> None:
    """The multi-node settings that need no network (runtime/nodes.py; the endpoint is
    checked just before launch)."""
    from parallab.runtime.nodes import check_node_settings

    check_node_settings(r)  # raises NodeError, a ConfigError


def data_parallel_degree(strategy: str, devices: int, *, tp: int = 0, pp: int = 0) -> int:
    """How many different slices of the global batch run at once."""
    if strategy not in STRATEGIES:
        return 1
    return parallel_dims(ParallelSection(strategy=strategy, devices=devices, tp=tp, pp=pp)).dp


def stages_per_device(p: ParallelSection) -> int:
    """Pipeline stages per device: the setting, or the schedule's default when it is 0."""
    if not uses_pipeline(p.strategy):
        return 1
    return p.stages_per_device or MULTI_STAGE_SCHEDULES.get(p.schedule, 1)


def resolved_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def validate_parallel(p: ParallelSection, cfg, *, preset: str, backend: str = "auto") -> None:
    """Checks of the parallel layout against the model, before any process starts."""
    _check(p.tp >= 0 and p.pp >= 0 and p.stages_per_device >= 0,
           f"parallel degrees tp={p.tp}, pp={p.pp}, stages_per_device={p.stages_per_device} "
           "must be >= 0 (0 = automatic)")
    dims = parallel_dims(p)
    if p.strategy in ("fsdp+tp", "pipeline+ddp"):
        _check(p.devices >= 2, f"{p.strategy} needs at least 2 devices, got devices={p.devices}")
    tied = getattr(cfg, "tie_embeddings", False)
    if uses_tp(p.strategy) and hasattr(cfg, "n_heads"):  # a transformer (other models: their plan)
        tp = dims.tp
        hidden = getattr(cfg, "ffn_dim", None) or cfg.d_model * cfg.mlp_ratio
        for what, value in (("n_heads", cfg.n_heads), ("d_model*mlp_ratio", hidden),
                            ("vocab_size", cfg.vocab_size)):
            _check(value % tp == 0, f"tensor parallelism over {tp} devices splits {what}={value}, "
                                    f"which is not divisible by {tp} (model {preset})")
        if p.sequence_parallel:
            _check(cfg.seq_len % tp == 0, f"sequence parallelism over {tp} devices splits "
                                          f"seq_len={cfg.seq_len}, which is not divisible by {tp}")
        _check(not tied, "tensor parallelism needs untied embeddings (the embedding and the output "
                         "layer are sharded separately): set model.tie_embeddings=false")
    if not uses_pipeline(p.strategy):
        return
    _check(p.devices >= 2, f"pipeline needs at least 2 devices, got devices={p.devices} "
                           "(use strategy single for 1)")
    spd = stages_per_device(p)
    n_stages = dims.pp * spd
    if p.schedule in ("zbv", "dualpipev"):
        _check(spd == 2, f"schedule {p.schedule} runs exactly 2 stages per device, not "
                         f"stages_per_device={spd}")
    elif p.schedule not in MULTI_STAGE_SCHEDULES:
        _check(spd == 1, f"schedule {p.schedule} runs 1 stage per device, not stages_per_device={spd} "
                         f"(use interleaved1f1b for several)")
    _check(n_stages <= cfg.n_layers,
           f"a pipeline of {dims.pp} devices x {spd} stages per device = {n_stages} stages needs at least "
           f"{n_stages} layers; model {preset} has n_layers={cfg.n_layers}")
    _check(not tied, "pipeline needs untied embeddings (the first and last stage would share a weight): "
                     "set model.tie_embeddings=false")
    mb = p.microbatches
    if p.schedule == "1f1b":
        _check(mb >= dims.pp, f"schedule 1f1b needs microbatches >= pipeline stages: "
                              f"microbatches={mb} < {dims.pp}")
    if p.schedule == "dualpipev":
        _check(mb >= n_stages, f"schedule dualpipev needs microbatches >= stages: microbatches={mb} < "
                               f"{dims.pp} devices x 2 = {n_stages}")
    if p.schedule in ("interleaved1f1b", "interleavedzb"):
        rounds = max(1, mb // dims.pp)
        _check(mb % rounds == 0, f"schedule {p.schedule} needs microbatches={mb} to be a multiple of "
                                 f"its rounds max(1, {mb} // {dims.pp} devices) = {rounds}")
    if p.schedule in GLOO_UNSUPPORTED_SCHEDULES and resolved_backend(backend) == "gloo":
        raise ConfigError(f"pipeline schedule {p.schedule} is not supported on gloo: "
                          f"{GLOO_UNSUPPORTED_SCHEDULES[p.schedule]}")


def check_writable(out_dir: str) -> None:
    """Create the output folder and a probe file in it now, before anything is launched
    (permission bits alone say nothing when running as root or on a read-only mount)."""
    import tempfile

    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".parallab-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"output folder '{out_dir}' is not writable ({e.strerror or e}); "
                          "choose runtime.out_dir in a folder you can write") from None


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
    from parallab.runtime.nodes import plan_sweep

    return plan_sweep(args, configs)  # several nodes: which counts run on node 0 alone, which span nodes


def with_parallel(args: TrainArgs, strategy: str, devices: int, schedule: str | None,
                  microbatches: int | None) -> TrainArgs:
    par = dataclasses.replace(args.parallel, strategy=strategy, devices=devices,
                              schedule=schedule or args.parallel.schedule,
                              microbatches=microbatches or args.parallel.microbatches)
    return TrainArgs(model=args.model, data=args.data, parallel=par, train=args.train, runtime=args.runtime)


def config_id(args: TrainArgs) -> str:
    """A stable, readable label: strategy, schedule, degrees of a 2-D mix (in the order of the
    strategy's name), options that differ from the defaults, device count. For example
    'single-1', 'ddp-2', 'fsdp-4', 'fsdp-zero2-4' (no reshard after forward), 'tp-sp-4'
    (sequence parallel), 'fsdp+tp-2x2-4', 'pipeline-1f1b-m8-4', 'pipeline-naive-2',
    'pipeline-interleaved1f1b-v2-m8-4' (2 stages per device), 'pipeline+ddp-1f1b-m4-2x2-4',
    'ddp-ac-2' (activation checkpointing), 'fsdp-compiled-2' (torch.compile per block)."""
    p = args.parallel
    parts = [p.strategy]
    if uses_pipeline(p.strategy):
        if p.schedule in MULTI_STAGE_SCHEDULES:
            parts.append(f"{p.schedule}-v{stages_per_device(p)}-m{p.microbatches}")
        else:
            parts.append("naive" if p.microbatches == 1 else f"{p.schedule}-m{p.microbatches}")
    if p.strategy in ("fsdp+tp", "pipeline+ddp"):
        try:
            dims = parallel_dims(p)
            parts.append(f"{dims.dp_shard}x{dims.tp}" if p.strategy == "fsdp+tp" else f"{dims.pp}x{dims.dp}")
        except ConfigError:
            parts.append(f"tp{p.tp}" if p.strategy == "fsdp+tp" else f"pp{p.pp}")
    if uses_fsdp(p.strategy) and not p.fsdp_reshard_after_forward:
        parts.append("zero2")
    if uses_tp(p.strategy) and p.sequence_parallel:
        parts.append("sp")
    if p.activation_checkpointing:
        parts.append("ac")
    if p.compile:
        parts.append("compiled")
    return "-".join(parts + [str(p.devices)])
