"""A GPT-style decoder, written for one device.

Nothing here knows about parallelism. Strategies are applied from outside by
``parallab.parallel.parallelize``, which relies on three properties of this file:

* flat, stable module names (``tok_emb``, ``layers.<i>.attn.wq`` ...) that tensor-parallel plans
  and tests name directly;
* ``layers`` is a ``ModuleDict`` keyed by the layer's index, so deleting layers for a pipeline
  stage keeps every remaining parameter's name unchanged;
* ``tok_emb``, ``pos_emb``, ``norm`` and ``output`` may be set to ``None`` (a stage that does not
  own them), and ``forward`` then passes hidden states through.

Shapes: B batch, T sequence, D model width, H heads, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 384
    n_layers: int = 8
    n_heads: int = 6
    mlp_ratio: int = 4
    tie_embeddings: bool = False
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name}={getattr(self, name)} must be at least 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"model d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        # Separate q/k/v projections (not one fused qkv) so a tensor-parallel plan can shard
        # each one column-wise by heads without re-ordering the fused weight.
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 for the head count: under tensor parallelism each device holds a slice of heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v, mask = kv_cache.update(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, -1)  # [B, T, D(/tp)]
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.w2 = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb: nn.Embedding | None = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_emb.weight

    def forward(self, x: torch.Tensor, caches: "list[KVCache] | None" = None,
                start_pos: int = 0) -> torch.Tensor:
        """tokens [B, T] (int64) -> logits [B, T, V]; a stage without ``tok_emb`` takes and
        returns hidden states [B, T, D]."""
        if self.tok_emb is not None:
            T = x.shape[1]
            pos = torch.arange(start_pos, start_pos + T, device=x.device)
            x = self.tok_emb(x) + self.pos_emb(pos)
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, None if caches is None else caches[i])
        if self.norm is not None:
            x = self.norm(x)
        if self.output is not None:
            x = self.output(x)
        return x

    @torch.no_grad()
    def init_weights(self, generator_for) -> None:
        """Deterministic initialization, parameter by parameter.

        ``generator_for(name)`` returns a ``torch.Generator`` seeded from the run's seed and the
        parameter's stable name, so every strategy, device count and stage split draws exactly
        the same values for the same parameter (the basis of the equivalence checks).
        """
        std = 0.02
        # GPT-2's scaled init for the projections that write into the residual stream.
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            module_path, kind = name.rsplit(".", 1)
            if kind == "bias":
                values = torch.zeros(p.shape)
            elif module_path.rsplit(".", 1)[-1].endswith("norm"):
                values = torch.ones(p.shape)
            else:
                s = resid_std if module_path.endswith(("attn.wo", "mlp.w2")) else std
                values = torch.randn(p.shape, generator=generator_for(name)) * s
            load_full_into(p, values)


def load_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size CPU tensor into a parameter, which may be a sharded DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank generated the same full tensor, so each keeps its own
        # slice without any communication.
        local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full.to(device=param.device, dtype=param.dtype))


class KVCache(nn.Module):
    """Keys and values of one attention layer for generation: [B, H(/tp), max_T, hd]."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)
        self.pos = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        end = self.pos + T
        self.k[:, : k.shape[1], self.pos:end] = k
        self.v[:, : v.shape[1], self.pos:end] = v
        # Causal mask for the new queries against every cached key so far.
        q_pos = torch.arange(self.pos, end, device=k.device)[:, None]
        k_pos = torch.arange(end, device=k.device)[None, :]
        mask = k_pos <= q_pos  # [T, end]
        self.pos = end
        return self.k[:, : k.shape[1], :end], self.v[:, : v.shape[1], :end], mask
