"""The real CLI end to end (torchrun subprocesses on the debug model) and its refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallab.bench.result import ROW_KEYS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def parallab(*args, cwd=None, timeout=500):
    return subprocess.run([sys.executable, "-m", "parallab", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or ROOT)


@pytest.fixture(scope="module")
def debug_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = parallab("sweep", "--config", ROOT / "configs/debug.toml", "--runtime.out-dir", out,
                    "--runtime.run-id", "e2e")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "e2e", proc


def test_sweep_writes_every_key_and_the_reports(debug_sweep):
    run, proc = debug_sweep
    all_rows = [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines()]
    rows = [r for r in all_rows if r["mode"] == "train"]
    assert [r["config_id"] for r in rows] == ["single-1", "ddp-2", "pipeline-1f1b-m2-2", "pipeline-naive-2"]
    infer = [r for r in all_rows if r["mode"] == "infer"]
    assert sorted({r["config_id"] for r in infer}) == ["infer-pipeline-m2-2", "infer-replicas-2",
                                                        "infer-single-1", "infer-tp-2"]
    for row in infer:
        assert set(ROW_KEYS) <= set(row) and row["status"] == "ok", row["reason"]
        assert row["verify_status"] in ("reference", "pass")
    for row in rows:
        assert set(ROW_KEYS) <= set(row), set(ROW_KEYS) - set(row)
        assert row["status"] == "ok", row["reason"]
        assert row["verify_status"] in ("reference", "pass")
        for key in ("samples_per_s", "tokens_per_s", "step_time_median_s", "step_time_p90_s",
                    "speedup", "efficiency", "peak_mem_bytes", "mfu", "torch_version", "cpu_model"):
            assert row[key] is not None, (row["config_id"], key)
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    assert len(list((run / "plots").glob("*.png"))) >= 3
    md = (run / "report.md").read_text()
    assert "ddp-2" in md and "pass" in md
    assert "single-1" in proc.stdout  # the terminal summary


def test_report_rebuilds_from_results_alone(debug_sweep, tmp_path):
    run, _ = debug_sweep
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.jsonl").write_text((run / "results.jsonl").read_text())
    proc = parallab("report", copy)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "report.md").read_text() == (run / "report.md").read_text()


def test_sweep_refuses_a_run_folder_with_results(debug_sweep):
    run, _ = debug_sweep
    before = (run / "results.jsonl").read_bytes()
    proc = parallab("sweep", "--config", ROOT / "configs/debug.toml", "--runtime.out-dir", run.parent,
                    "--runtime.run-id", "e2e")
    assert proc.returncode == 2
    assert "already holds results" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (run / "results.jsonl").read_bytes() == before  # nothing lost


def test_train_runs_ddp_on_two_devices(tmp_path):
    proc = parallab("train", "--model.preset", "debug", "--parallel.strategy", "ddp", "--parallel.devices", 2,
                    "--train.steps", 3, "--train.warmup-steps", 1, "--runtime.out-dir", tmp_path,
                    "--runtime.run-id", "t")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(l) for l in (tmp_path / "t/results.jsonl").read_text().splitlines()]
    assert rows[0]["config_id"] == "ddp-2" and rows[0]["dp_degree"] == 2


def test_train_as_a_worker_inside_torchrun(tmp_path):
    """A torchrun the user started: parallab runs as its worker."""
    from parallab.runtime.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "parallab", "train", "--model.preset", "debug",
           "--parallel.strategy", "pipeline", "--parallel.devices", "2", "--parallel.microbatches", "2",
           "--train.steps", "3", "--train.warmup-steps", "1", "--runtime.out-dir", str(tmp_path),
           "--runtime.run-id", "inside"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "inside/results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["pp_degree"] == 2 and rows[0]["status"] == "ok"


def test_env_lists_devices_and_backend():
    proc = parallab("env", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["backend"] in ("gloo", "nccl") and info["cpu_cores"] >= 1


BAD = [
    (["train", "--model.preset", "huge"], "unknown model preset 'huge'"),
    (["train", "--model.name", "bert"], "unknown model 'bert'"),
    (["train", "--parallel.strategy", "zero9"], "unknown strategy 'zero9'"),
    (["train", "--parallel.strategy", "ddp", "--parallel.devices", "0"], "devices=0"),
    (["train", "--parallel.devices", "abc"], "'abc'"),
    (["train", "--parallel.strategy", "ddp", "--parallel.devices", "3"], "not divisible"),
    (["train", "--parallel.strategy", "pipeline", "--parallel.devices", "2", "--parallel.microbatches", "3"],
     "not divisible"),
    (["train", "--model.preset", "debug", "--parallel.strategy", "pipeline", "--parallel.devices", "8",
      "--data.global-batch", "64", "--parallel.microbatches", "1"], "needs at least 8 layers"),
    (["train", "--parallel.strategy", "single", "--parallel.devices", "2"], "strategy single runs on 1 device"),
    (["train", "--data.source", "text", "--data.path", "/no/such/file.txt"], "/no/such/file.txt"),
    (["train", "--data.source", "text"], "path"),
    (["train", "--runtime.out-dir", "/proc/parallab-runs"], "not writable"),
    (["train", "--train.steps", "2", "--train.warmup-steps", "2"], "warmup_steps=2"),
    (["train", "--train.lr", "-1"], "lr=-1"),
    (["train", "--train.dtype", "float8"], "float8"),
    (["train", "--data.global-batch", "0"], "global_batch=0"),
    (["train", "--model.d-model", "65", "--model.preset", "debug"], "not divisible by n_heads"),
    (["train", "--data.scaling", "medium"], "medium"),
    (["train", "--runtime.threads-per-device", "0"], "threads_per_device=0"),
    (["sweep", "--sweep.strategies", "ddp", "pipeline:zigzag"], "pipeline:zigzag"),
    (["sweep", "--sweep.device-counts", "0"], "device count 0"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["report", "/no/such/run"], "/no/such/run"),
    (["train", "--config", "/no/such.toml"], "/no/such.toml"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_launches_nothing(tmp_path, capsys, args, needle):
    """In-process through the CLI's own main() (the same path as the console script, without
    paying a Python start-up per case); the subprocess tests below cover the real entry point."""
    from parallab.cli import main

    if "--runtime.out-dir" not in args and args[0] in ("train", "sweep"):
        args = args + ["--runtime.out-dir", str(tmp_path / "runs")]
    rc = main(list(args))
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert not list((tmp_path / "runs").glob("*/logs")), "a process was launched"


def test_bad_input_through_the_console_script(tmp_path):
    proc = parallab("train", "--parallel.strategy", "ddp", "--parallel.devices", "3",
                    "--runtime.out-dir", tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "parallab train: error: global batch 16 is not divisible by data-parallel degree 3 x "
        "micro-batches 1 = 3 (choose a global_batch that is a multiple of 3)"]


def test_bad_toml_files(tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text('[model]\npreset = "debug"\ncolour = "blue"\n')
    proc = parallab("train", "--config", bad_key, "--runtime.out-dir", tmp_path)
    assert proc.returncode == 2 and "colour" in proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    proc = parallab("sweep", "--config", broken)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_a_failing_configuration_is_recorded_and_the_sweep_goes_on(tmp_path):
    """A configuration that cannot finish (here: a 1-second limit) gets a row with its reason;
    the next configuration still runs and the report is still written."""
    proc = parallab("sweep", "--config", ROOT / "configs/debug.toml", "--runtime.out-dir", tmp_path,
                    "--runtime.run-id", "fail", "--sweep.config-timeout-s", "1",
                    "--sweep.strategies", "ddp", "--sweep.device-counts", "2", "--sweep.modes", "train")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "fail/results.jsonl").read_text().splitlines()]
    assert [r["config_id"] for r in rows] == ["single-1", "ddp-2"]
    for row in rows:
        assert row["status"] == "timeout" and "no result within 1 s" in row["reason"]
        assert set(ROW_KEYS) <= set(row)
    assert "timeout" in (tmp_path / "fail/report.md").read_text()
