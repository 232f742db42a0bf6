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

    fp32 with SGD: 1e-5. A parallel run sums the same numbers in another order (all-reduce,
    micro-batches), which changes results by ~1e-7 relative; SGD passes that through linearly.
    fp32 with AdamW: 1e-4. Adam's step g / (sqrt(v) + eps) is steepest where a gradient element
    is near zero (|g| ~ eps = 1e-8); there the same rounding changes the update by a large
    fraction of lr. Measured here up to 1.3e-5 (debug model, ddp on 4 devices, 4 steps) with no
    error in the parallel computation, so 1e-5 would flag correct runs.
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
    gradient element by ~1e-7 of its summands, and where summands cancel (a LayerNorm bias
    sums over every token) that is a large part of the element itself; Adam divides by the
    gradient's own scale and carries that into the update. Such elements are few and small, so
    a norm-wise bound stays meaningful where an elementwise one would flag benign rounding.
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
