"""``parallab <command>``: each command is one typed settings class (parsed by tyro from a TOML
file plus command-line overrides) and one library function.

A user's mistake ends in one line naming the value and what would be valid, exit code 2,
before any process is launched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tyro.conf import Positional

from parallab.plan.commands import CommBenchArgs, PlanArgs, cmd_bench_comm, cmd_plan
from parallab.slurm import SlurmArgs, cmd_slurm

from parallab.config import (ConfigError, InferArgs, SweepArgs, SweepSection, TrainArgs, TrainSection,
                             ModelSection, load_toml, validate_train)


@dataclass
class VerifyArgs(SweepArgs):
    """Equivalence check: every strategy x device count against one device."""
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="debug"))
    train: TrainSection = field(default_factory=lambda: TrainSection(
        steps=6, warmup_steps=1, optimizer="sgd", lr=0.05))
    sweep: SweepSection = field(default_factory=lambda: SweepSection(
        strategies=("ddp", "pipeline:gpipe", "pipeline:1f1b", "pipeline:naive"), device_counts=(2, 4)))


@dataclass
class ReportArgs:
    """Rebuild report.md, report.html and plots of a run from its results.jsonl alone."""
    run: Positional[str]
    """The run folder (runs/<id>)."""


@dataclass
class CompareArgs:
    """Two sweeps side by side (two machines, or before and after a change)."""
    run_a: Positional[str]
    run_b: Positional[str]
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
    from parallab.runtime.nodes import check_endpoint, file_suffix, plan_train, run_name, writes_results

    args = plan_train(args)  # several nodes (runtime/nodes.py): devices per node, then the endpoint
    check_endpoint(args.runtime)
    if args.runtime.nproc_per_node and args.parallel.devices > args.runtime.nproc_per_node:
        from parallab.config import parallel_dims
        from parallab.runtime.layout import describe

        per_node = args.runtime.nproc_per_node  # where each mesh dimension falls: within or across nodes
        Console().print(describe(parallel_dims(args.parallel), args.parallel.devices // per_node, per_node))
    if args.train.resume or args.train.resume_from:  # continuing: the run folder may hold results
        from parallab.bench.launch import new_run_id

        run_id = args.runtime.run_id or new_run_id()
        folder = RunFolder(Path(args.runtime.out_dir) / run_id).create()
    else:
        folder, run_id = prepare_run_folder(args.runtime.out_dir, run_name(args.runtime),
                                            writes_results=writes_results(args.runtime))
    from parallab.bench.resume import RunLock

    import contextlib

    peak, src = peak_flops_for(args, folder)
    # Several nodes may share the folder: only node 0 (the one writer) takes its lock.
    # The sweep's live view with one entry: the current step and throughput while it runs.
    from rich.live import Live

    from parallab.bench.sweep import Entry, SweepView
    from parallab.config import config_id

    entry = Entry(config_id(args), args, state="running", started=time.perf_counter())
    with RunLock(folder.root) if writes_results(args.runtime) else contextlib.nullcontext(), \
            Live(SweepView([entry], f"parallab train {run_id}", folder), refresh_per_second=2,
                 transient=True):
        row = launch(args, folder, run_id=run_id, reference=None, save_reference=False,
                     peak_flops=peak, peak_flops_source=src, timeout_s=24 * 3600)
    if writes_results(args.runtime):  # several nodes: node 0 only
        append_row(folder.results, row)
    console = Console()
    if row["status"] != "ok":
        from rich.markup import escape  # a reason may hold brackets ("[/path/pair.cc:152]")

        console.print(f"[red]{row['config_id']}: {row['status']}[/]: {escape(str(row['reason']))}\n"
                      f"log: {folder.root / 'logs' / (row['config_id'] + file_suffix(args.runtime) + '.log')}")
        return 1
    console.print(f"{row['config_id']}: {row['samples_per_s']:.2f} samples/s, "
                  f"{row['tokens_per_s']:.0f} tokens/s, step {row['step_time_median_s']:.3f} s "
                  f"(p90 {row['step_time_p90_s']:.3f} s), peak "
                  f"{'n/a' if row['peak_mem_bytes'] is None else format(row['peak_mem_bytes'] / 2**20, '.1f')} MiB/device, "
                  f"loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}")
    if not writes_results(args.runtime):
        console.print(f"node {args.runtime.node_rank}: done; node 0 writes the results")
        return 0
    console.print(f"results: {folder.results}")
    return 0


def _train_inside_torchrun(args: TrainArgs) -> int:
    """A worker inside a torchrun the user started: every rank runs the same command."""
    from parallab.config import config_id
    from parallab.worker import inside_user_torchrun, run_worker

    return inside_user_torchrun(args, config_id(args), run_worker)


def cmd_infer(args: InferArgs) -> int:
    from parallab.infer.commands import cmd_infer as run

    return run(args)


@dataclass
class ExportArgs:
    """Write a checkpoint's model weights to one plain file (any strategy, any device count)."""
    checkpoint: Positional[str]
    """A step-N checkpoint folder, or a checkpoint folder (its newest)."""
    out: Positional[str]
    """The file to write: torch.save of {parameter name: tensor}."""


def cmd_export(args: ExportArgs) -> int:
    from parallab.train.checkpoint import export

    path, info = export(args.checkpoint, args.out)
    print(f"{path}: weights of step {info['step']} ({info['model']['name']} "
          f"{info['model']['preset']}, saved by {info['strategy']} on {info['devices']} device(s)); "
          "load with torch.load(path, weights_only=True)")
    return 0


def cmd_sweep(args: SweepArgs) -> int:
    from parallab.bench.sweep import run_sweep

    run_sweep(args)
    return 0


def cmd_verify(args: VerifyArgs) -> int:
    from parallab.bench.result import read_rows
    from parallab.bench.sweep import run_sweep

    folder = run_sweep(args)
    if args.runtime.node_rank != 0:  # several nodes: node 0 holds the results and checks them
        print(f"parallab verify: node {args.runtime.node_rank}: done; node 0 checks the results")
        return 0
    rows = read_rows(folder / "results.jsonl")
    configs = sorted({r["config_id"] for r in rows})
    bad = sorted({r["config_id"] for r in rows if r["verify_status"] not in ("pass", "reference")})
    if bad:
        print(f"parallab verify: {len(bad)} of {len(configs)} configuration(s) did not match one device "
              f"(or did not run): {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"parallab verify: all {len(configs)} configurations match the single-device run")
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
    "infer": (InferArgs, cmd_infer, True),
    "verify": (VerifyArgs, cmd_verify, True),
    "env": (EnvArgs, cmd_env, False),
    "report": (ReportArgs, cmd_report, False),
    "compare": (CompareArgs, cmd_compare, False),
    "plan": (PlanArgs, cmd_plan, False),
    "bench-comm": (CommBenchArgs, cmd_bench_comm, False),
    "export": (ExportArgs, cmd_export, False),
    "slurm": (SlurmArgs, cmd_slurm, False),
}


def _usage() -> str:
    lines = ["usage: parallab <command> [--config FILE.toml] [--section.key value ...]", "", "commands:"]
    for name, (cls, _, _) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<10} {doc}")
    lines.append("\n`parallab <command> --help` lists every setting.")
    return "\n".join(lines)


def _parse(cls, args: list[str], default, *, prog: str):
    """tyro parses; its boxed error message is folded into one line (exit code 2)."""
    import contextlib
    import io

    import tyro

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(cls, args=args, default=default, prog=prog, description=cls.__doc__)
    except SystemExit as e:
        text = err.getvalue()
        if e.code in (0, None):
            sys.stderr.write(text)
            raise
        # Keep the message part of the box (before its first rule), without the drawing.
        lines = []
        for raw in text.splitlines():
            raw = raw.strip()
            if raw.startswith(("\u256d", "\u2570")):  # the box's top (title) and bottom
                continue
            line = raw.strip("\u2502 ")
            if line and set(line) <= {"\u2500", " "}:  # the rule after the message
                break
            if line:
                lines.append(line)
        message = " ".join(lines) or "invalid arguments"
        raise ConfigError(f"{message} (see {prog} --help)") from None


def main(argv: list[str] | None = None) -> int:
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
            if issubclass(cls, SweepArgs):  # --resume RUN_DIR: that sweep's own settings
                pre.add_argument("--resume", "--sweep.resume", dest="resume")
            known, rest = pre.parse_known_args(rest)
            if known.config:
                defaults = load_toml(cls, known.config)
            if getattr(known, "resume", None):
                from parallab.bench.resume import load_settings

                if known.config:
                    raise ConfigError("give --resume RUN_DIR or --config, not both (a resumed sweep "
                                      "uses the settings in RUN_DIR/sweep.json)")
                defaults = load_settings(cls, known.resume)
        settings = _parse(cls, rest, defaults, prog=f"parallab {name}")
        return func(settings)
    except ConfigError as e:
        print(f"parallab {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"parallab {name}: interrupted; every finished row is already in results.jsonl",
              file=sys.stderr)
        return 130
