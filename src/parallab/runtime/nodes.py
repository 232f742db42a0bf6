"""Runs over several machines ("nodes"): the node settings' checks, which configurations a node
takes part in, torchrun's c10d rendezvous arguments, and the two collectives that keep a
run's results in one place.

The same command runs on every node. Each node's parallab starts one torchrun per
configuration; the torchruns meet at the rendezvous endpoint (hosted by node_rank 0) and start
nnodes x nproc_per_node workers. Global ranks are assigned by the rendezvous (torchrun ignores
``--node-rank`` for c10d), so node_rank is parallab's own: node 0 hosts the rendezvous, runs the
one-node configurations of a sweep, and is the only node that appends rows to results.jsonl.
Global rank 0 computes each row and broadcasts it, so node 0 has it whichever node rank 0 ran on
and whether or not the run folder is on a filesystem every node sees.

Nothing here imports torch at module level (config validation uses it).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any

from parallab.config import ConfigError

# Environment the launcher gives its workers (every node's launcher its own values).
ENV_NODE_RANK = "PARALLAB_NODE_RANK"
ENV_RDZV_ENDPOINT = "PARALLAB_RDZV_ENDPOINT"

CONNECT_TIMEOUT_S = 3.0
RESOLVE_TIMEOUT_S = 5.0


class NodeError(ConfigError):
    """A node setting that cannot work: one line naming the value (exit code 2)."""


# ---------------------------------------------------------------- settings


def parse_nnodes(value: Any) -> tuple[int, int]:
    """``2`` -> (2, 2); ``"1:4"`` -> (1, 4) (an elastic range, torchrun's MIN:MAX)."""
    text = str(value).strip()
    m = re.fullmatch(r"(\d+)(?::(\d+))?", text)
    if not m:
        raise NodeError(f"runtime.nnodes={text!r} must be a node count (e.g. 2) or an elastic "
                        "range MIN:MAX (e.g. 1:4)")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if not 1 <= lo <= hi:
        raise NodeError(f"runtime.nnodes={text!r}: the node count must be at least 1 and MIN <= MAX")
    return lo, hi


def is_multinode(runtime) -> bool:
    return parse_nnodes(runtime.nnodes)[1] > 1


def is_elastic(runtime) -> bool:
    lo, hi = parse_nnodes(runtime.nnodes)
    return lo != hi


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[addr]:port') -> (host, port)."""
    text = (endpoint or "").strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9_.-]+):(\d+)", text)
    if not m:
        raise NodeError(f"runtime.rdzv_endpoint={endpoint!r} is not host:port (e.g. node001:29500, "
                        "the first node's address and a free port, the same on every node)")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 1 <= int(port) <= 65535:
        raise NodeError(f"runtime.rdzv_endpoint={endpoint!r}: port {port} is not in 1..65535")
    return host, int(port)


def run_name(runtime) -> str | None:
    """The run's name on every node: runtime.run_id, else runtime.rdzv_id."""
    return runtime.run_id or runtime.rdzv_id


def check_node_settings(runtime) -> None:
    """Checks that need no network and no device (every command, before anything starts)."""
    lo, hi = parse_nnodes(runtime.nnodes)
    if runtime.node_rank < 0 or runtime.node_rank >= hi:
        raise NodeError(f"runtime.node_rank={runtime.node_rank} must be in 0..{hi - 1} for "
                        f"runtime.nnodes={runtime.nnodes} (node 0 hosts the rendezvous)")
    if runtime.nproc_per_node < 0:
        raise NodeError(f"runtime.nproc_per_node={runtime.nproc_per_node} must be >= 0 "
                        "(0 = detect: the GPUs of the node, or devices / nnodes)")
    if runtime.rdzv_timeout_s <= 0:
        raise NodeError(f"runtime.rdzv_timeout_s={runtime.rdzv_timeout_s} must be positive")
    if hi == 1:
        return
    if not runtime.rdzv_endpoint:
        raise NodeError(f"runtime.nnodes={runtime.nnodes} needs runtime.rdzv_endpoint host:port: the "
                        "first node's (node_rank 0) address and a free port, the same on every node")
    parse_endpoint(runtime.rdzv_endpoint)
    name = run_name(runtime)
    if not name:
        raise NodeError(f"runtime.nnodes={runtime.nnodes} needs a name for the run, the same on every "
                        "node: set runtime.run_id (or runtime.rdzv_id, e.g. $SLURM_JOB_ID)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise NodeError(f"run name {name!r} (runtime.run_id / rdzv_id) may hold only letters, digits, "
                        "'_', '.', '-'")


def local_gpu_count(backend: str = "auto") -> int:
    """GPUs this node would use (0 on a CPU machine or with backend gloo)."""
    if backend == "gloo":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _with_nproc(args, nproc: int):
    runtime = dataclasses.replace(args.runtime, nproc_per_node=nproc)
    return dataclasses.replace(args, runtime=runtime)


def plan_train(args):
    """A multi-node ``train``: every node runs parallel.devices / nnodes processes.
    Returns ``args`` with runtime.nproc_per_node resolved (unchanged for one node)."""
    r, devices = args.runtime, args.parallel.devices
    if not is_multinode(r):
        return args
    lo, hi = parse_nnodes(r.nnodes)
    gpus = local_gpu_count(r.backend)
    nproc = r.nproc_per_node or gpus
    if not nproc:
        if lo != hi:
            raise NodeError(f"an elastic runtime.nnodes={r.nnodes} needs runtime.nproc_per_node "
                            "(devices per node)")
        if devices % hi:
            raise NodeError(f"parallel.devices={devices} cannot be split evenly over runtime.nnodes={hi} "
                            f"nodes (give a multiple of {hi})")
        nproc = devices // hi
    if gpus and nproc > gpus:
        raise NodeError(f"runtime.nproc_per_node={nproc} but this node has {gpus} GPU(s)")
    if devices % nproc or not lo <= devices // nproc <= hi:
        want = f"{hi} x {nproc} = {hi * nproc}" if lo == hi else \
            f"a multiple of {nproc} from {lo * nproc} to {hi * nproc}"
        raise NodeError(f"parallel.devices={devices} does not match runtime.nnodes={r.nnodes} nodes x "
                        f"runtime.nproc_per_node={nproc} devices per node (give devices = {want})")
    return _with_nproc(args, nproc)


def plan_sweep(args, configs: list):
    """A multi-node sweep or verify: a device count up to nproc_per_node runs on node 0 alone;
    a larger one must be a multiple of it and runs on count / nproc_per_node nodes.
    Returns the configurations with runtime.nproc_per_node resolved."""
    r = args.runtime
    if not is_multinode(r):
        return configs
    if is_elastic(r):
        raise NodeError(f"a sweep runs on a fixed number of nodes, not the elastic runtime.nnodes={r.nnodes}")
    nnodes = parse_nnodes(r.nnodes)[1]
    counts = sorted({c.parallel.devices for c in configs})
    gpus = local_gpu_count(r.backend)
    nproc = r.nproc_per_node or gpus
    if not nproc:
        if counts[-1] % nnodes:
            raise NodeError(f"the largest device count {counts[-1]} cannot be split evenly over "
                            f"runtime.nnodes={nnodes} nodes; give runtime.nproc_per_node")
        nproc = counts[-1] // nnodes
    if gpus and nproc > gpus:
        raise NodeError(f"runtime.nproc_per_node={nproc} but this node has {gpus} GPU(s)")
    for n in counts:
        if n > nproc and (n % nproc or n // nproc > nnodes):
            raise NodeError(f"device count {n} on {nnodes} nodes x {nproc} devices: a count above "
                            f"{nproc} must be a multiple of {nproc} and at most {nnodes * nproc}")
    return [_with_nproc(c, nproc) for c in configs]


# ---------------------------------------------------------------- the endpoint, reachable?


def _resolve(host: str, port: int) -> list[str]:
    result: dict[str, Any] = {}

    def work():
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(RESOLVE_TIMEOUT_S)
    if t.is_alive():
        raise NodeError(f"runtime.rdzv_endpoint host {host!r} did not resolve within "
                        f"{RESOLVE_TIMEOUT_S:.0f} s (check the name or give an IP address)")
    if "error" in result:
        e = result["error"]
        raise NodeError(f"runtime.rdzv_endpoint host {host!r} cannot be resolved "
                        f"({getattr(e, 'strerror', None) or e}): give the first node's name or IP")
    return [info[4][0] for info in result["infos"]]


def _is_local_address(ip: str) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
            return True
        except OSError:
            return False


def check_endpoint(runtime) -> None:
    """Before a multi-node launch: the endpoint's host resolves; on node 0 it is an address of
    this machine with the port free (node 0 hosts the rendezvous there); on other nodes a TCP
    connection to it does not time out or find no route. A refused connection is fine there:
    the host answered, node 0 has just not started its rendezvous yet (the node then waits up to
    runtime.rdzv_timeout_s)."""
    if not is_multinode(runtime):
        return
    endpoint = runtime.rdzv_endpoint
    host, port = parse_endpoint(endpoint)
    ips = _resolve(host, port)
    if runtime.node_rank == 0:
        local = [ip for ip in ips if _is_local_address(ip)]
        if not local:
            raise NodeError(f"runtime.rdzv_endpoint={endpoint!r}: {host} ({', '.join(sorted(set(ips)))}) "
                            "is not an address of this machine, but node_rank 0 hosts the rendezvous: "
                            "give node 0's own name or IP")
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((local[0], port))
            except OSError as e:
                raise NodeError(f"runtime.rdzv_endpoint={endpoint!r}: port {port} cannot be used on this "
                                f"machine ({e.strerror or e}): choose another port") from None
        return
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except ConnectionRefusedError:
        return  # reachable; node 0's rendezvous is not up yet
    except socket.timeout:
        raise NodeError(f"runtime.rdzv_endpoint={endpoint!r} is unreachable from this node (no answer "
                        f"within {CONNECT_TIMEOUT_S:.0f} s): check the address and that the firewall "
                        f"lets port {port} through") from None
    except OSError as e:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EADDRNOTAVAIL):
            raise NodeError(f"runtime.rdzv_endpoint={endpoint!r} is unreachable from this node "
                            f"({e.strerror}): check the address and the network") from None
        raise NodeError(f"runtime.rdzv_endpoint={endpoint!r}: cannot connect ({e.strerror or e})") from None


# ---------------------------------------------------------------- launching one configuration


@dataclass(frozen=True)
class NodeLaunch:
    """How one configuration starts on this node when it spans several nodes."""
    nnodes: str
    """torchrun's --nnodes: a count or MIN:MAX."""
    nproc_per_node: int
    node_rank: int
    endpoint: str
    rdzv_id: str
    timeout_s: float

    def torchrun_args(self) -> list[str]:
        """torchrun's c10d rendezvous arguments. join_timeout: how long a node waits for the
        others; read_timeout: how long a node may wait for node 0's store to come up (a node
        started before node 0 keeps retrying the connection); is_host: node 0 hosts the store,
        stated rather than guessed from host names. No --node-rank: torchrun ignores it for c10d
        (the rendezvous assigns the ranks)."""
        t = max(1, round(self.timeout_s))
        conf = f"join_timeout={t},read_timeout={t},is_host={1 if self.node_rank == 0 else 0}"
        return ["--nnodes", self.nnodes, "--nproc-per-node", str(self.nproc_per_node),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.rdzv_id,
                "--rdzv-conf", conf]

    def env(self) -> dict[str, str]:
        return {ENV_NODE_RANK: str(self.node_rank), ENV_RDZV_ENDPOINT: self.endpoint}

    @property
    def max_nodes(self) -> int:
        return parse_nnodes(self.nnodes)[1]


def config_launch(runtime, devices: int, config_id: str) -> NodeLaunch | None:
    """This configuration's multi-node launch, or None when it runs on one node (the loopback
    rendezvous of a single-node run)."""
    if not is_multinode(runtime):
        return None
    nproc = runtime.nproc_per_node
    assert nproc > 0, "nproc_per_node is resolved by plan_train / plan_sweep"
    if devices <= nproc and not is_elastic(runtime):
        return None
    nnodes = runtime.nnodes if is_elastic(runtime) else devices // nproc
    # A rendezvous id of its own per configuration: consecutive configurations never mix.
    return NodeLaunch(nnodes=str(nnodes), nproc_per_node=nproc, node_rank=runtime.node_rank,
                      endpoint=runtime.rdzv_endpoint, rdzv_id=f"{run_name(runtime)}-{config_id}",
                      timeout_s=runtime.rdzv_timeout_s)


def takes_part(runtime, launch: NodeLaunch | None) -> bool:
    """Whether this node runs the configuration: node 0 runs every one; another node runs
    those that span it (node ranks below the configuration's node count)."""
    if launch is None:
        return runtime.node_rank == 0
    return runtime.node_rank < launch.max_nodes


def writes_results(runtime) -> bool:
    """Only node 0's launcher appends rows and writes reports."""
    return runtime.node_rank == 0


def file_suffix(runtime) -> str:
    """Per-node names for the files every node's launcher writes (spec, log, row), so that a
    run folder on a filesystem the nodes share never gets two writers for one file."""
    return f".node{runtime.node_rank}" if is_multinode(runtime) and runtime.node_rank else ""


def rendezvous_failure(log_text: str, launch: NodeLaunch) -> str | None:
    """A one-line reason for a multi-node start that never got going, from torchrun's log."""
    where = (f"endpoint {launch.endpoint}, rdzv id {launch.rdzv_id}, {launch.nnodes} nodes x "
             f"{launch.nproc_per_node}")
    if "RendezvousTimeoutError" in log_text:
        return (f"rendezvous timed out after {launch.timeout_s:.0f} s: not every node joined ({where}); "
                "start the same command on every node, or check the endpoint and firewall")
    if "RendezvousConnectionError" in log_text or "The client socket has timed out" in log_text:
        return (f"could not reach the rendezvous at {launch.endpoint} within {launch.timeout_s:.0f} s "
                f"({where}): is node 0 running, and is its port open?")
    if "RendezvousClosedError" in log_text:
        return f"the rendezvous was closed before this node joined ({where})"
    return None


# ---------------------------------------------------------------- inside the workers


def node_layout_env() -> tuple[int, int, int]:
    """(nodes, this node's index in the run, devices per node) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) or 1
    return max(1, world // local), int(os.environ.get("GROUP_RANK", 0)), local


def gather_hosts() -> list[str]:
    """Host name of each node, in node order (a collective on every rank when the run spans
    several nodes; no communication on one node)."""
    nodes, group_rank, _ = node_layout_env()
    me = socket.gethostname()
    if nodes == 1:
        return [me]
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (group_rank, me))
    return [host for _, host in sorted(dict(everyone).items())]


def share_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank when the run spans several nodes (so that each node's
    launcher gets the row); on one node, returned as is."""
    nodes, _, _ = node_layout_env()
    if nodes == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def writes_row_file(rank: int, local_rank: int) -> bool:
    """The worker that writes the row file: global rank 0 on one node; on several nodes the
    first worker of every node, each into its own node's run folder."""
    nodes, _, _ = node_layout_env()
    return rank == 0 if nodes == 1 else local_rank == 0


def devices_per_host(machine: dict, devices: int) -> int:
    """Worker processes on the busiest machine of a run, from a row's machine fields: the
    devices of one node times the node agents sharing a host (two on one machine in a test)."""
    hosts = machine.get("hosts") or [None]
    return (machine.get("devices_per_node") or devices) * max(hosts.count(h) for h in hosts)


def ranks_agree(flag: bool, device) -> tuple[int, int]:
    """(ranks where ``flag`` holds, world size): one all-reduce, so that every rank takes the
    same branch (a file present on one node only must not split the ranks' collectives)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(flag), 1
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item()), dist.get_world_size()


REFERENCE_NOT_SHARED = "reference-not-shared"


def reference_where(path, device, config_id: str) -> str:
    """Which ranks see the verification reference: "all", "none", or "some" (several nodes
    whose run folders are not shared: the reference is on node 0's disk only; logged). One
    all-reduce, so that every rank takes the same branch (comparing has collectives)."""
    seen, world = ranks_agree(path is not None and path.exists(), device)
    if seen == world:
        return "all"
    if not seen:
        return "none"
    from parallab.runtime.dist import get_logger

    get_logger().warning("%s: %s is not on every node: not compared (put runtime.out_dir on a "
                         "filesystem every node sees, with the same run_id)", config_id, path)
    return "some"
