"""Device and interconnect profiles: what one device computes and how fast collectives run.

A collective over ``n`` devices moving a tensor of ``S`` bytes takes (alpha-beta model)

    t = alpha * ceil(log2 n) + S * factor(n) / busbw

with the nccl-tests bus-bandwidth factors (all-reduce 2(n-1)/n, all-gather and reduce-scatter
(n-1)/n, send/recv 1; S is the whole tensor: the gathered output, the scattered input). Bus
bandwidth, unlike algorithm bandwidth S/t, does not depend on n for a ring, which is what lets a
profile measured at one device count speak for another. The latency term grows with log2 n
(tree-like algorithms); that is an assumption, stated in every plan.

Built-in GPU profiles use data-sheet peaks and typical nccl-tests bus bandwidths (order of
magnitude, not measurements of a particular machine); ``cpu-gloo-this-machine`` is measured here
(``parallab bench-comm`` and a compute probe), cached under ``runs/.cache``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from parallab.config import ConfigError

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
GiB = 2**30


def bus_factor(collective: str, n: int) -> float:
    """nccl-tests: busbw = algbw * factor (PERFORMANCE.md of nccl-tests)."""
    if collective == "all_reduce":
        return 2 * (n - 1) / n
    if collective in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    if collective == "send_recv":
        return 1.0
    raise ValueError(f"unknown collective '{collective}' (valid: {', '.join(COLLECTIVES)})")


@dataclass(frozen=True)
class Link:
    """Latency (s) and bus bandwidth (bytes/s) of one collective over one kind of link."""
    alpha_s: float
    busbw: float

    def time(self, collective: str, nbytes: float, n: int) -> float:
        if n <= 1 or nbytes <= 0:
            return 0.0
        hops = 1 if collective == "send_recv" else math.ceil(math.log2(n))
        return self.alpha_s * hops + nbytes * bus_factor(collective, n) / self.busbw


def _links(alpha_s: float, busbw: float, p2p_busbw: float | None = None) -> dict[str, Link]:
    out = {c: Link(alpha_s, busbw) for c in COLLECTIVES}
    out["send_recv"] = Link(alpha_s, p2p_busbw or busbw)
    return out


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device and its links. ``efficiency``: the fraction of peak FLOP/s a dense
    transformer step reaches (model FLOPs utilization); ``overlap``: the fraction of
    overlappable communication (DDP's bucketed all-reduce, FSDP's prefetched all-gathers) that
    is actually hidden behind computation."""
    name: str
    description: str
    peak_flops: dict[str, float]
    memory_bytes: int
    mem_bandwidth: float
    devices_per_node: int
    intra: dict[str, Link]
    inter: dict[str, Link]
    efficiency: float = 0.4
    overlap: float = 0.8
    block_overhead_s: float = 1e-4        # launch/dispatch cost per block per micro-batch (fwd+bwd)
    # Extra dispatch cost of a block under TP (DTensor sharding propagation, redistributes) and
    # FSDP (hooks, per-block collectives), in units of block_overhead_s. On GPUs the host runs
    # ahead of the device and hides it (0); on CPUs it is on the critical path.
    tp_overhead_x: float = 0.0
    fsdp_overhead_x: float = 0.0
    pipeline_op_overhead_x: float = 0.0   # per micro-batch forward or backward of a stage
    cores: int | None = None              # CPUs: more devices than cores share them
    # CPUs: a synchronous step of several busy processes over one alone (shared cache and memory
    # bandwidth, skew the step waits for); measured by ``parallab bench-comm`` (commbench.py).
    concurrency_x: float = 1.0
    optimizer_s_per_param: float | None = None  # measured; else 80 bytes/param over mem_bandwidth
    source: str = "data sheet (typical values, not a measurement)"
    measured: dict = field(default_factory=dict)

    def link(self, collective: str, group: int, *, spans_nodes: bool) -> Link:
        return (self.inter if spans_nodes else self.intra)[collective]

    def rate(self, dtype: str) -> float:
        """Achieved FLOP/s per device for ``dtype``."""
        peak = self.peak_flops.get(dtype) or 0.0
        if peak <= 0:
            raise ConfigError(f"profile '{self.name}' has no peak FLOP/s for dtype {dtype} "
                              f"(known: {', '.join(k for k, v in self.peak_flops.items() if v)})")
        return peak * self.efficiency

    def optimizer_time(self, n_params: float) -> float:
        # foreach AdamW makes about 20 passes over 4-byte arrays per parameter.
        per = self.optimizer_s_per_param or 80.0 / self.mem_bandwidth
        return n_params * per

    def to_dict(self) -> dict:
        return asdict(self)


def _gpu(name, description, bf16, fp32, mem_gib, hbm, per_node, intra_bw, inter_bw, *,
         alpha=15e-6, inter_alpha=30e-6, p2p=None) -> DeviceProfile:
    return DeviceProfile(name=name, description=description,
                         peak_flops={"bfloat16": bf16, "float32": fp32}, memory_bytes=int(mem_gib * GiB),
                         mem_bandwidth=hbm, devices_per_node=per_node,
                         intra=_links(alpha, intra_bw, p2p), inter=_links(inter_alpha, inter_bw))


BUILTIN: dict[str, DeviceProfile] = {p.name: p for p in (
    _gpu("h100-sxm-nvlink", "8x H100 SXM 80GB per node, NVLink 4 (NVSwitch), 400 Gb/s InfiniBand per GPU",
         989e12, 67e12, 80, 3.35e12, 8, 360e9, 45e9, p2p=250e9),
    _gpu("h100-pcie", "8x H100 PCIe 80GB per node, PCIe Gen5 without NVLink, 200 Gb/s per GPU",
         756e12, 51e12, 80, 2.0e12, 8, 40e9, 22e9, alpha=20e-6),
    _gpu("a100-sxm", "8x A100 SXM 80GB per node, NVLink 3 (NVSwitch), 200 Gb/s InfiniBand per GPU",
         312e12, 19.5e12, 80, 2.04e12, 8, 230e9, 22e9, p2p=150e9),
    _gpu("a100-pcie", "8x A100 PCIe 80GB per node, PCIe Gen4, 100 Gb/s per GPU",
         312e12, 19.5e12, 80, 1.94e12, 8, 20e9, 11e9, alpha=20e-6),
    _gpu("l4-pcie", "8x L4 24GB per node, PCIe Gen4 (no NVLink), 100 Gb/s per node",
         121e12, 30.3e12, 24, 0.3e12, 8, 12e9, 1.5e9, alpha=25e-6),
    _gpu("rtx4090-pcie", "8x RTX 4090 24GB per node, PCIe Gen4, no peer-to-peer, 100 Gb/s per node",
         165e12, 82.6e12, 24, 1.0e12, 8, 8e9, 1.5e9, alpha=30e-6),
)}
CPU_PROFILE = "cpu-gloo-this-machine"
PROFILE_NAMES = (*BUILTIN, CPU_PROFILE)
CACHE_FILE = "machine_profile.json"


def fit_alpha_beta(sizes: list[float], times: list[float], collective: str, n: int) -> Link:
    """Fit t = alpha + S * factor(n) / busbw to measured (bytes, seconds), least squares on the
    relative error (weights 1/t^2) so that small messages (latency) and large ones (bandwidth)
    both count. Alpha is the intercept divided by the log2 n hops of ``Link.time``."""
    xs = [s * bus_factor(collective, n) for s in sizes]
    if len(xs) < 2:
        raise ValueError("need at least two message sizes to fit alpha and beta")
    w = [1.0 / max(t, 1e-12) ** 2 for t in times]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, xs)) / sw
    my = sum(wi * y for wi, y in zip(w, times)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, xs))
    slope = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, xs, times)) / sxx if sxx else 0.0
    if slope <= 0:  # no bandwidth term visible: take the largest message's rate
        slope = times[-1] / max(xs[-1], 1.0)
    intercept = max(my - slope * mx, min(times) * 0.1)
    hops = 1 if collective == "send_recv" else math.ceil(math.log2(n))
    return Link(alpha_s=intercept / hops, busbw=1.0 / slope)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PARALLAB_CACHE", "runs/.cache"))


def cpu_profile(cache_dir: Path | None = None, *, probe: bool = True) -> DeviceProfile:
    """This machine as a profile: compute from a probe (one thread per device), links from the
    measured comm profile (``bench-comm``); both cached in ``cache_dir``. Without a measured comm
    profile and with ``probe`` false, gloo-over-loopback values typical of this kind of VM are
    used and the source says so."""
    from parallab.runtime.device import cpu_cores, cpu_model

    cache_dir = Path(cache_dir or default_cache_dir())
    data = load_machine_profile(cache_dir)
    if "compute" not in data and probe:
        data["compute"] = measure_compute()
        save_machine_profile(cache_dir, data)
    comp = data.get("compute") or {"peak_flops": 5e10, "block_overhead_s": 1e-3,
                                   "optimizer_s_per_param": 8e-9, "mem_bandwidth": 5e9}
    links = data.get("links")
    source = "measured on this machine" if links else \
        "compute measured; links: typical gloo loopback values (run parallab bench-comm to measure)"
    intra = {c: Link(**links[c]) for c in COLLECTIVES} if links else _links(100e-6, 1.5e9)
    total = _total_memory()
    cores = cpu_cores()
    return DeviceProfile(
        name=CPU_PROFILE, description=f"{cores} CPU processes of 1 thread ({cpu_model()}), gloo",
        peak_flops={"float32": comp["peak_flops"], "bfloat16": comp.get("peak_flops_bf16") or comp["peak_flops"] / 4},
        memory_bytes=total // max(cores, 1), mem_bandwidth=comp["mem_bandwidth"],
        # Efficiency of the model's FLOPs against the square-matmul probe, once dispatch, the
        # optimizer and communication are counted apart (about 0.7 measured for the small GPT);
        # a measured 1-device run (predict_for_row's baseline, plan --baseline) replaces it.
        devices_per_node=cores, intra=intra, inter=intra, efficiency=comp.get("efficiency", 0.7),
        overlap=0.0, block_overhead_s=comp["block_overhead_s"],
        # TP's and FSDP's fixed cost per block: measured by bench-comm on this machine's
        # devices (plan/strategy_cost.strategy_overheads) when it ran; else the values measured once on
        # a 2-core Xeon VM, torch 2.13, debug GPT (CPU time per step, tp=2, fsdp=2 and 2-stage
        # pipelines against one device): about 15x and 5x a plain block's dispatch cost, and 2x
        # per pipeline micro-batch step (schedule, p2p).
        tp_overhead_x=_overhead_x(data, "tp", comp["block_overhead_s"], 15.0),
        fsdp_overhead_x=_overhead_x(data, "fsdp", comp["block_overhead_s"], 5.0),
        pipeline_op_overhead_x=2.0, cores=cores,
        concurrency_x=data.get("concurrency_x", 1.0) if links else 1.0,
        optimizer_s_per_param=comp["optimizer_s_per_param"], source=source, measured=data)


def _overhead_x(data: dict, strategy: str, block_s: float, default: float) -> float:
    measured = (data.get("overhead_per_block_s") or {}).get(strategy) if data.get("links") else None
    return default if measured is None else measured / max(block_s, 1e-9)


def _total_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


def load_machine_profile(cache_dir: Path) -> dict:
    from parallab.runtime.device import cpu_model

    try:
        data = json.loads((Path(cache_dir) / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    import torch

    # Another CPU or torch version: measure again rather than trust it.
    if data.get("cpu_model") != cpu_model() or data.get("torch") != torch.__version__:
        return {}
    return data


def save_machine_profile(cache_dir: Path, data: dict) -> Path:
    import torch

    from parallab.runtime.device import cpu_model

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    data = {**data, "cpu_model": cpu_model(), "torch": torch.__version__}
    path = cache_dir / CACHE_FILE
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def measure_compute(threads: int = 1) -> dict:
    """A cheap probe of one CPU device (``threads`` threads): matmul FLOP/s, the fixed cost of a
    tiny transformer block's forward and backward (dispatch overhead), foreach AdamW time per
    parameter and copy bandwidth. Timed in the thread's CPU time, best of several, so that
    other processes on a shared machine do not inflate it: the profile describes the machine
    when it is not shared. About two seconds."""
    import time

    import torch

    from parallab.models.gpt import Block, GPTConfig

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter

    def best_of(fn, reps: int = 5) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        return max(min(ts), 1e-9)

    try:
        n = 512
        a, b = torch.randn(n, n), torch.randn(n, n)
        peak = 2 * n**3 * 4 / best_of(lambda: [a @ b for _ in range(4)], reps=8)
        block = Block(GPTConfig(d_model=8, n_heads=2, seq_len=2))
        x = torch.randn(1, 2, 8, requires_grad=True)
        overhead = best_of(lambda: block(x).sum().backward(), reps=20)
        params = [torch.zeros(1 << 20, requires_grad=True) for _ in range(4)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        opt_s = best_of(opt.step) / sum(p.numel() for p in params)
        big = torch.empty(1 << 24)
        copy = best_of(lambda: big.clone())
        return {"peak_flops": peak, "block_overhead_s": overhead, "optimizer_s_per_param": opt_s,
                "mem_bandwidth": 2 * big.numel() * 4 / copy, "threads": threads,
                "clock": "thread CPU time" if threads == 1 else "wall"}
    finally:
        torch.set_num_threads(old)


def get_profile(name: str, *, cache_dir: Path | None = None, peak_flops: float | None = None,
                bandwidth: float | None = None, latency_s: float | None = None,
                memory_bytes: int | None = None, efficiency: float | None = None,
                dtype: str = "bfloat16") -> DeviceProfile:
    """A built-in or measured profile, with the user's overrides applied."""
    if name == CPU_PROFILE:
        prof = cpu_profile(cache_dir)
    elif name in BUILTIN:
        prof = BUILTIN[name]
    else:
        raise ConfigError(f"unknown device profile '{name}' (valid: {', '.join(PROFILE_NAMES)})")
    if peak_flops is not None:
        if peak_flops <= 0:
            raise ConfigError(f"peak_flops={peak_flops} must be positive (FLOP/s per device)")
        prof = replace(prof, peak_flops={**prof.peak_flops, dtype: peak_flops}, source=prof.source + "; peak FLOP/s by user")
    if bandwidth is not None or latency_s is not None:
        if bandwidth is not None and bandwidth <= 0:
            raise ConfigError(f"bandwidth={bandwidth} must be positive (bytes/s of bus bandwidth)")
        if latency_s is not None and latency_s < 0:
            raise ConfigError(f"latency_s={latency_s} must be zero or positive (seconds)")

        def over(links: dict[str, Link]) -> dict[str, Link]:
            return {c: Link(latency_s if latency_s is not None else l.alpha_s, bandwidth or l.busbw)
                    for c, l in links.items()}
        prof = replace(prof, intra=over(prof.intra), inter=over(prof.inter),
                       source=prof.source + "; links by user")
    if memory_bytes is not None:
        prof = replace(prof, memory_bytes=memory_bytes)
    if efficiency is not None:
        if not 0 < efficiency <= 1:
            raise ConfigError(f"efficiency={efficiency} must be in (0, 1] (fraction of peak FLOP/s)")
        prof = replace(prof, efficiency=efficiency)
    return prof
