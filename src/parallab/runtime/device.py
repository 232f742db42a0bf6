"""What the machine is and what its devices can do: names, memory, topology, peak FLOP/s."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import torch

# Dense peak FLOP/s per GPU (no sparsity) from the vendors' data sheets, by dtype.
# Matched against torch.cuda.get_device_name(); a GPU not in the table gets no MFU unless the
# user gives its peak (never a silent fallback to another GPU's number).
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100 SXM": {"bfloat16": 989e12, "float32": 67e12},
    "H100 NVL": {"bfloat16": 835e12, "float32": 60e12},
    "H100 PCIe": {"bfloat16": 756e12, "float32": 51e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362e12, "float32": 91.6e12},
    "L4": {"bfloat16": 121e12, "float32": 30.3e12},
    "A10G": {"bfloat16": 70e12, "float32": 31.2e12},
    "A10": {"bfloat16": 125e12, "float32": 31.2e12},
    "RTX 4090": {"bfloat16": 165e12, "float32": 82.6e12},
    "RTX 3090": {"bfloat16": 71e12, "float32": 35.6e12},
    "V100": {"bfloat16": 0.0, "float32": 15.7e12},
    "T4": {"bfloat16": 0.0, "float32": 8.1e12},
}


def gpu_peak_flops(device_name: str, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, source) for a GPU name; (None, reason) when the GPU is not in the table."""
    override = os.environ.get("PARALLAB_PEAK_FLOPS")
    if override:
        return float(override), "user (PARALLAB_PEAK_FLOPS)"
    # Longest key first so "H100 PCIe" wins over "H100".
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            peak = GPU_PEAK_FLOPS[key].get(dtype) or None
            return peak, f"table:{key}:{dtype}"
    return None, f"unknown GPU '{device_name}': set PARALLAB_PEAK_FLOPS"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure_cpu_peak_flops(threads: int = 1, *, dtype: torch.dtype = torch.float32,
                           n: int = 512, seconds: float = 0.5) -> float:
    """FLOP/s of a square matrix product on this CPU with ``threads`` threads: the CPU's
    practical peak, measured (there is no data-sheet number to trust for a shared VM)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ b
        best = 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            dt = (time.perf_counter() - t0) / 4
            best = max(best, 2 * n**3 / dt)
        return best
    finally:
        torch.set_num_threads(old)


def cached_cpu_peak_flops(threads: int, cache_dir: Path) -> float:
    """The calibration, measured once per machine, thread count and torch version."""
    key = f"{cpu_model()}|{threads}|{torch.__version__}"
    path = cache_dir / "cpu_peak_flops.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = measure_cpu_peak_flops(threads)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    return float(table[key])


def gpu_topology() -> str | None:
    """`nvidia-smi topo -m` (NVLink or PCIe between GPUs) where the tool exists."""
    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# Link kinds in `nvidia-smi topo -m`, nearest first: PCIe through one switch (PIX), several
# switches (PXB), the host bridge (PHB), within a NUMA node (NODE), across sockets (SYS).
PCIE_LINKS = ("PIX", "PXB", "PHB", "NODE", "SYS")


def summarize_gpu_topology(text: str | None) -> str | None:
    """A short summary of an `nvidia-smi topo -m` matrix: 'NV18 between all GPUs',
    'PCIe (PHB/SYS)', 'NVLink on 4 of 6 GPU pairs (NV12), PCIe (SYS) on the rest'."""
    import re

    if not text:
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colour codes of some versions
    lines = [l.split() for l in text.splitlines() if l.strip()]
    header = next((l for l in lines if l and l[0] == "GPU0"), None)
    if header is None:
        return None
    n = sum(1 for tok in header if re.fullmatch(r"GPU\d+", tok))
    rows = {l[0]: l[1:1 + n] for l in lines[lines.index(header) + 1:]
            if re.fullmatch(r"GPU\d+", l[0]) and len(l) > n}
    if n <= 1:
        return "1 GPU" if n == 1 else None
    links = [rows.get(f"GPU{i}", [None] * n)[j] for i in range(n) for j in range(i + 1, n)]
    links = [l for l in links if l]
    nv = sorted({l for l in links if l.startswith("NV")}, key=lambda l: (len(l), l))
    pcie = [k for k in PCIE_LINKS if k in links]
    n_nv = sum(1 for l in links if l.startswith("NV"))
    if nv and n_nv == len(links):
        return f"{nv[0]} between all GPUs" if len(nv) == 1 else f"NVLink between all GPUs ({'/'.join(nv)})"
    if not nv:
        return f"PCIe ({'/'.join(pcie)})" if pcie else None
    return (f"NVLink on {n_nv} of {len(links)} GPU pairs ({'/'.join(nv)}), "
            f"PCIe ({'/'.join(pcie) or '?'}) on the rest")


def route_interface(ip: str) -> str | None:
    """The network interface of this machine's route to ``ip``: `ip route get`, else the
    longest matching prefix in /proc/net/route (IPv4)."""
    import ipaddress
    import re

    try:
        out = subprocess.run(["ip", "route", "get", ip], capture_output=True, text=True, timeout=3)
        m = re.search(r"\bdev\s+(\S+)", out.stdout)
        if out.returncode == 0 and m:
            return m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        addr = ipaddress.ip_address(ip)
        if addr.is_loopback:
            return "lo"
        best = None
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) < 8:
                continue
            # Destination and mask are little-endian hex.
            dest, mask = (int.from_bytes(bytes.fromhex(x), "little") for x in (f[1], f[7]))
            if int(addr) & mask == dest and (best is None or mask > best[0]):
                best = (mask, f[0])
        return best[1] if best else None
    except (OSError, ValueError):
        return None


def network_interface(backend: str | None = None) -> str | None:
    """The interface inter-node traffic uses, and why: the one NCCL_SOCKET_IFNAME or
    GLOO_SOCKET_IFNAME names (the backend's own variable first), else the interface of the
    route to the rendezvous host (the loopback on one node)."""
    names = ["NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"]
    if backend == "gloo":
        names.reverse()
    for var in names:
        if os.environ.get(var):
            return f"{os.environ[var]} ({var})"
    from parallab.runtime.nodes import ENV_RDZV_ENDPOINT, parse_endpoint

    endpoint = os.environ.get(ENV_RDZV_ENDPOINT)  # set by parallab's multi-node launcher
    host = parse_endpoint(endpoint)[0] if endpoint else os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        ip = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return None
    iface = route_interface(ip)
    return f"{iface} (route to {ip})" if iface else None


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_info(hosts: list[str] | None = None) -> dict:
    """The machine fields of a result row, as rank 0 sees them; ``hosts``: every node's host
    name in node order (``runtime.nodes.gather_hosts``, a collective), default this one."""
    import parallab
    from parallab.runtime.nodes import ENV_NODE_RANK, node_layout_env

    _, group_rank, per_node = node_layout_env()
    info = {
        "hostname": socket.gethostname(),
        "hosts": list(hosts) if hosts else [socket.gethostname()],
        "node_rank": int(os.environ.get(ENV_NODE_RANK, group_rank)),
        "devices_per_node": per_node if "LOCAL_WORLD_SIZE" in os.environ else None,
        "network_interface": network_interface("nccl" if torch.cuda.is_available() else "gloo"),
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_cores(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "parallab_version": parallab.__version__,
        "git_rev": git_revision(),
    }
    if torch.cuda.is_available():
        info["device_type"] = "cuda"
        info["device_name"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["gpu_topology"] = summarize_gpu_topology(gpu_topology())
    else:
        info["device_type"] = "cpu"
        info["device_name"] = f"CPU process ({cpu_model()})"
    return info


def describe_devices() -> dict:
    """Everything ``parallab env`` prints."""
    from parallab.runtime.dist import pick_backend

    env = machine_info()
    env["backend"] = pick_backend("auto")
    env["cuda_available"] = torch.cuda.is_available()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count})
        env["cuda_version"] = torch.version.cuda
        env["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["gpu_topology"] = gpu_topology()
        env["gpu_topology_summary"] = summarize_gpu_topology(env["gpu_topology"])
    env["gpus"] = gpus
    env["distributed_available"] = torch.distributed.is_available()
    env["gloo_available"] = torch.distributed.is_gloo_available()
    env["nccl_available"] = torch.distributed.is_nccl_available()
    return env
