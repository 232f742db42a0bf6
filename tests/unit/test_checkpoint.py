"""The pure parts of reliability: checkpoint files (pointer, checks, safe reading, export),
torchrun failure summaries, the progress board, the run-folder lock, resumed sweeps' settings,
typed settings from files, pre-launch checks. No process group, no torchrun."""

import json
import os
import pickle
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from checkpoint_fixtures import make_checkpoint
from parallab.bench.result import append_row, read_rows
from parallab.bench.resume import RunLock, check_same_settings
from parallab.config import (ConfigError, DataSection, ModelSection, RuntimeSection, SweepArgs,
                             TrainArgs, TrainSection, from_dict, load_toml, to_dict, validate_train)
from parallab.models.gpt import GPT
from parallab.models.registry import GPT_PRESETS, build_meta, get_family
from parallab.preflight import check_compatible, check_port
from parallab.runtime.faults import ProgressBoard, failure, is_timeout, root_cause
from parallab.train.checkpoint import export, latest, read_info, resolve, state_module, verify_files
from parallab.train.safe_dcp import SafeLoadPlanner, SafeReader


# ------------------------------------------------------------------ checkpoint files


def test_latest_follows_the_pointer_and_falls_back_to_the_newest_complete(tmp_path):
    make_checkpoint(tmp_path, step=2)
    make_checkpoint(tmp_path, step=4)
    assert latest(tmp_path).name == "step-4"
    (tmp_path / "latest").write_text("step-2\n")
    assert latest(tmp_path).name == "step-2"
    # A torn save (no parallab.json), a .tmp folder and a pointer to a missing folder are skipped.
    (tmp_path / "step-9").mkdir()
    (tmp_path / "step-6.tmp").mkdir()
    (tmp_path / "latest").write_text("step-7\n")
    assert latest(tmp_path).name == "step-4"
    assert resolve(tmp_path).name == "step-4" and resolve(tmp_path / "step-2").name == "step-2"


def test_resolve_names_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a parallab checkpoint"):
        resolve(tmp_path / "empty")


def test_export_writes_plain_weights_that_load_without_parallab(tmp_path):
    step_dir, model = make_checkpoint(tmp_path / "ck", step=3)
    out, info = export(tmp_path / "ck", tmp_path / "model.pt")
    assert info["step"] == 3
    weights = torch.load(out, weights_only=True)
    fresh = GPT(GPT_PRESETS["debug"])
    fresh.load_state_dict(weights, strict=True)
    for name, p in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name
    code = ("import sys, torch; sd = torch.load(sys.argv[1], weights_only=True); "
            "assert all(isinstance(v, torch.Tensor) for v in sd.values()); "
            "assert not any(m.startswith('parallab') for m in sys.modules); print(len(sd))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(model.state_dict())


def test_export_refuses_a_missing_target_folder(tmp_path):
    make_checkpoint(tmp_path / "ck")
    with pytest.raises(ConfigError, match="does not exist"):
        export(tmp_path / "ck", tmp_path / "no" / "model.pt")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_corrupt_metadata_is_refused_and_its_code_never_runs(tmp_path):
    step_dir, _ = make_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (step_dir / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConfigError, match="is corrupt: .metadata cannot be read"):
        verify_files(step_dir)
    assert not marker.exists()
    (step_dir / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ConfigError, match="is corrupt"):
        verify_files(step_dir)


def test_truncated_or_missing_shards_are_refused(tmp_path):
    step_dir, _ = make_checkpoint(tmp_path)
    shard = next(step_dir.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=f"is truncated: {shard.name} holds {len(data) // 2} bytes"):
        verify_files(step_dir)
    shard.unlink()
    with pytest.raises(ConfigError, match="is incomplete"):
        verify_files(step_dir)


def test_corrupt_info_file_is_refused(tmp_path):
    step_dir, _ = make_checkpoint(tmp_path)
    (step_dir / "parallab.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is corrupt: parallab.json is unreadable"):
        read_info(step_dir)


class _Gadget:
    pass


def test_non_tensor_items_are_read_weights_only(tmp_path):
    """DCP's default planner would unpickle any object; the safe planner refuses classes."""
    dcp.save({"hp": {"lr": 0.5, "betas": (0.9, 0.95)}}, storage_writer=FileSystemWriter(tmp_path / "ok"),
             no_dist=True)
    got = {"hp": {"lr": 0.0, "betas": (0.0, 0.0)}}
    dcp.load(got, storage_reader=SafeReader(tmp_path / "ok"), planner=SafeLoadPlanner(), no_dist=True)
    assert got == {"hp": {"lr": 0.5, "betas": (0.9, 0.95)}}
    dcp.save({"obj": _Gadget()}, storage_writer=FileSystemWriter(tmp_path / "bad"), no_dist=True)
    with pytest.raises(BaseException, match="Unsupported global"):  # DCP's CheckpointException
        dcp.load({"obj": None}, storage_reader=SafeReader(tmp_path / "bad"), planner=SafeLoadPlanner(),
                 no_dist=True)


@pytest.mark.parametrize("change,needle", [
    (dict(vocab_size=512), "another vocabulary: vocab_size=256, this run's model has 512"),
    (dict(d_model=128), "another model: d_model=64 (this run: 128)"),
    (dict(n_layers=2), "another model: n_layers=4 (this run: 2)"),
])
def test_a_checkpoint_of_another_model_is_refused(tmp_path, change, needle):
    step_dir, _ = make_checkpoint(tmp_path)
    cfg = replace(GPT_PRESETS["debug"], **change)
    with pytest.raises(ConfigError, match=f"checkpoint '{step_dir}'.*") as e:
        check_compatible(step_dir, model_name="gpt", cfg=cfg, model=build_meta(get_family("gpt"), cfg),
                         optimizer="sgd", steps=10)
    assert needle in str(e.value)


def test_a_checkpoint_with_other_weights_or_optimizer_or_too_late_is_refused(tmp_path):
    step_dir, _ = make_checkpoint(tmp_path, step=4)
    cfg = GPT_PRESETS["debug"]
    meta = build_meta(get_family("gpt"), cfg)
    info = check_compatible(step_dir, model_name="gpt", cfg=cfg, model=meta, optimizer="sgd", steps=10)
    assert info["step"] == 4
    with pytest.raises(ConfigError, match="holds sgd optimizer state; this run uses adamw"):
        check_compatible(step_dir, model_name="gpt", cfg=cfg, model=meta, optimizer="adamw", steps=10)
    with pytest.raises(ConfigError, match="is at step 4: train.steps=4 leaves nothing to run"):
        check_compatible(step_dir, model_name="gpt", cfg=cfg, model=meta, optimizer="sgd", steps=4)
    # parallab.json says debug, but the weights are not those of this model: shapes are checked too.
    info_path = step_dir / "parallab.json"
    info_data = json.loads(info_path.read_text())
    del info_data["model"]["config"]
    info_path.write_text(json.dumps(info_data))
    other = replace(cfg, d_model=128)
    with pytest.raises(ConfigError, match="has shape"):
        check_compatible(step_dir, model_name="gpt", cfg=other, model=build_meta(get_family("gpt"), other),
                         optimizer="sgd", steps=10)


def test_state_module_merges_pipeline_stages_under_the_stable_names():
    family = get_family("gpt")
    model = GPT(GPT_PRESETS["debug"])
    first = family.make_stage(model, ["layers.0", "layers.1"], first=True, last=False)
    last = family.make_stage(model, ["layers.2", "layers.3"], first=False, last=True)
    merged = state_module([first, last])
    assert set(merged.state_dict()) == set(model.state_dict())
    params = dict(merged.named_parameters())
    assert params["layers.2.mlp.w1.weight"] is dict(last.named_parameters())["layers.2.mlp.w1.weight"]
    assert state_module([model]) is model


# ------------------------------------------------------------------ failures and timeouts

SUMMARY = """
[rank0]: PARALLAB-ERROR rank 0: RuntimeError: Connection reset by peer
PARALLAB-ERROR rank 0: RuntimeError: Connection reset by peer
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
parallab.worker FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_15:06:08
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 25278)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 25278
============================================================
"""


def test_root_cause_names_the_rank_that_died_first():
    assert root_cause(SUMMARY) == {"rank": 1, "exitcode": -9, "signal": "SIGKILL"}
    reason, timed_out = failure(SUMMARY)
    # Not rank 0's consequence ("connection reset"), but what happened to rank 1.
    assert reason == "rank 1 died: killed by SIGKILL (exit code -9)" and not timed_out


def test_failure_prefers_the_failed_ranks_own_error_and_flags_timeouts():
    text = SUMMARY.replace("exitcode  : -9", "exitcode  : 1").replace(
        "traceback : Signal 9 (SIGKILL) received by PID 25278", "traceback : <N/A>")
    text = text.replace("Root Cause", "PARALLAB-ERROR rank 1: CollectiveTimeout: collective timed out\nRoot Cause")
    reason, timed_out = failure(text)
    assert reason == "rank 1: CollectiveTimeout: collective timed out" and timed_out
    assert failure("no summary at all") == (None, False)
    assert is_timeout(RuntimeError("[x.cc:78] Timed out waiting 3000ms for recv operation to complete"))
    assert not is_timeout(RuntimeError("Connection reset by peer"))


class FakeStore:
    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(k in self.data for k in keys)

    def get(self, key):
        return self.data[key]


def test_progress_board_names_the_operation_and_the_ranks_behind():
    store = FakeStore()
    boards = []
    for rank in range(4):
        b = ProgressBoard(rank, 1, 30.0, describe=lambda p: "DDP gradient all-reduce in backward")
        b.world, b.store = 4, store
        boards.append(b)
    for b in boards:
        b.post("step 0")
    for b in (boards[0], boards[1], boards[3]):
        b.post("step 1")  # rank 2 is stuck before step 1
    err = boards[0].explain(RuntimeError("[/x/unbound_buffer.cc:78] Timed out waiting 30000ms for recv"))
    msg = str(err)
    assert "after 30 s (runtime.collective_timeout_s) on rank 0 in step 1" in msg
    assert "DDP gradient all-reduce in backward" in msg
    assert "waiting for rank(s) 2 (rank 2 last reported 'step 0'" in msg
    assert "backend: Timed out waiting 30000ms" in msg and "\n" not in msg


# ------------------------------------------------------------------ sweeps


def test_run_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path, capsys):
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(ConfigError, match=f"in use by another parallab sweep \\(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text("999999999 otherhost\n")  # left by a process that died
    with RunLock(tmp_path):
        assert "taking over the stale lock" in capsys.readouterr().err
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())


def test_a_row_after_a_torn_line_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"config_id": "a"}) + "\n" + '{"config_id": "b", "sta')
    append_row(path, {"config_id": "c"})
    with pytest.warns(UserWarning, match="torn"):
        rows = read_rows(path)
    assert [r["config_id"] for r in rows] == ["a", "c"]


def test_resumed_sweep_keeps_its_settings(tmp_path):
    args = SweepArgs(model=ModelSection(preset="debug"))
    (tmp_path / "sweep.json").write_text(json.dumps(to_dict(args)))
    check_same_settings(replace(args, sweep=replace(args.sweep, config_timeout_s=5.0)), tmp_path)
    with pytest.raises(ConfigError, match="train.steps=99 differs from the run's sweep.json"):
        check_same_settings(replace(args, train=replace(args.train, steps=99)), tmp_path)


# ------------------------------------------------------------------ settings and pre-launch checks


def test_settings_from_a_file_are_type_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"setting train.steps = 'five' has the wrong type \(give an integer\)"):
        from_dict(TrainArgs, {"train": {"steps": "five"}})
    with pytest.raises(ConfigError, match="data.source = 'web' has the wrong type .*'synthetic'"):
        from_dict(TrainArgs, {"data": {"source": "web"}})
    with pytest.raises(ConfigError, match="setting model = 5"):
        from_dict(TrainArgs, {"model": 5})
    ok = from_dict(TrainArgs, {"train": {"lr": 1, "checkpoint_dir": None}, "runtime": {"port": 29500}})
    assert ok.train.lr == 1 and ok.runtime.port == 29500
    f = tmp_path / "c.toml"
    f.write_text("[train]\ncheckpoint_every = 1.5\n")
    with pytest.raises(ConfigError, match="checkpoint_every = 1.5"):
        load_toml(TrainArgs, f)


def _args(tmp_path, **train) -> TrainArgs:
    return TrainArgs(model=ModelSection(preset="debug"), data=DataSection(global_batch=8),
                     train=TrainSection(**train), runtime=RuntimeSection(out_dir=str(tmp_path)))


def test_port_checks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port={port} is already in use on 127.0.0.1"):
            check_port(port)
    with pytest.raises(ConfigError, match="port=80 is not a usable TCP port"):
        check_port(80)


def test_free_space_and_resume_checks(tmp_path, monkeypatch):
    validate_train(_args(tmp_path, checkpoint_every=2))
    monkeypatch.setenv("PARALLAB_MIN_FREE_BYTES", str(10**18))
    with pytest.raises(ConfigError, match=f"output folder '{tmp_path}' has .* MiB free, less than"):
        validate_train(_args(tmp_path))
    monkeypatch.delenv("PARALLAB_MIN_FREE_BYTES")
    with pytest.raises(ConfigError, match="train.resume needs the run to continue"):
        validate_train(_args(tmp_path, resume=True))
    step_dir, _ = make_checkpoint(tmp_path / "ck", step=2)
    validate_train(_args(tmp_path, resume_from=str(tmp_path / "ck"), steps=5, optimizer="sgd"))
    with pytest.raises(ConfigError, match="seed=-1 must be >= 0"):
        validate_train(_args(tmp_path, seed=-1))


# ------------------------------------------------------------------ a parameter stored in another shape


def test_a_parameter_stored_split_is_checkpointed_in_the_model_shape(tmp_path):
    """GPT-2's c_attn under tp is [D, 3, D]; checkpoints hold [D, 3D] (InCheckpointShape): saved
    from [D, 3, D] it reads back as [D, 3D], and loads from [D, 3D] into [D, 3, D] in place."""
    from parallab.train.checkpoint import InCheckpointShape, SavePlanner

    w = torch.arange(4 * 12, dtype=torch.float32).view(4, 12)
    split, b = w.clone().view(4, 3, 4), torch.arange(12.0)
    dcp.save({"model": {"w": InCheckpointShape(split, (4, 12)), "b": InCheckpointShape(b.view(3, 4), (12,))}},
             storage_writer=FileSystemWriter(tmp_path / "a"), planner=SavePlanner(), no_dist=True)
    back = {"model": {"w": torch.zeros(4, 12), "b": torch.zeros(12)}}
    dcp.load(back, storage_reader=SafeReader(tmp_path / "a"), planner=SafeLoadPlanner(), no_dist=True)
    assert torch.equal(back["model"]["w"], w) and torch.equal(back["model"]["b"], b)
    into = torch.zeros(4, 3, 4)
    dcp.load({"model": {"w": InCheckpointShape(into, (4, 12))}}, storage_reader=SafeReader(tmp_path / "a"),
             planner=SafeLoadPlanner(), no_dist=True)
    assert torch.equal(into.view(4, 12), w)
    with pytest.raises(ValueError, match="cannot be checkpointed as"):
        InCheckpointShape(into, (12, 4))


def test_a_checkpoint_in_the_old_tp_layout_is_refused_with_the_reason(tmp_path):
    step_dir, _ = make_checkpoint(tmp_path)
    sd = {k: torch.zeros(v.shape) for k, v in GPT(GPT_PRESETS["debug"]).state_dict().items()}
    name = next(k for k, v in sd.items() if v.dim() == 2)  # as if split [in, 2, out/2]
    d0, d1 = sd[name].shape
    sd[name] = torch.zeros(d0, 2, d1 // 2)
    dcp.save({"model": sd}, storage_writer=FileSystemWriter(step_dir), no_dist=True)
    cfg = GPT_PRESETS["debug"]
    with pytest.raises(ConfigError, match=rf"holds {name} as \[{d0}, 2, {d1 // 2}\], the layout "
                                          r"parallab's tensor parallelism wrote before"):
        check_compatible(step_dir, model_name="gpt", cfg=cfg, model=build_meta(get_family("gpt"), cfg),
                         optimizer="sgd", steps=10)
