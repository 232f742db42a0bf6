"""What the planner knows about a model: parameter counts by part, read from the real model built
on the meta device (no memory is allocated, so a 13b preset costs nothing), and the shape numbers
the activation formula needs. Also byte-size parsing and printing, shared by the plan and the
per-device budget."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from parallab.config import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float, *, what: str = "device_memory") -> int:
    """'24GiB', '64MiB', '80GB', '1.5 TiB', 1024 -> bytes. Zero, negative or unparsable values
    raise ConfigError naming the value (GiB = 2**30, GB = 10**9)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what}={text!r} is not a memory size (give e.g. 24GiB, 512MiB, 80GB)")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what}={text!r} must be a positive memory size (e.g. 24GiB)")
    return size


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of one model, by part, plus the numbers of its activations.

    ``layer_*`` are per transformer block (all blocks are alike); ``*_tp`` is the part of a count
    that tensor parallelism shards (the modules its plan names), the rest is replicated.
    """
    family: str
    preset: str
    n_params: int
    embed_params: int
    embed_params_tp: int
    head_params: int
    head_params_tp: int
    layer_params: int
    layer_params_tp: int
    layer_tensors: int
    embed_tensors: int
    head_tensors: int
    largest_layer_matrix: int   # elements of the largest weight in a block (mlp.w1)
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    vocab_size: int
    mlp_ratio: int
    flops_per_token_train: float
    stage_costs: tuple[float, ...]  # forward FLOPs/token of each pipeline unit (one per block)
    tied: bool = False

    @property
    def n_tensors(self) -> int:
        return self.n_layers * self.layer_tensors + self.embed_tensors + self.head_tensors


def model_shape(family_name: str = "gpt", preset: str = "small", overrides: dict | None = None) -> ModelShape:
    """Build the model on the meta device and count its parameters by part."""
    from parallab.models.registry import build_meta, get_family

    try:
        family = get_family(family_name)
        cfg = family.config(preset, dict(overrides or {}))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("d_model", "n_layers", "n_heads", "seq_len", "vocab_size", "mlp_ratio"):
        if not hasattr(cfg, name):
            raise ConfigError(f"model family '{family_name}' has no '{name}': the planner's activation "
                              "formula covers GPT-style decoders only")
    model = build_meta(family, cfg)
    # Only these styles split a module's weight; the others (norm, sequence_*, replicate) move
    # activations, not parameters.
    patterns = [pat for pat, style in family.tp_plan(cfg).items()
                if style in ("colwise", "rowwise", "rowwise_embedding", "colwise_output")]
    seen: set[int] = set()
    parts = {"embed": [0, 0, 0], "head": [0, 0, 0], "layer": [0, 0, 0]}  # params, tp-sharded, tensors
    largest = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        assert p.device.type == "meta", name  # never materialize here
        module = name.rsplit(".", 1)[0]
        sharded = any(fnmatch.fnmatchcase(module, pat) for pat in patterns)
        if name.startswith("layers."):
            if not name.startswith("layers.0."):
                continue  # blocks are alike: count block 0 and multiply
            part = "layer"
            if p.dim() == 2:
                largest = max(largest, p.numel())
        elif name.startswith(("tok_emb", "pos_emb")):
            part = "embed"
        else:
            part = "head"
        parts[part][0] += p.numel()
        parts[part][1] += p.numel() if sharded else 0
        parts[part][2] += 1
    n_params = parts["embed"][0] + parts["head"][0] + cfg.n_layers * parts["layer"][0]
    return ModelShape(
        family=family_name, preset=preset, n_params=n_params,
        embed_params=parts["embed"][0], embed_params_tp=parts["embed"][1],
        head_params=parts["head"][0], head_params_tp=parts["head"][1],
        layer_params=parts["layer"][0], layer_params_tp=parts["layer"][1],
        layer_tensors=parts["layer"][2], embed_tensors=parts["embed"][2], head_tensors=parts["head"][2],
        largest_layer_matrix=largest, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, mlp_ratio=cfg.mlp_ratio,
        flops_per_token_train=family.flops_per_token(cfg, training=True),
        stage_costs=tuple(u.flops_per_token for u in family.pipeline_units(cfg)),
        tied=bool(getattr(cfg, "tie_embeddings", False)),
    )
