"""Activation checkpointing: each transformer block keeps only its input during forward and
recomputes its inside activations in backward (about one extra forward of compute for
roughly n_layers x the per-block activation memory saved).

Applied per block by replacing the block's ``forward`` with a checkpointed call of the original
one, rather than ``checkpoint_wrapper``: the wrapper adds a ``_checkpoint_wrapped_module.``
level to every parameter name, and parameter names are what the seeded initialization,
checkpoints and the equivalence check key on. Hooks of later techniques (FSDP's all-gather, TP's
input layouts) sit on the block module itself, outside the checkpointed function, so the
recomputation in backward runs with the parameters FSDP has gathered for backward.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        # Non-reentrant checkpointing: works with DTensors, keyword arguments and inputs that
        # do not require grad; no RNG is involved in the model, so recomputation is exact.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    run._parallab_checkpointed = True
    return run


def apply_ac(model: nn.Module) -> nn.Module:
    """Checkpoint every entry of ``model.layers`` (the transformer blocks), in place."""
    for block in model.layers.values():
        if getattr(block.forward, "_parallab_checkpointed", False):
            continue  # already checkpointed: applying twice would recompute twice
        block.forward = _checkpointed(block.forward)
    return model
