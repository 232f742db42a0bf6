"""Bad input, second catalogue (the first is BAD in test_cli.py): settings of checkpoints,
restarts and ports, data files, checkpoints to resume from or export, output folders, resumed
and concurrent sweeps. Each ends in one line naming the value and what would be valid, exit
code 2, before any process is launched, and nothing already written is lost."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_fixtures import make_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--model.preset", "debug", "--data.global-batch", "8"]


def parallab(*args, env=None, timeout=120):
    import os

    return subprocess.run([sys.executable, "-m", "parallab", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------ setups: files the case needs


def _text(tmp, data: bytes, name="corpus.txt"):
    p = tmp / name
    p.write_bytes(data)
    return p


def _binary_folder(tmp):
    d = tmp / "bins"
    d.mkdir()
    (d / "a.bin").write_bytes(b"\x00\x01\x02" * 100)
    (d / "b.bin").write_bytes(bytes(range(256)))
    return d


def _ckpt(tmp, **kw):
    step_dir, _ = make_checkpoint(tmp / "ck", **kw)
    return step_dir


def _corrupt(tmp):
    step_dir = _ckpt(tmp)
    (step_dir / ".metadata").write_bytes(b"\x80\x04not a pickle")
    return step_dir


def _truncated(tmp):
    step_dir = _ckpt(tmp)
    shard = next(step_dir.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    return step_dir


def _toml(tmp, text):
    p = tmp / "c.toml"
    p.write_text(text)
    return p


def _sweep_json(tmp):
    from parallab.config import ModelSection, SweepArgs, to_dict

    run = tmp / "runs" / "old"
    run.mkdir(parents=True)
    (run / "sweep.json").write_text(json.dumps(to_dict(SweepArgs(model=ModelSection(preset="debug")))))
    (run / "results.jsonl").write_text('{"config_id": "single-1", "mode": "train", "status": "ok"}\n')
    return run


def _not_a_folder(tmp):
    f = tmp / "a-file"
    f.write_text("x")
    return f


# (name, command, needle, setup): "{S}" in the command is replaced by what setup(tmp) returns.
CASES = [
    ("checkpoint_every<0", TRAIN + ["--train.checkpoint-every", "-1"], "checkpoint_every=-1 must be >= 0", None),
    ("checkpoint_keep=0", TRAIN + ["--train.checkpoint-keep", "0"], "checkpoint_keep=0 must be at least 1", None),
    ("max_restarts<0", TRAIN + ["--runtime.max-restarts", "-2"], "max_restarts=-2 must be >= 0", None),
    ("port out of range", TRAIN + ["--runtime.port", "80"], "port=80 is not a usable TCP port", None),
    ("port taken", TRAIN + ["--runtime.port", "{S}"], "is already in use on 127.0.0.1", "port"),
    ("collective timeout 0", TRAIN + ["--runtime.collective-timeout-s", "0"], "collective_timeout_s=0", None),
    ("negative seed", TRAIN + ["--train.seed", "-3"], "seed=-3 must be >= 0", None),
    ("unknown schedule", TRAIN + ["--parallel.strategy", "pipeline", "--parallel.devices", "2",
                                  "--parallel.schedule", "zigzag"], "zigzag", None),
    ("zero heads", TRAIN + ["--model.n-heads", "0"], "n_heads=0", None),
    ("vocab below bytes", TRAIN + ["--data.source", "stdlib", "--model.vocab-size", "100"],
     "vocab_size=100 is smaller than the byte tokenizer's 256", None),
    ("path without text", TRAIN + ["--data.path", "x.txt"], "only used with data source 'text'", None),
    ("unknown optimizer", TRAIN + ["--train.optimizer", "adam"], "adam", None),
    ("tp over 3", TRAIN + ["--parallel.strategy", "tp", "--parallel.devices", "3", "--data.global-batch", "3"],
     "not divisible by 3", None),
    ("empty data file", TRAIN + ["--data.source", "text", "--data.path", "{S}"], "is empty",
     lambda t: _text(t, b"")),
    ("binary data file", TRAIN + ["--data.source", "text", "--data.path", "{S}"], "is not text",
     lambda t: _text(t, b"\x89PNG\x00\x00binary", "image.png")),
    ("data too short", TRAIN + ["--data.source", "text", "--data.path", "{S}"],
     "holds 10 tokens, fewer than seq_len+1 = 33", lambda t: _text(t, b"short text")),
    ("data folder of binaries", TRAIN + ["--data.source", "text", "--data.path", "{S}"],
     "holds no non-empty text files", _binary_folder),
    ("out dir is a file", ["train", "--runtime.out-dir", "{S}"], "is not writable", _not_a_folder),
    ("out dir full", TRAIN, "MiB free, less than the", "full"),
    ("resume from nothing", TRAIN + ["--train.resume-from", "/no/such/ckpt"], "'/no/such/ckpt' does not exist", None),
    ("resume from a non-checkpoint", TRAIN + ["--train.resume-from", "{S}"], "is not a parallab checkpoint",
     lambda t: t),
    ("corrupt checkpoint", TRAIN + ["--train.resume-from", "{S}"], "is corrupt: .metadata cannot be read", _corrupt),
    ("truncated checkpoint", TRAIN + ["--train.resume-from", "{S}"], "is truncated", _truncated),
    ("checkpoint of another model", TRAIN + ["--train.resume-from", "{S}", "--train.optimizer", "sgd"],
     "another model: d_model=128 (this run: 64)", lambda t: _ckpt(t, d_model=128)),
    ("checkpoint of another vocabulary", TRAIN + ["--train.resume-from", "{S}", "--train.optimizer", "sgd"],
     "another vocabulary: vocab_size=512, this run's model has 256", lambda t: _ckpt(t, vocab_size=512)),
    ("checkpoint of another optimizer", TRAIN + ["--train.resume-from", "{S}"],
     "holds sgd optimizer state; this run uses adamw", _ckpt),
    ("checkpoint past the end", TRAIN + ["--train.resume-from", "{S}", "--train.optimizer", "sgd",
                                         "--train.steps", "2", "--train.warmup-steps", "1"],
     "is at step 2: train.steps=2 leaves nothing to run", _ckpt),
    ("resume without a run", TRAIN + ["--train.resume"], "train.resume needs the run to continue", None),
    ("resume with no checkpoint", TRAIN + ["--train.resume", "--runtime.run-id", "r"], "no checkpoint in", None),
    ("toml wrong type", ["train", "--config", "{S}"], "train.steps = 'five' has the wrong type (give an integer)",
     lambda t: _toml(t, '[train]\nsteps = "five"\n')),
    ("toml section as value", ["train", "--config", "{S}"], "setting model = 5 has the wrong type",
     lambda t: _toml(t, "model = 5\n")),
    ("toml literal", ["sweep", "--config", "{S}"], "data.source = 'web'",
     lambda t: _toml(t, '[data]\nsource = "web"\n')),
    ("sweep resume of nothing", ["sweep", "--resume", "/no/such/run"], "'/no/such/run' has no sweep.json", None),
    ("sweep resume and config", ["sweep", "--resume", "{S}", "--config", "configs/debug.toml"],
     "give --resume RUN_DIR or --config, not both", _sweep_json),
    ("sweep resume changing settings", ["sweep", "--resume", "{S}", "--train.steps", "99"],
     "train.steps=99 differs from the run's sweep.json", _sweep_json),
    ("sweep timeout 0", ["sweep", "--model.preset", "debug", "--sweep.config-timeout-s", "0"],
     "config_timeout_s=0", None),
    ("export of nothing", ["export", "/no/such/ckpt", "{S}/m.pt"], "'/no/such/ckpt' does not exist", lambda t: t),
    ("export into no folder", ["export", "{S}", "/no/such/dir/m.pt"], "folder '/no/such/dir' does not exist", _ckpt),
    ("export of a corrupt checkpoint", ["export", "{S}", "/tmp/m.pt"], "is corrupt", _corrupt),
]


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("name,args,needle,setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path, name, args, needle, setup, request):
    env = {}
    subst = None
    if setup == "port":
        subst = request.getfixturevalue("busy_port")
    elif setup == "full":
        env["PARALLAB_MIN_FREE_BYTES"] = str(10**18)  # no disk has that much free: "full"
    elif setup is not None:
        subst = setup(tmp_path)
    args = [a.replace("{S}", str(subst)) if isinstance(a, str) else a for a in args]
    if args[0] in ("train", "sweep") and "--runtime.out-dir" not in args and "--resume" not in args:
        args = args + ["--runtime.out-dir", str(tmp_path / "runs")]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = parallab(*args, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    assert not list(tmp_path.rglob("logs/*.log")), "a process was launched"
    for p, data in before.items():  # nothing already written is lost or changed
        assert p.read_bytes() == data, p


def test_output_folder_on_a_full_disk(tmp_path):
    """A real full folder: a 64 KiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = parallab(*TRAIN, "--runtime.out-dir", mnt / "runs")
        assert proc.returncode == 2, proc.stderr
        assert "MiB free, less than the 16.0 MiB this run needs" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_second_sweep_into_a_running_sweeps_folder_is_refused(tmp_path):
    """The lock is held by this process, as a running sweep holds it."""
    from parallab.bench.resume import RunLock

    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text("")
    (run / "sweep.json").write_text(json.dumps({"model": {"preset": "debug"}}))
    with RunLock(run):
        proc = parallab("sweep", "--resume", run)
    assert proc.returncode == 2, proc.stderr
    assert "is in use by another parallab sweep (pid" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (run / "results.jsonl").read_text() == ""


def test_a_torn_results_line_is_skipped_by_the_cli(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    good = {"config_id": "single-1", "mode": "train", "status": "ok", "strategy": "single", "devices": 1}
    (run / "results.jsonl").write_text(json.dumps(good) + "\n" + '{"config_id": "ddp-2", "sta')
    proc = parallab("report", run)
    assert "skipped a line that is not a whole JSON row" in proc.stderr
