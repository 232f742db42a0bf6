"""Hugging Face model configs for parallab (models/hf.py): per architecture, where the parts
live, presets and which shape overrides map to which config key; and ``make_config``, which
resolves preset / local folder / ``model.hf_config`` / overrides into one ``HFConfig``. Nothing
here imports transformers before a config is made."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Per architecture: where the parts live, which ModelSection overrides map to which config key,
# the keys set to 0 (dropout), and presets (Hugging Face config keys; vocab 256 = byte tokenizer).
ARCHS = {
    "gpt2": dict(
        body="transformer", layers="h", embeds=("wte", "wpe"), norm="ln_f",
        keys=dict(d_model="n_embd", n_layers="n_layer", n_heads="n_head", seq_len="n_positions",
                  vocab_size="vocab_size", tie_embeddings="tie_word_embeddings"),
        no_dropout=("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"),
        presets={
            "debug": dict(n_embd=64, n_layer=4, n_head=4, n_positions=32, vocab_size=256),
            "tiny": dict(n_embd=128, n_layer=4, n_head=4, n_positions=64, vocab_size=256),
            "small": dict(n_embd=384, n_layer=8, n_head=6, n_positions=128, vocab_size=256),
            "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
                         tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256),
        },
        defaults=dict(tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
    ),
    "llama": dict(
        body="model", layers="layers", embeds=("embed_tokens",), norm="norm",
        keys=dict(d_model="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                  seq_len="max_position_embeddings", vocab_size="vocab_size",
                  tie_embeddings="tie_word_embeddings"),
        no_dropout=("attention_dropout",),
        presets={
            "debug": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=176,
                          max_position_embeddings=32, vocab_size=256),
            "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=352,
                         max_position_embeddings=64, vocab_size=256),
            "small": dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6,
                          num_key_value_heads=2, intermediate_size=1024,
                          max_position_embeddings=128, vocab_size=256),
        },
        defaults=dict(tie_word_embeddings=False),
    ),
}
NO_SP = ("sequence parallelism is not supported for Hugging Face models (their decoder layers "
         "call attention and MLP with keyword arguments, which the sequence-parallel layout "
         "hooks take positionally): set parallel.sequence_parallel=false")


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("Hugging Face models need the optional dependency: pip install "
                         "'parallab[hf]' (transformers, safetensors)") from None
    transformers.logging.set_verbosity_error()  # config warnings would fill every rank's log
    return transformers


@dataclass(frozen=True)
class HFConfig:
    """A Hugging Face causal LM: its config (as JSON), where weights come from, and the shape
    numbers the strategies and validation read."""
    model_type: str
    hf_json: str
    path: str | None
    vocab_size: int
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    tie_embeddings: bool

    def hf_config(self):
        transformers = require_transformers()
        return transformers.AutoConfig.for_model(self.model_type, **json.loads(self.hf_json))


def _read_json(text_or_path: str, what: str) -> dict:
    try:
        if text_or_path.lstrip().startswith("{"):
            data = json.loads(text_or_path)
        else:
            data = json.loads(Path(text_or_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} '{text_or_path}' is neither a JSON object nor a readable JSON "
                         f"file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} '{text_or_path}' must hold a JSON object of config keys")
    return data


def make_config(model_type: str | None, preset: str, overrides: dict, *, family: str) -> HFConfig:
    """Preset (or the folder's config.json), then ``hf_config`` keys, then the shape overrides."""
    over = dict(overrides)
    path, extra = over.pop("path", None), over.pop("hf_config", None)
    base: dict = {}
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            raise ValueError(f"model.path '{path}' must be a folder with config.json and "
                             "*.safetensors weights")
        base = _read_json(str(folder / "config.json"), "model.path config")
        path = str(folder.resolve())
    extra_d = _read_json(extra, "model.hf_config") if extra is not None else {}
    mt = base.get("model_type") or extra_d.get("model_type") or model_type
    if model_type is not None and mt != model_type:
        raise ValueError(f"model {family} builds model_type '{model_type}', but the config says "
                         f"'{mt}' (use --model.name hf-{mt} or --model.name hf)")
    if mt not in ARCHS:
        raise ValueError(f"model {family} needs a model_type among {', '.join(ARCHS)} "
                         f"(from model.path's config.json or model.hf_config), got {mt!r}")
    arch = ARCHS[mt]
    if path is None:
        if preset not in arch["presets"] and not extra_d:
            raise ValueError(f"unknown model preset '{preset}' for {family} (valid: "
                             f"{', '.join(arch['presets'])}, or give model.hf_config/model.path)")
        base = {**arch["defaults"], **arch["presets"].get(preset, {})}
    bad = sorted(set(over) - set(arch["keys"]))
    if bad:
        raise ValueError(f"unknown model setting(s) {bad} for {family} (valid: "
                         f"{sorted(arch['keys']) + ['hf_config', 'path']})")
    d = {**base, **extra_d, **{arch["keys"][k]: v for k, v in over.items()}}
    for k in [k for k in d if k in ("torch_dtype", "dtype", "architectures", "transformers_version",
                                    "model_type", "_name_or_path", "attn_implementation")]:
        del d[k]
    for k in arch["no_dropout"]:
        d[k] = 0.0
    require_transformers()
    from transformers import AutoConfig

    try:
        c = AutoConfig.for_model(mt, **d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model {family}: invalid Hugging Face config ({e})") from None
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
    for name, value in (("d_model", c.hidden_size), ("n_layers", c.num_hidden_layers),
                        ("n_heads", heads), ("seq_len", c.max_position_embeddings),
                        ("vocab_size", c.vocab_size)):
        if value < 1:
            raise ValueError(f"model {name}={value} must be at least 1")
    if mt == "gpt2" and c.hidden_size % heads:
        raise ValueError(f"model d_model={c.hidden_size} is not divisible by n_heads={heads}")
    if heads % kv:
        raise ValueError(f"model n_heads={heads} is not divisible by num_key_value_heads={kv}")
    return HFConfig(model_type=mt, hf_json=json.dumps(d, sort_keys=True), path=path,
                    vocab_size=c.vocab_size, seq_len=c.max_position_embeddings,
                    d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=heads,
                    n_kv_heads=kv, head_dim=head_dim, ffn_dim=ffn,
                    tie_embeddings=bool(c.tie_word_embeddings))
