"""Run one configuration in its own torchrun and turn whatever happens into a result row."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from parallab.bench.result import make_row
from parallab.config import TrainArgs, config_id as make_config_id, to_dict, uses_pipeline
from parallab.runtime.dist import free_port
from parallab.runtime.nodes import NodeLaunch, config_launch, file_suffix, rendezvous_failure
from parallab.worker import WorkerSpec

OOM_PATTERNS = ("CUDA out of memory", "OutOfMemoryError", "DefaultCPUAllocator: can't allocate memory")


@dataclass
class RunFolder:
    """Where one run's files live: runs/<id>/{results.jsonl, configs, logs, rows, tmp}."""
    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def cache(self) -> Path:
        return self.root.parent / ".cache"

    def create(self) -> "RunFolder":
        for sub in ("configs", "logs", "rows", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return self


def steps_csv_path(folder: RunFolder, cid: str) -> Path:
    """The per-step log of a configuration (metrics/live.py), read by the progress display."""
    return folder.root / "logs" / f"{cid}.steps.csv"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def torchrun_command(devices: int, spec_path: Path, *, port: int,
                     module: str = "parallab.worker", max_restarts: int = 0,
                     nodes: NodeLaunch | None = None) -> list[str]:
    """One node, ``devices`` worker processes, rendezvous bound to the loopback address;
    ``module`` is the worker entry (parallab.infer.worker for inference). After a worker dies
    torchrun restarts all of them up to ``max_restarts`` times (they resume from a checkpoint).
    ``nodes``: a configuration spanning several machines meets at its c10d rendezvous
    endpoint instead (runtime/nodes.py; ``port`` is then unused)."""
    if nodes is not None:
        return [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_args(),
                "--max-restarts", str(max_restarts), "-m", module, str(spec_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(devices), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--max-restarts", str(max_restarts),
            "-m", module, str(spec_path)]


def failure_reason(log_text: str, returncode: int) -> tuple[str, str]:
    """(status, one-line reason) from a failed run's log: the error of the rank torchrun saw
    fail first, or how it died (runtime/faults.py); a collective timeout has status timeout."""
    from parallab.runtime.faults import failure

    reason, timed_out = failure(log_text)
    if timed_out:
        return "timeout", reason
    if reason is None:
        tail = [l.strip() for l in log_text.splitlines() if l.strip()]
        errors = [l for l in tail if re.search(r"(Error|Exception|error:)", l)]
        reason = (errors[-1] if errors else (tail[-1] if tail else f"exit code {returncode}"))[:400]
    status = "oom" if any(p in log_text for p in OOM_PATTERNS) else "failed"
    if "DoesNotFit" in log_text:
        status = "does_not_fit"
    return status, reason


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty where /proc is not readable)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill torchrun and every worker. torchrun may start its workers in sessions of their own,
    out of reach of a signal to torchrun's group, so the tree is collected first (before the
    parent dies and its children are re-parented) and each process is killed by pid."""
    pids = _descendants(proc.pid)
    for target in (lambda: os.killpg(proc.pid, signal.SIGKILL), *(
            (lambda p=p: os.kill(p, signal.SIGKILL)) for p in pids)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def run_torchrun(cmd: list[str], *, log_path: Path, folder: RunFolder, threads: int,
                 timeout_s: float, env_extra: dict[str, str] | None = None
                 ) -> tuple[int, str, str | None, float]:
    """Run a torchrun command with its output in ``log_path``; (return code, status, reason,
    wall seconds). Status is "ok" or "timeout": the caller reads failures from the log."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TMPDIR=str(folder.root / "tmp"))
    env.update(env_extra or {})
    t0 = time.perf_counter()
    status, reason = "ok", None
    with open(log_path, "w") as log:
        # A session of its own, so a timeout ends torchrun and every worker together.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc, status, reason = -9, "timeout", f"no result within {timeout_s:.0f} s (killed)"
        except BaseException:  # Ctrl-C in the sweep: leave no worker behind
            kill_tree(proc)
            raise
    return rc, status, reason, time.perf_counter() - t0


def launch(args: TrainArgs, folder: RunFolder, *, run_id: str, reference: Path | None,
           save_reference: bool, peak_flops: float | None, peak_flops_source: str | None,
           timeout_s: float) -> dict:
    """Run ``args`` under torchrun; return its row (measured, or failed with a reason)."""
    cid = make_config_id(args)
    # Several nodes: each node's launcher its own files (".node1" ...), the run folder may be shared.
    nodes = config_launch(args.runtime, args.parallel.devices, cid)
    sfx = file_suffix(args.runtime)
    spec_path = folder.root / "configs" / f"{cid}{sfx}.json"
    result_path = folder.root / "rows" / f"{cid}{sfx}.json"
    log_path = folder.root / "logs" / f"{cid}{sfx}.log"
    result_path.unlink(missing_ok=True)
    spec = WorkerSpec(args=to_dict(args), run_id=run_id, config_id=cid, result_path=str(result_path),
                      cache_dir=str(folder.cache), reference_path=str(reference) if reference else None,
                      save_reference=save_reference, peak_flops=peak_flops,
                      peak_flops_source=peak_flops_source, steps_csv=str(steps_csv_path(folder, cid)),
                      tensorboard_dir=str(folder.root / "tensorboard" / cid) if args.runtime.tensorboard else None)
    spec.write(spec_path)
    cmd = torchrun_command(args.parallel.devices, spec_path, port=args.runtime.port or free_port(),
                           max_restarts=args.runtime.max_restarts, nodes=nodes)
    rc, status, reason, wall = run_torchrun(cmd, log_path=log_path, folder=folder,
                                            threads=args.runtime.threads_per_device, timeout_s=timeout_s,
                                            env_extra=nodes.env() if nodes else None)
    if status == "ok" and (rc != 0 or not result_path.exists()):
        log_text = log_path.read_text(errors="replace")
        status, reason = failure_reason(log_text, rc)
        if nodes is not None:
            reason = rendezvous_failure(log_text, nodes) or f"{reason} (several nodes: see each node's log)"
    last_ckpt = None
    if status != "ok":
        from parallab.train.checkpoint import checkpoint_dir_for, latest

        last_ckpt = latest(checkpoint_dir_for(args.train, folder.root, cid))
        if args.runtime.max_restarts and status != "timeout":
            reason += f"; restarts used up (runtime.max_restarts={args.runtime.max_restarts})"
        if args.train.checkpoint_every:
            reason += f"; last checkpoint: {last_ckpt}" if last_ckpt else "; no checkpoint was written"
    if status == "ok":
        import json

        row = json.loads(result_path.read_text())
        row["run_id"] = run_id  # several nodes: rank 0 may have run on a node with another folder
    else:
        p = args.parallel
        row = make_row(run_id=run_id, config_id=cid, mode="train", status=status, reason=reason,
                       strategy=p.strategy, schedule=p.schedule if uses_pipeline(p.strategy) else None,
                       devices=p.devices, nodes=nodes.max_nodes if nodes else 1,
                       threads_per_device=args.runtime.threads_per_device,
                       model=args.model.name, preset=args.model.preset, dtype=args.train.dtype,
                       data=args.data.source, global_batch=args.data.global_batch,
                       microbatches=p.microbatches if uses_pipeline(p.strategy) else 1,
                       scaling=args.data.scaling, steps=args.train.steps,
                       warmup_steps=args.train.warmup_steps,
                       last_checkpoint=str(last_ckpt) if last_ckpt else None)
        if getattr(args.runtime, "device_memory", None):
            from parallab.plan.budget import budget_bytes

            row["device_memory_budget_bytes"] = budget_bytes(args.runtime.device_memory)
            row["fits_budget"] = False if status == "does_not_fit" else None
    row["wall_s"] = wall
    return row
