"""The scaling study: every strategy x device count, one isolated torchrun each, one result row
appended as soon as each finishes, a live display while it runs, reports at the end."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from parallab.bench.launch import RunFolder, launch, new_run_id
from parallab.bench.result import add_scaling, append_row
from parallab.config import ConfigError, SweepArgs, TrainArgs, config_id, to_dict, validate_sweep
from parallab.runtime.device import cached_cpu_peak_flops, cpu_cores


@dataclass
class Entry:
    cid: str
    args: TrainArgs
    state: str = "queued"
    row: dict | None = None
    started: float | None = None


def prepare_run_folder(out_dir: str, run_id: str | None) -> tuple[RunFolder, str]:
    """A new run folder; an existing one with results is never written into (nothing lost)."""
    run_id = run_id or new_run_id()
    folder = RunFolder(Path(out_dir) / run_id)
    if folder.results.exists():
        raise ConfigError(f"run folder '{folder.root}' already holds results "
                          "(choose another runtime.run_id, or leave it unset for a new one)")
    return folder.create(), run_id


def peak_flops_for(args: TrainArgs, folder: RunFolder) -> tuple[float | None, str | None]:
    """CPU peak measured once by calibration; GPU peaks come from the table inside the worker."""
    import torch

    if torch.cuda.is_available() and args.runtime.backend != "gloo":
        return None, None
    t = args.runtime.threads_per_device
    return cached_cpu_peak_flops(t, folder.cache), f"measured: fp32 matmul, {t} thread(s)"


def _render(entries: list[Entry], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("configuration", "state", "samples/s", "speedup", "peak MiB/dev", "verify", "time"):
        table.add_column(col, justify="right" if col not in ("configuration", "state", "verify") else "left")
    for e in entries:
        r = e.row or {}
        sps = f"{r['samples_per_s']:.2f}" if r.get("samples_per_s") else ""
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        if r.get("oversubscribed"):
            sp += " (oversub.)"
        mem = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") else ""
        verify = r.get("verify_status") or ""
        if r.get("verify_max_weight_rel") is not None:
            verify += f" ({max(r['verify_max_weight_rel'], r['verify_max_loss_rel']):.1e})"
        if e.state == "running":
            elapsed = f"{time.perf_counter() - e.started:.0f}s"
        else:
            elapsed = f"{r['wall_s']:.0f}s" if r.get("wall_s") else ""
        state = {"ok": "[green]done[/]", "running": "[yellow]running[/]", "queued": "queued"}.get(
            e.state, f"[red]{e.state}[/]")
        table.add_row(e.cid, state, sps, sp, mem, verify, elapsed)
    return table


def run_configs(entries: list[Entry], folder: RunFolder, *, run_id: str, peak_flops: float | None,
                peak_flops_source: str | None, timeout_s: float, console: Console,
                title: str) -> list[dict]:
    """Run each entry in its own torchrun, the first (the single-device run) saving the
    reference the others are verified against; append each row as soon as it exists."""
    reference = folder.root / "reference.pt"
    baseline = None
    with Live(_render(entries, title), console=console, refresh_per_second=2, transient=False) as live:
        for i, e in enumerate(entries):
            e.state, e.started = "running", time.perf_counter()
            live.update(_render(entries, title))
            row = launch(e.args, folder, run_id=run_id, reference=reference, save_reference=i == 0,
                         peak_flops=peak_flops, peak_flops_source=peak_flops_source, timeout_s=timeout_s)
            if i == 0 and row["status"] == "ok":
                baseline = row
            add_scaling(row, baseline)
            append_row(folder.results, row)  # written at once: a later crash loses nothing
            e.row, e.state = row, row["status"]
            live.update(_render(entries, title))
            if row["status"] != "ok":
                live.console.print(f"[red]{e.cid}: {row['status']}[/]: {row['reason']} "
                                   f"(log: {folder.root / 'logs' / (e.cid + '.log')})")
    return [e.row for e in entries]


def run_sweep(args: SweepArgs, *, console: Console | None = None) -> Path:
    """Run the whole sweep; returns the run folder."""
    console = console or Console()
    configs = validate_sweep(args)  # every configuration checked before anything launches
    folder, run_id = prepare_run_folder(args.runtime.out_dir, args.runtime.run_id)
    (folder.root / "sweep.json").write_text(json.dumps(to_dict(args), indent=1))
    peak, peak_src = peak_flops_for(args, folder)
    entries = [Entry(config_id(c), c) for c in configs]
    title = (f"parallab sweep {run_id}: {args.model.preset}, global batch {args.data.global_batch} "
             f"({args.data.scaling} scaling), {cpu_cores()} cores")
    run_configs(entries, folder, run_id=run_id, peak_flops=peak, peak_flops_source=peak_src,
                timeout_s=args.sweep.config_timeout_s, console=console, title=title)
    from parallab.report import build_reports, print_summary
    from parallab.bench.result import read_rows

    paths = build_reports(folder.root)
    print_summary(read_rows(folder.results), console=console)
    console.print(f"results: {folder.results}")
    for name, path in paths.items():
        console.print(f"{name}: {path}")
    return folder.root
