"""Checks before launch that read files or the machine (``config.validate_train`` calls
``check_train`` after its own checks): settings of checkpoints and restarts, the checkpoint a
run resumes from, a text corpus long enough for one sample, free disk space, a free
rendezvous port. Each failure is one ConfigError line naming the value and what would be valid.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

from parallab.config import ConfigError, TrainArgs, config_id

# Below this much free space in the output folder a run is refused (logs, rows, checkpoints).
# PARALLAB_MIN_FREE_BYTES overrides it (tests use a huge value to simulate a full disk).
MIN_FREE_BYTES = 16 * 2**20


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_train(args: TrainArgs, cfg, *, check_output: bool = True) -> None:
    t, r, d = args.train, args.runtime, args.data
    _check(t.seed >= 0, f"seed={t.seed} must be >= 0 (data generators take non-negative seeds)")
    _check(t.checkpoint_every >= 0, f"checkpoint_every={t.checkpoint_every} must be >= 0 "
                                    "(0 = no checkpoints, N = every N steps and at the end)")
    _check(t.checkpoint_keep >= 1, f"checkpoint_keep={t.checkpoint_keep} must be at least 1")
    _check(r.max_restarts >= 0, f"max_restarts={r.max_restarts} must be >= 0")
    if r.port is not None:
        check_port(r.port)
    if d.source == "text" and check_output:
        check_text_length(d.path, seq_len=cfg.seq_len, cache_dir=Path(r.out_dir) / ".cache")
    if t.resume or t.resume_from:
        check_resume(args, cfg)
    if check_output:
        check_free_space(args, cfg)


def check_port(port: int) -> None:
    """The rendezvous port must be valid and free on the loopback address now."""
    from parallab.runtime.dist import in_torchrun

    _check(1024 <= port <= 65535, f"port={port} is not a usable TCP port (give 1024-65535, or "
                                  "leave runtime.port unset for a free one)")
    if in_torchrun():
        return  # inside a torchrun the user started, the port is its own and already taken
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"port={port} is already in use on 127.0.0.1 (choose another "
                              "runtime.port, or leave it unset for a free one)") from None


def check_text_length(path: str, *, seq_len: int, cache_dir: Path) -> None:
    """Tokenize the corpus now (cached for the run; a binary or empty file fails here with
    the data module's message) and check it holds one sample of seq_len + 1 tokens."""
    from parallab.data import prepare_token_file

    try:
        tokens = prepare_token_file(Path(path), cache_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    n = os.path.getsize(tokens)
    _check(n >= seq_len + 1, f"data path '{path}' holds {n} tokens, fewer than seq_len+1 = "
                             f"{seq_len + 1} for one sample (give a longer text or a smaller "
                             "model.seq_len)")


def checkpoint_dir(args: TrainArgs) -> Path | None:
    """The run's checkpoint folder when it can be known before launch."""
    from parallab.train.checkpoint import checkpoint_dir_for

    if args.train.checkpoint_dir or args.runtime.run_id:
        return checkpoint_dir_for(args.train, Path(args.runtime.out_dir) / (args.runtime.run_id or ""),
                                  config_id(args))
    return None


def check_resume(args: TrainArgs, cfg) -> None:
    """The checkpoint a run continues from exists, is whole, and fits the model."""
    from parallab.models.registry import build_meta, get_family
    from parallab.train.checkpoint import latest, resolve

    t = args.train
    step_dir = None
    if t.resume:  # the run's own newest checkpoint first
        folder = checkpoint_dir(args)
        if folder is None and not t.resume_from:
            raise ConfigError("train.resume needs the run to continue: give runtime.run_id (its "
                              "folder under runtime.out_dir) or train.checkpoint_dir")
        step_dir = latest(folder) if folder is not None else None
        if step_dir is None and not t.resume_from:
            raise ConfigError(f"train.resume: no checkpoint in '{folder}' (run with "
                              "train.checkpoint_every > 0 first, or drop train.resume)")
    if step_dir is None:
        step_dir = resolve(t.resume_from)
    family = get_family(args.model.name)
    check_compatible(step_dir, model_name=args.model.name, cfg=cfg,
                     model=build_meta(family, cfg), optimizer=t.optimizer, steps=t.steps)


def check_compatible(step_dir: Path, *, model_name: str, cfg, model, optimizer: str,
                     steps: int) -> dict:
    """ConfigError (one line, the file and the mismatch) unless the checkpoint fits this run:
    the same model and vocabulary (every weight's name and shape), the same optimizer, a step
    before ``steps``. ``model`` is the whole model on the meta device."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from parallab.train.checkpoint import read_info, verify_files

    info = read_info(step_dir)
    md = verify_files(step_dir)
    saved = (info.get("model") or {}).get("config") or {}
    here = asdict(cfg)
    if saved.get("vocab_size") not in (None, here["vocab_size"]):
        raise ConfigError(f"checkpoint '{step_dir}' was saved for another vocabulary: vocab_size="
                          f"{saved['vocab_size']}, this run's model has {here['vocab_size']}")
    diff = [f"{k}={saved[k]} (this run: {here[k]})" for k in here if k in saved and saved[k] != here[k]]
    if (info.get("model") or {}).get("name", model_name) != model_name or diff:
        what = ", ".join(diff) or f"model {info['model'].get('name')} (this run: {model_name})"
        raise ConfigError(f"checkpoint '{step_dir}' was saved for another model: {what}")
    shapes = md.state_dict_metadata
    for name, p in model.state_dict().items():
        got = shapes.get(f"model.{name}")
        if not isinstance(got, TensorStorageMetadata):
            raise ConfigError(f"checkpoint '{step_dir}' was saved for another model: it has no "
                              f"weight '{name}'")
        if tuple(got.size) != tuple(p.shape) and _split_last(tuple(got.size), tuple(p.shape)):
            raise ConfigError(f"checkpoint '{step_dir}' holds {name} as {list(got.size)}, the layout "
                              "parallab's tensor parallelism wrote before checkpoints kept Hugging "
                              f"Face's {list(p.shape)} under every strategy; it cannot be resumed by "
                              "this version (resume it with the version that wrote it)")
        if tuple(got.size) != tuple(p.shape):
            raise ConfigError(f"checkpoint '{step_dir}' was saved for another model: {name} has shape "
                              f"{list(got.size)}, this run's model needs {list(p.shape)}")
    if info.get("optimizer", optimizer) != optimizer:
        raise ConfigError(f"checkpoint '{step_dir}' holds {info['optimizer']} optimizer state; this "
                          f"run uses {optimizer} (set train.optimizer={info['optimizer']})")
    if info["step"] >= steps:
        raise ConfigError(f"checkpoint '{step_dir}' is at step {info['step']}: train.steps={steps} "
                          f"leaves nothing to run (give train.steps > {info['step']})")
    return info


def _split_last(got: tuple, want: tuple) -> bool:
    """``got`` is ``want`` with its last dim split in two ([D, 3, D] for [D, 3D])."""
    return len(got) == len(want) + 1 and got[:-2] == want[:-1] and got[-2] * got[-1] == want[-1]


def _needed_bytes(args: TrainArgs, cfg) -> tuple[int, str]:
    raw = os.environ.get("PARALLAB_MIN_FREE_BYTES", str(MIN_FREE_BYTES))
    try:
        minimum = int(float(raw))
    except ValueError:
        raise ConfigError(f"PARALLAB_MIN_FREE_BYTES={raw!r} is not a number of bytes (unset it "
                          f"for the default {MIN_FREE_BYTES})") from None
    if not args.train.checkpoint_every:
        return minimum, "logs and results"
    from parallab.models.registry import build_meta, count_params, get_family

    n = count_params(build_meta(get_family(args.model.name), cfg))
    per_value = 2 if args.train.dtype == "bfloat16" else 4
    states = 2 if args.train.optimizer == "adamw" else 1
    one = n * per_value * (1 + states)
    need = one * (args.train.checkpoint_keep + 1)
    return max(minimum, need), (f"{args.train.checkpoint_keep + 1} checkpoints of "
                                f"{one / 2**20:.1f} MiB while one is written")


def check_free_space(args: TrainArgs, cfg) -> None:
    """Refuse to start in a folder too full for the run's files and checkpoints."""
    need, what = _needed_bytes(args, cfg)
    folders = [Path(args.runtime.out_dir)]
    if args.train.checkpoint_every and args.train.checkpoint_dir:
        folders.append(Path(args.train.checkpoint_dir))
    for folder in folders:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        _check(free >= need, f"output folder '{folder}' has {free / 2**20:.1f} MiB free, less "
                             f"than the {need / 2**20:.1f} MiB this run needs ({what}); free space "
                             "or choose another runtime.out_dir")
