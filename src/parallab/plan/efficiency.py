"""How fast one CPU device runs a transformer block at a given micro-batch size and tensor-parallel
width: the compute term's correction for work cut into smaller pieces.

A step's FLOPs do not all cost the same. Measured on a 2-core Xeon VM (small GPT, one thread):
one sequence per micro-batch costs 1.30x the time per sample of sixteen, two cost 1.12x, four or
more 1.0x; a tensor-parallel rank's narrower matmuls (heads/t, d_ff/t) are slower per FLOP too.
A rate calibrated on a 1-device run at the full batch misses both, so pipelines with many
micro-batches and TP were predicted 20-25 % too fast.

The probe times what one device really computes for one block: layer norms, the qkv and
output projections, attention and the MLP with the local widths of a TP rank, forward and
backward, in the thread's CPU time (other processes on the machine do not count). The point
and its reference run in turn, many times, and the median of the pairs' ratios counts: this
VM's speed per FLOP drifts by 10-15 % over minutes (neighbours in the shared cache), which two
separately timed points would mistake for an efficiency. The ratio is cached per block shape in the
machine profile (plan/profiles.py), so a sweep pays for each point once: about two seconds
for the small preset.

``cost_factor(...)``: seconds per FLOP at (tokens, tp) over seconds per FLOP at (ref_tokens,
no TP), the correction applied to a rate calibrated at ``ref_tokens``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from parallab.plan.shapes import ModelShape

# A point above this many block FLOPs is not probed (the probe would take seconds); matmuls that
# large run near the machine's peak, so the factor is taken as 1.
MAX_PROBE_FLOPS = 4e10
# Above this many rows a CPU matmul's time per FLOP no longer falls (measured: 4 sequences of 128
# tokens already run at the rate of 16), so larger micro-batches are probed at this size.
SATURATED_TOKENS = 4096
CACHE_KEY = "block_efficiency"


def block_flops(d: int, heads: int, d_ff: int, tokens: int, seq_len: int, tp: int) -> float:
    """Forward + backward FLOPs of one block on one TP rank for ``tokens`` tokens (3x forward)."""
    proj = 2 * tokens * d * (3 * d // tp + d // tp + 2 * d_ff // tp)
    attn = 2 * 2 * tokens * seq_len * (d // tp)  # scores and weighted sum, full (unmasked) cost
    return 3 * (proj + attn)


def block_step(d: int, heads: int, d_ff: int, tokens: int, seq_len: int, tp: int):
    """A function that runs one block's forward and backward on a TP rank of ``tp`` (local
    widths) for ``tokens`` tokens and returns its thread CPU seconds."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    b = max(1, tokens // seq_len)
    hl = max(1, heads // tp)
    dl = hl * (d // heads)
    fl = max(1, d_ff // tp)
    w = {name: (torch.randn(*s, generator=g) * 0.02).requires_grad_()
         for name, s in (("qkv", (d, 3 * dl)), ("o", (dl, d)), ("w1", (d, fl)), ("w2", (fl, d)))}
    ln = [torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)]
    x = torch.randn(b, seq_len, d, generator=g, requires_grad=True)

    def step() -> float:
        t0 = time.thread_time()
        h = ln[0](x)
        q, k, v = (h @ w["qkv"]).split(dl, dim=-1)
        q, k, v = (t.view(b, seq_len, hl, d // heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = x + a.transpose(1, 2).reshape(b, seq_len, dl) @ w["o"]
        y = y + F.gelu(ln[1](y) @ w["w1"]) @ w["w2"]
        y.sum().backward()
        return time.thread_time() - t0

    return step


def measure_ratio(d: int, heads: int, d_ff: int, seq_len: int, point: tuple[int, int],
                  ref: tuple[int, int], budget_s: float = 2.0) -> float:
    """Seconds per FLOP at ``point`` (tokens, tp) over seconds per FLOP at ``ref``, the two run
    in turn (at least 5 runs each, about ``budget_s`` seconds in all), median of the pairs."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = block_step(d, heads, d_ff, point[0], seq_len, point[1])
        b = block_step(d, heads, d_ff, ref[0], seq_len, ref[1])
        warm = a() + b()
        reps = max(5, min(40, int(budget_s / max(warm, 1e-6))))
        ta, tb = [], []
        for _ in range(reps):
            ta.append(a())
            tb.append(b())
    finally:
        torch.set_num_threads(old)
    fa = block_flops(d, heads, d_ff, point[0], seq_len, point[1])
    fb = block_flops(d, heads, d_ff, ref[0], seq_len, ref[1])
    # Each pair ran back to back, so its ratio cancels the machine's slow drift; the median
    # of the pairs' ratios ignores a pair a burst of load hit. (The fastest run of each point
    # favoured the shorter one, which more often fits into a quiet moment: it put 8 sequences
    # at 0.90x the cost per FLOP of 16, where the small GPT's real steps show 1.0-1.03x.)
    return statistics.median((a_ / fa) / max(b_ / fb, 1e-18) for a_, b_ in zip(ta, tb))


def _key(shape: ModelShape) -> str:
    return f"d{shape.d_model}-h{shape.n_heads}-ff{shape.mlp_ratio * shape.d_model}-T{shape.seq_len}"


def _seqs(shape: ModelShape, tokens: float) -> int:
    return max(1, int(min(tokens, SATURATED_TOKENS) // shape.seq_len))


def cost_factor(shape: ModelShape, tokens: float, tp: int, ref_tokens: float, *,
                cache_dir: Path | None = None, probe: bool = True) -> float:
    """Seconds per FLOP of a block at ``tokens`` tokens per micro-batch on a TP rank of ``tp``
    over seconds per FLOP at ``ref_tokens`` without TP: how much slower each FLOP runs than it
    did in the calibration run. Measured once (measure_ratio) and cached in the machine profile
    under ``cache_dir``. 1.0 when the points are the same, a block too large to probe, heads or
    d_ff that do not split ``tp`` ways, or no number cached and ``probe`` off. Never below 1/2
    or above 4 (a disturbed probe must not swing a prediction further). Tokens are rounded down
    to whole sequences; above SATURATED_TOKENS the rate is taken as flat."""
    from parallab.plan.profiles import default_cache_dir, load_machine_profile, save_machine_profile

    d, h, ff, T = shape.d_model, shape.n_heads, shape.mlp_ratio * shape.d_model, shape.seq_len
    s, r = _seqs(shape, tokens), _seqs(shape, ref_tokens)
    if (s, tp) == (r, 1) or (tp > 1 and (h % tp or ff % tp)):
        return 1.0
    if max(block_flops(d, h, ff, s * T, T, tp), block_flops(d, h, ff, r * T, T, 1)) > MAX_PROBE_FLOPS:
        return 1.0
    cache_dir = Path(cache_dir or default_cache_dir())
    data = load_machine_profile(cache_dir)
    table = data.setdefault(CACHE_KEY, {}).setdefault(_key(shape), {})
    point = f"b{s}-tp{tp}/b{r}"
    if point not in table:
        if not probe:
            return 1.0
        table[point] = measure_ratio(d, h, ff, T, (s * T, tp), (r * T, 1))
        save_machine_profile(cache_dir, data)
    return min(4.0, max(0.5, table[point]))
