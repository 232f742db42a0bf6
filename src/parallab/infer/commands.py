"""What the CLI and the sweep call for inference: launch one configuration (bench/sweep.py runs
lists of them against the single-device reference) and the ``parallab infer`` command.

Each configuration runs in its own torchrun (``python -m parallab.infer.worker``) and yields
several rows (one per workload and batch size), appended to results.jsonl as soon as it ends.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from parallab.bench.launch import RunFolder, failure_reason, run_torchrun, torchrun_command
from parallab.config import InferArgs, to_dict
from parallab.infer.rows import failed_rows
from parallab.infer.settings import infer_config_id, validate_infer
from parallab.runtime.dist import free_port
from parallab.runtime.nodes import config_launch, file_suffix, rendezvous_failure
from parallab.worker import WorkerSpec

WORKER_MODULE = "parallab.infer.worker"


def launch_infer(args: InferArgs, folder: RunFolder, *, run_id: str, reference: Path | None,
                 save_reference: bool, peak_flops: float | None, peak_flops_source: str | None,
                 timeout_s: float) -> list[dict]:
    """Run one inference configuration under torchrun; its rows (measured, does_not_fit, or
    one failed/timeout row with the reason from its log). A configuration spanning several
    nodes meets at the c10d rendezvous, as in training (bench/launch.py, runtime/nodes.py):
    this node's files get its suffix (``.node1``), and rank 0's rows reach every node."""
    cid = infer_config_id(args)
    nodes = config_launch(args.runtime, args.parallel.devices, cid)
    sfx = file_suffix(args.runtime)
    spec_path = folder.root / "configs" / f"{cid}{sfx}.json"
    result_path = folder.root / "rows" / f"{cid}{sfx}.json"
    log_path = folder.root / "logs" / f"{cid}{sfx}.log"
    result_path.unlink(missing_ok=True)
    WorkerSpec(args=to_dict(args), run_id=run_id, config_id=cid, result_path=str(result_path),
               cache_dir=str(folder.cache), reference_path=str(reference) if reference else None,
               save_reference=save_reference, peak_flops=peak_flops,
               peak_flops_source=peak_flops_source).write(spec_path)
    cmd = torchrun_command(args.parallel.devices, spec_path, port=free_port(), module=WORKER_MODULE,
                           nodes=nodes)
    rc, status, reason, wall = run_torchrun(cmd, log_path=log_path, folder=folder,
                                            threads=args.runtime.threads_per_device, timeout_s=timeout_s,
                                            env_extra=nodes.env() if nodes else None)
    if status == "ok" and (rc != 0 or not result_path.exists()):
        log_text = log_path.read_text(errors="replace")
        status, reason = failure_reason(log_text, rc)
        if nodes is not None:
            reason = rendezvous_failure(log_text, nodes) or f"{reason} (several nodes: see each node's log)"
    if status == "ok":
        rows = json.loads(result_path.read_text())
    else:
        rows = failed_rows(run_id=run_id, config_id=cid, args=args, status=status, reason=reason,
                           nodes=nodes.max_nodes if nodes else 1)
    for row in rows:
        row["run_id"] = run_id  # several nodes: rank 0 may have run on a node with another folder
        row["wall_s"] = wall
    return rows


def _title(args: InferArgs, run_id: str) -> str:
    from parallab.runtime.device import cpu_cores

    s = args.infer
    budget = f", budget {s.device_memory}/device" if s.device_memory else ""
    return (f"parallab infer {run_id}: {args.model.preset}, {'+'.join(s.workloads)}, batches "
            f"{list(s.batch_sizes)}, generate {s.generate_batch}x({s.prompt_len}+{s.new_tokens}){budget}, "
            f"{cpu_cores()} cores")


def cmd_infer(args: InferArgs) -> int:
    """`parallab infer`: one configuration (parallel.strategy x parallel.devices), in a
    torchrun of its own, or as this process's rank when already inside torchrun. On several
    nodes (docs/MULTI-NODE.md) every node runs the same command and node 0 writes the rows."""
    from parallab.bench.sweep import Entry, peak_flops_for, prepare_run_folder, run_configs
    from parallab.runtime.dist import in_torchrun
    from parallab.runtime.nodes import check_endpoint, plan_train, run_name, writes_results

    validate_infer(args)
    if in_torchrun():
        return _infer_inside_torchrun(args)
    args = plan_train(args)  # several nodes: parallel.devices = nnodes x nproc_per_node
    check_endpoint(args.runtime)
    rt = args.runtime
    folder, run_id = prepare_run_folder(rt.out_dir, run_name(rt), writes_results=writes_results(rt))
    peak, src = peak_flops_for(args, folder)  # on every node: rank 0 may run on any
    cid = infer_config_id(args)
    entries = [Entry(cid, args)]
    rows = run_configs(entries, folder, run_id=run_id, peak_flops=peak, peak_flops_source=src,
                       timeout_s=24 * 3600, console=Console(), title=_title(args, run_id))
    if writes_results(rt):
        print(f"results: {folder.results}")
    else:
        print(f"node {rt.node_rank}: done; node 0 writes the results")
    return 0 if all(r["status"] in ("ok", "does_not_fit") for r in rows) else 1


def _infer_inside_torchrun(args: InferArgs) -> int:
    """Every rank of a torchrun the user started runs the same command."""
    from parallab.infer.worker import run_infer_worker
    from parallab.worker import inside_user_torchrun

    return inside_user_torchrun(args, infer_config_id(args), run_infer_worker)
