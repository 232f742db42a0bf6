"""The scaling study: every strategy x device count, one isolated torchrun each, one result row
appended as soon as each finishes, a live display while it runs, reports at the end."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from parallab.bench.launch import RunFolder, launch, new_run_id, steps_csv_path
from parallab.bench.result import add_scaling_rows, append_row
from parallab.config import (ConfigError, InferArgs, InferSweepArgs, SweepArgs, TrainArgs, config_id,
                             validate_sweep)
from parallab.metrics.live import last_step
from parallab.runtime.device import cached_cpu_peak_flops, cpu_cores
from parallab.runtime.nodes import (check_endpoint, config_launch, file_suffix, is_multinode, run_name,
                                    takes_part, writes_results)


@dataclass
class Entry:
    """One configuration of a sweep (training or inference) and what it produced so far."""
    cid: str
    args: TrainArgs | InferArgs
    state: str = "queued"
    rows: list[dict] = field(default_factory=list)
    started: float | None = None
    append: bool = True
    """False when rerun (--resume) only to recreate its reference file: its row is written already."""

    @property
    def mode(self) -> str:
        return "infer" if isinstance(self.args, InferArgs) else "train"


def prepare_run_folder(out_dir: str, run_id: str | None, *,
                       writes_results: bool = True) -> tuple[RunFolder, str]:
    """A new run folder; an existing one with results is never written into (nothing lost).
    ``writes_results=False``: a node other than node 0 of a multi-node run, which shares the
    folder (same name) and never writes results.jsonl."""
    run_id = run_id or new_run_id()
    folder = RunFolder(Path(out_dir) / run_id)
    if writes_results and folder.results.exists():
        raise ConfigError(f"run folder '{folder.root}' already holds results "
                          "(choose another runtime.run_id, or leave it unset for a new one)")
    return folder.create(), run_id


def peak_flops_for(args: TrainArgs, folder: RunFolder) -> tuple[float | None, str | None]:
    """The user's peak (runtime.peak_tflops); else the CPU peak measured once by calibration;
    GPU peaks come from the table inside the worker (it knows the GPU's name)."""
    import torch

    if args.runtime.peak_tflops:
        return args.runtime.peak_tflops * 1e12, "user: runtime.peak_tflops"
    if torch.cuda.is_available() and args.runtime.backend != "gloo":
        return None, None
    t = args.runtime.threads_per_device
    return cached_cpu_peak_flops(t, folder.cache), f"measured: fp32 matmul, {t} thread(s)"


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return format(value * scale, spec) if isinstance(value, (int, float)) else ""


@dataclass
class SweepView:
    """The live display: rebuilt on every refresh, so a running configuration shows its
    elapsed time and its newest step (from the step log its rank 0 writes) as it goes."""
    entries: list[Entry]
    title: str
    folder: RunFolder

    def __rich__(self) -> Table:
        return _render(self.entries, self.title, self.folder)


def _progress(folder: RunFolder, e: Entry) -> str:
    step = last_step(steps_csv_path(folder, e.cid))
    if step is None:
        return "starting"
    return f"step {step['step']}/{step['steps']}, {float(step['samples_per_s']):.2f} samples/s"


def _render(entries: list[Entry], title: str, folder: RunFolder) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("configuration", "workload", "state", "samples/s", "speedup", "peak MiB/dev",
                "verify", "time"):
        table.add_column(col, justify="left" if col in ("configuration", "workload", "state", "verify")
                         else "right")
    for e in entries:
        if not e.rows:
            running = e.state == "running"
            elapsed = f"{time.perf_counter() - e.started:.0f}s" if running else ""
            state = f"[yellow]running[/] {_progress(folder, e)}" if running and e.mode == "train" else \
                "[yellow]running[/]" if running else e.state
            table.add_row(e.cid, e.mode, state, "", "", "", "", elapsed)
            continue
        for r in e.rows:
            workload = "train" if r["mode"] == "train" else f"{r.get('workload')} x{r.get('batch_size')}"
            speedup = _fmt(r.get("speedup"), ".2f") + ("x (oversub.)" if r.get("oversubscribed") and
                                                       r.get("speedup") else "x" if r.get("speedup") else "")
            deviation = max((r.get(k) for k in ("verify_max_loss_rel", "verify_max_weight_rel",
                                                "verify_max_logits_rel") if r.get(k) is not None), default=None)
            verify = (r.get("verify_status") or "") + (f" ({deviation:.1e})" if deviation is not None else "")
            state = "[green]done[/]" if r["status"] == "ok" else f"[red]{r['status']}[/]"
            table.add_row(e.cid, workload, state, _fmt(r.get("samples_per_s"), ".2f"), speedup,
                          _fmt(r.get("peak_mem_bytes"), ".1f", 2**-20), verify, _fmt(r.get("wall_s"), ".0f") + "s")
    return table


def _run_one(e: Entry, folder: RunFolder, *, run_id: str, save_reference: bool, **kw) -> list[dict]:
    """Launch one configuration; its rows (training: one; inference: one per workload and batch)."""
    if e.mode == "infer":
        from parallab.infer.commands import launch_infer

        return launch_infer(e.args, folder, run_id=run_id, reference=folder.root / "reference-infer.pt",
                            save_reference=save_reference, **kw)
    return [launch(e.args, folder, run_id=run_id, reference=folder.root / "reference.pt",
                   save_reference=save_reference, **kw)]


def run_configs(entries: list[Entry], folder: RunFolder, *, run_id: str, peak_flops: float | None,
                peak_flops_source: str | None, timeout_s: float, console: Console,
                title: str) -> list[dict]:
    """Run each entry in its own torchrun. The first single-device entry of each mode saves the
    reference that mode's other entries are verified against, and its rows are the baseline of
    their speedups. Every row is appended to results.jsonl as soon as it exists."""
    baselines: dict[str, list[dict]] = {}
    out: list[dict] = []
    with Live(SweepView(entries, title, folder), console=console, refresh_per_second=2,
              transient=False) as live:
        for e in entries:
            if e.state == "finished":  # its rows are in results.jsonl already (--resume)
                if e.mode not in baselines and e.args.parallel.strategy == "single":
                    baselines[e.mode] = e.rows
                out += e.rows
                continue
            # Several nodes (runtime/nodes.py): node 0 runs every configuration, another node
            # only those that span it; only node 0 appends rows.
            rt = e.args.runtime
            if not takes_part(rt, config_launch(rt, e.args.parallel.devices, e.cid)):
                e.state = "node 0 only"
                continue
            e.state, e.started = "running", time.perf_counter()
            live.refresh()
            is_reference = e.mode not in baselines and e.args.parallel.strategy == "single"
            rows = _run_one(e, folder, run_id=run_id, save_reference=is_reference,
                            peak_flops=peak_flops, peak_flops_source=peak_flops_source, timeout_s=timeout_s)
            if is_reference:
                baselines[e.mode] = rows
            add_scaling_rows(rows, baselines.get(e.mode, []))
            if e.mode == "train":  # the planner's prediction beside the measurement (plan/predict.py)
                from parallab.plan.predict import predict_for_row

                base = (baselines.get("train") or [None])[0]
                for row in rows:
                    row.update(predict_for_row(row, base, cache_dir=folder.cache,
                                               optimizer=e.args.train.optimizer))
            for row in rows if writes_results(rt) and e.append else ():
                append_row(folder.results, row)  # written at once: a later crash loses nothing
            e.rows = rows
            bad = [r for r in rows if r["status"] not in ("ok", "does_not_fit")]
            e.state = bad[0]["status"] if bad else "ok"
            live.refresh()
            for r in bad:
                live.console.print(f"[red]{e.cid}: {r['status']}[/]: {escape(str(r['reason']))} "
                                   f"(log: {folder.root / 'logs' / (e.cid + file_suffix(rt) + '.log')})")
            out += rows
    return out


def sweep_entries(args: SweepArgs) -> list[Entry]:
    """Every configuration of the sweep, each checked before anything launches: training
    (single first), then inference (single first), as sweep.modes asks."""
    modes = args.sweep.modes
    for m in modes:
        if m not in ("train", "infer"):
            raise ConfigError(f"unknown sweep mode '{m}' in sweep.modes (valid: train, infer)")
    if not modes:
        raise ConfigError("sweep.modes is empty (give train, infer or both)")
    entries = []
    if "train" in modes:
        entries += [Entry(config_id(c), c) for c in validate_sweep(args)]
    if "infer" in modes:
        from parallab.infer.settings import infer_config_id, validate_infer_sweep

        inf = InferSweepArgs(model=args.model, parallel=args.parallel, infer=args.infer,
                             runtime=args.runtime,
                             sweep=replace(args.sweep, strategies=args.sweep.infer_strategies))
        entries += [Entry(infer_config_id(c), c) for c in validate_infer_sweep(inf)]
    return entries


def run_sweep(args: SweepArgs, *, console: Console | None = None) -> Path:
    """Run the whole sweep; returns the run folder."""
    console = console or Console()
    entries = sweep_entries(args)  # every configuration checked before anything launches
    rt = args.runtime
    if is_multinode(rt):
        check_endpoint(rt)  # one line naming the endpoint (a ConfigError), before anything starts
    from parallab.bench.resume import resume_folder, start_sweep

    if args.resume:  # parallab sweep --resume RUN_DIR: that folder, only what is missing
        folder, run_id = resume_folder(args)
    else:
        folder, run_id = prepare_run_folder(rt.out_dir, run_name(rt), writes_results=writes_results(rt))
    peak, peak_src = peak_flops_for(args, folder)  # on every node: rank 0 may run on any
    if not writes_results(rt):  # another node: run its part, node 0 writes results and reports
        console.print(f"node {rt.node_rank}: multi-node configurations of sweep {run_id}; node 0 writes "
                      "the results and reports")
        run_configs(entries, folder, run_id=run_id, peak_flops=peak, peak_flops_source=peak_src,
                    timeout_s=args.sweep.config_timeout_s, console=console,
                    title=f"parallab sweep {run_id}, node {rt.node_rank}")
        return folder.root
    lock = start_sweep(args, entries, folder)  # one sweep per folder; writes sweep.json
    try:
        title = (f"parallab sweep {run_id}: {args.model.preset}, {' + '.join(args.sweep.modes)}, training "
                 f"global batch {args.data.global_batch} ({args.data.scaling} scaling), {cpu_cores()} cores")
        run_configs(entries, folder, run_id=run_id, peak_flops=peak, peak_flops_source=peak_src,
                    timeout_s=args.sweep.config_timeout_s, console=console, title=title)
    except KeyboardInterrupt:
        print(f"parallab sweep: the finished rows are in {folder.results}; run the rest with "
              f"parallab sweep --resume {folder.root}", file=sys.stderr, flush=True)
        raise
    finally:
        lock.release()
    from parallab.report import build_reports, print_summary
    from parallab.bench.result import read_rows

    paths = build_reports(folder.root)
    print_summary(read_rows(folder.results), console=console)
    console.print(f"results: {folder.results}")
    for name, path in paths.items():
        console.print(f"{name}: {path}")
    return folder.root
