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
from parallab.config import TrainArgs, config_id as make_config_id, to_dict
from parallab.runtime.dist import free_port
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


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def torchrun_command(devices: int, spec_path: Path, *, port: int) -> list[str]:
    """One node, ``devices`` worker processes, rendezvous bound to the loopback address."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(devices), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--max-restarts", "0",
            "-m", "parallab.worker", str(spec_path)]


def failure_reason(log_text: str, returncode: int) -> tuple[str, str]:
    """(status, one-line reason) from a failed run's log."""
    lines = [l for l in log_text.splitlines() if "PARALLAB-ERROR" in l]
    reason = lines[0].split("PARALLAB-ERROR", 1)[1].strip(" :") if lines else None
    if reason is None:
        tail = [l.strip() for l in log_text.splitlines() if l.strip()]
        errors = [l for l in tail if re.search(r"(Error|Exception|error:)", l)]
        reason = (errors[-1] if errors else (tail[-1] if tail else f"exit code {returncode}"))[:400]
    status = "oom" if any(p in log_text for p in OOM_PATTERNS) else "failed"
    if "DoesNotFit" in log_text:
        status = "does_not_fit"
    return status, reason


def launch(args: TrainArgs, folder: RunFolder, *, run_id: str, reference: Path | None,
           save_reference: bool, peak_flops: float | None, peak_flops_source: str | None,
           timeout_s: float) -> dict:
    """Run ``args`` under torchrun; return its row (measured, or failed with a reason)."""
    cid = make_config_id(args)
    spec_path = folder.root / "configs" / f"{cid}.json"
    result_path = folder.root / "rows" / f"{cid}.json"
    log_path = folder.root / "logs" / f"{cid}.log"
    result_path.unlink(missing_ok=True)
    spec = WorkerSpec(args=to_dict(args), run_id=run_id, config_id=cid, result_path=str(result_path),
                      cache_dir=str(folder.cache), reference_path=str(reference) if reference else None,
                      save_reference=save_reference, peak_flops=peak_flops,
                      peak_flops_source=peak_flops_source)
    spec.write(spec_path)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.runtime.threads_per_device), PYTHONUNBUFFERED="1",
               TMPDIR=str(folder.root / "tmp"))
    t0 = time.perf_counter()
    status, reason = "ok", None
    with open(log_path, "w") as log:
        # A session of its own, so a timeout can end torchrun and every worker together.
        proc = subprocess.Popen(torchrun_command(args.parallel.devices, spec_path, port=free_port()),
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status, reason = -9, "timeout", f"no result within {timeout_s:.0f} s (killed)"
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    if status == "ok" and (rc != 0 or not result_path.exists()):
        status, reason = failure_reason(log_path.read_text(errors="replace"), rc)
    if status == "ok":
        import json

        row = json.loads(result_path.read_text())
    else:
        p = args.parallel
        row = make_row(run_id=run_id, config_id=cid, mode="train", status=status, reason=reason,
                       strategy=p.strategy, schedule=p.schedule if p.strategy == "pipeline" else None,
                       devices=p.devices, nodes=1, threads_per_device=args.runtime.threads_per_device,
                       model=args.model.name, preset=args.model.preset, dtype=args.train.dtype,
                       data=args.data.source, global_batch=args.data.global_batch,
                       microbatches=p.microbatches if p.strategy == "pipeline" else 1,
                       scaling=args.data.scaling, steps=args.train.steps,
                       warmup_steps=args.train.warmup_steps)
    row["wall_s"] = wall
    return row
