"""Model families and presets: name -> a single-device model built on the meta device, plus what
the strategies need to know about it (pipeline units and their costs, the tensor-parallel plan,
FLOPs per token). A second family registers a ``ModelFamily`` here; no strategy changes."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallab.models.gpt import GPT, GPTConfig

# Presets from tests (debug) through the demo (small) to billion-parameter shapes for planning
# and GPUs. vocab 256 = the byte tokenizer; 50304 = GPT-2's vocabulary padded to a multiple of 64.
GPT_PRESETS: dict[str, GPTConfig] = {
    "debug": GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=4, n_heads=4),
    "tiny": GPTConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=4, n_heads=4),
    "small": GPTConfig(vocab_size=256, seq_len=128, d_model=384, n_layers=8, n_heads=6),
    "medium": GPTConfig(vocab_size=50304, seq_len=512, d_model=768, n_layers=12, n_heads=12),
    "350m": GPTConfig(vocab_size=50304, seq_len=1024, d_model=1024, n_layers=24, n_heads=16),
    "1b": GPTConfig(vocab_size=50304, seq_len=2048, d_model=2048, n_layers=18, n_heads=16),
    "3b": GPTConfig(vocab_size=50304, seq_len=2048, d_model=3072, n_layers=26, n_heads=24),
    "7b": GPTConfig(vocab_size=50304, seq_len=2048, d_model=4096, n_layers=32, n_heads=32),
    "13b": GPTConfig(vocab_size=50304, seq_len=2048, d_model=5120, n_layers=40, n_heads=40),
}


@dataclass(frozen=True)
class PipelineUnit:
    """A piece of the model that a pipeline stage can own: its module names and its cost."""
    name: str                 # e.g. "layers.3"
    flops_per_token: float    # forward FLOPs per token (the balancing weight)


class ModelFamily(Protocol):
    """What every family provides. Optional, used where present (docs/MODELS.md):

    * ``presets``: list of preset names (for help and errors);
    * ``check(cfg, *, mode, parallel)``: raise ValueError (one line) for a strategy the family
      refuses, before launch (mode 'train' or 'infer', parallel: the ParallelSection);
    * ``make_data(cfg, global_batch, seed)``: the family's own batches (an object with
      ``batch(step, *, rank, world) -> (x, y)`` and ``global_batch``), or None for tokens;
    * ``init_weights(model, generator_for)``: initialize a materialized part that has no
      ``init_weights`` method of its own (a user's module);
    * ``flops_per_sample(cfg, *, training)``: counted FLOPs of one sample.

    The model's config object exposes ``seq_len`` (1 for non-token models) and ``n_layers``
    (the number of pipeline units), which validation and the result row read."""
    name: str

    def config(self, preset: str, overrides: dict) -> object: ...
    def build(self, cfg) -> nn.Module: ...
    def pipeline_units(self, cfg) -> list[PipelineUnit]: ...
    def make_stage(self, model: nn.Module, units: list[str], *, first: bool, last: bool) -> nn.Module: ...
    def tp_plan(self, cfg) -> dict[str, str]: ...
    def flops_per_token(self, cfg, *, training: bool) -> float: ...
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


class GPTFamily:
    name = "gpt"

    def config(self, preset: str, overrides: dict) -> GPTConfig:
        if preset not in GPT_PRESETS:
            raise ValueError(f"unknown model preset '{preset}' (valid: {', '.join(GPT_PRESETS)})")
        valid = {f.name for f in fields(GPTConfig)}
        bad = sorted(set(overrides) - valid)
        if bad:
            raise ValueError(f"unknown model setting(s) {bad} (valid: {sorted(valid)})")
        cfg = replace(GPT_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
        cfg.validate()
        return cfg

    def build(self, cfg: GPTConfig) -> GPT:
        return GPT(cfg)

    def _block_flops(self, cfg: GPTConfig) -> float:
        # Forward FLOPs per token of one block: 2 per multiply-add of the four attention
        # projections (4 D^2) and the MLP (2 * ratio * D^2), plus QK^T and AV (2 * 2 * T * D).
        d = cfg.d_model
        return 2 * (4 * d * d + 2 * cfg.mlp_ratio * d * d) + 4 * cfg.seq_len * d

    def pipeline_units(self, cfg: GPTConfig) -> list[PipelineUnit]:
        # The embedding lookup costs no matmul FLOPs but is not free: charge it like a gather
        # of D values per token. The output projection (2 D V per token) is charged to the
        # last block's stage, which is what makes a large vocabulary shift layers away from it.
        units = [PipelineUnit(f"layers.{i}", self._block_flops(cfg)) for i in range(cfg.n_layers)]
        head = 2 * cfg.d_model * cfg.vocab_size + 5 * cfg.d_model
        units[0] = replace(units[0], flops_per_token=units[0].flops_per_token + cfg.d_model)
        units[-1] = replace(units[-1], flops_per_token=units[-1].flops_per_token + head)
        return units

    def make_stage(self, model: GPT, units: list[str], *, first: bool, last: bool) -> GPT:
        """The part of ``model`` that one pipeline stage runs: its blocks, plus the embeddings
        on the first stage and the final norm and output layer on the last. Parameter names
        are unchanged (``layers`` is keyed by index)."""
        stage = copy.deepcopy(model)
        keep = {u.split(".", 1)[1] for u in units}
        for key in list(stage.layers.keys()):
            if key not in keep:
                del stage.layers[key]
        if not first:
            stage.tok_emb = None
            stage.pos_emb = None
        if not last:
            stage.norm = None
            stage.output = None
        return stage

    def tp_plan(self, cfg: GPTConfig) -> dict[str, str]:
        """Tensor-parallel plan as data: module path pattern -> style (see parallel/tp.py).
        The norm / replicated_input / sequence_split entries carry sequence parallelism
        when it is on."""
        return {
            "tok_emb": "rowwise_embedding",
            "pos_emb": "replicate",
            "layers.0": "sequence_split",
            "layers.*.attn_norm": "norm",
            "layers.*.attn": "replicated_input",
            "layers.*.mlp_norm": "norm",
            "layers.*.mlp": "replicated_input",
            "norm": "norm",
            "layers.*.attn.wq": "colwise",
            "layers.*.attn.wk": "colwise",
            "layers.*.attn.wv": "colwise",
            "layers.*.attn.wo": "rowwise",
            "layers.*.mlp.w1": "colwise",
            "layers.*.mlp.w2": "rowwise",
            "output": "colwise_output",
        }

    def flops_per_token(self, cfg: GPTConfig, *, training: bool) -> float:
        """Model FLOPs per token (PaLM's accounting): 2 per parameter used in a matmul plus
        attention's 2 * 2 * T * D per layer, forward; training is 3x forward."""
        d = cfg.d_model
        matmul_params = cfg.n_layers * (4 + 2 * cfg.mlp_ratio) * d * d + d * cfg.vocab_size
        forward = 2 * matmul_params + cfg.n_layers * 4 * cfg.seq_len * d
        return 3 * forward if training else forward

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every token: logits [B, T, V], targets [B, T]."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))

    def flops_per_sample(self, cfg: GPTConfig, *, training: bool = True) -> float:
        """Counted FLOPs of one sequence (FlopCounterMode on meta, models/flops.py)."""
        from parallab.models.flops import count_flops

        x = torch.zeros(1, cfg.seq_len, dtype=torch.long, device="meta")
        counted = count_flops(build_meta(self, cfg), x, x, self.loss, key=("gpt", cfg))
        return float(counted["training" if training else "forward"])


def _families() -> dict[str, ModelFamily]:
    from parallab.models.hf import HFFamily
    from parallab.models.resnet import ResNetFamily
    from parallab.models.user import UserFamily

    return {"gpt": GPTFamily(), "hf-gpt2": HFFamily("hf-gpt2", "gpt2"),
            "hf-llama": HFFamily("hf-llama", "llama"), "hf": HFFamily("hf", None),
            "resnet": ResNetFamily(), "user": UserFamily()}


FAMILIES: dict[str, ModelFamily] = _families()


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model '{name}' (valid: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def presets(name: str) -> list[str]:
    if name == "gpt":
        return list(GPT_PRESETS)
    return list(getattr(FAMILIES.get(name), "presets", []))


def build_meta(family: ModelFamily, cfg) -> nn.Module:
    """The whole model with parameters on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return family.build(cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_generator(seed: int) -> Callable[[str], torch.Generator]:
    """Per-parameter generators keyed by (seed, parameter name), stable across processes
    (Python's hash() is salted per process, so a fixed digest is used instead)."""
    import hashlib

    def generator_for(name: str) -> torch.Generator:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        g = torch.Generator()
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return g

    return generator_for
