"""Inference over several nodes without processes: which configurations of an inference sweep
span nodes, what the launcher starts (torchrun's c10d arguments, per-node file names, the
reason of a rendezvous that never formed), and the node fields of the rows."""

import json
import types

import pytest
import torch

from parallab.config import (InferArgs, InferSection, InferSweepArgs, ModelSection, ParallelSection,
                             RuntimeSection, SweepSection)
from parallab.infer.settings import infer_config_id, validate_infer_sweep
from parallab.runtime import nodes


def runtime(tmp_path, **kw) -> RuntimeSection:
    base = dict(nnodes=2, rdzv_endpoint="127.0.0.1:29500", run_id="mi", backend="gloo", out_dir=str(tmp_path))
    return RuntimeSection(**(base | kw))


def test_an_inference_sweep_runs_small_counts_on_node_0_and_large_ones_across_nodes(tmp_path):
    args = InferSweepArgs(model=ModelSection(preset="debug"), runtime=runtime(tmp_path),
                          sweep=SweepSection(strategies=("replicas", "pipeline"), device_counts=(2, 4)))
    plan = {}
    for c in validate_infer_sweep(args):  # 2 nodes x 2 devices (4 / 2 nodes)
        cid = infer_config_id(c)
        launch = nodes.config_launch(c.runtime, c.parallel.devices, cid)
        plan[cid] = (launch and launch.rdzv_id, nodes.takes_part(c.runtime, launch),
                     nodes.takes_part(runtime(tmp_path, node_rank=1), launch))
    # (rendezvous id or None for node 0's loopback, node 0 runs it, node 1 runs it)
    assert plan == {"infer-single-1": (None, True, False), "infer-replicas-2": (None, True, False),
                    "infer-pipeline-m4-2": (None, True, False),
                    "infer-replicas-4": ("mi-infer-replicas-4", True, True),
                    "infer-pipeline-m4-4": ("mi-infer-pipeline-m4-4", True, True)}


def test_launch_infer_on_node_1_meets_at_the_rendezvous(tmp_path, monkeypatch):
    """Node 1's launcher: torchrun with the c10d rendezvous and node 1's environment, its own
    file names; a rendezvous that never formed gives the row a one-line reason and 2 nodes."""
    from parallab.bench.launch import RunFolder
    from parallab.infer import commands

    seen = {}

    def fake_run_torchrun(cmd, *, log_path, folder, threads, timeout_s, env_extra=None):
        seen.update(cmd=cmd, log=log_path, env=env_extra)
        log_path.write_text("torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n")
        return 1, "ok", None, 2.5

    monkeypatch.setattr(commands, "run_torchrun", fake_run_torchrun)
    args = InferArgs(model=ModelSection(preset="debug"),
                     parallel=ParallelSection(strategy="replicas", devices=4),
                     infer=InferSection(batch_sizes=(1,)),
                     runtime=runtime(tmp_path, node_rank=1, nproc_per_node=2, rdzv_timeout_s=20))
    folder = RunFolder(tmp_path / "mi").create()
    (row,) = commands.launch_infer(args, folder, run_id="mi", reference=None, save_reference=False,
                                   peak_flops=None, peak_flops_source=None, timeout_s=60)
    cmd = seen["cmd"]
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d" and "--master-addr" not in cmd
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--rdzv-id") + 1] == "mi-infer-replicas-4"
    assert "parallab.infer.worker" in cmd and cmd[-1].endswith("configs/infer-replicas-4.node1.json")
    assert seen["env"]["PARALLAB_NODE_RANK"] == "1" and seen["log"].name == "infer-replicas-4.node1.log"
    spec = json.loads((folder.root / "configs/infer-replicas-4.node1.json").read_text())
    assert spec["result_path"].endswith("rows/infer-replicas-4.node1.json")
    assert row["status"] == "failed" and row["nodes"] == 2 and row["mode"] == "infer"
    assert "rendezvous timed out after 20 s: not every node joined" in row["reason"]
    assert row["wall_s"] == 2.5


@pytest.mark.parametrize("hosts,per_node,cores,oversubscribed", [
    (["a", "b"], 2, 2, False),  # 2 machines, 2 workers each, 2 cores each
    (["a", "a"], 2, 2, True),   # two node agents on one machine: 4 workers on its 2 cores
    (None, None, 8, False),     # one node, no host list: the devices on this machine
])
def test_rows_carry_the_nodes(tmp_path, hosts, per_node, cores, oversubscribed):
    from parallab.infer.rows import base_fields
    from parallab.runtime.dist import DistInfo
    from parallab.worker import WorkerSpec

    engine = types.SimpleNamespace(par=types.SimpleNamespace(dims=types.SimpleNamespace(
        dp=4, pp=1, tp=1, dp_shard=1)), n_params=10)
    info = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"), backend="gloo")
    spec = WorkerSpec(args={}, run_id="mi", config_id="infer-replicas-4", result_path="", cache_dir="")
    args = InferArgs(parallel=ParallelSection(strategy="replicas", devices=4), runtime=runtime(tmp_path))
    machine = {"cpu_cores": cores, "node_rank": 1 if hosts else 0, "devices_per_node": per_node}
    if hosts:
        machine["hosts"] = hosts
    base = base_fields(spec=spec, args=args, engine=engine, info=info, machine=machine, verify={})
    assert base["nodes"] == (len(hosts) if hosts else 1)
    assert base["node_rank"] == machine["node_rank"] and base["devices_per_node"] == per_node
    assert base["oversubscribed"] is oversubscribed
