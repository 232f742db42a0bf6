"""Entry point of every rank: ``python -m parallab.worker SPEC.json`` under torchrun.

The spec is plain JSON written by the launcher (never a pickle); rank 0 writes the result row
as JSON next to it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from parallab.config import TrainArgs, from_dict


@dataclass
class WorkerSpec:
    args: dict
    run_id: str
    config_id: str
    result_path: str
    cache_dir: str
    reference_path: str | None = None
    save_reference: bool = False
    peak_flops: float | None = None
    peak_flops_source: str | None = None
    steps_csv: str | None = None
    """Where rank 0 logs each step as it ends (metrics/live.py)."""
    tensorboard_dir: str | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "WorkerSpec":
        return cls(**json.loads(Path(path).read_text()))


def start_rank(args):
    """Join the process group torchrun prepared; check it has the configured size. CPU ranks
    use deterministic kernels (exact resume and bitwise-repeatable references)."""
    import torch

    from parallab.runtime.dist import init_distributed

    info = init_distributed(backend=args.runtime.backend, timeout_s=args.runtime.collective_timeout_s,
                            threads=args.runtime.threads_per_device)
    if info.world_size != args.parallel.devices:
        from parallab.runtime.dist import shutdown

        shutdown()
        raise ValueError(f"parallel.devices={args.parallel.devices} but torchrun started "
                         f"{info.world_size} processes")
    torch.use_deterministic_algorithms(info.device.type == "cpu", warn_only=True)
    return info


def write_result(spec: WorkerSpec, result, info):
    """Write rank 0's ``result`` (a training row, or an inference run's list of rows) to the
    spec's result path; every rank calls this and gets it back. On several nodes rank 0's
    result goes to the first worker of every node, which writes it into its own node's run
    folder; node 0's launcher appends it (runtime/nodes.py)."""
    from parallab.runtime.nodes import share_from_rank0, writes_row_file

    result = share_from_rank0(result)
    if writes_row_file(info.rank, info.local_rank):
        tmp = Path(spec.result_path + ".tmp")
        tmp.write_text(json.dumps(result, default=str))
        os.replace(tmp, spec.result_path)
    return result


def inside_user_torchrun(args, cid: str, run) -> int:
    """Run as a rank of a torchrun the user started (every rank runs the same command): the
    same spec a launcher would write; rank 0 appends the row(s) to the run's results."""
    from parallab.bench.launch import RunFolder
    from parallab.bench.result import append_row
    from parallab.config import to_dict

    run_id = args.runtime.run_id or f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    folder = RunFolder(Path(args.runtime.out_dir) / run_id).create()
    spec = WorkerSpec(args=to_dict(args), run_id=run_id, config_id=cid,
                      result_path=str(folder.root / "rows" / f"{cid}.json"), cache_dir=str(folder.cache))
    rc = run(spec)
    if rc == 0 and os.environ.get("RANK", "0") == "0":
        result = json.loads(Path(spec.result_path).read_text())
        for row in result if isinstance(result, list) else [result]:
            append_row(folder.results, row)
    return rc


def run_worker(spec: WorkerSpec) -> int:
    from parallab.metrics.processor import train_row
    from parallab.runtime.device import gpu_peak_flops, machine_info
    from parallab.runtime.dist import get_logger, shutdown
    from parallab.runtime.faults import ProgressBoard, restart_count
    from parallab.runtime.nodes import REFERENCE_NOT_SHARED, gather_hosts, reference_where
    from parallab.train.checkpoint import Checkpointing, checkpoint_dir_for
    from parallab.train.trainer import Trainer, gather_measurements
    from parallab.train.verify import compare_to_reference, save_reference, tolerance

    args = from_dict(TrainArgs, spec.args)
    info = start_rank(args)
    log = get_logger()
    try:
        trainer = Trainer.build(args, info, cache_dir=Path(spec.cache_dir))
        log.info("%s: %s, %d parameters, %d device(s), %s", spec.config_id, args.model.preset,
                 trainer.n_params, info.world_size, info.backend)
        # Reliability (train/checkpoint.py, runtime/faults.py): resume, checkpoints, and a
        # progress board that names the operation and the ranks when a collective times out.
        board = ProgressBoard.for_trainer(trainer)
        ckpt = Checkpointing(trainer, checkpoint_dir_for(args.train, Path(spec.result_path).parent.parent,
                                                         spec.config_id), on_save=board.post)
        board.post("resume")
        start = ckpt.resume()
        if start:
            log.info("%s: resumed from %s at step %d", spec.config_id, ckpt.source, start)
        if info.is_main and spec.steps_csv:
            from parallab.metrics.live import StepLog

            trainer.step_log = StepLog(
                Path(spec.steps_csv), steps=args.train.steps, samples_per_step=trainer.data.global_batch,
                tokens_per_step=trainer.data.global_batch * trainer.cfg.seq_len,
                tensorboard_dir=Path(spec.tensorboard_dir) if spec.tensorboard_dir else None)
        raw = trainer.run(start_step=start, before_step=board.before_step, after_step=ckpt.after_step)
        if trainer.step_log is not None:
            trainer.step_log.close()
        board.post("gather")
        gathered = gather_measurements(trainer, raw)
        gathered["losses"] = ckpt.history + gathered["losses"]  # steps before the resume
        losses = gathered["losses"]
        board.post("verify")
        verify = {"verify_tolerance": tolerance(args.train.dtype, args.train.optimizer)}
        ref = Path(spec.reference_path) if spec.reference_path else None
        # On several nodes the reference may be on node 0's disk only; every rank takes the
        # same branch (the comparison has collectives).
        where = "none" if spec.save_reference else reference_where(ref, info.device, spec.config_id)
        if spec.save_reference:
            if info.is_main:
                save_reference(trainer.par.model_parts, losses, ref)
            verify["verify_status"] = "reference"
        elif where == "all":
            loss_dev, weight_dev = compare_to_reference(trainer.par.model_parts, losses, ref,
                                                        device=info.device)
            ok = max(loss_dev, weight_dev) <= verify["verify_tolerance"]
            verify.update(verify_status="pass" if ok else "fail", verify_max_loss_rel=loss_dev,
                          verify_max_weight_rel=weight_dev)
        elif where == "some":
            verify["verify_status"] = REFERENCE_NOT_SHARED
        hosts = gather_hosts()  # several nodes: a collective
        row = None
        if info.is_main:
            machine = machine_info(hosts=hosts)
            peak_src = spec.peak_flops_source
            if info.device.type == "cuda" and spec.peak_flops is None:
                spec.peak_flops, peak_src = gpu_peak_flops(machine["device_name"], args.train.dtype)
                spec.peak_flops_source = peak_src
            row = train_row(spec=spec, args=args, trainer=trainer, gathered=gathered,
                            verify=verify, machine=machine)
            row.update(resumed_from_step=start or None, restarts=restart_count(),
                       last_checkpoint=str(ckpt.last) if ckpt.last else None)
        row = write_result(spec, row, info)
        if info.is_main:
            log.info("%s: %.2f samples/s, step %.3fs, verify %s", spec.config_id, row["samples_per_s"],
                     row["step_time_median_s"], row["verify_status"])
        return 0
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m parallab.worker SPEC.json", file=sys.stderr)
        return 2
    try:
        return run_worker(WorkerSpec.read(argv[0]))
    except Exception:
        # The launcher reads the last line of the log as the failure's reason.
        traceback.print_exc()
        from parallab.runtime.faults import explain_current

        exc = explain_current(sys.exc_info()[1])  # a collective timeout: which operation, ranks
        print(f"PARALLAB-ERROR rank {os.environ.get('RANK', '0')}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    from parallab.runtime.dist import worker_entry

    worker_entry(main)
