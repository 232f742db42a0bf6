"""Equivalence with the single-device run: the same per-step losses and the same final weights.

The single-device run saves its losses and full weights as the reference; every parallel run
from the same seed weights on the same global batches compares against it. Weights are compared
by their stable names, each rank checking the parameters it owns (a sharded parameter is
gathered whole first), and the largest deviation over ranks is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

def tolerance(dtype: str, optimizer: str) -> float:
    """Largest relative deviation from one device that still counts as the same computation.

    fp32 with SGD: 1e-5, the precise check (``parallab verify``, the parity tests). A parallel
    run sums the same numbers in another order (all-reduce, micro-batches), which changes
    results by ~1e-7 relative; SGD's update is linear in the gradient and passes that through
    unamplified, so anything above 1e-5 is a real difference in the computation.

    fp32 with AdamW: 1e-4, the most the project allows any strategy (issue 3), and enough for
    the sweeps it ships (the demo's runs deviate by up to 8e-6). Adam amplifies the same ~1e-7
    rounding, though, and can push a correct run past it:

    * Adam's step lr * m / (sqrt(v) + eps) normalizes each element by its own gradient scale.
      Where an element's gradient is below eps = 1e-8 the rounding of the reordered sum decides
      its sign: the update moves by a different fraction of lr (up to ~lr).
    * Adam without warm-up at lr 1e-3 overshoots in its first steps (a loss spike), and at such
      a step the gradient itself is ill-conditioned: tiny weight differences change it by
      percents, in float64 just as in float32, and Adam carries that into the update.

    Measured on the demo's settings at global batch 32 instead of 16 (small GPT, stdlib text,
    7 steps, ddp on 2 devices): at step 0 one element of layers.1.attn.wo.weight has gradient
    -6.7e-10 on one device and +4.7e-10 as the mean of the two halves, so its first update is
    -0.063 lr vs +0.045 lr; at step 4 (loss spike, layer-0 gradients 100x larger than at step
    3) the gradient of layers.0.attn_norm.bias differs by 2.6% between the two runs' weights,
    whose deviation was then 1.6e-6. The final weights deviate by 4.9e-3 (that bias; pipeline
    1f1b with 8 micro-batches 9.7e-4), the losses by 2e-5, and a one-process simulation (full
    batch against the mean of the two halves' gradients) reproduces 4.9e-3 exactly: not an
    error of the parallel run. A real error is far larger: a data-sharding bug (both ranks
    reading rank 0's rows) gives 0.84 on the same run, losses 1.5e-2 off after one step.
    So an AdamW row that fails with a loss deviation below the bound and a weight deviation
    of ~1e-3 is decided by ``parallab verify`` (SGD, 1e-5), the precise check; the worker
    logs the parameter that deviates most.

    bf16: values carry ~3 significant digits.
    """
    if dtype != "float32":
        return 2e-2
    return 1e-4 if optimizer == "adamw" else 1e-5


def full_named_parameters(parts):
    """(name, whole tensor) in the checkpoint's layout. A module may store a parameter in
    another shape of the same values in the same order, and then names the checkpoint's shape
    in ``checkpoint_shapes`` (tensor parallelism's fused q|k|v split, parallel/tp.py)."""
    from torch.distributed.tensor import DTensor

    for part in parts:
        shapes = {f"{m}.{p}" if m else p: shape for m, module in part.named_modules()
                  for p, shape in getattr(module, "checkpoint_shapes", {}).items()}
        for name, p in part.named_parameters():
            t = p.detach()
            if isinstance(t, DTensor):
                t = t.full_tensor()
            if name in shapes:
                t = t.reshape(shapes[name])
            yield name, t.float().cpu()


def save_reference(parts, losses: list[float], path: Path) -> None:
    """Rank 0 of a one-device run writes the reference (written whole, then renamed)."""
    blob = {"losses": torch.tensor(losses, dtype=torch.float64),
            "weights": {name: t.clone() for name, t in full_named_parameters(parts)}}
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def relative_deviation(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| (Frobenius norms, in float64), the tensor's relative error.

    Not the elementwise maximum: a reordered sum (an all-reduce, a micro-batch split) changes a
    gradient element by ~1e-7 of its summands, and where summands cancel (a gradient element
    near zero) that is a large part of the element itself; Adam divides by the gradient's own
    scale and carries that into the update (one such element moved by 0.1 lr in the demo run,
    see ``tolerance``). Such elements are few, so a norm-wise bound stays meaningful where an
    elementwise one would flag benign rounding. Under AdamW whole tensors can also drift once the
    trajectory passes an ill-conditioned step (see ``tolerance``).
    """
    a, ref = a.double(), ref.double()
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-30))


def compare_to_reference(parts, losses: list[float], path: Path, *, device) -> tuple[float, float]:
    """(largest relative loss deviation, largest relative weight deviation), over all ranks."""
    ref = torch.load(path, map_location="cpu", weights_only=True)
    ref_losses = ref["losses"]
    n = min(len(ref_losses), len(losses))
    got = torch.tensor(losses[:n], dtype=torch.float64)
    loss_dev = float(((got - ref_losses[:n]).abs() / ref_losses[:n].abs().clamp(min=1e-12)).max()) if n else 0.0
    if n < len(ref_losses) or n < len(losses):
        loss_dev = float("inf")  # different step counts cannot be compared
    weight_dev, worst = 0.0, None
    for name, t in full_named_parameters(parts):
        if name not in ref["weights"]:
            raise KeyError(f"parameter '{name}' is not in the reference {path}")
        dev = relative_deviation(t, ref["weights"][name])
        if dev > weight_dev:
            weight_dev, worst = dev, name
    if worst is not None:
        from parallab.runtime.dist import get_logger

        get_logger().info("largest weight deviation: %s %.3g", worst, weight_dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([weight_dev], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        weight_dev = float(t.item())
    return loss_dev, weight_dev
