"""`parallab slurm`: the batch script's content (and, with fake scontrol/srun, what each node
would run), its refusals, --submit; and the CLI's refusals of bad node settings."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from parallab.config import ConfigError
from parallab.slurm import SlurmArgs, slurm_script

ROOT = Path(__file__).resolve().parents[2]


def parallab(*args, cwd=None, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "parallab", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or ROOT, env=env)


def test_script_for_gpu_nodes():
    a = SlurmArgs(command="sweep --config configs/demo.toml --sweep.device-counts 1 2 4 8", nodes=2,
                  gpus_per_node=4, cpus_per_task=32, partition="gpu", account="proj1", time="02:30:00",
                  job_name="scaling", output="logs/%x-%j.out", port=29555)
    text = slurm_script(a, python="/opt/venv/bin/python", workdir="/home/me/parallab")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [l for l in lines if l.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=scaling", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --cpus-per-task=32", "#SBATCH --gpus-per-node=4", "#SBATCH --time=02:30:00",
                      "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                      "#SBATCH --output=logs/%x-%j.out"]
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert "RDZV_PORT=29555" in lines
    assert "cd /home/me/parallab" in lines
    assert any(l.startswith("srun --ntasks-per-node=1") for l in lines)
    run = text[text.index("srun "):]
    assert "/opt/venv/bin/python -m parallab sweep --config configs/demo.toml --sweep.device-counts 1 2 4 8" in run
    for flag in ('--runtime.nnodes "$SLURM_NNODES"', "--runtime.nproc-per-node 4",
                 '--runtime.rdzv-endpoint "$HEAD_NODE:$RDZV_PORT"', '--runtime.rdzv-id "slurm-$SLURM_JOB_ID"',
                 '--runtime.node-rank "$SLURM_NODEID"'):
        assert flag in run, flag
    # The interface hints are there, commented out.
    for hint in ("# export NCCL_SOCKET_IFNAME=", "# export NCCL_IB_HCA=", "# export GLOO_SOCKET_IFNAME=",
                 "# export NCCL_DEBUG=INFO"):
        assert hint in text, hint
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid shell


def test_script_for_cpu_nodes_leaves_out_gpus_and_optional_lines():
    text = slurm_script(SlurmArgs(command="train --parallel.strategy ddp --parallel.devices 8",
                                  nodes=4, devices_per_node=2), python="python3", workdir="/w")
    assert "--gpus-per-node" not in text and "--partition" not in text and "--account" not in text
    assert "#SBATCH --nodes=4" in text and "--runtime.nproc-per-node 2" in text


def test_each_node_runs_the_command_with_its_node_rank(tmp_path):
    """The script run with fake scontrol and srun (srun starts the command once per node with
    SLURM_NODEID set) and a fake python that prints its arguments."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_ / "srun").write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                               "for id in 0 1; do SLURM_NODEID=$id \"$@\"; done\n")
    fake_python = bin_ / "fakepython"
    fake_python.write_text("#!/bin/bash\nprintf '%s|' \"$@\"; echo\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    text = slurm_script(SlurmArgs(command="verify --sweep.strategies 'ddp pipeline:1f1b'", nodes=2,
                                  gpus_per_node=8), python=str(fake_python), workdir=str(tmp_path))
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_NNODES="2", SLURM_JOB_ID="4242")
    out = subprocess.run(["bash", "-c", text], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    runs = [l.split("|")[:-1] for l in out.stdout.splitlines()]
    assert len(runs) == 2
    for node, argv in enumerate(runs):
        assert argv[:4] == ["-m", "parallab", "verify", "--sweep.strategies"]
        assert argv[4] == "ddp pipeline:1f1b"  # quoting survives
        flags = dict(zip(argv[5::2], argv[6::2]))
        assert flags == {"--runtime.nnodes": "2", "--runtime.nproc-per-node": "8",
                         "--runtime.rdzv-endpoint": "gpu-a17:29500", "--runtime.rdzv-id": "slurm-4242",
                         "--runtime.node-rank": str(node)}


@pytest.mark.parametrize("kw,needle", [
    (dict(command="report runs/x"), "must start with one of train, sweep, verify"),
    (dict(command="sweep --runtime.nnodes 4"), "sets --runtime.nnodes"),
    (dict(command="sweep --runtime.node-rank=1"), "sets --runtime.node-rank"),
    (dict(command="sweep 'unclosed"), "cannot be split"),
    (dict(nodes=0, gpus_per_node=1), "nodes=0"),
    (dict(gpus_per_node=0, devices_per_node=0), "give gpus_per_node"),
    (dict(gpus_per_node=2, devices_per_node=4), "devices_per_node=4 is more than gpus_per_node=2"),
    (dict(gpus_per_node=1, time="2 hours"), "time='2 hours'"),
    (dict(gpus_per_node=1, partition="gpu;rm -rf"), "partition="),
    (dict(gpus_per_node=1, port=80), "port=80"),
])
def test_bad_slurm_settings(kw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        slurm_script(SlurmArgs(**kw))
    assert needle in str(e.value)


def test_cli_writes_the_script(tmp_path):
    script = tmp_path / "job.sh"
    proc = parallab("slurm", "--nodes", 2, "--gpus-per-node", 4, "--command", "sweep --config configs/demo.toml",
                    "--script", script)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {script}" in proc.stdout and os.access(script, os.X_OK)
    assert "#SBATCH --nodes=2" in script.read_text()


def test_submit_without_sbatch_is_one_line_exit_2(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + ":/usr/bin:/bin")
    assert subprocess.run(["bash", "-c", "command -v sbatch"], env=env, capture_output=True).returncode != 0
    proc = parallab("slurm", "--devices-per-node", 2, "--script", tmp_path / "j.sh", "--submit", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sbatch was not found" in lines[0]


def test_submit_calls_sbatch(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text("#!/bin/bash\necho \"Submitted batch job 77 ($1)\"\n")
    (bin_ / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}")
    proc = parallab("slurm", "--devices-per-node", 2, "--script", tmp_path / "j.sh", "--submit", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"Submitted batch job 77 ({tmp_path / 'j.sh'})" in proc.stdout


# ---------------------------------------------------------------- node settings on the CLI

MULTI = ["train", "--model.preset", "debug", "--parallel.strategy", "ddp", "--parallel.devices", "4",
         "--runtime.nnodes", "2", "--runtime.run-id", "mn"]

BAD_NODES = [
    (["--runtime.node-rank", "2", "--runtime.rdzv-endpoint", "127.0.0.1:29500"],
     "runtime.node_rank=2 must be in 0..1"),
    (["--runtime.node-rank", "1", "--runtime.rdzv-endpoint", "no-such-host.invalid:29500"],
     "'no-such-host.invalid' cannot be resolved"),
    (["--runtime.rdzv-endpoint", "192.0.2.1:29500"], "is not an address of this machine"),
    (["--runtime.rdzv-endpoint", "node001"], "runtime.rdzv_endpoint='node001' is not host:port"),
    ([], "needs runtime.rdzv_endpoint"),
    (["--runtime.nnodes", "3:1"], "runtime.nnodes='3:1'"),
    (["--runtime.rdzv-endpoint", "127.0.0.1:29500", "--runtime.nproc-per-node", "4"],
     "parallel.devices=4 does not match runtime.nnodes=2 nodes x runtime.nproc_per_node=4"),
    (["--parallel.mesh-order", "tp", "pp"], "parallel.mesh_order='tp pp' must name each of"),
]


@pytest.mark.parametrize("extra,needle", BAD_NODES, ids=[" ".join(e)[:50] or "no endpoint" for e, _ in BAD_NODES])
def test_bad_node_settings_are_one_line_exit_2(tmp_path, extra, needle):
    proc = parallab(*MULTI, *extra, "--runtime.out-dir", tmp_path / "runs")
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    assert not list((tmp_path / "runs").glob("*/logs")), "a process was launched"


INFER_MULTI = ["infer", "--model.preset", "debug", "--parallel.strategy", "replicas", "--parallel.devices", "2",
               "--runtime.nnodes", "2", "--runtime.run-id", "mi"]

BAD_INFER_NODES = [
    (["--runtime.node-rank", "2", "--runtime.rdzv-endpoint", "127.0.0.1:29500"],
     "runtime.node_rank=2 must be in 0..1"),
    (["--runtime.node-rank", "1", "--runtime.rdzv-endpoint", "no-such-host.invalid:29500"],
     "'no-such-host.invalid' cannot be resolved"),
    (["--runtime.rdzv-endpoint", "192.0.2.1:29500"], "is not an address of this machine"),
    ([], "needs runtime.rdzv_endpoint"),
    (["--runtime.nnodes", "1:2", "--runtime.rdzv-endpoint", "127.0.0.1:29500"], "fixed number of nodes"),
    (["--runtime.rdzv-endpoint", "127.0.0.1:29500", "--parallel.devices", "3"],
     "parallel.devices=3 cannot be split evenly over runtime.nnodes=2"),
]


@pytest.mark.parametrize("extra,needle", BAD_INFER_NODES,
                         ids=[" ".join(e)[:50] or "no endpoint" for e, _ in BAD_INFER_NODES])
def test_bad_node_settings_of_infer_are_one_line_exit_2(tmp_path, extra, needle):
    proc = parallab(*INFER_MULTI, *extra, "--runtime.out-dir", tmp_path / "runs")
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]
    assert not list((tmp_path / "runs").glob("*/logs")), "a process was launched"


@pytest.mark.parametrize("modes", ["train", "infer"])
def test_unreachable_endpoint_in_a_sweep_is_refused_before_launch(tmp_path, modes):
    proc = parallab("verify", "--sweep.strategies", "ddp", "--sweep.infer-strategies", "replicas",
                    "--sweep.device-counts", "4", "--sweep.modes", modes,
                    "--runtime.nnodes", "2", "--runtime.node-rank", "1", "--runtime.run-id", "v",
                    "--runtime.rdzv-endpoint", "no-such-host.invalid:29500", "--runtime.out-dir", tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot be resolved" in proc.stderr
    assert not list(tmp_path.glob("*/logs/*")), "a process was launched"


def test_shlex_roundtrip_of_the_command():
    # The command in the script is the user's words, each quoted for the shell.
    text = slurm_script(SlurmArgs(command="train --data.path 'my corpus.txt'", devices_per_node=1),
                        python="py", workdir="/w")
    assert shlex.quote("my corpus.txt") in text
