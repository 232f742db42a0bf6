"""Checkpoints with torch.distributed.checkpoint (DCP): save every N steps and at the end,
resume exactly, reshard across strategies and device counts, export to one plain file.

A checkpoint is a folder ``step-N`` (N = steps completed = the data position, since a batch is
a pure function of (seed, step)) holding DCP's shard files and ``.metadata``, plus
``parallab.json`` (model, optimizer, loss history; plain JSON). Keys are the model's stable
parameter names (``model.layers.3.attn.wq.weight``), the optimizer state flattened per
parameter (``optim.state.<name>.exp_avg``), the step and each rank's RNG state. Every strategy
gets its state dict from ``Parallelized.model_parts`` (the unwrapped modules), so DCP reshards
between plain, DDP, FSDP2 and TP (DTensor shards) and pipeline stages (each loads its own keys).

Saving never damages the last good checkpoint: DCP writes ``step-N.tmp``, rank 0 adds
``parallab.json`` and renames it to ``step-N``, then replaces the ``latest`` pointer atomically.

A parameter that a strategy stores in another shape than the model's own (GPT-2's fused
q|k|v ``c_attn`` under tensor parallelism: [D, 3, D] instead of [D, 3D], named in the module's
``checkpoint_shapes``) is saved and loaded in the model's own shape, so the files are the same
under every strategy: each rank hands DCP its shard as the blocks it forms in that shape
(``InCheckpointShape``; a column shard of [D, 3, D] is three column blocks of [D, 3D]).

Loading executes nothing from the file: DCP's ``.metadata`` (a pickle) is read by an unpickler
that admits only DCP's metadata classes, and non-tensor items with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from parallab.config import ConfigError
from parallab.train.safe_dcp import SafeLoadPlanner, SafeReader, read_metadata

META = "parallab.json"
LATEST = "latest"
FORMAT = 1
# Resharding across pipeline stages needs the optimizer state keyed per parameter name.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# ------------------------------------------------------------------ where checkpoints are


def checkpoint_dir_for(train, run_root: Path, config_id: str) -> Path:
    """<train.checkpoint_dir or run folder/checkpoints>/<config id>: each configuration of a
    sweep in a folder of its own."""
    return Path(train.checkpoint_dir or Path(run_root) / "checkpoints") / config_id


def is_complete(step_dir: Path) -> bool:
    return (step_dir / META).is_file() and (step_dir / ".metadata").is_file()


def _steps(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for d in Path(ckpt_dir).glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and is_complete(d):
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``ckpt_dir``: the one ``latest`` names, else the
    highest complete step-N (a crash between the rename and the pointer update)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        name = (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        name = ""
    if name and "/" not in name and is_complete(ckpt_dir / name):
        return ckpt_dir / name
    steps = _steps(ckpt_dir)
    return steps[-1][1] if steps else None


def resolve(path: str | os.PathLike) -> Path:
    """The step-N folder a user means: the folder itself, or a checkpoint folder's newest."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint '{p}' does not exist (give a step-N folder or a checkpoint "
                          "folder written by parallab train)")
    if p.is_dir() and is_complete(p):
        return p
    found = latest(p) if p.is_dir() else None
    if found is None:
        raise ConfigError(f"'{p}' is not a parallab checkpoint: no {META} and .metadata in it or in "
                          "a step-N folder under it (give a folder written with train.checkpoint_every)")
    return found


def read_info(step_dir: Path) -> dict:
    """``parallab.json`` of a checkpoint; ConfigError naming the file when unreadable."""
    path = Path(step_dir) / META
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("step"), int):
            raise ValueError("no integer 'step'")
        return info
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"checkpoint '{step_dir}' is corrupt: {path.name} is unreadable ({e})") from None


def verify_files(step_dir: Path):
    """Read the index and check that every shard file holds the bytes it names (a truncated
    or missing file fails here, before any process starts). Returns DCP's metadata."""
    try:
        md = read_metadata(step_dir)
        storage = md.storage_data
    except Exception as e:  # anything a corrupt pickle raises
        raise ConfigError(f"checkpoint '{step_dir}' is corrupt: .metadata cannot be read "
                          f"({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = Path(step_dir) / rel
        have = f.stat().st_size if f.is_file() else None
        if have is None:
            raise ConfigError(f"checkpoint '{step_dir}' is incomplete: shard file {rel} is missing")
        if have < size:
            raise ConfigError(f"checkpoint '{step_dir}' is truncated: {rel} holds {have} bytes, "
                              f"its index needs {size}")
    return md


# ------------------------------------------------------------------ state of a rank


def state_module(parts: list[nn.Module]) -> nn.Module:
    """One module whose parameter names are the stable names: the part itself, or, for several
    pipeline stages on one rank, a view merging their (disjoint) module trees."""
    if len(parts) == 1:
        return parts[0]
    out = nn.Module()
    for part in parts:
        for name, p in part._parameters.items():
            if p is not None:
                out.register_parameter(name, p)
        for name, b in part._buffers.items():
            if b is not None:
                out.register_buffer(name, b, persistent=name not in part._non_persistent_buffers_set)
    names = dict.fromkeys(n for part in parts for n, m in part._modules.items() if m is not None)
    for name in names:
        kids = [part._modules[name] for part in parts if part._modules.get(name) is not None]
        out.add_module(name, kids[0] if len(kids) == 1 else state_module(kids))
    return out


def checkpoint_shapes(module: nn.Module) -> dict[str, tuple]:
    """{parameter name: shape in checkpoints} for the parameters a strategy stores in another
    shape of the same values in the same order (``checkpoint_shapes`` of their module; today
    GPT-2's c_attn under tensor parallelism, parallel/tp.py)."""
    return {f"{m}.{p}" if m else p: tuple(shape) for m, mod in module.named_modules()
            for p, shape in getattr(mod, "checkpoint_shapes", {}).items()}


class InCheckpointShape:
    """A tensor stored as [..., parts, out] (whole, or this rank's shard of a DTensor) presented
    to DCP as the [..., parts * out] tensor of the checkpoint: the same values, in the blocks
    this rank holds of that shape. A shard split on ``out`` (tensor parallelism) is ``parts``
    column blocks there, which a DTensor cannot describe (DCP takes one block per DTensor
    shard); DCP's chunk protocol (``__create_write_items__``, ``__create_chunk_list__``,
    ``__get_tensor_shard__``, as DTensor implements it) takes any number. Loading writes
    through views into the tensor itself; the planners below resolve the blocks."""

    def __init__(self, tensor: torch.Tensor, shape: tuple):
        if tensor.dim() < 2 or tuple(shape) != (*tensor.shape[:-2], tensor.shape[-2] * tensor.shape[-1]):
            raise ValueError(f"a tensor of shape {tuple(tensor.shape)} cannot be checkpointed as "
                             f"{tuple(shape)} (only [..., parts, out] as [..., parts*out])")
        self.shape, out = torch.Size(shape), tensor.shape[-1]
        if isinstance(tensor, DTensor):
            (chunk,) = tensor.__create_chunk_list__()
            offsets, self.local = tuple(chunk.offsets), tensor.to_local()
        else:
            offsets, self.local = (0,) * tensor.dim(), tensor
        *lead, o_part, o_out = offsets
        sizes = torch.Size((*self.local.shape[:-2], self.local.shape[-1]))
        # {offsets in the checkpoint's shape: (sizes, view of the local tensor)}
        self.blocks = {torch.Size((*lead, (o_part + j) * out + o_out)): (sizes, self.local[..., j, :])
                       for j in range(self.local.shape[-2]) if sizes.numel()}

    def size(self) -> torch.Size:
        return self.shape

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=o, sizes=s) for o, (s, _) in self.blocks.items()]

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        props = TensorProperties.create_from_tensor(self.local)
        return [WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=o, sizes=s),
                                                      properties=props, size=self.shape))
                for o, (s, _) in self.blocks.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.blocks[torch.Size(index.offset)][1]


class SavePlanner(DefaultSavePlanner):
    """DCP's save planner that also resolves the blocks of an ``InCheckpointShape``."""

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict.get(index.fqn)
        if isinstance(obj, InCheckpointShape):
            return obj.__get_tensor_shard__(index).contiguous()  # a strided view: its values only
        return super().lookup_object(index)


def _in_checkpoint_shape(module: nn.Module, state: dict) -> dict:
    """``state`` as DCP sees it: weights and optimizer state of a parameter stored in another
    shape (``checkpoint_shapes``) wrapped as ``InCheckpointShape``; everything else as is."""
    shapes = checkpoint_shapes(module)
    if not shapes:
        return state
    out = dict(state)
    shapes = {k: v for k, v in shapes.items() if k in state["model"]}
    out["model"] = {k: InCheckpointShape(v, shapes[k]) if k in shapes else v
                    for k, v in state["model"].items()}
    optim = dict(state["optim"])
    for name, shape in shapes.items():  # flattened: state.<name>.<exp_avg|momentum_buffer|...>
        for key, value in state["optim"].items():
            if (key.startswith(f"state.{name}.") and isinstance(value, torch.Tensor)
                    and value.shape == state["model"][name].shape):
                optim[key] = InCheckpointShape(value, shape)
    out["optim"] = optim
    return out


def _rng_state(rank: int) -> dict[str, torch.Tensor]:
    state = {f"cpu.rank{rank}": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"cuda.rank{rank}"] = torch.cuda.get_rng_state()
    return state


def _app_state(trainer) -> tuple[nn.Module, dict]:
    module = state_module(trainer.par.model_parts)
    # get_optimizer_state_dict initializes an optimizer without state by a step with zero
    # gradients and lr 0 (weights unchanged), so that loading has tensors to fill.
    return module, {"model": get_model_state_dict(module, options=OPTIONS),
                    "optim": get_optimizer_state_dict(module, trainer.optimizer, options=OPTIONS)}


def _dcp(fn, *args, **kwargs):
    """A DCP call whose failure is a RuntimeError with its first cause (DCP raises
    CheckpointException, a BaseException that ``except Exception`` would let through)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return fn(*args, **kwargs)
    except CheckpointException as e:
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        first = causes[0] if causes else e
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(first)).strip().splitlines()
        raise RuntimeError(f"{fn.__name__} of a checkpoint failed: {type(first).__name__}: "
                           f"{text[0] if text else ''}") from None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(trainer, *, step: int, ckpt_dir: Path, losses: list[float], keep: int = 2) -> Path:
    """Every rank saves its shards of the state after ``step`` completed steps; returns the
    step-N folder. ``losses``: the run's global per-step losses so far."""
    info = trainer.info
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f"step-{step}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # the torn save of an earlier attempt
        tmp.mkdir(parents=True)
    _barrier()
    module, state = _app_state(trainer)
    state["train"] = {"step": torch.tensor(step, dtype=torch.int64)}
    state["rng"] = _rng_state(info.rank)
    _dcp(dcp.save, _in_checkpoint_shape(module, state),
         storage_writer=FileSystemWriter(tmp, sync_files=True), planner=SavePlanner())
    if info.is_main:
        a = trainer.args
        meta = {"format": FORMAT, "step": step, "world_size": info.world_size,
                "strategy": a.parallel.strategy, "devices": a.parallel.devices,
                "model": {"name": a.model.name, "preset": a.model.preset, "config": asdict(trainer.cfg)},
                "optimizer": a.train.optimizer, "lr": a.train.lr, "seed": a.train.seed,
                "dtype": a.train.dtype, "data": {"source": a.data.source,
                                                 "global_batch": trainer.data.global_batch},
                "losses": list(losses), "torch_version": torch.__version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_atomic(tmp / META, json.dumps(meta, indent=1))
        old = ckpt_dir / f".step-{step}.old"
        if final.exists():  # the same step saved again after a restart
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _write_atomic(ckpt_dir / LATEST, final.name + "\n")
        _fsync_dir(ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
        prune(ckpt_dir, keep=keep, current=final)
    _barrier()
    return final


def prune(ckpt_dir: Path, *, keep: int, current: Path) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and torn ``.tmp`` folders."""
    steps = _steps(ckpt_dir)
    for _, d in steps[:-keep] if keep > 0 else []:
        if d != current:
            shutil.rmtree(d, ignore_errors=True)
    for d in ckpt_dir.glob("step-*.tmp"):
        shutil.rmtree(d, ignore_errors=True)


def load(trainer, step_dir: Path) -> dict:
    """Every rank loads its part of the state saved in ``step_dir`` (by any strategy at any
    device count; DCP reads the chunks each shard needs). Returns the checkpoint's info."""
    step_dir = Path(step_dir)
    info = read_info(step_dir)
    md = read_metadata(step_dir)
    module, state = _app_state(trainer)
    state["train"] = {"step": torch.tensor(-1, dtype=torch.int64)}
    rank, world = trainer.info.rank, trainer.info.world_size
    rng = _rng_state(rank)
    # RNG states are per rank: restored only when the layout is the one they were saved from.
    if info.get("world_size") == world and all(f"rng.{k}" in md.state_dict_metadata for k in rng):
        state["rng"] = rng
    # Through views, the blocks of InCheckpointShape fill state's own tensors.
    _dcp(dcp.load, _in_checkpoint_shape(module, state), storage_reader=SafeReader(step_dir),
         planner=SafeLoadPlanner())
    set_model_state_dict(module, state["model"], options=OPTIONS)
    set_optimizer_state_dict(module, trainer.optimizer, state["optim"], options=OPTIONS)
    for group in trainer.optimizer.param_groups:
        group["lr"] = trainer.args.train.lr  # this run's setting, not the saved one
    if "rng" in state:
        torch.set_rng_state(state["rng"][f"cpu.rank{rank}"])
        if f"cuda.rank{rank}" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"][f"cuda.rank{rank}"])
    loaded = int(state["train"]["step"])
    assert loaded == info["step"], (loaded, info["step"], step_dir)
    return info


# ------------------------------------------------------------------ a run's policy


def global_losses(trainer, local: list[float]) -> list[float]:
    """Per-step losses of the whole run from each rank's own (NaN where a pipeline stage has
    none; a data-parallel replica's loss of its slice): the average over ranks that have one,
    the same arithmetic as ``gather_measurements``."""
    losses = torch.tensor([0.0 if v != v else v for v in local], dtype=torch.float64)
    has = torch.tensor([0.0 if (local and local[0] != local[0]) else 1.0], dtype=torch.float64)
    if trainer.info.world_size > 1:
        losses, has = losses.to(trainer.info.device), has.to(trainer.info.device)
        dist.all_reduce(losses, op=dist.ReduceOp.SUM)
        dist.all_reduce(has, op=dist.ReduceOp.SUM)
        losses, has = losses.cpu(), has.cpu()
    return (losses / has.clamp(min=1)).tolist()


class Checkpointing:
    """Where a run resumes from and when it saves (inside every rank)."""

    def __init__(self, trainer, ckpt_dir: Path, *, on_save=None):
        self.trainer, self.dir, self.on_save = trainer, Path(ckpt_dir), on_save
        t = trainer.args.train
        self.every, self.keep, self.steps = t.checkpoint_every, t.checkpoint_keep, t.steps
        self.start, self.history, self.last, self.source = 0, [], None, None

    def resume(self) -> int:
        """Load the checkpoint this run continues from, if any; returns the first step to run:
        this run's own newest checkpoint after a torchrun restart or with train.resume, else
        train.resume_from."""
        from parallab.runtime.faults import restart_count

        t = self.trainer.args.train
        source = latest(self.dir) if restart_count() > 0 or t.resume else None
        if source is None and t.resume_from:
            source = resolve(t.resume_from)
        if source is None:
            return 0
        info = load(self.trainer, source)
        self.start, self.source, self.last = info["step"], source, source if source.parent == self.dir else None
        hist = [float(v) for v in (info.get("losses") or [])][: self.start]
        self.history = hist + [float("nan")] * (self.start - len(hist))
        return self.start

    def after_step(self, step: int, local_losses: list[float]) -> None:
        """Called by every rank after step index ``step``: saves after every ``every`` steps
        and after the last."""
        done = step + 1
        if not self.every or (done % self.every and done != self.steps):
            return
        if self.on_save is not None:
            self.on_save(f"checkpoint after step {done}")
        losses = self.history + global_losses(self.trainer, local_losses)
        self.last = save(self.trainer, step=done, ckpt_dir=self.dir, losses=losses, keep=self.keep)


# ------------------------------------------------------------------ export


def export(checkpoint: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, dict]:
    """Write the model weights of a checkpoint (any strategy, any device count) to one plain
    file: ``torch.save`` of {stable name: tensor}, loadable with ``torch.load(weights_only=True)``
    and ``GPT.load_state_dict`` without parallab. Returns (the file, the checkpoint's info)."""
    step_dir = resolve(checkpoint)
    info = read_info(step_dir)
    md = verify_files(step_dir)
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"export target '{out}' is a folder (give a file name, e.g. {out / 'model.pt'})")
    if not out.parent.is_dir():
        raise ConfigError(f"export target '{out}': folder '{out.parent}' does not exist")
    weights = {key[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in md.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process, as meant
            warnings.simplefilter("ignore", UserWarning)
            _dcp(dcp.load, {"model": weights}, storage_reader=SafeReader(step_dir),
                 planner=SafeLoadPlanner(), no_dist=True)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint '{step_dir}' cannot be read: {e}") from None
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        torch.save(weights, tmp)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"export target '{out}' cannot be written ({e.strerror or e})") from None
    return out, info
