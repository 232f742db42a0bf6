"""``parallab bench-comm``: how fast this machine's collectives are.

All-reduce, all-gather, reduce-scatter and point-to-point send/recv over a range of message
sizes, each under torchrun (``python -m parallab.commbench SPEC.json`` in every rank). Time per
size: the median of the timed iterations after warm-up on each rank, then the maximum over
ranks (a collective is as slow as its slowest participant). Bandwidths follow nccl-tests:
algbw = S / t, busbw = algbw * factor (all-reduce 2(n-1)/n, all-gather and reduce-scatter
(n-1)/n, send/recv 1), S the whole tensor (all-gather's output, reduce-scatter's input).

A least-squares alpha-beta fit per collective (on each size's median iteration) becomes the
machine's measured link profile
(``comm_profile.json`` in the run folder, and the cache the planner reads).

On CPUs it also measures what no collective shows: how much slower a synchronous step is when
every device computes at once than when one computes alone (``concurrency_x``; shared cache and
memory bandwidth, the host's other work, the skew a synchronous step waits for). The same block
of transformer work runs in every rank between barriers, the slowest rank's time counted, in
rounds alternating with rank 0 working alone; the ratio of medians enters the planner's
compute term (plan/speed.py). And, in the same ranks, what tensor parallelism and FSDP cost per
transformer block beyond their share (plan/strategy_cost.py).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")
DEFAULT_SIZES = tuple(4096 * 4**i for i in range(8))  # 4 KiB .. 64 MiB


@dataclass
class CommSpec:
    sizes: list[int]
    collectives: list[str]
    iters: int
    warmup: int
    result_path: str
    backend: str = "auto"
    threads: int = 1
    timeout_s: float = 300.0
    concurrency_rounds: int = 12  # CPUs only; 0: skip (about 0.3 s a round)
    overhead_rounds: int = 25  # CPUs only; 0: skip (the TP and FSDP per-block cost, about 4 s)
    # CPUs: a model's blocks at their own width under TP and FSDP ([d_model, n_heads, mlp_ratio,
    # seq_len, sequences per micro-batch]), see plan/strategy_cost.block_cost; None: skip.
    block: list[int] | None = None


# ---------------------------------------------------------------- inside every rank


def _run_rank(spec: CommSpec) -> None:
    import torch
    import torch.distributed as dist

    from parallab.plan.profiles import bus_factor
    from parallab.runtime.dist import init_distributed, shutdown

    info = init_distributed(backend=spec.backend, timeout_s=spec.timeout_s, threads=spec.threads)
    dev, n, r = info.device, info.world_size, info.rank
    cuda = dev.type == "cuda"
    rows = []
    try:
        for coll in spec.collectives:
            for size in spec.sizes:
                elems = max(n, size // 4 // n * n)  # divisible by n for the sharded collectives
                full = torch.ones(elems, dtype=torch.float32, device=dev)
                shard = torch.ones(elems // n, dtype=torch.float32, device=dev)
                if coll == "all_reduce":
                    op = lambda: dist.all_reduce(full)
                elif coll == "all_gather":
                    op = lambda: dist.all_gather_into_tensor(full, shard)
                elif coll == "reduce_scatter":
                    op = lambda: dist.reduce_scatter_tensor(shard, full)
                else:  # every rank sends to the next and receives from the previous at once
                    recv = torch.empty_like(full)

                    def op():
                        ops = [dist.P2POp(dist.isend, full, (r + 1) % n),
                               dist.P2POp(dist.irecv, recv, (r - 1) % n)]
                        for w in dist.batch_isend_irecv(ops):
                            w.wait()
                times = []
                for i in range(spec.warmup + spec.iters):
                    dist.barrier()
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    op()
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= spec.warmup:
                        times.append(time.perf_counter() - t0)
                local = torch.tensor([statistics.median(times), min(times), max(times)],
                                     dtype=torch.float64, device=dev)
                dist.all_reduce(local, op=dist.ReduceOp.MAX)
                med, lo, hi = local.tolist()
                nbytes = elems * 4
                algbw = nbytes / med
                rows.append({"collective": coll, "bytes": nbytes, "world_size": n,
                             "backend": info.backend, "device_type": dev.type,
                             "iters": spec.iters, "warmup": spec.warmup,
                             "time_s": med, "time_min_s": lo, "time_max_s": hi,
                             "algbw_Bps": algbw, "busbw_Bps": algbw * bus_factor(coll, n)})
        if not cuda and spec.concurrency_rounds > 0:
            rows.append(_concurrency(spec.concurrency_rounds, n, r, info.backend))
        if not cuda and spec.overhead_rounds > 0:
            from parallab.plan.strategy_cost import strategy_overheads

            rows.append(strategy_overheads(spec.overhead_rounds, n, info.backend))
        if not cuda and spec.block:
            from parallab.plan.strategy_cost import block_cost

            rows.append(block_cost(spec.block, n, info.backend))
        if r == 0:
            tmp = Path(spec.result_path + ".tmp")
            tmp.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
            os.replace(tmp, spec.result_path)
    finally:
        shutdown()


def _concurrency(rounds: int, n: int, r: int, backend: str) -> dict:
    """All ranks' block work between barriers (slowest rank's time) against rank 0's alone."""
    import torch
    import torch.distributed as dist

    from parallab.plan.efficiency import block_step

    step = block_step(384, 6, 1536, 512, 128, 1)  # a small-GPT block, 4 sequences

    def work() -> float:  # wall time: waiting for the shared core or cache counts here
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    together, alone = [], []
    work()  # warm-up
    for _ in range(rounds):
        dist.barrier()
        t = torch.tensor([work()], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        together.append(t.item())
        dist.barrier()
        if r == 0:
            alone.append(work())
        dist.barrier()
    ratio = statistics.median(together) / statistics.median(alone) if r == 0 else 0.0
    return {"collective": "compute", "world_size": n, "backend": backend, "device_type": "cpu",
            "rounds": rounds, "together_s": together, "alone_s": alone, "concurrency_x": max(1.0, ratio)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m parallab.commbench SPEC.json", file=sys.stderr)
        return 2
    try:
        _run_rank(CommSpec(**json.loads(Path(argv[0]).read_text())))
        return 0
    except Exception as exc:
        traceback.print_exc()
        print(f"PARALLAB-ERROR rank {os.environ.get('RANK', '0')}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return 1


# ---------------------------------------------------------------- the launcher


def run_comm_bench(*, devices: int = 2, sizes: tuple[int, ...] = DEFAULT_SIZES,
                   collectives: tuple[str, ...] = COLLECTIVES, iters: int = 10, warmup: int = 3,
                   out_dir: str = "runs", run_id: str | None = None, backend: str = "auto",
                   threads: int = 1, timeout_s: float = 600.0, cache_dir: str | Path | None = None,
                   update_cache: bool = True, plot: bool = True, console=None,
                   block: tuple[int, int, int, int, int] | None = None) -> dict:
    """Measure the collectives on ``devices`` local devices under torchrun; write
    ``comm.jsonl`` (one row per collective and size), ``comm_profile.json`` (the alpha-beta
    fits), ``comm.png`` and print a table. With ``update_cache`` the fits also become the
    measured links of the ``cpu-gloo-this-machine`` profile (on CPUs). Returns the rows, the
    fits and the paths. ``block``: (d_model, n_heads, mlp_ratio, seq_len, sequences per
    micro-batch) of a model whose TP and FSDP cost per block to measure at its own width (CPUs)."""
    from rich.console import Console

    from parallab.bench.launch import RunFolder, new_run_id, run_torchrun, torchrun_command
    from parallab.config import ConfigError
    from parallab.runtime.dist import free_port

    if devices < 2:
        raise ConfigError(f"devices={devices}: collectives need at least 2 devices")
    bad = [c for c in collectives if c not in COLLECTIVES]
    if bad or not collectives:
        raise ConfigError(f"unknown collective '{bad[0] if bad else ''}' (valid: {', '.join(COLLECTIVES)})")
    if not sizes or any(int(s) < 4 for s in sizes):
        raise ConfigError(f"message sizes {list(sizes)} must be at least 4 bytes each")
    if iters < 1 or warmup < 0:
        raise ConfigError(f"iters={iters} must be >= 1 and warmup={warmup} >= 0")
    if block is not None:
        d, heads, _, _, seqs = block
        if heads % devices or d % heads or seqs < devices:
            raise ConfigError(f"block={list(block)}: n_heads must split {devices} ways, d_model into "
                              f"n_heads, and a micro-batch hold a sequence per device")
    console = console or Console()
    run_id = run_id or f"comm-{new_run_id()}"
    folder = RunFolder(Path(out_dir) / run_id).create()
    spec_path = folder.root / "configs" / "comm.json"
    raw_path = folder.root / "rows" / "comm.jsonl"
    raw_path.unlink(missing_ok=True)
    spec = CommSpec(sizes=sorted({int(s) for s in sizes}), collectives=list(collectives), iters=iters,
                    warmup=warmup, result_path=str(raw_path), backend=backend, threads=threads,
                    timeout_s=timeout_s, block=list(block) if block else None)
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    log_path = folder.root / "logs" / "comm.log"
    cmd = torchrun_command(devices, spec_path, port=free_port(), module="parallab.commbench")
    # Its own session: a timeout or Ctrl-C ends torchrun and every rank together.
    rc, _, _, _ = run_torchrun(cmd, log_path=log_path, folder=folder, threads=threads, timeout_s=timeout_s)
    if rc != 0 or not raw_path.exists():
        from parallab.bench.launch import failure_reason

        _, reason = failure_reason(log_path.read_text(errors="replace"), rc)
        raise RuntimeError(f"bench-comm failed ({reason}); log: {log_path}")
    rows = [json.loads(l) for l in raw_path.read_text().splitlines() if l.strip()]
    compute = [r for r in rows if r["collective"] == "compute"]
    overhead = [r for r in rows if r["collective"] == "overhead"]
    block_rows = [r for r in rows if r["collective"] == "block"]
    rows = [r for r in rows if r["collective"] not in ("compute", "overhead", "block")]
    results = folder.root / "comm.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fits = fit_rows(rows)
    profile = {"world_size": devices, "backend": rows[0]["backend"], "device_type": rows[0]["device_type"],
               "threads": threads, "model": "t = alpha * ceil(log2 n) + S * factor(n) / busbw",
               "links": fits}
    if compute:
        profile["concurrency_x"] = compute[0]["concurrency_x"]
        profile["concurrency"] = compute[0]
    from parallab.plan.strategy_cost import block_extra, block_key, overhead_per_block

    if overhead:
        profile["overhead_per_block_s"] = overhead_per_block(overhead[0], fits)
        profile["overhead"] = overhead[0]
    for row in block_rows:
        d, heads, ratio, seq, seqs = row["block"]
        row["extra_per_block_s"] = block_extra(row, fits)
        profile.setdefault("block_extra_s", {}).setdefault(block_key(d, heads, ratio, seq), {})[
            f"b{seqs}-n{devices}"] = row["extra_per_block_s"]
        profile.setdefault("block", []).append(row)
    prof_path = folder.root / "comm_profile.json"
    prof_path.write_text(json.dumps(profile, indent=1))
    if update_cache and rows[0]["device_type"] == "cpu":
        from parallab.plan.profiles import default_cache_dir, load_machine_profile, save_machine_profile

        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        data = load_machine_profile(cache)
        data.update(links=fits, links_world_size=devices, links_source=str(prof_path))
        from parallab.runtime.device import cpu_cores

        if compute and devices <= cpu_cores():  # more ranks than cores measure time-sharing
            data["concurrency_x"] = compute[0]["concurrency_x"]
        if overhead and devices <= cpu_cores():
            data["overhead_per_block_s"] = profile["overhead_per_block_s"]
        if block_rows and devices <= cpu_cores():
            for key, points in profile["block_extra_s"].items():
                data.setdefault("block_extra_s", {}).setdefault(key, {}).update(points)
        save_machine_profile(cache, data)
    console.print(comm_table(rows, fits))
    if compute:
        console.print(f"{devices} devices computing at once: a synchronous step takes "
                      f"{compute[0]['concurrency_x']:.3f}x the time of one device alone (concurrency_x)")
    if overhead:
        o = profile["overhead_per_block_s"]
        console.print(f"fixed cost per block and micro-batch over the plain model: TP {o['tp'] * 1e3:.2f} ms, "
                      f"FSDP {o['fsdp'] * 1e3:.2f} ms")
    for row in block_rows:
        e = row["extra_per_block_s"]
        console.print(f"at width {row['block'][0]}, {row['block'][4]} sequences a micro-batch, per block beyond "
                      f"a rank's share and its modelled collectives: TP {e['tp'] * 1e3:.2f} ms (and "
                      f"{e['tp_root'] * 1e3:.2f} ms a micro-batch outside the blocks), FSDP {e['fsdp'] * 1e3:.2f} ms")
    out = {"rows": rows, "fits": fits, "results": results, "profile": prof_path, "folder": folder.root}
    if plot:
        out["plot"] = plot_comm(rows, folder.root / "comm.png")
    return out


def fit_rows(rows: list[dict]) -> dict[str, dict]:
    """Alpha-beta fit per collective: {collective: {alpha_s, busbw}}, on each size's median
    iteration (the slowest rank's): the time a step's collective typically takes, as the step
    time it predicts is a median. (Fits on the fastest iteration described an idealised link:
    they put a 3 MiB all-reduce at 1.6 ms where the median is 3.5 ms on this 2-core VM, and
    TP, with 34 such calls a step, came out 30 % too fast.) One descheduled iteration of ten
    does not move a median."""
    from parallab.plan.profiles import fit_alpha_beta

    fits = {}
    for coll in dict.fromkeys(r["collective"] for r in rows):
        rs = sorted((r for r in rows if r["collective"] == coll), key=lambda r: r["bytes"])
        if len(rs) < 2:
            continue
        times = [r["time_s"] for r in rs]
        link = fit_alpha_beta([r["bytes"] for r in rs], times, coll, rs[0]["world_size"])
        fits[coll] = {"alpha_s": link.alpha_s, "busbw": link.busbw}
    return fits


def _size(n: float) -> str:
    for unit, s in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= s:
            return f"{n / s:g} {unit}"
    return f"{int(n)} B"


def comm_table(rows: list[dict], fits: dict | None = None):
    """A rich table: per message size and collective, bus bandwidth and time."""
    from rich.table import Table

    colls = list(dict.fromkeys(r["collective"] for r in rows))
    n = rows[0]["world_size"] if rows else 0
    table = Table(title=f"bench-comm, {n} ranks, {rows[0]['backend'] if rows else ''}: busbw GB/s "
                        "(nccl-tests) / time ms (median, max over ranks)", title_justify="left")
    table.add_column("size", justify="right")
    for c in colls:
        table.add_column(c, justify="right")
    for size in sorted({r["bytes"] for r in rows}):
        cells = [_size(size)]
        for c in colls:
            row = next((r for r in rows if r["collective"] == c and r["bytes"] == size), None)
            cells.append(f"{row['busbw_Bps'] / 1e9:.3f} / {row['time_s'] * 1e3:.3g}" if row else "")
        table.add_row(*cells)
    if fits:
        table.add_row("fit", *[f"{fits[c]['busbw'] / 1e9:.3f}, a={fits[c]['alpha_s'] * 1e6:.0f}us"
                               if c in fits else "" for c in colls], style="bold")
    return table


def plot_comm(rows: list[dict], path: Path) -> Path:
    """Time and bus bandwidth against message size, one line per collective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for coll in dict.fromkeys(r["collective"] for r in rows):
        rs = sorted((r for r in rows if r["collective"] == coll), key=lambda r: r["bytes"])
        xs = [r["bytes"] for r in rs]
        ax_t.plot(xs, [r["time_s"] * 1e3 for r in rs], marker="o", label=coll)
        ax_b.plot(xs, [r["busbw_Bps"] / 1e9 for r in rs], marker="o", label=coll)
    for ax in (ax_t, ax_b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per operation (ms, median, max over ranks)")
    ax_b.set_ylabel("bus bandwidth (GB/s, nccl-tests definition)")
    n = rows[0]["world_size"] if rows else 0
    fig.suptitle(f"Collectives on {n} ranks ({rows[0]['backend'] if rows else ''}, {rows[0]['device_type'] if rows else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    from parallab.runtime.dist import worker_entry

    worker_entry(main)
