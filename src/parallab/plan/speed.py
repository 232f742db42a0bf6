"""Time of one training step per strategy: computation, communication over the profile's
alpha-beta links, the pipeline bubble, the optimizer step, and what overlap is assumed.

    step = compute (slowest device, per-block dispatch overhead included; on CPUs scaled by
                   the measured cost per FLOP at the micro-batch's size and TP width, and by
                   the slowdown of several processes busy at once: plan/efficiency.py)
         + bubble (pipelines: (p-1)/v idle micro-batch slots of m + (p-1)/v)
         + exposed communication (what the assumed overlap does not hide)
         + optimizer step (foreach AdamW over the device's parameters, memory-bound)
         + copies (FSDP's copy-in/out around its collectives, memory-bound)

Communication volume per step and device, for a model of P parameters of e bytes:
    DDP      all-reduce of the gradients (P e) over the replicas, in 25 MiB buckets
    FSDP     all-gather of the parameters in forward and again in backward (ZeRO-2: forward
             only), reduce-scatter of the gradients, one call per block
    TP       4 all-reduces per block (2 forward after the row-parallel projections, 2 backward
             before the column-parallel ones) of the [tokens, D] activation, plus the embedding's
    pipeline send/recv of the [tokens, D] activation forward and its gradient backward at every
             stage boundary, per micro-batch
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from parallab.plan.memory import Layout, Precision, stage_layer_counts
from parallab.plan.profiles import DeviceProfile
from parallab.plan.shapes import ModelShape

DDP_BUCKET_BYTES = 25 * 2**20

OVERLAP_NOTES = {
    "single": "no communication",
    "ddp": "gradient all-reduce overlaps backward (all but the last bucket), scaled by the profile's overlap",
    "fsdp": "all-gathers prefetched one block ahead and reduce-scatters overlap compute (all but the first block), scaled by the profile's overlap",
    "tp": "none: tensor-parallel all-reduces sit on the critical path",
    "pipeline": "none: p2p transfers sit between dependent micro-batch steps",
    "pipeline+ddp": "none: replicas all-reduce stage gradients after the pipeline flush; p2p as pipeline",
    "fsdp+tp": "TP all-reduces exposed; FSDP collectives overlapped as for fsdp",
}


@dataclass
class StepTime:
    compute_s: float = 0.0
    bubble_s: float = 0.0
    optimizer_s: float = 0.0
    copies_s: float = 0.0     # memory-bound copies outside the model (FSDP's copy-in/out)
    comm_s: dict[str, float] = field(default_factory=dict)   # total time of each traffic kind
    comm_bytes: dict[str, float] = field(default_factory=dict)  # bytes per device per step
    hidden_s: float = 0.0
    bubble_fraction: float = 0.0
    overlap: str = ""

    @property
    def comm_total_s(self) -> float:
        return sum(self.comm_s.values())

    @property
    def exposed_comm_s(self) -> float:
        return self.comm_total_s - self.hidden_s

    @property
    def total_s(self) -> float:
        return self.compute_s + self.bubble_s + self.exposed_comm_s + self.optimizer_s + self.copies_s

    def as_dict(self) -> dict:
        return {"total_s": self.total_s, "compute_s": self.compute_s, "bubble_s": self.bubble_s,
                "bubble_fraction": self.bubble_fraction, "optimizer_s": self.optimizer_s,
                "copies_s": self.copies_s,
                "comm_s": dict(self.comm_s), "comm_bytes": dict(self.comm_bytes),
                "comm_total_s": self.comm_total_s, "hidden_comm_s": self.hidden_s,
                "exposed_comm_s": self.exposed_comm_s, "overlap": self.overlap}


def _spans(lay: Layout, inner: int, prof: DeviceProfile) -> bool:
    """Mesh order is (pp, dp, fsdp, tp), tp innermost: a group whose devices lie within the
    first ``inner`` consecutive ranks stays on one node when inner <= devices per node."""
    return inner > prof.devices_per_node


def step_time(shape: ModelShape, lay: Layout, *, global_batch: int, prof: DeviceProfile,
              dtype: str = "bfloat16", prec: Precision | None = None,
              rate: float | None = None, optimizer: str = "adamw",
              cost_factor: Callable[[float, int], float] | None = None,
              block_extra: dict[str, float] | None = None) -> StepTime:
    """Predicted step time of ``lay``; ``rate`` (FLOP/s per device) overrides the profile's
    peak x efficiency (a measured single-device rate). ``cost_factor(tokens, tp)``: how much
    slower a FLOP runs in a micro-batch of ``tokens`` tokens on a TP rank of ``tp`` than at the
    rate's own point (plan/efficiency.cost_factor); 1 when not given. ``block_extra``: {"tp": s,
    "tp_root": s, "fsdp": s}, a TP or FSDP rank's measured cost per block (tp_root: per
    micro-batch, outside the blocks) beyond its share of the FLOPs and its modelled collectives,
    at this width and micro-batch (plan/strategy_cost.py); it replaces the profile's dispatch overhead of that technique
    (and, for TP, the narrow-matmul part of ``cost_factor``; for FSDP, the modelled copies)."""
    prec = prec or Precision.for_dtype(dtype)
    rate = rate or prof.rate(dtype)
    out = StepTime(overlap=OVERLAP_NOTES.get(lay.strategy.replace("-zero2", ""), ""))
    t, f, dp, p = lay.tp, lay.fsdp, lay.dp, lay.pp
    m = lay.microbatches if p > 1 else 1
    v = lay.stages_per_device if p > 1 else 1
    D, T, e = shape.d_model, shape.seq_len, prec.param
    local_batch = global_batch / (dp * f)
    mb_tokens = local_batch / m * T

    # ---- computation on the busiest device
    counts = stage_layer_counts(shape, p)
    if p > 1:
        from parallab.parallel.pp import partition

        units = list(shape.stage_costs)
        worst = max(sum(units[i] for i in r) for r in partition(units, p))
        share = worst / sum(units)
    else:
        share = 1.0
    flops_step = shape.flops_per_token_train * global_batch * T
    if lay.ac:  # one more forward of every block in backward
        flops_step *= 4 / 3
    device_flops_mb = flops_step * share / (dp * f * t) / m
    extra = block_extra or {}
    measured_tp = t > 1 and extra.get("tp") is not None
    measured_fsdp = f > 1 and extra.get("fsdp") is not None
    overhead = prof.block_overhead_s * (1 + (prof.tp_overhead_x if t > 1 and not measured_tp else 0)
                                        + (prof.fsdp_overhead_x if f > 1 and not measured_fsdp else 0))
    # Measured with every rank busy (plan/strategy_cost.py), so not scaled by concurrency below.
    measured_mb = 0.0
    if measured_tp:  # the plain block's dispatch is shared like its FLOPs; the rest was measured
        overhead -= prof.block_overhead_s * (1 - 1 / t)
        # vocabulary-parallel embedding, head and loss: once per micro-batch
        measured_mb += max(counts) * extra["tp"] + extra.get("tp_root", 0.0)
    if measured_fsdp:
        measured_mb += max(counts) * extra["fsdp"]
    scale = cost_factor(mb_tokens, 1 if measured_tp else t) if cost_factor else 1.0
    per_mb = device_flops_mb / rate * scale + max(counts) * overhead
    if p > 1:  # the schedule's own work per micro-batch: one forward and one backward step per chunk
        per_mb += 2 * v * prof.pipeline_op_overhead_x * prof.block_overhead_s
    # CPUs: processes computing at the same time. A pipeline keeps at most min(p, m) of its
    # stages busy at once (one, the naive m = 1 split), so its idle stages cost no core.
    busy = lay.devices if p == 1 else lay.devices // p * min(p, m)
    if prof.cores and busy > prof.cores:  # oversubscribed CPU devices share the cores
        per_mb *= busy / prof.cores
    elif prof.cores and busy > 1:  # busy processes slow each other (shared cache, skew)
        per_mb *= prof.concurrency_x
    per_mb += measured_mb
    out.compute_s = m * per_mb
    if p > 1:
        slots = (p - 1) / v
        out.bubble_s = slots * per_mb
        out.bubble_fraction = slots / (m + slots)

    # ---- parameters on the busiest device (for gradients and the optimizer)
    layer_local = (shape.layer_params_tp / t + shape.layer_params - shape.layer_params_tp)
    stage_params = max(counts) * layer_local + max(
        (shape.embed_params_tp / t + shape.embed_params - shape.embed_params_tp),
        (shape.head_params_tp / t + shape.head_params - shape.head_params_tp))
    if p == 1:
        stage_params = shape.n_layers * layer_local + (
            shape.embed_params_tp / t + shape.embed_params - shape.embed_params_tp) + (
            shape.head_params_tp / t + shape.head_params - shape.head_params_tp)
    # SGD with momentum makes about a third of AdamW's passes over memory.
    out.optimizer_s = prof.optimizer_time(stage_params / f) * (1.0 if optimizer == "adamw" else 0.3)

    # ---- communication
    hideable = 0.0
    window = 0.0
    grad_bytes = stage_params * e
    if dp > 1:
        inner = t * f * dp
        link = prof.link("all_reduce", dp, spans_nodes=_spans(lay, inner, prof))
        buckets = max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES))
        t_ar = sum(link.time("all_reduce", min(DDP_BUCKET_BYTES, grad_bytes - i * DDP_BUCKET_BYTES), dp)
                   for i in range(buckets))
        out.comm_s["ddp all-reduce grads"] = t_ar
        out.comm_bytes["ddp all-reduce grads"] = grad_bytes
        if p == 1:  # overlapped with backward except the last bucket
            last = link.time("all_reduce", grad_bytes - (buckets - 1) * DDP_BUCKET_BYTES, dp)
            hideable += t_ar - last
            window += out.compute_s * 2 / 3
    if f > 1:
        spans = _spans(lay, t * f, prof)
        blocks = max(counts) + 1  # every block, plus the root (embeddings and head)
        per_block = grad_bytes / blocks
        ag = prof.link("all_gather", f, spans_nodes=spans)
        rs = prof.link("reduce_scatter", f, spans_nodes=spans)
        gathers = 1 if lay.zero2 else 2
        t_ag = gathers * blocks * ag.time("all_gather", per_block, f)
        t_rs = blocks * rs.time("reduce_scatter", per_block, f)
        out.comm_s[f"fsdp all-gather params x{gathers}"] = t_ag
        out.comm_s["fsdp reduce-scatter grads"] = t_rs
        out.comm_bytes[f"fsdp all-gather params x{gathers}"] = gathers * grad_bytes
        out.comm_bytes["fsdp reduce-scatter grads"] = grad_bytes
        first = ag.time("all_gather", per_block, f)
        # FSDP2 copies each block's shard into the all-gather buffer and out of it into the
        # unsharded parameters (forward and backward), and the gradients into the
        # reduce-scatter buffer: about 2 passes per gather + 2, over the unsharded bytes.
        out.copies_s = 0.0 if measured_fsdp else (2 * gathers + 2) * stage_params * e / prof.mem_bandwidth
        hideable += t_ag + t_rs - first
        window += out.compute_s
    if t > 1:
        link = prof.link("all_reduce", t, spans_nodes=_spans(lay, t, prof))
        act = mb_tokens * D * prec.act
        calls = (4 * max(counts) + 2) * m
        out.comm_s["tp all-reduce activations"] = calls * link.time("all_reduce", act, t)
        out.comm_bytes["tp all-reduce activations"] = calls * act
    if p > 1:
        link = prof.link("send_recv", 2, spans_nodes=_spans(lay, lay.devices, prof))
        act = mb_tokens * D * prec.act
        sends = 2 * (m * v + p - 1)
        out.comm_s["pipeline send/recv activations"] = sends * link.time("send_recv", act, 2)
        out.comm_bytes["pipeline send/recv activations"] = 2 * m * v * act
    out.hidden_s = min(hideable * prof.overlap, window)
    return out
