"""Memory per device of one training step, for every strategy: parameters, gradients, optimizer
state, activations and temporary buffers, at the moment of the step's peak.

The step is replayed as a sequence of allocations and frees (``_Sim``): each micro-batch's
forward saves what autograd keeps for backward, the backward frees it layer by layer while the
gradients appear, and the optimizer step allocates foreach AdamW's one intermediate. The
pipeline schedules (GPipe, 1F1B, interleaved) are replayed in their real order, so a stage's
in-flight micro-batches come out of the replay instead of a rule of thumb.

What one block saves for backward, per token (D model width, r MLP ratio, t tensor-parallel
degree), counted on the CPU with TensorMemoryTracker (tests/unit/test_plan.py checks it):

    block input, attn_norm out, mlp_norm in, mlp_norm out          4 D   (replicated under TP)
    q, k, v, attention output (= wo input)                          4 D / t
    w1 output (gelu input), gelu output (w2 input)                  2 r D / t
    attention log-sum-exp (fp32, flash kernel) and norm statistics  H / t + 4 values

The CPU tracker does not see storages made outside the dispatcher before it starts: the
pipeline's receive buffers (allocated on the first step) and DDP's gradient buckets (counted
separately by the trainer). ``tracked=True`` reproduces what it reports; the default is what
the device really holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parallab.plan.shapes import ModelShape

CATEGORIES = ("params", "grads", "optimizer", "activations", "temporary")
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # state tensors per parameter (sgd: momentum)


@dataclass(frozen=True)
class Layout:
    """One way to spread a training step over ``devices`` devices (degrees multiply to it)."""
    strategy: str                  # single ddp fsdp fsdp-zero2 tp pipeline fsdp+tp pipeline+ddp
    devices: int
    dp: int = 1                    # replicas (DDP)
    fsdp: int = 1                  # parameter-sharding degree
    tp: int = 1
    pp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"         # gpipe, 1f1b, interleaved1f1b (pipelines only)
    stages_per_device: int = 1
    zero2: bool = False            # FSDP keeps gathered parameters from forward to backward
    ac: bool = False               # activation checkpointing of every block
    sp: bool = False               # sequence parallelism with TP: norms and residuals split too

    @property
    def label(self) -> str:
        parts = []
        if self.pp > 1:
            sched = "naive" if self.microbatches == 1 else f"{self.schedule} m{self.microbatches}"
            v = f" v{self.stages_per_device}" if self.stages_per_device > 1 else ""
            parts.append(f"pp {self.pp} ({sched}{v})")
        for name, deg in (("dp", self.dp), ("fsdp", self.fsdp), ("tp", self.tp)):
            if deg > 1:
                parts.append(f"{name} {deg}")
        opts = (" +zero2" if self.zero2 and self.fsdp > 1 else "") + (" +sp" if self.sp and self.tp > 1 else "") \
            + (" +ac" if self.ac else "")
        return f"{self.strategy} [{' x '.join(parts) or '1 device'}]{opts}"


@dataclass(frozen=True)
class Precision:
    """Bytes per element: parameters and gradients, activations, each AdamW state, and an fp32
    master copy of the weights under mixed precision (0 when parameters are already fp32 or
    training is pure low precision, as parallab's trainer does)."""
    param: int = 4
    act: int = 4
    state: int = 4
    master: int = 0

    @classmethod
    def for_dtype(cls, dtype: str, *, mixed: bool = True) -> "Precision":
        if dtype == "float32":
            return cls()
        if dtype == "bfloat16":
            return cls(2, 2, 4, 4) if mixed else cls(2, 2, 2, 0)
        raise ValueError(f"unknown dtype '{dtype}' (valid: float32, bfloat16)")


@dataclass
class MemoryBreakdown:
    """Bytes per device at the step's peak (the busiest device), by category."""
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    temporary: int = 0
    phase: str = ""                # where the peak happens
    stage: int = 0                 # which pipeline stage is the busiest
    untracked: int = 0             # buffers the CPU tracker does not see (part of temporary)
    per_stage: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.temporary

    @property
    def tracked_total(self) -> int:
        return self.total - self.untracked

    def as_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "temporary": self.temporary, "total": self.total,
                "phase": self.phase, "stage": self.stage, "per_stage_total": self.per_stage}


class _Sim:
    """Live bytes by category; remembers the split at the largest total."""

    def __init__(self) -> None:
        self.cur = dict.fromkeys(CATEGORIES, 0)
        self.peak = -1
        self.at_peak: dict[str, int] = {}
        self.phase = ""
        self.untracked = 0

    def add(self, cat: str, n: float, phase: str) -> None:
        self.cur[cat] += int(n)
        total = sum(self.cur.values())
        if total > self.peak:
            self.peak, self.at_peak, self.phase = total, dict(self.cur), phase

    def free(self, cat: str, n: float) -> None:
        self.cur[cat] -= int(n)

    def spike(self, cat: str, n: float, phase: str) -> None:
        self.add(cat, n, phase)
        self.free(cat, n)


def stage_layer_counts(shape: ModelShape, stages: int) -> list[int]:
    """Blocks per pipeline stage, cut exactly as parallel/pp.partition cuts them."""
    from parallab.parallel.pp import partition

    if stages == 1:
        return [shape.n_layers]
    return [len(r) for r in partition(list(shape.stage_costs), stages)]


def _schedule(kind: str, m: int, p: int, s: int, v: int) -> list[tuple[str, int]]:
    """The order of forward (F) and backward (B) micro-batch chunks on stage ``s``."""
    if kind == "gpipe" or p == 1:
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    chunks = m * v
    if kind == "1f1b":
        warm = min(m, p - s)
    else:  # interleaved: torch's Interleaved1F1B warm-up over all local chunks
        warm = min(chunks, (v - 1) * p + 2 * (p - 1 - s) + 1)
    ops = [("F", i) for i in range(warm)]
    f, b = warm, 0
    while b < chunks:
        ops.append(("B", b))
        b += 1
        if f < chunks:
            ops.append(("F", f))
            f += 1
    return ops


def step_memory(shape: ModelShape, lay: Layout, *, global_batch: int, prec: Precision = Precision(),
                tracked: bool = False, first_step: bool = False, optimizer: str = "adamw") -> MemoryBreakdown:
    """Peak bytes per device of one training step (the busiest pipeline stage).

    ``tracked``: what parallab's CPU TensorMemoryTracker reports instead of what the device
    holds; ``first_step``: the tracked step is the run's first (no optimizer state yet, the
    pipeline's buffers allocated inside it). ``optimizer``: adamw (two states, one
    parameter-sized intermediate) or sgd (momentum: one state, updated in place).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer '{optimizer}' (valid: {', '.join(OPTIMIZER_STATES)})")
    counts = stage_layer_counts(shape, lay.pp)
    p = lay.pp
    # Long pipelines: the busiest stage is one of the ends (most micro-batches in flight at the
    # start, the logits at the end) or one with the most blocks; the middle ones are skipped.
    stages = range(p) if p <= 16 else sorted({0, 1, p - 2, p - 1, counts.index(max(counts))})
    results = {s: _stage_memory(shape, lay, global_batch=global_batch, prec=prec, stage=s,
                                n_layers=counts[s], tracked=tracked, first_step=first_step,
                                optimizer=optimizer)
               for s in stages}
    size = {s: r.tracked_total if tracked else r.total for s, r in results.items()}
    best = max(size, key=size.get)
    out = results[best]
    out.stage = best
    out.per_stage = [size[s] for s in sorted(size)] if p <= 16 else []
    return out


def _stage_memory(shape: ModelShape, lay: Layout, *, global_batch: int, prec: Precision, stage: int,
                  n_layers: int, tracked: bool, first_step: bool, optimizer: str) -> MemoryBreakdown:
    t, f = lay.tp, lay.fsdp
    first, last = stage == 0, stage == lay.pp - 1
    D, T, H, V, r = shape.d_model, shape.seq_len, shape.n_heads, shape.vocab_size, shape.mlp_ratio
    local_batch = global_batch / (lay.dp * lay.fsdp)
    m = max(1, lay.microbatches if lay.pp > 1 else 1)
    v = max(1, lay.stages_per_device if lay.pp > 1 else 1)
    n = local_batch / m * T                       # tokens of one micro-batch
    ea = prec.act

    # ---- parameters held by this device (sharded by TP and FSDP)
    def sharded(total: int, tp_part: int) -> float:
        return (tp_part / t + (total - tp_part)) / f

    layer_p = sharded(shape.layer_params, shape.layer_params_tp)
    stage_p = n_layers * layer_p
    stage_tensors = n_layers * shape.layer_tensors
    if first:
        stage_p += sharded(shape.embed_params, shape.embed_params_tp)
        stage_tensors += shape.embed_tensors
    if last:
        stage_p += sharded(shape.head_params, shape.head_params_tp)
        stage_tensors += shape.head_tensors
    grad_bytes = stage_p * prec.param
    adam = optimizer == "adamw"
    # AdamW's per-tensor step counters are fp32 scalars on the CPU: seen by the CPU tracker only.
    state_bytes = stage_p * (OPTIMIZER_STATES[optimizer] * prec.state + prec.master) + (
        stage_tensors * 4 if tracked and adam else 0)

    # ---- activations of one micro-batch on this stage (one chunk when interleaved)
    u = n * D * ea                                # a replicated [tokens, D] tensor
    if lay.sp and t > 1:
        # Residuals and norm outputs split over the sequence; about one gathered [tokens, D]
        # input per block stays saved for the matmuls (measured at tp=2 on CPU).
        layer_saved = u + (8 + 2 * r) * u / t + n * (H / t) * 4 + 4 * n / t * 4
    else:
        layer_saved = 4 * u + (4 + 2 * r) * u / t + n * (H / t) * 4 + 4 * n * 4
    # Activation checkpointing keeps only each block's input; backward recomputes the rest.
    layer_kept = u if lay.ac else layer_saved
    recompute = layer_saved - u if lay.ac else 0
    chunk_layers = n_layers / v
    logits = n * V / t * ea
    logprobs = n * V / t * 4                      # the loss runs in fp32
    recv = u if not first else 0                  # this stage's input arrives in a p2p buffer
    saved = chunk_layers * layer_kept - recv   # the first block's input is the buffer
    out_kept = u if not last else 0               # the stage output waits in fwd_cache
    head_saved = 2 * u + 2 * n * 4 + logprobs if last else 0

    sim = _Sim()
    sim.add("params", stage_p * prec.param, "start")
    # DDP's gradients live in persistent buckets; pipeline+ddp averages plain gradients after
    # the schedule instead (parallel/ddp.allreduce_gradients: one flat copy, below).
    ddp_like = lay.dp > 1 and f == 1 and lay.pp == 1
    if not first_step:
        sim.add("optimizer", state_bytes, "start")
    # The tracker first sees DDP's buckets on the first step when backward writes the first
    # gradient into them; later steps count them for the whole step.
    buckets_late = ddp_like and tracked and first_step
    if ddp_like and not buckets_late:
        sim.add("grads", grad_bytes, "start")
    inputs = 2 * local_batch * T * 8              # token ids and targets (int64) of the step
    sim.add("activations", inputs, "start")
    if lay.pp > 1:
        # Receive buffers (activations in, gradients back) for every micro-batch, allocated
        # once on the first step; the tracker sees them only when it tracks that step.
        buffers = (recv + out_kept) * m * v
        if not tracked or first_step:
            sim.add("temporary", buffers, "start")
        if not tracked:
            sim.untracked = buffers
    if f > 1:
        # FSDP: gathered parameters of the embeddings/head (kept for the step) and of two
        # blocks (the one running and the one prefetched); ZeRO-2 keeps every gathered block
        # until backward.
        root = ((sharded(shape.embed_params, shape.embed_params_tp) if first else 0)
                + (sharded(shape.head_params, shape.head_params_tp) if last else 0)) * (f - 1)
        gathered_block = layer_p * f * prec.param
        # Activation checkpointing's recomputation in backward gathers two blocks more
        # (measured with FSDP2 on CPU: about four blocks' unsharded parameters at the peak).
        blocks = 4 if lay.ac else 2
        sim.add("temporary", root * prec.param + blocks * gathered_block, "start")

    # Gradients appear during the first backward of each chunk and are accumulated in place
    # by the later ones (DDP's live in buckets from the start).
    grads_done = ddp_like
    backward_ops = 0
    wgrad = shape.largest_layer_matrix / t * prec.param    # one weight gradient before accumulation
    fsdp_grad = layer_p * f * prec.param if f > 1 else 0    # unsharded block gradient to reduce-scatter
    head = head_saved / v, logits / v, logprobs / v
    for kind, mb in _schedule(lay.schedule, m, lay.pp, stage, v):
        phase = f"{'forward' if kind == 'F' else 'backward'} micro-batch {mb}"
        if kind == "F":
            sim.add("activations", saved + out_kept, phase)
            if lay.zero2 and f > 1:
                sim.add("temporary", chunk_layers * layer_p * (f - 1) * prec.param, phase)
            if last:
                sim.add("activations", head[0] + head[1], phase)
                if ea != 4:
                    sim.spike("temporary", head[2], phase)     # the fp32 copy of the logits
            continue
        if last:
            sim.spike("temporary", 2 * head[2], phase)         # the loss's gradient and its input's
            sim.free("activations", head[2])
            sim.spike("temporary", head[2] + u / v, phase)      # grad of the logits, of the norm
            sim.free("activations", head[0] - head[2])          # the logits stay referenced
            if not grads_done:
                sim.add("grads", sharded(shape.head_params, shape.head_params_tp) * prec.param / v, phase)
        if buckets_late:  # the first gradient is ready (the output layer's, on the last stage)
            sim.add("grads", grad_bytes, phase)
            buckets_late = False
        # Per block, from the last: the gradient flowing down (u), the MLP's wide gradient and
        # one weight gradient before accumulation; then the block's saved tensors go.
        # The per-block change is the same for every block, so the largest total is at the
        # first or the last block: replay those two and jump over the ones between.
        k = round(chunk_layers)
        spike = recompute + u + r * u / t + wgrad + fsdp_grad
        grow = layer_p * prec.param if not grads_done else 0

        def block_backward() -> None:
            sim.spike("temporary", spike, phase)
            sim.free("activations", layer_kept)
            sim.add("grads", grow, phase)

        if k >= 1:
            block_backward()
        if k > 2:  # the blocks in between change the total by the same step each
            sim.free("activations", layer_kept * (k - 2))
            sim.cur["grads"] += int(grow * (k - 2))
        if k >= 2:
            block_backward()
        sim.free("activations", saved - round(chunk_layers) * layer_kept + out_kept)
        if tracked and not first_step and out_kept:
            # The tracker first sees a gradient receive buffer when backward takes a view of
            # it, and counts it from then on.
            sim.add("temporary", out_kept, phase)
        if lay.zero2 and f > 1:
            sim.free("temporary", chunk_layers * layer_p * (f - 1) * prec.param)
        if first and not grads_done:
            sim.add("grads", sharded(shape.embed_params, shape.embed_params_tp) * prec.param / v, phase)
        backward_ops += 1
        grads_done = grads_done or backward_ops >= v
    # ---- optimizer step: states appear on the first step; foreach AdamW's sqrt(exp_avg_sq)
    # is one intermediate as large as all local parameters; the logits are still referenced.
    phase = "optimizer step"
    if first_step:
        sim.add("optimizer", state_bytes, phase)
    if lay.dp > 1 and lay.pp > 1:
        sim.spike("temporary", grad_bytes, phase)  # gradients flattened for the replicas' all-reduce
    if adam:
        sim.spike("temporary", stage_p * prec.state, phase)
    a = sim.at_peak
    return MemoryBreakdown(params=a["params"], grads=a["grads"], optimizer=a["optimizer"],
                           activations=a["activations"], temporary=a["temporary"], phase=sim.phase,
                           untracked=sim.untracked if sim.phase != "start" else 0)
