"""What tensor parallelism and FSDP cost per transformer block on CPU devices, beyond a rank's
share of the FLOPs and the collectives plan/speed.py models: measured inside ``parallab
bench-comm``'s ranks (commbench.py runs the probes, the launcher derives and caches the costs).

On GPUs the host runs ahead of the device and hides framework overhead; on CPUs it is on the
critical path. Two probes, each against the plain model run by every rank at once (so both
sides share the machine alike), in alternating rounds, slowest rank, median:

* ``strategy_overheads``: a GPT too small for its FLOPs to matter under parallab's TP and FSDP:
  dispatch (DTensor's sharding propagation and redistributes, FSDP's hooks, each collective's
  wake-up). ``overhead_per_block`` turns it into seconds per block; the CPU profile takes it in
  place of its defaults (plan/profiles.py).
* ``block_cost``: two blocks of a real model at its width and micro-batch under TP and FSDP
  (``bench-comm --calibrate-model``). ``block_extra`` gives seconds per block and TP's cost
  outside the blocks; cached per width under ``block_extra_s``, taken by
  plan/predict.measured_block_extra.
"""

from __future__ import annotations

import statistics
import time


def block_weight_bytes(d: int, ratio: int) -> int:
    """fp32 bytes of one GPT block's matrices: q, k, v, o (4 d^2) and the MLP (2 ratio d^2)."""
    return (4 + 2 * ratio) * d * d * 4


def _link_time(fits: dict, coll: str, nbytes: float, n: int) -> float:
    """A collective's modelled time from bench-comm's fits; 0 when it was not measured."""
    from parallab.plan.profiles import Link

    f = fits.get(coll)
    return Link(f["alpha_s"], f["busbw"]).time(coll, nbytes, n) if f else 0.0


def overhead_model(n: int) -> dict:
    """A GPT so small that its FLOPs cost nothing (what its step costs is the framework's),
    with heads and vocabulary that split ``n`` ways."""
    heads = max(2, n)
    return dict(vocab_size=32 * heads, seq_len=8, d_model=8 * heads, n_layers=4, n_heads=heads)


def _alternate(runs: dict, loss, rounds: int, warmup: int) -> dict[str, float]:
    """Time every run of ``runs`` ({name: (module, parallelized or None, input)}) in turn, each
    between barriers on all ranks, ``warmup`` + ``rounds`` rounds: forward, ``loss`` (the input
    as targets) and backward of a model on tokens, or of a stack of blocks (a ModuleDict) on
    hidden states. The slowest rank's wall time counts; median over the timed rounds."""
    import torch
    import torch.distributed as dist

    def step(module, par, x) -> float:
        t0 = time.perf_counter()
        if x.is_floating_point():
            h = x
            for blk in module.values():
                h = blk(h)
            h.sum().backward()
        elif par is None:
            loss(module(x), x).backward()
        else:
            with par.loss_context():
                loss(module(x), x).backward()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + rounds):
        for name, (module, par, x) in runs.items():
            dist.barrier()
            t = torch.tensor([step(module, par, x)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            module.zero_grad(set_to_none=True)
            x.grad = None
            if i >= warmup:
                times[name].append(t.item())
    return {k: statistics.median(v) for k, v in times.items()}


def strategy_overheads(rounds: int, n: int, backend: str) -> dict:
    """The fixed cost per transformer block that tensor parallelism and FSDP add on this
    machine's devices: a tiny GPT's forward and backward (one sequence of 8 tokens) under
    parallab's own TP and FSDP (plan/parallelize.py) on all ``n`` ranks, against the plain
    model on every rank at once, in alternating rounds; wall time of the slowest rank, median
    over rounds. What the difference holds: DTensor's sharding propagation and redistributes,
    FSDP's hooks and buffer copies, and every collective's latency including waking the rank
    that waits for it (the launcher subtracts the collectives' modelled latency, which the
    planner counts apart). On GPUs the host runs ahead of the device and hides this cost."""
    import torch

    from parallab.models.registry import build_meta, get_family
    from parallab.parallel.dims import dims_for
    from parallab.parallel.parallelize import parallelize

    family = get_family("gpt")
    shape = overhead_model(n)
    cfg = family.config("debug", shape)
    x = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    runs = {"plain": (family.build(cfg), None, x)}
    for strategy in ("tp", "fsdp"):
        par = parallelize(build_meta(family, cfg), family, cfg, dims_for(strategy, n),
                          device=torch.device("cpu"), seed=0)
        runs[strategy] = (par.module, par, x)
    med = _alternate(runs, family.loss, rounds, warmup=2)
    return {"collective": "overhead", "world_size": n, "backend": backend, "device_type": "cpu",
            "rounds": rounds, "model": shape, "layers": cfg.n_layers,
            "tokens": cfg.seq_len, "step_s": med}


BLOCK_LAYERS = 2
AT_SIZE = ("tp", "fsdp")


def block_cost(block: list[int], n: int, backend: str, rounds: int = 7) -> dict:
    """TP's and FSDP's real cost at a model's own width: a GPT of two blocks (d_model, n_heads,
    mlp_ratio, seq_len from ``block``; a vocabulary of 32 n, so its embeddings cost nothing),
    forward, loss and backward on a micro-batch of ``block[4]`` sequences, under parallab's TP
    and FSDP over all ``n`` ranks and plain on every rank at once (so both sides share the
    machine alike; plain on the micro-batch a rank of the strategy holds: all of it under TP,
    1/n under FSDP), alternating rounds, slowest rank, median.

    The tiny-model probe (strategy_overheads) sees dispatch only. At a real width a TP rank
    also pays what does not shrink with its share of the FLOPs: the norms and residual adds
    every rank repeats, DTensor's copies, narrower matmuls, and all-reduces arriving while the
    other rank still computes; an FSDP rank its buffer copies and collectives competing with
    compute for the cores (on the 2-core VM 0.3 s a step of the small GPT under TP that neither
    the FLOPs nor the modelled links account for)."""
    import torch

    from parallab.models.registry import build_meta, get_family
    from parallab.parallel.dims import dims_for
    from parallab.parallel.parallelize import parallelize

    d, heads, ratio, seq, seqs = (int(v) for v in block)
    family = get_family("gpt")
    cfg = family.config("debug", dict(d_model=d, n_heads=heads, mlp_ratio=ratio, seq_len=seq,
                                      n_layers=BLOCK_LAYERS, vocab_size=32 * n))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (seqs, seq), generator=g)
    local = tokens[: max(1, seqs // n)]
    cpu = torch.device("cpu")
    plain = family.build(cfg)
    hidden = torch.randn(seqs, seq, d, generator=g, requires_grad=True)
    runs = {}
    for strategy in AT_SIZE:
        par = parallelize(build_meta(family, cfg), family, cfg, dims_for(strategy, n), device=cpu, seed=0)
        runs[strategy] = (par.module, par, tokens if strategy == "tp" else local)
        runs[f"plain-{strategy}"] = (plain, None, tokens if strategy == "tp" else local)
        if strategy == "tp":  # the blocks alone: what is left is the embeddings, head and loss
            runs["tp-layers"] = (par.module.layers, None, hidden)
            runs["plain-tp-layers"] = (plain.layers, None, hidden)
    med = _alternate(runs, family.loss, rounds, warmup=1)
    return {"collective": "block", "world_size": n, "backend": backend, "device_type": "cpu",
            "rounds": rounds, "block": [d, heads, ratio, seq, seqs], "layers": BLOCK_LAYERS,
            "step_s": med}


def block_key(d: int, heads: int, ratio: int, seq: int) -> str:
    return f"d{d}-h{heads}-ff{ratio * d}-T{seq}"


def block_extra(row: dict, fits: dict) -> dict[str, float]:
    """Seconds per block and micro-batch that a TP or FSDP rank spends beyond its share of the
    plain model's step and the collectives plan/speed.py models for it (TP: 4 all-reduces of
    the activations; FSDP: 2 all-gathers and a reduce-scatter of the block's weights), from
    ``block_cost``'s row; and ``tp_root``, TP's cost per micro-batch outside the blocks (the
    vocabulary-parallel embedding and head, the loss on sharded logits, less their 2 modelled
    all-reduces). Never below zero."""
    n, (d, _, ratio, seq, seqs) = row["world_size"], row["block"]
    t = row["step_s"]
    weights = block_weight_bytes(d, ratio)
    act = _link_time(fits, "all_reduce", seqs * seq * d * 4, n)
    fsdp = (t["fsdp"] - t["plain-fsdp"]) / row["layers"]
    fsdp -= 2 * _link_time(fits, "all_gather", weights, n) + _link_time(fits, "reduce_scatter", weights, n)
    tp = (t["tp-layers"] - t["plain-tp-layers"] / n) / row["layers"] - 4 * act
    root = (t["tp"] - t["tp-layers"]) - (t["plain-tp"] - t["plain-tp-layers"]) / n - 2 * act
    return {"tp": max(0.0, tp), "tp_root": max(0.0, root), "fsdp": max(0.0, fsdp)}


def overhead_per_block(row: dict, fits: dict) -> dict[str, float]:
    """Seconds per block per micro-batch (forward and backward) that TP and FSDP add to the
    plain model, from ``strategy_overheads``' row, less the collectives' latency the planner
    models apart (plan/speed.py: TP 4 all-reduces per block and 2 more for embeddings and loss;
    FSDP an all-gather in forward and backward and a reduce-scatter per block plus the root).
    Never below zero."""
    n, layers, t = row["world_size"], row["layers"], row["step_s"]
    act = row["tokens"] * row["model"]["d_model"] * 4
    weights = block_weight_bytes(row["model"]["d_model"], row["model"].get("mlp_ratio", 4))
    tp_comm = (4 * layers + 2) * _link_time(fits, "all_reduce", act, n)
    fsdp_comm = (layers + 1) * (2 * _link_time(fits, "all_gather", weights, n)
                                + _link_time(fits, "reduce_scatter", weights, n))
    return {"tp": max(0.0, (t["tp"] - t["plain"] - tp_comm) / layers),
            "fsdp": max(0.0, (t["fsdp"] - t["plain"] - fsdp_comm) / layers)}
