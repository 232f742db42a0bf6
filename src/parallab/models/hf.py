"""Hugging Face transformers causal LMs (GPT-2, Llama) as parallab model families.

Optional dependency: ``pip install 'parallab[hf]'`` (transformers, safetensors); nothing here
imports transformers until a model is configured. A model is given by

* a preset of the family (``--model.name hf-llama --model.preset tiny``), with the usual shape
  overrides (``--model.d-model`` ...) and/or ``model.hf_config`` (a JSON file, or an inline
  JSON object, of Hugging Face config keys, applied last): built from the config, no download;
* or a local folder (``--model.name hf --model.path DIR``) holding ``config.json`` and
  ``*.safetensors`` weights, which every rank then loads by parameter name into its own
  parameters or shards (a checkpoint split over several safetensors files included).

The Hugging Face model is built on the meta device (``from_config`` under
``torch.device("meta")``) and wrapped in ``HFCausalLM``, which holds the model's top-level
children under their own names, so every parameter keeps its Hugging Face name
(``model.layers.3.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn.weight``): the
safetensors keys, tensor-parallel plans and the equivalence check all use them. The decoder
layers' ``ModuleList`` becomes a ``ModuleDict`` keyed by index (same names), so a pipeline
stage deletes the layers it does not own. ``HFCausalLM.forward`` replaces the Hugging Face
model's own forward: embeddings (first stage), the stage's decoder layers called one by one,
final norm and ``lm_head`` (last stage); hidden states pass between stages.

Departures from the Hugging Face defaults, each for the equivalence check: dropout is 0
(random masks would differ per strategy); attention is ``sdpa`` with no mask (causal, no
padding); parameters are initialized by name from the run's seed (``param_generator``), not by
Hugging Face's ``_init_weights``, unless weights are loaded from ``model.path``.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallab.models.gpt import load_full_into
from parallab.models.hf_config import ARCHS, NO_SP, HFConfig, make_config, require_transformers


class _LayerCache:
    """One layer's parallab ``KVCache`` behind the Hugging Face cache call
    ``update(key_states, value_states, layer_idx, ...) -> (all keys, all values)``."""

    def __init__(self, kv):
        self.kv = kv

    def update(self, k, v, layer_idx=None, *args, **kwargs):
        k_all, v_all, _ = self.kv.update(k, v)  # the mask is not needed: see HFCausalLM.forward
        return k_all, v_all


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM with its parameter names, run layer by layer (see the module
    docstring). ``layers`` is the ModuleDict of decoder layers (FSDP units, pipeline units,
    KV caches, activation checkpointing); embeddings, final norm and ``lm_head`` are None on
    pipeline stages that do not own them. Shapes: tokens [B, T] -> logits [B, T, V], or hidden
    states [B, T, D] in and out of the middle stages."""

    def __init__(self, hf_model: nn.Module, cfg: HFConfig):
        super().__init__()
        self.cfg = cfg
        self.arch = ARCHS[cfg.model_type]
        for name, child in hf_model.named_children():  # 'model' / 'transformer', 'lm_head'
            setattr(self, name, child)
        body = self.body
        layers = getattr(body, self.arch["layers"])
        setattr(body, self.arch["layers"], nn.ModuleDict({str(i): m for i, m in enumerate(layers)}))

    @property
    def body(self) -> nn.Module:
        return getattr(self, self.arch["body"])

    @property
    def layers(self) -> nn.ModuleDict:
        return getattr(self.body, self.arch["layers"])

    def forward(self, x: torch.Tensor, caches=None, start_pos: int = 0) -> torch.Tensor:
        """With ``caches`` (one parallab KVCache per layer here) for generation: a prefill from
        position 0, then one token at a time. Attention gets no mask: sdpa is then causal for
        a prompt (queries and keys of the same length) and attends to every cached key for a
        single new token, which is all greedy decoding needs."""
        body, arch = self.body, self.arch
        T = x.shape[1]
        pos = torch.arange(start_pos, start_pos + T, device=x.device)
        first = getattr(body, arch["embeds"][0])
        if first is not None:
            x = first(x)
            if len(arch["embeds"]) > 1:  # GPT-2's learned positions
                x = x + getattr(body, arch["embeds"][1])(pos)
        kwargs = {}
        if hasattr(body, "rotary_emb"):  # Llama: rotary cos/sin, computed on every stage
            if x.device.type == "meta":  # counting FLOPs: shapes only (older transformers'
                cs = torch.empty(1, T, self.cfg.head_dim, device="meta", dtype=x.dtype)  # rotary
                rope = (cs, cs)                                  # opens autocast, which meta lacks)
            else:
                rope = body.rotary_emb(x, pos[None])
            kwargs = dict(position_embeddings=rope, position_ids=pos[None])
        cache_kw = _cache_keyword(self) if caches is not None else None
        for i, layer in enumerate(self.layers.values()):
            if cache_kw == "layer_past":  # transformers < 4.5x GPT-2: (keys, values) tuples
                x = _tuple_cache_layer(layer, x, caches[i], kwargs)
                continue
            extra = {cache_kw: _LayerCache(caches[i])} if caches is not None else {}
            out = layer(x, **kwargs, **extra)
            x = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
        norm = getattr(body, arch["norm"])
        if norm is not None:
            x = norm(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    @torch.no_grad()
    def init_weights(self, generator_for) -> None:
        """After ``to_empty``: rebuild the computed buffers, then load the folder's weights by
        name, or draw every parameter from the generator of its name (normal(0, 0.02) for
        matrices and embeddings, GPT-2's residual projections scaled by 1/sqrt(2 n_layers);
        norms 1, biases 0)."""
        self._rebuild_buffers()
        self._localize_heads()
        if self.cfg.path is not None:
            load_safetensors(self, Path(self.cfg.path))
            return
        std = getattr(self.body.config, "initializer_range", 0.02)
        seen: set[int] = set()
        for mod_name, module in self.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:  # a tied weight: initialized under its first name
                    continue
                seen.add(id(p))
                name = f"{mod_name}.{pname}" if mod_name else pname
                if pname == "bias":
                    values = torch.zeros(p.shape)
                elif "norm" in type(module).__name__.lower() or "ln_" in mod_name.rsplit(".", 1)[-1]:
                    values = torch.ones(p.shape)
                else:
                    s = std
                    if self.cfg.model_type == "gpt2" and mod_name.endswith("c_proj"):
                        s = std / (2 * self.cfg.n_layers) ** 0.5
                    values = torch.randn(p.shape, generator=generator_for(name)) * s
                load_full_into(p, values)

    def _rebuild_buffers(self) -> None:
        """``to_empty`` leaves buffers uninitialized; the only ones these models have are
        computed from the config (rotary frequencies; older GPT-2's causal-mask buffers)."""
        device = next(self.parameters()).device
        body = self.body
        rotary = getattr(body, "rotary_emb", None)
        if rotary is not None:
            with torch.device(device):
                body.rotary_emb = type(rotary)(config=body.config)
        for mod_name, module in self.named_modules():
            for bname, buf in list(module.named_buffers(recurse=False)):
                if mod_name.endswith("rotary_emb"):
                    continue
                if bname == "bias" and buf.dtype == torch.bool:  # transformers < 4.5x GPT-2
                    n = buf.shape[-1]
                    buf.copy_(torch.tril(torch.ones(n, n, dtype=torch.bool, device=device)).view(buf.shape))
                elif bname == "masked_bias":
                    buf.fill_(-1e4)
                else:
                    raise RuntimeError(f"buffer {mod_name}.{bname} has no known initialization")

    def _localize_heads(self) -> None:
        """Under tensor parallelism a device holds n_heads/tp heads. Current transformers
        reshape with -1 heads and need nothing for Llama; older ones (4.4x Llama) reshape with
        head-count attributes, which are divided by the tp degree here (once). GPT-2 splits its
        fused q|k|v output with ``split_size`` (and older versions reshape with ``num_heads``
        and ``embed_dim``): these become the local sizes too."""
        from torch.distributed.tensor import DTensor

        for module in self.modules():
            q = getattr(module, "q_proj", None)
            q = getattr(module, "c_attn", None) if q is None else q
            if q is None or not isinstance(q.weight, DTensor) or getattr(module, "_parallab_tp", False):
                continue
            mesh = q.weight.device_mesh
            names = mesh.mesh_dim_names or ()
            tp = mesh.size(names.index("tp")) if "tp" in names else 1
            for attr in ("num_heads", "num_key_value_heads", "hidden_size", "split_size", "embed_dim"):
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, getattr(module, attr) // tp)
            module._parallab_tp = True


def _cache_keyword(model: HFCausalLM) -> str:
    """The decoder layer's keyword for its KV cache, by transformers version: a cache object
    (``cache``, ``past_key_values``, ``past_key_value``) or GPT-2's older tuples."""
    layer = next(iter(model.layers.values()))
    params = inspect.signature(type(layer).forward).parameters
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if name in params:
            return name
    raise NotImplementedError(f"no KV-cache argument found on {type(layer).__name__}.forward: "
                              "generation needs one (the forward workload works)")


def _tuple_cache_layer(layer: nn.Module, x: torch.Tensor, kv, kwargs: dict) -> torch.Tensor:
    """One layer with a tuple cache: the cached keys/values [B, H, pos, hd] in, the layer's
    'present' (all keys/values) out, whose new positions go into the parallab cache."""
    past = (kv.k[:, :, :kv.pos], kv.v[:, :, :kv.pos]) if kv.pos else None
    out = layer(x, layer_past=past, use_cache=True, **kwargs)
    k_all, v_all = out[1]
    kv.update(k_all[:, :, kv.pos:], v_all[:, :, kv.pos:])
    return out[0]


def load_safetensors(model: nn.Module, folder: Path) -> None:
    """Every parameter of ``model`` (a stage, possibly sharded) from the folder's safetensors,
    by name. Each rank reads the whole tensors it needs and keeps its shard. Accepts the
    names without the body prefix ('h.0...' for GPT-2's original checkpoints) and a missing
    lm_head.weight when the embeddings are tied."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                where[key] = f
    arch = model.arch
    embed_key = f"{arch['body']}.{arch['embeds'][0]}.weight"
    stored = _checkpoint_shapes(model)
    missing = []
    for name, p in model.named_parameters():
        candidates = [name, name.split(".", 1)[1] if name.startswith(arch["body"] + ".") else None]
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            candidates += [embed_key, embed_key.split(".", 1)[1]]
        key = next((c for c in candidates if c in where), None)
        if key is None:
            missing.append(name)
            continue
        with safe_open(str(where[key]), framework="pt") as handle:
            t = handle.get_tensor(key)
        want = stored.get(name, tuple(p.shape))
        if tuple(t.shape) != want:
            raise ValueError(f"weight {key} in {folder} has shape {tuple(t.shape)}, the model's "
                             f"{name} {want}")
        t = t.reshape(p.shape)  # a fused q|k|v split by tensor parallelism: [D, 3D] -> [D, 3, D]
        load_full_into(p, t.float() if t.is_floating_point() else t)
    if missing:
        raise ValueError(f"{folder} has no weights for {len(missing)} parameter(s), e.g. "
                         f"{missing[:3]}")


def _checkpoint_shapes(model: nn.Module) -> dict[str, tuple]:
    """{parameter name: checkpoint shape} for parameters stored in another shape (the same
    values in the same order): GPT-2's c_attn under tensor parallelism (parallel/tp.py)."""
    out = {}
    for mod_name, module in model.named_modules():
        for pname, shape in getattr(module, "checkpoint_shapes", {}).items():
            out[f"{mod_name}.{pname}" if mod_name else pname] = tuple(shape)
    return out


class HFFamily:
    """``hf-gpt2`` / ``hf-llama`` (presets or a config) and ``hf`` (model.path or
    model.hf_config naming the model_type)."""

    def __init__(self, name: str, model_type: str | None):
        self.name, self.model_type = name, model_type
        self.presets = list(ARCHS[model_type]["presets"]) if model_type else []

    def config(self, preset: str, overrides: dict) -> HFConfig:
        return make_config(self.model_type, preset, overrides, family=self.name)

    def build(self, cfg: HFConfig) -> HFCausalLM:
        transformers = require_transformers()
        model = transformers.AutoModelForCausalLM.from_config(cfg.hf_config(), attn_implementation="sdpa")
        return HFCausalLM(model, cfg)

    def _layer_flops(self, cfg: HFConfig) -> float:
        d, hd = cfg.d_model, cfg.head_dim
        attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
        mlp = (3 if cfg.model_type == "llama" else 2) * d * cfg.ffn_dim
        return 2 * (attn + mlp) + 4 * cfg.seq_len * cfg.n_heads * hd

    def pipeline_units(self, cfg: HFConfig):
        """One unit per decoder layer (forward FLOPs per token), embeddings charged to the
        first, final norm and lm_head (2 D V) to the last, as for the built-in GPT."""
        from parallab.models.registry import PipelineUnit

        arch = ARCHS[cfg.model_type]
        prefix = f"{arch['body']}.{arch['layers']}"
        units = [PipelineUnit(f"{prefix}.{i}", self._layer_flops(cfg)) for i in range(cfg.n_layers)]
        units[0] = PipelineUnit(units[0].name, units[0].flops_per_token + cfg.d_model)
        units[-1] = PipelineUnit(units[-1].name, units[-1].flops_per_token
                                 + 2 * cfg.d_model * cfg.vocab_size + 5 * cfg.d_model)
        return units

    def make_stage(self, model: HFCausalLM, units: list[str], *, first: bool, last: bool) -> HFCausalLM:
        stage = copy.deepcopy(model)
        keep = {u.rsplit(".", 1)[1] for u in units}
        for key in list(stage.layers.keys()):
            if key not in keep:
                del stage.layers[key]
        if not first:
            for name in stage.arch["embeds"]:
                setattr(stage.body, name, None)
        if not last:
            setattr(stage.body, stage.arch["norm"], None)
            stage.lm_head = None
        return stage

    def tp_plan(self, cfg: HFConfig) -> dict[str, str]:
        """Megatron-style, by heads and hidden units: the projections into attention and the
        MLP split by output features, those out of them by input features (one all-reduce
        each), embeddings over the vocabulary, lm_head's logits left split for loss_parallel;
        norms (and GPT-2's position embeddings) replicated. Heads become local by -1 reshapes
        (``_localize_heads`` sets the attributes older transformers and GPT-2 split with).

        GPT-2's projections are ``Conv1D`` ([in, out] weights: the ``*_conv1d`` styles), and its
        q, k and v come from one fused ``c_attn`` [D, 3D]: ``colwise_conv1d_qkv`` stores it as
        [D, 3, D] (same name, same values in the same order) and splits the last dim, so each
        device holds the same heads of q, k and v (docs/MODELS.md)."""
        if cfg.model_type == "gpt2":
            h = "transformer.h.*"
            return {"transformer.wte": "rowwise_embedding", "transformer.wpe": "replicate",
                    f"{h}.ln_1": "norm", f"{h}.ln_2": "norm", "transformer.ln_f": "norm",
                    f"{h}.attn.c_attn": "colwise_conv1d_qkv", f"{h}.attn.c_proj": "rowwise_conv1d",
                    f"{h}.mlp.c_fc": "colwise_conv1d", f"{h}.mlp.c_proj": "rowwise_conv1d",
                    "lm_head": "colwise_output"}
        a = "model.layers.*.self_attn"
        m = "model.layers.*.mlp"
        return {"model.embed_tokens": "rowwise_embedding",
                "model.layers.*.input_layernorm": "norm",
                "model.layers.*.post_attention_layernorm": "norm",
                "model.norm": "norm",
                f"{a}.q_proj": "colwise", f"{a}.k_proj": "colwise", f"{a}.v_proj": "colwise",
                f"{a}.o_proj": "rowwise",
                f"{m}.gate_proj": "colwise", f"{m}.up_proj": "colwise", f"{m}.down_proj": "rowwise",
                "lm_head": "colwise_output"}

    def check(self, cfg: HFConfig, *, mode: str, parallel) -> None:
        """Refusals before launch (ValueError, one line)."""
        from parallab.config import parallel_dims, uses_tp

        tp_on = parallel.strategy == "tp" if mode == "infer" else uses_tp(parallel.strategy)
        if not tp_on:
            return
        if mode == "train" and parallel.sequence_parallel:
            raise ValueError(NO_SP)
        tp = parallel.devices if mode == "infer" else parallel_dims(parallel).tp
        sizes = [("n_heads", cfg.n_heads), ("intermediate_size", cfg.ffn_dim),
                 ("vocab_size", cfg.vocab_size)]
        if cfg.n_kv_heads != cfg.n_heads:  # grouped-query attention (Llama); GPT-2 has none
            sizes.insert(0, ("num_key_value_heads", cfg.n_kv_heads))
        for what, value in sizes:
            if value % tp:
                raise ValueError(f"tensor parallelism over {tp} devices splits {what}={value}, "
                                 f"which is not divisible by {tp}")

    def _counted(self, cfg: HFConfig) -> dict:
        from parallab.models.flops import count_flops
        from parallab.models.registry import build_meta

        x = torch.zeros(1, cfg.seq_len, dtype=torch.long, device="meta")
        return count_flops(build_meta(self, cfg), x, x, self.loss, key=("hf", cfg.hf_json))

    def flops_per_sample(self, cfg: HFConfig, *, training: bool = True) -> float:
        """Counted (FlopCounterMode on meta) FLOPs of one sequence of seq_len tokens."""
        return float(self._counted(cfg)["training" if training else "forward"])

    def flops_per_token(self, cfg: HFConfig, *, training: bool) -> float:
        return self.flops_per_sample(cfg, training=training) / cfg.seq_len

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every token: logits [B, T, V], targets [B, T]."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
