"""A user's own model for parallab (``--model.name user --model.entry
tests/distributed/user_model.py:build``): an MLP classifier on synthetic vectors, as an
nn.Sequential so that pipeline stages are runs of its children, with its own batches and loss.
docs/MODELS.md walks through the same interface."""

import torch
import torch.nn as nn
import torch.nn.functional as F

IN, HIDDEN, CLASSES = 16, 32, 5


def make_batch(step: int, rank: int, world: int, *, batch: int, seed: int):
    """This rank's rows of the step's global batch: the whole batch is drawn from (seed, step)
    and sliced, so any data-parallel split sees the same rows as one device."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(batch, IN, generator=g)
    y = (x[:, :CLASSES] * 3).argmax(dim=1)  # a learnable rule
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    return x[rows], y[rows]


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def build(preset: str = "debug"):
    width = {"debug": HIDDEN, "small": 4 * HIDDEN}.get(preset, HIDDEN)
    module = nn.Sequential(
        nn.Linear(IN, width), nn.GELU(),
        nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(),
        nn.Linear(width, width), nn.GELU(),
        nn.Linear(width, CLASSES),
    )
    return {"module": module, "split_points": ["2", "5"], "loss": loss, "make_batch": make_batch,
            # Megatron-style pairs: split by output features, then by input features (one
            # all-reduce per pair); the LayerNorm whole on every device.
            "tp_plan": {"0": "colwise", "2": "rowwise", "3": "replicate", "5": "colwise",
                        "7": "rowwise"}}


def build_plain():
    """A bare module, no plan: strategies that need more than the module refuse."""
    return nn.Sequential(nn.Embedding(256, 32), nn.Linear(32, 256))
