"""``parallab slurm``: a SLURM batch script that runs a parallab command on several nodes.

The script asks for ``nodes`` nodes with one task each; ``srun`` starts parallab on every node
with the same command and the node flags (``runtime.nnodes``, ``runtime.node_rank`` from
``$SLURM_NODEID``, the rendezvous at the allocation's first host). parallab then starts one
torchrun per configuration on each node, and the torchruns meet at that endpoint
(runtime/nodes.py, docs/MULTI-NODE.md).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from parallab.config import ConfigError

# Commands that run across nodes, and the flags the script itself sets.
NODE_COMMANDS = ("train", "sweep", "verify")
SCRIPT_FLAGS = ("--runtime.nnodes", "--runtime.node-rank", "--runtime.node_rank",
                "--runtime.rdzv-endpoint", "--runtime.rdzv_endpoint", "--runtime.rdzv-id",
                "--runtime.rdzv_id", "--runtime.nproc-per-node", "--runtime.nproc_per_node")


@dataclass
class SlurmArgs:
    """Write a SLURM batch script running a parallab command on several nodes (and submit it)."""
    command: str = "sweep --config configs/demo.toml"
    """The parallab command and its settings, as one quoted argument: train, sweep or verify."""
    nodes: int = 2
    gpus_per_node: int = 0
    """GPUs to ask for per node (0: CPU nodes; give devices_per_node)."""
    devices_per_node: int = 0
    """parallab devices (worker processes) per node; 0 = gpus_per_node."""
    cpus_per_task: int = 16
    """CPU cores per node (the one task per node runs all of that node's workers)."""
    partition: str | None = None
    account: str | None = None
    time: str = "01:00:00"
    """Wall-clock limit: [D-]HH:MM:SS, MM:SS or minutes."""
    job_name: str = "parallab"
    output: str = "slurm-%x-%j.out"
    """SLURM's log file (#SBATCH --output; %x = job name, %j = job id)."""
    script: str = "parallab-slurm.sh"
    """Where the batch script is written."""
    port: int = 29500
    """Rendezvous port on the first node."""
    submit: bool = False
    """Also run sbatch on the script."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_slurm(a: SlurmArgs) -> tuple[list[str], int]:
    """(the parallab command's words, devices per node); ConfigError naming a bad value."""
    try:
        words = shlex.split(a.command)
    except ValueError as e:
        raise ConfigError(f"command={a.command!r} cannot be split into words ({e})") from None
    _check(bool(words) and words[0] in NODE_COMMANDS,
           f"command={a.command!r} must start with one of {', '.join(NODE_COMMANDS)} "
           "(the parallab command to run on every node)")
    for w in words:
        flag = w.split("=", 1)[0]
        _check(flag not in SCRIPT_FLAGS, f"command={a.command!r} sets {flag}, which the script sets "
                                         "for every node; leave it out")
    _check(a.nodes >= 1, f"nodes={a.nodes} must be at least 1")
    _check(a.gpus_per_node >= 0 and a.devices_per_node >= 0,
           f"gpus_per_node={a.gpus_per_node} and devices_per_node={a.devices_per_node} must be >= 0")
    per_node = a.devices_per_node or a.gpus_per_node
    _check(per_node >= 1, "give gpus_per_node (GPU nodes) or devices_per_node (CPU nodes): "
                          "both are 0")
    _check(not a.gpus_per_node or per_node <= a.gpus_per_node,
           f"devices_per_node={per_node} is more than gpus_per_node={a.gpus_per_node}")
    _check(a.cpus_per_task >= 1, f"cpus_per_task={a.cpus_per_task} must be at least 1")
    _check(re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", a.time) is not None,
           f"time={a.time!r} is not a SLURM time limit ([D-]HH:MM:SS, MM:SS or minutes)")
    for name in ("job_name", "partition", "account"):
        value = getattr(a, name)
        _check(value is None or re.fullmatch(r"[A-Za-z0-9_.,+-]+", value) is not None,
               f"{name}={value!r} may hold only letters, digits and _ . , + -")
    _check(bool(a.output) and not re.search(r"\s", a.output),
           f"output={a.output!r} must be a path without spaces")
    _check(1024 <= a.port <= 65535, f"port={a.port} is not a usable TCP port (1024-65535)")
    return words, per_node


def slurm_script(a: SlurmArgs, *, python: str | None = None, workdir: str | None = None) -> str:
    """The batch script's text."""
    words, per_node = validate_slurm(a)
    python = python or sys.executable
    workdir = workdir or os.getcwd()
    sb = [f"--job-name={a.job_name}", f"--nodes={a.nodes}", "--ntasks-per-node=1",
          f"--cpus-per-task={a.cpus_per_task}"]
    if a.gpus_per_node:
        sb.append(f"--gpus-per-node={a.gpus_per_node}")
    sb.append(f"--time={a.time}")
    if a.partition:
        sb.append(f"--partition={a.partition}")
    if a.account:
        sb.append(f"--account={a.account}")
    sb.append(f"--output={a.output}")
    kind = f"{a.gpus_per_node} GPU(s)" if a.gpus_per_node else "CPU"
    cmd = " ".join(shlex.quote(w) for w in words)
    lines = [
        "#!/bin/bash",
        f"# parallab on {a.nodes} node(s) x {per_node} device(s) ({kind} per node), written by",
        "# `parallab slurm` (docs/MULTI-NODE.md). Submit with: sbatch " + shlex.quote(a.script),
        *[f"#SBATCH {s}" for s in sb],
        "set -eu  # no pipefail: head closing the pipe early must not end the job",
        "",
        "# One task per node: parallab starts one torchrun per configuration there, which starts",
        f"# the node's {per_node} worker(s). Node 0 (the allocation's first host) hosts the",
        "# rendezvous and writes results.jsonl; give the nodes a shared run folder (runtime.out_dir).",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        '[ -n "$HEAD_NODE" ] || { echo "parallab: no host in SLURM_JOB_NODELIST" >&2; exit 1; }',
        f"RDZV_PORT={a.port}",
        "export HEAD_NODE RDZV_PORT",
        "",
        "# The network between nodes. Default: the interface of the route to HEAD_NODE. To choose",
        "# it (see `ip -br addr` on a compute node), uncomment and set:",
        "# export NCCL_SOCKET_IFNAME=ib0     # NCCL's bootstrap and socket traffic (GPU runs)",
        "# export NCCL_IB_HCA=mlx5           # the InfiniBand adapters NCCL may use",
        "# export GLOO_SOCKET_IFNAME=ib0     # gloo (CPU runs)",
        "# export NCCL_DEBUG=INFO            # the logs then say 'via NET/IB' (InfiniBand) or 'NET/Socket' (TCP)",
        "# Firewall: RDZV_PORT on HEAD_NODE and the NCCL/gloo ports between all nodes must be open.",
        "",
        f"cd {shlex.quote(workdir)}",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        "  bash -c 'exec \"$@\" --runtime.node-rank \"$SLURM_NODEID\"' parallab-node \\",
        f"  {shlex.quote(python)} -m parallab {cmd} \\",
        f'  --runtime.nnodes "$SLURM_NNODES" --runtime.nproc-per-node {per_node} \\',
        '  --runtime.rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" --runtime.rdzv-id "slurm-$SLURM_JOB_ID"',
        "",
    ]
    return "\n".join(lines)


def cmd_slurm(a: SlurmArgs) -> int:
    text = slurm_script(a)
    path = Path(a.script)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    except OSError as e:
        raise ConfigError(f"script={a.script!r} cannot be written ({e.strerror or e})") from None
    print(f"wrote {path}")
    if not a.submit:
        print(f"submit with: sbatch {shlex.quote(str(path))}")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError(f"sbatch was not found on PATH: submit {path} with `sbatch {path}` on a "
                          "machine of the cluster")
    out = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return out.returncode
