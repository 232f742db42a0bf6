"""Checkpoints made in one process, without torchrun, for the unit and bad-input tests: the same
layout parallab writes (DCP files, parallab.json, a `latest` pointer)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from parallab.models.gpt import GPT
from parallab.models.registry import GPT_PRESETS
from parallab.train.checkpoint import OPTIONS


def make_checkpoint(root: Path, *, step: int = 2, optimizer: str = "sgd", preset: str = "debug",
                    **overrides) -> tuple[Path, GPT]:
    """<root>/step-<step> of a debug GPT after one optimizer step; returns (folder, model)."""
    cfg = replace(GPT_PRESETS[preset], **overrides)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    state = {"model": get_model_state_dict(model, options=OPTIONS),
             "optim": get_optimizer_state_dict(model, opt, options=OPTIONS),
             "train": {"step": torch.tensor(step)}}
    step_dir = Path(root) / f"step-{step}"
    dcp.save(state, storage_writer=FileSystemWriter(step_dir), no_dist=True)
    meta = {"format": 1, "step": step, "world_size": 1, "strategy": "single", "devices": 1,
            "model": {"name": "gpt", "preset": preset, "config": asdict(cfg)},
            "optimizer": optimizer, "lr": 0.1, "seed": 0, "dtype": "float32",
            "data": {"source": "synthetic", "global_batch": 8}, "losses": [5.5] * step}
    (step_dir / "parallab.json").write_text(json.dumps(meta))
    (Path(root) / "latest").write_text(step_dir.name + "\n")
    return step_dir, model
