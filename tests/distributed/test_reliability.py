"""Reliability under real torchrun (gloo, debug model): exact resume, a killed rank restarted,
restarts used up, a hung collective, an interrupted sweep resumed, and checkpoints resharded
across strategies and device counts (FSDP at 4 -> pipeline at 2 -> TP at 2 -> one device).

Each torchrun costs 5-15 s here (more under load); every subprocess has a timeout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from parallab.config import (DataSection, ModelSection, ParallelSection, RuntimeSection, TrainArgs,
                             TrainSection, to_dict)
from parallab.runtime.dist import free_port
from parallab.train.checkpoint import export, latest
from parallab.train.safe_dcp import SafeLoadPlanner, SafeReader, read_metadata

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 400
# Six AdamW steps of ddp-2, a checkpoint every two: the optimizer has state worth restoring.
RUN = ["train", "--model.preset", "debug", "--data.global-batch", "8", "--train.steps", "6",
       "--train.warmup-steps", "1", "--train.checkpoint-every", "2", "--parallel.strategy", "ddp",
       "--parallel.devices", "2"]
KILL = {"PARALLAB_TEST_KILL_AT_STEP": "3", "PARALLAB_TEST_KILL_RANK": "1"}


def parallab(*args, env=None, timeout=TIMEOUT):
    return subprocess.run([sys.executable, "-m", "parallab", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]


def weights(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out, _ = export(ckpt, tmp / f"{abs(hash(str(ckpt)))}.pt")
    return torch.load(out, weights_only=True)


def saved(step_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` in a checkpoint, read whole in this process."""
    md = read_metadata(step_dir)
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    dcp.load(sd, storage_reader=SafeReader(step_dir), planner=SafeLoadPlanner(), no_dist=True)
    return sd


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def out_dir(tmp: Path) -> list[str]:
    return ["--runtime.out-dir", str(tmp)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    proc = parallab(*RUN, *out_dir(tmp), "--runtime.run-id", "full")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = rows(tmp / "full")
    return tmp, row, weights(tmp / "full/checkpoints/ddp-2", tmp)


def test_a_stopped_run_resumes_exactly(uninterrupted):
    tmp, full, full_weights = uninterrupted
    stop = parallab(*RUN, *out_dir(tmp), "--runtime.run-id", "stop", env=KILL)
    assert stop.returncode == 1
    (failed,) = rows(tmp / "stop")
    assert failed["status"] == "failed"
    assert "rank 1 died: killed by SIGKILL" in failed["reason"], failed["reason"]
    assert f"last checkpoint: {tmp / 'stop/checkpoints/ddp-2/step-2'}" in failed["reason"]
    resumed = parallab(*RUN, *out_dir(tmp), "--runtime.run-id", "stop", "--train.resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    row = rows(tmp / "stop")[-1]
    assert row["status"] == "ok" and row["resumed_from_step"] == 2
    assert row["losses"] == full["losses"]  # the same per-step losses, to the bit
    assert_identical(weights(tmp / "stop/checkpoints/ddp-2", tmp), full_weights)


def test_a_killed_rank_is_restarted_and_the_run_finishes_the_same(uninterrupted):
    tmp, full, full_weights = uninterrupted
    proc = parallab(*RUN, *out_dir(tmp), "--runtime.run-id", "killed", "--runtime.max-restarts", "1", env=KILL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = rows(tmp / "killed")
    assert row["restarts"] == 1 and row["resumed_from_step"] == 2
    assert row["losses"] == full["losses"]
    assert_identical(weights(tmp / "killed/checkpoints/ddp-2", tmp), full_weights)
    log = (tmp / "killed/logs/ddp-2.log").read_text()
    assert "killing this rank (SIGKILL)" in log


def test_restarts_used_up_name_the_rank_and_the_last_checkpoint(uninterrupted):
    tmp, _, _ = uninterrupted
    proc = parallab(*RUN, *out_dir(tmp), "--runtime.run-id", "used-up", "--runtime.max-restarts", "1",
                    env={**KILL, "PARALLAB_TEST_KILL_ATTEMPTS": "2"})
    assert proc.returncode == 1
    (row,) = rows(tmp / "used-up")
    assert row["status"] == "failed"
    reason = row["reason"]
    assert "rank 1 died: killed by SIGKILL" in reason, reason
    assert "restarts used up (runtime.max_restarts=1)" in reason, reason
    step2 = tmp / "used-up/checkpoints/ddp-2/step-2"
    assert f"last checkpoint: {step2}" in reason and row["last_checkpoint"] == str(step2)
    assert latest(step2.parent) == step2  # the last good checkpoint is intact


def test_a_hung_collective_ends_with_a_clear_error_and_the_sweep_goes_on(tmp_path):
    """Rank 1 sleeps 600 s before step 2; rank 0 gives up after collective_timeout_s=20."""
    env = {"PARALLAB_TEST_HANG_AT_STEP": "2", "PARALLAB_TEST_HANG_RANK": "1", "PARALLAB_TEST_HANG_S": "600"}
    t0 = time.monotonic()
    proc = parallab("sweep", "--config", ROOT / "configs/debug.toml", "--sweep.modes", "train",
                    "--sweep.strategies", "ddp", "--sweep.device-counts", "1", "2",
                    "--runtime.collective-timeout-s", "20",
                    *out_dir(tmp_path), "--runtime.run-id", "hang", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - t0 < 400  # far less than the 600 s stall: not a silent hang
    by_id = {r["config_id"]: r for r in rows(tmp_path / "hang")}
    assert by_id["single-1"]["status"] == "ok"
    hung = by_id["ddp-2"]
    assert hung["status"] == "timeout"
    reason = hung["reason"]
    assert "collective timed out after 20 s (runtime.collective_timeout_s)" in reason, reason
    assert "DDP gradient all-reduce" in reason and "waiting for rank(s) 1" in reason, reason
    assert hung["wall_s"] < 300
    assert (tmp_path / "hang/report.md").is_file()  # the sweep went on to its reports


def test_an_interrupted_sweep_keeps_its_rows_and_resume_runs_only_the_rest(tmp_path):
    run = tmp_path / "sw"
    cmd = [sys.executable, "-m", "parallab", "sweep", "--config", str(ROOT / "configs/debug.toml"),
           "--sweep.modes", "train", "--sweep.strategies", "ddp", "pipeline:1f1b",
           "--sweep.device-counts", "1", "2",
           # Long enough (~5 s a configuration) that the sweep is still running when the
           # second sweep has been refused and the interrupt arrives: with 6 steps it once
           # finished first. SGD: 150 AdamW steps drift past its 1e-4 bound (train/verify.py).
           "--train.steps", "150", "--train.optimizer", "sgd", "--train.lr", "0.05",
           "--runtime.out-dir", str(tmp_path), "--runtime.run-id", "sw"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((run / "results.jsonl").exists() and (run / "results.jsonl").read_text().strip()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no row in time"
            time.sleep(0.3)
        # A second sweep into the same folder while this one runs is refused.
        second = parallab("sweep", "--resume", run)
        assert second.returncode == 2 and "in use by another parallab sweep" in second.stderr, second.stderr
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 130, err[-3000:]
    assert f"parallab sweep --resume {run}" in err
    before = (run / "results.jsonl").read_bytes()
    kept = rows(run)
    assert kept and kept[0]["config_id"] == "single-1" and not (run / ".lock").exists()
    # A crash mid-write leaves a torn line; the reference file is gone too: resume copes with both.
    with open(run / "results.jsonl", "a") as f:
        f.write('{"config_id": "torn", "status"')
    (run / "reference.pt").unlink()
    resumed = parallab("sweep", "--resume", run)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "skipped a line that is not a whole JSON row" in resumed.stderr
    assert (run / "results.jsonl").read_bytes().startswith(before)  # nothing lost or rewritten
    lines = [l for l in (run / "results.jsonl").read_text().splitlines() if l.startswith("{")]
    final = [json.loads(l) for l in lines if not l.startswith('{"config_id": "torn"')]
    ids = [r["config_id"] for r in final]
    assert sorted(ids) == ["ddp-2", "pipeline-1f1b-m2-2", "single-1"], ids  # each exactly once
    assert (run / "reference.pt").is_file()  # rerun first, its row not written twice
    for r in final:
        assert r["status"] == "ok" and r["verify_status"] in ("reference", "pass"), r


def _torchrun_reshard(tmp: Path, name: str, args: TrainArgs, load: Path, save: Path) -> None:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"args": to_dict(args), "load": str(load), "save": str(save),
                                "cache": str(tmp / ".cache")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           str(args.parallel.devices), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "tests/distributed/reshard_main.py"), str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _args(strategy: str, devices: int, **parallel) -> TrainArgs:
    return TrainArgs(model=ModelSection(preset="debug"), data=DataSection(global_batch=8),
                     parallel=ParallelSection(strategy=strategy, devices=devices, **parallel),
                     train=TrainSection(steps=6, warmup_steps=1), runtime=RuntimeSection())


def test_checkpoints_reshard_across_strategies_and_device_counts(tmp_path):
    # FSDP on 4 devices trains 3 AdamW steps and saves (parameters and optimizer state sharded).
    common = ["train", "--model.preset", "debug", "--data.global-batch", "8", "--train.warmup-steps", "1",
              *out_dir(tmp_path)]
    proc = parallab(*common, "--parallel.strategy", "fsdp", "--parallel.devices", "4", "--train.steps", "3",
                    "--train.checkpoint-every", "3", "--runtime.run-id", "fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = tmp_path / "fsdp/checkpoints/fsdp-4/step-3"
    # Loaded and saved again by: FSDP x TP on 2x2 (2-D DTensors), a 2-device pipeline with two
    # stages per device (interleaved 1F1B: each rank merges two stages' states), tensor
    # parallelism on 2, one device.
    chain = [("fsdptp", _args("fsdp+tp", 4)),
             ("pipe", _args("pipeline", 2, schedule="interleaved1f1b", microbatches=4)),
             ("tp", _args("tp", 2)), ("single", _args("single", 1))]
    src, dirs = a, [a]
    for name, args in chain:
        _torchrun_reshard(tmp_path, name, args, src, tmp_path / f"re-{name}")
        src = tmp_path / f"re-{name}" / "step-3"
        dirs.append(src)
    ref_w, ref_o = saved(a, "model."), saved(a, "optim.state.")
    assert ref_w and any(k.endswith(".exp_avg_sq") for k in ref_o)
    for d in dirs[1:]:  # weights and optimizer state identical, to the bit
        assert_identical(saved(d, "model."), ref_w)
        assert_identical(saved(d, "optim.state."), ref_o)
        assert json.loads((d / "parallab.json").read_text())["step"] == 3
    # Training continues in another layout: the pipeline on 2 resumes the FSDP checkpoint and
    # matches one device trained the whole way (within verify's AdamW tolerance).
    proc = parallab(*common, "--parallel.strategy", "pipeline", "--parallel.devices", "2",
                    "--parallel.microbatches", "2", "--train.steps", "5", "--train.checkpoint-every", "5",
                    "--train.resume-from", a, "--runtime.run-id", "pipe")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = parallab(*common, "--train.steps", "5", "--train.checkpoint-every", "5", "--runtime.run-id", "one")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (pipe,), (one,) = rows(tmp_path / "pipe"), rows(tmp_path / "one")
    assert pipe["resumed_from_step"] == 3
    assert pipe["losses"][:3] == json.loads((a / "parallab.json").read_text())["losses"]
    assert pipe["losses"] == pytest.approx(one["losses"], rel=1e-4)
    w_pipe = weights(tmp_path / "pipe/checkpoints/pipeline-1f1b-m2-2", tmp_path)
    w_one = weights(tmp_path / "one/checkpoints/single-1", tmp_path)
    for k in w_one:
        rel = float((w_pipe[k].double() - w_one[k].double()).norm() / w_one[k].double().norm().clamp(min=1e-30))
        assert rel <= 1e-4, (k, rel)
