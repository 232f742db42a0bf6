"""Multi-node pieces without processes: node settings, which configurations a node runs, the
torchrun arguments, the mesh's placement over nodes, GPU topology and network summaries."""

import dataclasses

import pytest

from parallab.config import (ConfigError, DataSection, ParallelSection, RuntimeSection, SweepArgs, SweepSection,
                             TrainArgs, ModelSection, parallel_dims, validate_sweep)
from parallab.parallel.dims import MESH_ORDER, dims_for
from parallab.runtime import nodes
from parallab.runtime.device import route_interface, summarize_gpu_topology
from parallab.runtime.layout import OrderedDims, check_mesh_order, describe, mesh_groups, placement, with_order


def rt(**kw) -> RuntimeSection:
    base = dict(nnodes=2, rdzv_endpoint="127.0.0.1:29500", run_id="mn")
    return RuntimeSection(**(base | kw))


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("value,expected", [(1, (1, 1)), ("2", (2, 2)), ("1:4", (1, 4)), (" 3:3 ", (3, 3))])
def test_parse_nnodes(value, expected):
    assert nodes.parse_nnodes(value) == expected


@pytest.mark.parametrize("value", ["0", "4:2", "two", "1:", "-1", "1:2:3"])
def test_parse_nnodes_refuses(value):
    with pytest.raises(ConfigError, match="nnodes"):
        nodes.parse_nnodes(value)


@pytest.mark.parametrize("endpoint,expected", [("node1:29500", ("node1", 29500)),
                                               ("10.0.0.1:1234", ("10.0.0.1", 1234)),
                                               ("[fe80::1]:29500", ("fe80::1", 29500))])
def test_parse_endpoint(endpoint, expected):
    assert nodes.parse_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["node1", "node1:", ":29500", "a b:1", "node1:0", "node1:70000"])
def test_parse_endpoint_refuses(endpoint):
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        nodes.parse_endpoint(endpoint)


@pytest.mark.parametrize("kw,needle", [
    (dict(node_rank=2), "node_rank=2 must be in 0..1"),
    (dict(node_rank=-1), "node_rank=-1"),
    (dict(rdzv_endpoint=None), "needs runtime.rdzv_endpoint"),
    (dict(run_id=None), "needs a name for the run"),
    (dict(run_id="a/b"), "may hold only"),
    (dict(rdzv_timeout_s=0), "rdzv_timeout_s=0"),
    (dict(nproc_per_node=-1), "nproc_per_node=-1"),
])
def test_node_settings_refused(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        nodes.check_node_settings(rt(**kw))


def test_one_node_needs_nothing():
    nodes.check_node_settings(RuntimeSection())
    assert not nodes.is_multinode(RuntimeSection())
    assert nodes.config_launch(RuntimeSection(), 4, "ddp-4") is None


def test_run_name_falls_back_to_rdzv_id():
    assert nodes.run_name(rt(run_id=None, rdzv_id="job42")) == "job42"
    assert nodes.run_name(rt(run_id="mine", rdzv_id="job42")) == "mine"


def train_args(devices, **runtime) -> TrainArgs:
    return TrainArgs(model=ModelSection(preset="debug"),
                     parallel=ParallelSection(strategy="ddp", devices=devices),
                     runtime=rt(backend="gloo", **runtime))


def test_plan_train_splits_devices_over_nodes():
    args = nodes.plan_train(train_args(4))
    assert args.runtime.nproc_per_node == 2
    with pytest.raises(ConfigError, match=r"parallel.devices=6 does not match runtime.nnodes=2 nodes x "
                                          r"runtime.nproc_per_node=2"):
        nodes.plan_train(train_args(6, nproc_per_node=2))
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        nodes.plan_train(train_args(3))
    elastic = nodes.plan_train(train_args(4, nnodes="1:4", nproc_per_node=2))
    assert nodes.config_launch(elastic.runtime, 4, "ddp-4").nnodes == "1:4"
    with pytest.raises(ConfigError, match="elastic"):
        nodes.plan_train(train_args(4, nnodes="1:4"))


def test_torchrun_arguments_of_a_spanning_configuration():
    args = nodes.plan_train(train_args(4, node_rank=1, rdzv_timeout_s=30))
    launch = nodes.config_launch(args.runtime, 4, "ddp-4")
    argv = launch.torchrun_args()
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
    assert argv[argv.index("--rdzv-endpoint") + 1] == "127.0.0.1:29500"
    assert argv[argv.index("--rdzv-id") + 1] == "mn-ddp-4"  # one rendezvous per configuration
    assert argv[argv.index("--rdzv-conf") + 1] == "join_timeout=30,read_timeout=30,is_host=0"
    assert launch.env() == {"PARALLAB_NODE_RANK": "1", "PARALLAB_RDZV_ENDPOINT": "127.0.0.1:29500"}
    assert nodes.file_suffix(args.runtime) == ".node1" and not nodes.writes_results(args.runtime)


def test_torchrun_command_single_node_unchanged_multi_node_c10d(tmp_path):
    from parallab.bench.launch import torchrun_command

    single = torchrun_command(2, tmp_path / "s.json", port=1234)
    assert "--master-addr" in single and "127.0.0.1" in single and "c10d" not in single
    launch = nodes.config_launch(nodes.plan_train(train_args(4)).runtime, 4, "ddp-4")
    multi = torchrun_command(4, tmp_path / "s.json", port=1234, nodes=launch)
    assert "--master-addr" not in multi and "c10d" in multi and "is_host=1" in " ".join(multi)


def sweep_args(counts, **runtime) -> SweepArgs:
    return SweepArgs(model=ModelSection(preset="debug"), runtime=rt(backend="gloo", **runtime),
                     data=DataSection(global_batch=48),
                     sweep=SweepSection(strategies=("ddp",), device_counts=counts, modes=("train",)))


def test_a_sweep_runs_small_counts_on_node_0_and_large_ones_across_nodes():
    configs = validate_sweep(sweep_args((1, 2, 4)))  # 2 nodes x 2 devices (4 / 2 nodes)
    plan = {}
    for c in configs:
        launch = nodes.config_launch(c.runtime, c.parallel.devices, f"x-{c.parallel.devices}")
        plan[c.parallel.devices] = (launch and launch.nnodes,
                                    nodes.takes_part(c.runtime, launch),
                                    nodes.takes_part(dataclasses.replace(c.runtime, node_rank=1), launch))
    # devices: (torchrun --nnodes or None for node 0's loopback, node 0 runs it, node 1 runs it)
    assert plan == {1: (None, True, False), 2: (None, True, False), 4: ("2", True, True)}


def test_a_sweep_count_that_does_not_fit_the_nodes_is_refused():
    with pytest.raises(ConfigError, match="device count 6 on 2 nodes x 4 devices"):
        validate_sweep(sweep_args((2, 6, 8), nproc_per_node=4))
    with pytest.raises(ConfigError, match="fixed number of nodes"):
        validate_sweep(sweep_args((2, 4), nnodes="1:2", nproc_per_node=2))


def test_rendezvous_failures_are_named():
    launch = nodes.config_launch(nodes.plan_train(train_args(4, rdzv_timeout_s=20)).runtime, 4, "ddp-4")
    reason = nodes.rendezvous_failure("...\ntorch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n", launch)
    assert "rendezvous timed out after 20 s" in reason and "127.0.0.1:29500" in reason
    assert "could not reach" in nodes.rendezvous_failure("RendezvousConnectionError: x", launch)
    assert nodes.rendezvous_failure("RuntimeError: boom", launch) is None


# ---------------------------------------------------------------- the endpoint


def test_endpoint_of_node_0_must_be_local_and_free():
    from parallab.runtime.dist import free_port

    nodes.check_endpoint(rt(rdzv_endpoint=f"127.0.0.1:{free_port()}"))
    with pytest.raises(ConfigError, match="not an address of this machine"):
        nodes.check_endpoint(rt(rdzv_endpoint="192.0.2.1:29500"))  # TEST-NET-1: never local
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="cannot be used on this machine"):
            nodes.check_endpoint(rt(rdzv_endpoint=f"127.0.0.1:{s.getsockname()[1]}"))


def test_endpoint_of_another_node_refused_is_fine_unresolvable_is_not():
    from parallab.runtime.dist import free_port

    nodes.check_endpoint(rt(node_rank=1, rdzv_endpoint=f"127.0.0.1:{free_port()}"))  # node 0 not up yet
    with pytest.raises(ConfigError, match="cannot be resolved"):
        nodes.check_endpoint(rt(node_rank=1, rdzv_endpoint="no-such-host.invalid:29500"))


# ---------------------------------------------------------------- the mesh over nodes


def test_default_order_keeps_tp_and_fsdp_inside_a_node():
    assert MESH_ORDER == ("pp", "dp_replicate", "dp_shard", "tp")
    # fsdp+tp on 2 nodes x 4: tp pairs inside a node; each dp_shard group (4 ranks) spans both.
    dims = dims_for("fsdp+tp", 8, tp=2)
    assert mesh_groups(dims)["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert placement(dims, 4) == {"dp_shard": "across nodes", "tp": "within nodes"}
    # tp over a whole node: tp inside, the FSDP dimension (one rank per node) across.
    assert placement(dims_for("fsdp+tp", 8, tp=4), 4) == {"dp_shard": "across nodes", "tp": "within nodes"}
    # pipeline+ddp: replicas inside a node, pipeline stages across nodes.
    assert placement(dims_for("pipeline+ddp", 8, pp=2), 4) == {"pp": "across nodes",
                                                               "dp_replicate": "within nodes"}
    # HSDP-like: shard inside the node, replicate across.
    from parallab.parallel.dims import ParallelDims

    hsdp = ParallelDims(world_size=8, dp_replicate=2, dp_shard=4)
    assert placement(hsdp, 4) == {"dp_replicate": "across nodes", "dp_shard": "within nodes"}
    assert "tp=2 within nodes" in describe(dims, 2, 4)
    # 3 devices per node: the pair (2, 3) straddles the boundary.
    assert placement(dims_for("fsdp+tp", 6, tp=2), 3)["tp"] == "partly across nodes"


def test_mesh_order_override_moves_tp_across_nodes():
    p = ParallelSection(strategy="fsdp+tp", devices=8, tp=4,
                        mesh_order=("tp", "pp", "dp_replicate", "dp_shard"))
    dims = parallel_dims(p)
    assert isinstance(dims, OrderedDims) and dims.active() == ["tp", "dp_shard"]
    assert placement(dims, 4) == {"tp": "across nodes", "dp_shard": "within nodes"}
    assert "cross the node boundary" in describe(dims, 2, 4)
    assert with_order(dims_for("ddp", 4), ()) == dims_for("ddp", 4)
    assert with_order(dims_for("ddp", 4), MESH_ORDER) == dims_for("ddp", 4)


@pytest.mark.parametrize("order", [("tp",), ("tp", "tp", "pp", "dp_shard"), ("fsdp", "pp", "dp_replicate", "tp")])
def test_mesh_order_must_name_each_dimension_once(order):
    with pytest.raises(ValueError, match="exactly once"):
        check_mesh_order(order)
    with pytest.raises(ConfigError, match="mesh_order"):
        parallel_dims(ParallelSection(strategy="ddp", devices=2, mesh_order=order))


# ---------------------------------------------------------------- the machine


TOPO = """\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \t{a}\t{b}\tNV18\tSYS\t0-55\t0\t\tN/A
GPU1\t{a}\t X \tNV18\tNV18\tSYS\t0-55\t0\t\tN/A
GPU2\t{b}\tNV18\t X \tNV18\tSYS\t56-111\t1\t\tN/A
GPU3\tNV18\tNV18\tNV18\t X \tSYS\t56-111\t1\t\tN/A
NIC0\tSYS\tSYS\tSYS\tSYS\t X

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def test_gpu_topology_summaries():
    assert summarize_gpu_topology(TOPO.format(a="NV18", b="NV18")) == "NV18 between all GPUs"
    assert summarize_gpu_topology(TOPO.format(a="NV12", b="NV18")) == "NVLink between all GPUs (NV12/NV18)"
    assert summarize_gpu_topology(TOPO.format(a="SYS", b="PHB")) == \
        "NVLink on 4 of 6 GPU pairs (NV18), PCIe (PHB/SYS) on the rest"
    pcie = TOPO.format(a="PHB", b="SYS").replace("NV18", "SYS")
    assert summarize_gpu_topology(pcie) == "PCIe (PHB/SYS)"
    assert summarize_gpu_topology("\tGPU0\tCPU Affinity\nGPU0\t X \t0-7\n") == "1 GPU"
    assert summarize_gpu_topology(None) is None and summarize_gpu_topology("no GPUs") is None


def test_route_interface_and_network_interface(monkeypatch):
    from parallab.runtime.device import network_interface

    assert route_interface("127.0.0.1") == "lo"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    assert network_interface("nccl") == "ib0 (NCCL_SOCKET_IFNAME)"
    assert network_interface("gloo") == "eth1 (GLOO_SOCKET_IFNAME)"
    monkeypatch.delenv("NCCL_SOCKET_IFNAME")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("PARALLAB_RDZV_ENDPOINT", "127.0.0.1:29500")
    assert network_interface("gloo") == "lo (route to 127.0.0.1)"


def test_machine_info_has_the_row_keys():
    from parallab.bench.result import ROW_KEYS
    from parallab.runtime.device import machine_info

    info = machine_info(hosts=["a", "b"])
    assert set(info) <= set(ROW_KEYS) and "nodes" not in info  # rows set nodes themselves
    assert info["hosts"] == ["a", "b"] and info["node_rank"] == 0
    for key in ("hosts", "node_rank", "devices_per_node", "network_interface", "cpu_model", "cpu_cores"):
        assert key in info
