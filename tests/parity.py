"""Shared harness of the multi-process tests: run configurations under real torchrun (gloo),
the single-device run first as the reference, and return their result rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console

from parallab.bench.launch import RunFolder
from parallab.bench.sweep import Entry, run_configs
from parallab.config import (DataSection, ModelSection, ParallelSection, RuntimeSection, TrainArgs,
                             TrainSection, config_id, validate_train)

# A hang must fail the test, not stall CI: each configuration's torchrun is killed after this.
CONFIG_TIMEOUT_S = 240


def base_args(tmp_path: Path, *, preset: str = "debug", steps: int = 5, global_batch: int = 8,
              **model_overrides) -> TrainArgs:
    return TrainArgs(model=ModelSection(preset=preset, **model_overrides),
                     data=DataSection(source="synthetic", global_batch=global_batch),
                     parallel=ParallelSection(),
                     # SGD: it shows a wrong gradient scale that Adam would hide (see train/verify.tolerance).
                     train=TrainSection(steps=steps, warmup_steps=1, lr=0.05, seed=1234, optimizer="sgd"),
                     runtime=RuntimeSection(out_dir=str(tmp_path), collective_timeout_s=120))


def variant(base: TrainArgs, strategy: str, devices: int, **parallel) -> TrainArgs:
    par = dataclasses.replace(base.parallel, strategy=strategy, devices=devices, **parallel)
    return dataclasses.replace(base, parallel=par)


def run_against_single(tmp_path: Path, base: TrainArgs, variants: list[TrainArgs],
                       run_id: str = "parity") -> dict[str, dict]:
    """Rows by config id, the single-device reference under 'single-1'."""
    configs = [variant(base, "single", 1)] + variants
    for c in configs:
        validate_train(c)
    folder = RunFolder(tmp_path / run_id).create()
    entries = [Entry(config_id(c), c) for c in configs]
    rows = run_configs(entries, folder, run_id=run_id, peak_flops=None, peak_flops_source=None,
                       timeout_s=CONFIG_TIMEOUT_S, console=Console(quiet=True), title="parity")
    out = {}
    for row in rows:
        if row["status"] != "ok":
            log = (folder.root / "logs" / f"{row['config_id']}.log").read_text(errors="replace")
            raise AssertionError(f"{row['config_id']} {row['status']}: {row['reason']}\n{log[-3000:]}")
        out[row["config_id"]] = row
    return out


def assert_matches_single(row: dict, tolerance: float = 1e-5) -> None:
    """Per-step losses and final weights within ``tolerance`` (relative) of one device."""
    assert row["verify_status"] == "pass", (row["config_id"], row["verify_status"],
                                            row["verify_max_loss_rel"], row["verify_max_weight_rel"])
    assert row["verify_max_loss_rel"] <= tolerance, row["verify_max_loss_rel"]
    assert row["verify_max_weight_rel"] <= tolerance, row["verify_max_weight_rel"]
