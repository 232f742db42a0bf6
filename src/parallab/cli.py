"""``parallab <command>``: each command is one typed settings class (parsed by tyro from a TOML
file plus command-line overrides) and one library function.

A user's mistake ends in one line naming the value and what would be valid, exit code 2,
before any process is launched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from parallab.config import (ConfigError, SweepArgs, SweepSection, TrainArgs, TrainSection,
                             ModelSection, load_toml, validate_train)


@dataclass
class VerifyArgs(SweepArgs):
    """Equivalence check: every strategy x device count against one device."""
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="debug"))
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=6, warmup_steps=1))
    sweep: SweepSection = field(default_factory=lambda: SweepSection(
        strategies=("ddp", "pipeline:gpipe", "pipeline:1f1b", "pipeline:naive"), device_counts=(2, 4)))


@dataclass
class ReportArgs:
    """Rebuild report.md, report.html and plots of a run from its results.jsonl alone."""
    run: str


@dataclass
class CompareArgs:
    """Two sweeps side by side (two machines, or before and after a change)."""
    run_a: str
    run_b: str
    out: str | None = None
    """Folder for the comparison (default: <run_b>/compare-<name of run_a>)."""


@dataclass
class EnvArgs:
    """The devices parallab sees, the backend it would use, versions and GPU topology."""
    json: bool = False


def cmd_env(args: EnvArgs) -> int:
    from rich.console import Console
    from rich.table import Table

    from parallab.runtime.device import describe_devices

    info = describe_devices()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    table = Table(title="parallab env", show_header=False)
    for key, value in info.items():
        if key in ("gpus", "gpu_topology"):
            continue
        table.add_row(key, str(value))
    for gpu in info["gpus"]:
        table.add_row(f"GPU {gpu['index']}", f"{gpu['name']}, {gpu['memory_gib']} GiB, "
                                             f"sm {gpu['capability']}")
    if not info["gpus"]:
        table.add_row("devices", f"{info['cpu_cores']} CPU cores: up to {info['cpu_cores']} CPU "
                                 "devices of 1 thread each without oversubscription")
    console = Console()
    console.print(table)
    if info.get("gpu_topology"):
        console.print(info["gpu_topology"])
    return 0


def cmd_train(args: TrainArgs) -> int:
    from rich.console import Console

    from parallab.bench.launch import RunFolder, launch
    from parallab.bench.result import append_row
    from parallab.bench.sweep import peak_flops_for, prepare_run_folder
    from parallab.runtime.dist import in_torchrun

    validate_train(args)
    if in_torchrun():
        return _train_inside_torchrun(args)
    folder, run_id = prepare_run_folder(args.runtime.out_dir, args.runtime.run_id)
    peak, src = peak_flops_for(args, folder)
    row = launch(args, folder, run_id=run_id, reference=None, save_reference=False,
                 peak_flops=peak, peak_flops_source=src, timeout_s=24 * 3600)
    append_row(folder.results, row)
    console = Console()
    if row["status"] != "ok":
        console.print(f"[red]{row['config_id']}: {row['status']}[/]: {row['reason']}\n"
                      f"log: {folder.root / 'logs' / (row['config_id'] + '.log')}")
        return 1
    console.print(f"{row['config_id']}: {row['samples_per_s']:.2f} samples/s, "
                  f"{row['tokens_per_s']:.0f} tokens/s, step {row['step_time_median_s']:.3f} s "
                  f"(p90 {row['step_time_p90_s']:.3f} s), peak {row['peak_mem_bytes'] / 2**20:.1f} MiB/device, "
                  f"loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}")
    console.print(f"results: {folder.results}")
    return 0


def _train_inside_torchrun(args: TrainArgs) -> int:
    """A worker inside a torchrun the user started: every rank runs the same command."""
    from parallab.bench.launch import RunFolder
    from parallab.config import config_id, to_dict
    from parallab.worker import WorkerSpec, run_worker

    run_id = args.runtime.run_id or f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    folder = RunFolder(Path(args.runtime.out_dir) / run_id).create()
    cid = config_id(args)
    spec = WorkerSpec(args=to_dict(args), run_id=run_id, config_id=cid,
                      result_path=str(folder.root / "rows" / f"{cid}.json"), cache_dir=str(folder.cache))
    rc = run_worker(spec)
    if rc == 0 and os.environ.get("RANK", "0") == "0":
        from parallab.bench.result import append_row

        append_row(folder.results, json.loads(Path(spec.result_path).read_text()))
    return rc


def cmd_sweep(args: SweepArgs) -> int:
    from parallab.bench.sweep import run_sweep

    run_sweep(args)
    return 0


def cmd_verify(args: VerifyArgs) -> int:
    from parallab.bench.result import read_rows
    from parallab.bench.sweep import run_sweep

    folder = run_sweep(args)
    rows = read_rows(folder / "results.jsonl")
    bad = [r["config_id"] for r in rows if r["verify_status"] not in ("pass", "reference")]
    if bad:
        print(f"parallab verify: {len(bad)} configuration(s) did not match one device: {', '.join(bad)}",
              file=sys.stderr)
        return 1
    print(f"parallab verify: all {len(rows) - 1} configuration(s) match the single-device run")
    return 0


def cmd_report(args: ReportArgs) -> int:
    from parallab.bench.result import read_rows
    from parallab.report import build_reports, print_summary

    run = Path(args.run)
    if not (run / "results.jsonl").is_file():
        raise ConfigError(f"run folder '{run}' has no results.jsonl (give a folder made by parallab sweep)")
    paths = build_reports(run)
    print_summary(read_rows(run / "results.jsonl"))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_compare(args: CompareArgs) -> int:
    from parallab.report import compare_runs

    for run in (args.run_a, args.run_b):
        if not (Path(run) / "results.jsonl").is_file():
            raise ConfigError(f"run folder '{run}' has no results.jsonl (give a folder made by parallab sweep)")
    out = Path(args.out) if args.out else Path(args.run_b) / f"compare-{Path(args.run_a).name}"
    paths = compare_runs(Path(args.run_a), Path(args.run_b), out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


COMMANDS: dict[str, tuple[type, Callable[..., int], bool]] = {
    # name: (settings class, function, takes --config)
    "sweep": (SweepArgs, cmd_sweep, True),
    "train": (TrainArgs, cmd_train, True),
    "verify": (VerifyArgs, cmd_verify, True),
    "env": (EnvArgs, cmd_env, False),
    "report": (ReportArgs, cmd_report, False),
    "compare": (CompareArgs, cmd_compare, False),
}


def _usage() -> str:
    lines = ["usage: parallab <command> [--config FILE.toml] [--section.key value ...]", "", "commands:"]
    for name, (cls, _, _) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<9} {doc}")
    lines.append("\n`parallab <command> --help` lists every setting.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"parallab: error: unknown command '{name}' (valid: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    cls, func, takes_config = COMMANDS[name]
    try:
        defaults = None
        if takes_config:
            defaults = cls()
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("--config")
            known, rest = pre.parse_known_args(rest)
            if known.config:
                defaults = load_toml(cls, known.config)
        settings = tyro.cli(cls, args=rest, default=defaults, prog=f"parallab {name}",
                            description=cls.__doc__)
        return func(settings)
    except ConfigError as e:
        print(f"parallab {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"parallab {name}: interrupted; every finished row is already in results.jsonl",
              file=sys.stderr)
        return 130
