"""Tensor parallelism (Megatron-style, on DTensor): each weight matrix split over the ``tp``
devices, so every device holds 1/tp of the block weights and does 1/tp of their FLOPs.

A model family states its plan as data (``ModelFamily.tp_plan``): module path pattern, with
``*`` for any one name, -> style name. This module turns style names into
``torch.distributed.tensor.parallel`` styles. Where communication happens (forward; backward
does the mirror image):

* ``colwise`` (wq, wk, wv, w1): weight split by output features, so each device computes its own
  heads / hidden units from the replicated input. No communication.
* ``rowwise`` (wo, w2): weight split by input features; the partial sums are all-reduced
  (reduce-scattered over the sequence under sequence parallelism).
* ``rowwise_embedding`` (tok_emb): the table split over the vocabulary; a device looks up the
  tokens it owns, zeros elsewhere, and an all-reduce completes the rows.
* ``colwise_output`` (output): logits stay split over the vocabulary ([B, T, V/tp] per device);
  the loss is computed on them under ``loss_parallel()``, which exchanges only per-token max and
  sum-of-exp values, never the whole [B, T, V] logits.
* ``replicate`` (pos_emb; norms without sequence parallelism): a whole copy of the weight on
  every device, as a replicated DTensor. No communication: the gradient reaching the
  replicated activations was already all-reduced by the styles above, so every device computes
  the same full weight gradient. (DTensors throughout let one foreach optimizer kernel and
  FSDP treat every parameter alike.)
* Under sequence parallelism (``sequence_parallel=True``) the residual stream between blocks
  is split over the sequence ([B, T/tp, D]): ``norm`` runs LayerNorm on that slice (its
  weight-gradient partial sums are all-reduced), ``replicated_input`` all-gathers the slices
  back to [B, T, D] at the entry of attention and MLP, and ``sequence_split`` cuts the
  replicated embedding sum into slices (no communication) entering the first block. Without
  sequence parallelism ``sequence_split`` does nothing.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

STYLES = ("colwise", "rowwise", "rowwise_embedding", "colwise_output", "replicate", "norm",
          "replicated_input", "sequence_split")


class ReplicateParallel(ParallelStyle):
    """Whole weights on every device (replicated DTensors) for a module whose inputs and
    outputs are ordinary replicated tensors: inputs are wrapped as replicated DTensors, the
    output is unwrapped again. No communication either way."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def wrap(mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                         if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t
                         for t in inputs)

        def unwrap(mod, outputs, mesh):
            return outputs.to_local() if isinstance(outputs, DTensor) else outputs

        # No partition function: distribute_module replicates every parameter.
        return distribute_module(module, device_mesh, input_fn=wrap, output_fn=unwrap)


class FirstInputLayout(ParallelStyle):
    """Redistribute a module's first input from layout ``current`` to ``desired``, handing it
    over as a DTensor (``local=False``) or a local tensor; other inputs (an optional KV cache)
    pass through. Works for modules called with one argument or several, which
    PrepareModuleInput does not."""

    def __init__(self, *, current, desired, local: bool):
        self.current, self.desired, self.local = current, desired, local

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def pre_hook(mod, inputs):
            x, *rest = inputs
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [self.current], run_check=False)
            x = x.redistribute(device_mesh, [self.desired])
            return (x.to_local() if self.local else x, *rest)

        module.register_forward_pre_hook(pre_hook)
        return module


def make_style(name: str, *, sequence_parallel: bool, loss_parallel: bool):
    """The ParallelStyle for a style name, or None where the style is a no-op in this mode."""
    # The residual stream's layout between blocks: replicated, or split over the sequence dim.
    stream = Shard(1) if sequence_parallel else Replicate()
    if name == "colwise":
        return ColwiseParallel()
    if name == "rowwise":
        # Partial sums -> all-reduce (Replicate) or reduce-scatter over the sequence (Shard(1)).
        return RowwiseParallel(output_layouts=stream)
    if name == "rowwise_embedding":
        # Always all-reduced to whole rows: the position embedding is added to them next (it
        # needs every position), and ``sequence_split`` then cuts the sum without communication.
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if name == "colwise_output":
        # Under SP the input is all-gathered over the sequence first.
        return ColwiseParallel(input_layouts=stream,
                               output_layouts=Shard(-1) if loss_parallel else Replicate(),
                               use_local_output=not loss_parallel)
    if name == "replicate":
        return ReplicateParallel()
    if name == "norm":
        return SequenceParallel() if sequence_parallel else ReplicateParallel()
    if name == "replicated_input":
        # Attention / MLP input as one replicated DTensor shared by wq, wk, wv (or w1): their
        # input-gradient partial sums add up first and are reduced once in backward, an
        # all-reduce (reduce-scatter under SP). Under SP the forward all-gathers the sequence.
        return FirstInputLayout(current=stream, desired=Replicate(), local=False)
    if not sequence_parallel:
        return None
    if name == "sequence_split":
        # Replicate -> Shard(1) is a local slice; its backward all-gathers the gradient.
        return FirstInputLayout(current=Replicate(), desired=Shard(1), local=True)
    raise ValueError(f"unknown tensor-parallel style '{name}' (valid: {', '.join(STYLES)})")


def _grad_like_param(param: torch.Tensor) -> None:
    """Give a parameter's gradient the parameter's own layout, as a compact local tensor.

    The vocabulary-sharded embedding's weight gradient comes back replicated (the whole
    [V, D] table on every device: the embedding backward sees a replicated output gradient).
    The optimizer would then keep whole-table state too; slicing it to the parameter's shard
    needs no communication (every device holds the same whole gradient).
    """
    g = param.grad
    if isinstance(g, DTensor) and g.placements != param.placements:
        local = g.redistribute(param.device_mesh, param.placements).to_local().clone()
        param.grad = DTensor.from_local(local, param.device_mesh, param.placements,
                                        run_check=False, shape=param.shape, stride=param.stride())


def _matches(model: nn.Module, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name, _ in model.named_modules() if name)


def apply_tp(model: nn.Module, mesh: DeviceMesh, *, plan: dict[str, str],
             sequence_parallel: bool = False, loss_parallel: bool = True) -> nn.Module:
    """Shard ``model`` (on meta or materialized) over the 1-D ``mesh`` following ``plan``.

    With ``loss_parallel`` the model returns logits as a DTensor sharded over the vocabulary,
    and the loss and its backward must run inside
    ``torch.distributed.tensor.parallel.loss_parallel()``.
    """
    for style in plan.values():
        if style not in STYLES:
            raise ValueError(f"unknown tensor-parallel style '{style}' (valid: {', '.join(STYLES)})")
    styles = {}
    for pattern, style in plan.items():
        s = make_style(style, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
        # A plan names every part of a whole model; a pattern with no module here (say the
        # embedding of a later pipeline stage) is skipped rather than warned about.
        if s is not None and _matches(model, pattern):
            styles[pattern] = s
    return parallelize_module(model, mesh, styles)


def keep_grads_sharded(model: nn.Module) -> None:
    """After materialization (``to_empty`` makes new parameter objects, dropping hooks): give
    every gradient its parameter's layout as it is accumulated. Not needed under FSDP, which
    computes with its own unsharded parameters and redistributes such gradients itself."""
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(_grad_like_param)
