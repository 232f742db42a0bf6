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
* ``colwise_conv1d`` / ``rowwise_conv1d``: the same for a module that stores its weight as
  [in, out] and computes ``x @ weight + bias`` (Hugging Face's ``Conv1D``, GPT-2): the weight
  is split on dim 1 / dim 0 instead, in the checkpoint's own layout. These and the next take
  the replicated stream only (no sequence parallelism).
* ``colwise_conv1d_qkv``: a ``Conv1D`` whose output is q|k|v side by side (GPT-2's ``c_attn``,
  [in, 3 out]). A column split of that would give the first device all of q and half of k, so
  the weight is stored as [in, 3, out] (bias [3, out]), the same values in the same order, and
  split on its last dim: each device holds the same heads of q, k and v and computes
  [..., 3 out/tp] = its q|k|v. The module names the checkpoint shape in ``checkpoint_shapes``
  (the equivalence check and weight loading use it). No communication in forward; backward
  all-reduces the input gradient, as ``colwise`` does.
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
from torch.distributed.tensor import (DTensor, Partial, Replicate, Shard, distribute_module,
                                      distribute_tensor)
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

STYLES = ("colwise", "rowwise", "rowwise_embedding", "colwise_output", "replicate", "norm",
          "replicated_input", "sequence_split", "colwise_conv1d", "rowwise_conv1d",
          "colwise_conv1d_qkv")


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


def _shard_param(module: nn.Module, name: str, mesh, dim: int | None) -> None:
    """Replace a parameter by a DTensor split on ``dim`` over ``mesh`` (None: replicated)."""
    p = getattr(module, name, None)
    if p is None:
        return
    placement = Replicate() if dim is None else Shard(dim)
    module.register_parameter(name, nn.Parameter(
        distribute_tensor(p, mesh, [placement], src_data_rank=None), requires_grad=p.requires_grad))


class Conv1DParallel(ParallelStyle):
    """Colwise or rowwise for a module with an [in, out] weight computing ``x @ weight + bias``
    (transformers' ``Conv1D``), through DTensor operations on its own forward, like torch's
    Colwise/RowwiseParallel do for nn.Linear (which they require). Colwise: weight Shard(1),
    bias Shard(0), replicated input, output split over features (a local tensor). Rowwise:
    weight Shard(0), bias replicated, input split over features, partial sums all-reduced."""

    def __init__(self, *, rowwise: bool):
        self.rowwise = rowwise

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        rowwise = self.rowwise
        if getattr(module, "weight", None) is None or module.weight.dim() != 2:
            raise ValueError(f"{'rowwise' if rowwise else 'colwise'}_conv1d needs a module with a "
                             f"2-D [in, out] weight, got {type(module).__name__}")

        def partition(name, mod, mesh):
            _shard_param(mod, "weight", mesh, 0 if rowwise else 1)
            _shard_param(mod, "bias", mesh, None if rowwise else 0)

        def wrap(mod, inputs, mesh):
            x, *rest = inputs
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Shard(-1) if rowwise else Replicate()],
                                       run_check=False)
            return (x, *rest)

        def unwrap(mod, out, mesh):
            want = Replicate() if rowwise else Shard(out.ndim - 1)
            if out.placements != (want,):
                out = out.redistribute(mesh, [want])  # rowwise: the all-reduce
            return out.to_local()

        return distribute_module(module, device_mesh, partition, wrap, unwrap)


class _FusedConv1D:
    """Forward of a ``colwise_conv1d_qkv`` module (mixed in before its own class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: the replicated input as a DTensor. Its local tensor hands the input gradient back
        # as partial sums, which from_local's backward (in ``wrap``) all-reduces.
        xl = x.to_local(grad_placements=[Partial()])
        w = self.weight.to_local()  # [in, parts, out/tp]
        b = self.bias.to_local().reshape(-1) if self.bias is not None else None
        y = xl.reshape(-1, xl.shape[-1]) @ w.reshape(w.shape[0], -1)
        if b is not None:
            y = y + b
        return y.view(*xl.shape[:-1], y.shape[-1])  # [..., parts * out/tp]: q_r | k_r | v_r


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """``cls`` with the split forward (one subclass per class, as FSDP2 swaps classes)."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"TP{cls.__name__}", (_FusedConv1D, cls), {})
    return _FUSED_CLASSES[cls]


class FusedConv1DParallel(ParallelStyle):
    """``colwise_conv1d_qkv`` (see the module docstring): an [in, parts*out] ``Conv1D`` split
    by output features within each of its ``parts`` equal parts."""

    def __init__(self, parts: int = 3):
        self.parts = parts

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        parts = self.parts
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2 or w.shape[1] % parts:
            raise ValueError(f"colwise_conv1d_qkv needs a 2-D [in, {parts}*out] weight, got "
                             f"{type(module).__name__} {tuple(w.shape) if w is not None else None}")
        if isinstance(w, DTensor):
            raise ValueError("colwise_conv1d_qkv is applied once, to a module not yet sharded")
        shapes = {"weight": tuple(w.shape)}
        module.weight = nn.Parameter(w.detach().view(w.shape[0], parts, -1), requires_grad=w.requires_grad)
        if module.bias is not None:
            b = module.bias
            shapes["bias"] = tuple(b.shape)
            module.bias = nn.Parameter(b.detach().view(parts, -1), requires_grad=b.requires_grad)
        module.checkpoint_shapes = shapes
        module.__class__ = _fused_class(type(module))

        def partition(name, mod, mesh):
            _shard_param(mod, "weight", mesh, 2)
            _shard_param(mod, "bias", mesh, 1)

        def wrap(mod, inputs, mesh):
            x, *rest = inputs
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            return (x, *rest)

        return distribute_module(module, device_mesh, partition, wrap)


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
    if name in ("colwise_conv1d", "rowwise_conv1d", "colwise_conv1d_qkv"):
        if sequence_parallel:  # they take and give the replicated stream only
            raise ValueError(f"tensor-parallel style '{name}' does not support sequence parallelism")
        if name == "colwise_conv1d_qkv":
            return FusedConv1DParallel(parts=3)
        return Conv1DParallel(rowwise=name == "rowwise_conv1d")
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
