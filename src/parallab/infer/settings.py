"""Validation of inference settings, configuration ids, and the per-device weight estimate the
memory-budget checks start from. Every user mistake is one ``ConfigError`` line naming the
values, raised before any process is launched."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re

from parallab.config import (DTYPES, resolve_model, INFER_STRATEGIES, INFER_WORKLOADS, ConfigError, InferArgs,
                             InferSweepArgs, check_nodes, check_writable)
from parallab.runtime.nodes import is_elastic, plan_sweep

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def parse_bytes(text: str | int | None) -> int | None:
    """'64MiB' -> 67108864; '2GB' -> 2e9; '1000' or 1000 -> 1000; None -> None."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"device_memory='{text}' is not a size (give e.g. 64MiB, 2GB or a "
                              "number of bytes)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"device_memory={text!r} must be positive")
    return value


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def parse_infer_strategy(spec: str) -> tuple[str, int | None]:
    """'single' | 'replicas' | 'tp' | 'pipeline' | 'pipeline:naive' | 'pipeline:m8'
    -> (strategy, micro-batches override)."""
    name, _, extra = spec.partition(":")
    valid = f"{', '.join(INFER_STRATEGIES)}, pipeline:naive, pipeline:m<N>"
    if name not in INFER_STRATEGIES:
        raise ConfigError(f"unknown inference strategy '{spec}' (valid: {valid})")
    if not extra:
        return name, None
    if name != "pipeline":
        raise ConfigError(f"inference strategy '{spec}': only pipeline takes ':naive' or ':m<N>'")
    if extra == "naive":
        return name, 1
    m = re.fullmatch(r"m([0-9]+)", extra)
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"inference strategy '{spec}': give pipeline:naive or pipeline:m<N> with N >= 1")
    return name, int(m.group(1))


def infer_config_id(args: InferArgs) -> str:
    """'infer-single-1', 'infer-replicas-2', 'infer-tp-4', 'infer-pipeline-m4-2',
    'infer-pipeline-naive-2' (one micro-batch)."""
    p = args.parallel
    if p.strategy == "pipeline":
        return f"infer-pipeline-{'naive' if p.microbatches == 1 else f'm{p.microbatches}'}-{p.devices}"
    return f"infer-{p.strategy}-{p.devices}"


def with_strategy(args: InferArgs, strategy: str, devices: int, microbatches: int | None) -> InferArgs:
    par = dataclasses.replace(args.parallel, strategy=strategy, devices=devices,
                              microbatches=microbatches or args.parallel.microbatches)
    return InferArgs(model=args.model, parallel=par, infer=args.infer, runtime=args.runtime)


def weight_bytes_per_device(family, cfg, strategy: str, devices: int, dtype: str) -> int:
    """Bytes of weights on the fullest device, from the model on meta (nothing allocated):
    the whole model (single, replicas), the largest stage (pipeline), or the plan's sharded
    matrices divided by the degree plus the replicated rest (tp)."""
    from parallab.models.registry import build_meta
    from parallab.parallel.parallelize import stage_plan

    meta = build_meta(family, cfg)
    size = DTYPE_BYTES[dtype]
    if strategy == "pipeline" and devices > 1:
        plan = stage_plan(family, cfg, devices)
        stages = [family.make_stage(meta, units, first=i == 0, last=i == devices - 1)
                  for i, units in enumerate(plan)]
        return max(sum(p.numel() for p in s.parameters()) for s in stages) * size
    if strategy == "tp" and devices > 1:
        patterns = list(family.tp_plan(cfg))
        total = 0
        for name, p in meta.named_parameters():
            module = name.rsplit(".", 1)[0]
            sharded = any(fnmatch.fnmatchcase(module, pat) for pat in patterns)
            total += math.ceil(p.numel() / devices) if sharded else p.numel()
        return total * size
    return sum(p.numel() for p in meta.parameters()) * size


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_infer(args: InferArgs, *, check_budget: bool = True, check_output: bool = True):
    """Check every setting of one inference run; returns the resolved model config.

    ``check_budget``: a budget below this configuration's weights per device is an error (a
    sweep turns it off: there such a point becomes a ``does_not_fit`` row instead)."""

    m, p, s, r = args.model, args.parallel, args.infer, args.runtime
    family, cfg = resolve_model(m, p, mode="infer", strategies=INFER_STRATEGIES)
    n = p.devices
    _check(p.strategy in INFER_STRATEGIES,
           f"unknown inference strategy '{p.strategy}' (valid: {', '.join(INFER_STRATEGIES)})")
    _check(n >= 1, f"devices={n} must be at least 1")
    _check(p.strategy != "single" or n == 1,
           f"strategy single runs on 1 device, not devices={n} (use replicas, pipeline or tp)")
    _check(p.strategy == "single" or n >= 2,
           f"strategy {p.strategy} needs at least 2 devices, got devices={n} (use single for 1)")
    _check(p.microbatches >= 1, f"microbatches={p.microbatches} must be at least 1")
    if p.strategy == "pipeline":
        _check(n <= cfg.n_layers, f"a pipeline of {n} stages needs at least {n} layers; "
                                  f"model {m.preset} has n_layers={cfg.n_layers}")
        _check(not getattr(cfg, "tie_embeddings", False),
               "pipeline needs untied embeddings (the first and last stage would share a "
               "weight): set model.tie_embeddings=false")
    if p.strategy == "tp":
        _check(cfg.n_heads % n == 0, f"tensor parallelism over {n} devices splits attention heads: "
                                     f"n_heads={cfg.n_heads} is not divisible by {n}")
    bad = [w for w in s.workloads if w not in INFER_WORKLOADS]
    _check(len(s.workloads) > 0 and not bad, f"infer.workloads={list(s.workloads)} must be a non-empty "
                                             f"subset of {', '.join(INFER_WORKLOADS)}")
    seq = cfg.seq_len
    if "forward" in s.workloads:
        _check(len(s.batch_sizes) > 0, "infer.batch_sizes is empty (give e.g. 1 4 16)")
        for b in s.batch_sizes:
            _check(isinstance(b, int) and b >= 1, f"batch size {b!r} in infer.batch_sizes must be an integer >= 1")
        if s.forward_len is not None:
            _check(1 <= s.forward_len <= seq, f"infer.forward_len={s.forward_len} must be in [1, the "
                                              f"model's seq_len={seq}]")
    _check(s.prompt_len >= 1, f"infer.prompt_len={s.prompt_len} must be at least 1")
    _check(s.prompt_len <= seq, f"infer.prompt_len={s.prompt_len} is longer than the model's "
                                f"context seq_len={seq}")
    _check(s.new_tokens >= 1, f"infer.new_tokens={s.new_tokens} must be at least 1 (nothing to generate)")
    _check(s.prompt_len + s.new_tokens <= seq,
           f"infer.prompt_len={s.prompt_len} + new_tokens={s.new_tokens} = "
           f"{s.prompt_len + s.new_tokens} exceeds the model's context seq_len={seq}")
    _check(s.generate_batch >= 1, f"infer.generate_batch={s.generate_batch} must be at least 1")
    _check(s.requests >= 1, f"infer.requests={s.requests} must be at least 1 (one timed repetition)")
    _check(s.warmup >= 0, f"infer.warmup={s.warmup} must be at least 0")
    _check(s.max_batch_search >= 1, f"infer.max_batch_search={s.max_batch_search} must be at least 1")
    _check(s.dtype in DTYPES, f"dtype '{s.dtype}' is not supported (valid: {', '.join(DTYPES)})")
    budget = parse_bytes(s.device_memory)
    if budget is not None and check_budget:
        need = weight_bytes_per_device(family, cfg, p.strategy, n, s.dtype)
        _check(budget >= need, f"infer.device_memory={s.device_memory} ({budget} bytes) is smaller than "
                               f"the weights alone on one device under {p.strategy} at {n} device(s) "
                               f"({need} bytes): no batch can fit (use more devices with pipeline or tp)")
    _check(r.threads_per_device >= 1, f"threads_per_device={r.threads_per_device} must be at least 1")
    check_nodes(r)  # several nodes (runtime/nodes.py): node_rank, endpoint's form, run name
    _check(not is_elastic(r), f"inference runs on a fixed number of nodes, not the elastic "
                              f"runtime.nnodes={r.nnodes} (give a count, e.g. 2)")
    _check(r.collective_timeout_s > 0, f"collective_timeout_s={r.collective_timeout_s} must be positive")
    if r.backend == "nccl":
        import torch

        _check(torch.cuda.is_available(), "backend nccl needs CUDA GPUs and none is visible (use gloo or auto)")
    if check_output:
        check_writable(r.out_dir)
    return cfg


def validate_infer_sweep(args: InferSweepArgs) -> list[InferArgs]:
    """Every configuration of an inference sweep, the single-device reference first, each
    checked; a budget no configuration can meet is an error here, one that only some miss is
    left to the run (those rows say ``does_not_fit``)."""
    from parallab.models.registry import get_family

    sw = args.sweep
    _check(len(sw.strategies) > 0, "sweep.strategies is empty (give at least one, e.g. replicas)")
    _check(len(sw.device_counts) > 0, "sweep.device_counts is empty (give e.g. 1 2 4)")
    for n in sw.device_counts:
        _check(isinstance(n, int) and n >= 1, f"device count {n!r} in sweep.device_counts must be an integer >= 1")
    _check(sw.config_timeout_s > 0, f"config_timeout_s={sw.config_timeout_s} must be positive")
    specs = [parse_infer_strategy(spec) for spec in sw.strategies]
    configs = [with_strategy(args, "single", 1, None)]
    for name, mb in specs:
        for n in sorted(set(sw.device_counts)):
            if n > 1 and name != "single":
                configs.append(with_strategy(args, name, n, mb))
    ids = [infer_config_id(c) for c in configs]
    configs = [c for i, c in enumerate(configs) if ids.index(ids[i]) == i]  # drop repeats
    cfg = None
    for c in configs:
        cfg = validate_infer(c, check_budget=False)
    budget = parse_bytes(args.infer.device_memory)
    if budget is not None:
        family = get_family(args.model.name)
        needs = {infer_config_id(c): weight_bytes_per_device(family, cfg, c.parallel.strategy,
                                                              c.parallel.devices, args.infer.dtype)
                 for c in configs}
        best = min(needs, key=needs.get)
        _check(budget >= needs[best],
               f"infer.device_memory={args.infer.device_memory} ({budget} bytes) is smaller than the "
               f"weights per device of every configuration (least: {needs[best]} bytes in {best}): "
               "no batch can fit anywhere")
    return plan_sweep(args, configs)  # several nodes: which counts run on node 0 alone, which span nodes
