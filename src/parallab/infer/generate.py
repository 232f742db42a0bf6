"""Greedy autoregressive generation with a KV cache: on a whole (or tensor-parallel) model,
and across pipeline stages with point-to-point sends per decode step.

Shapes: B batch, P prompt length, N new tokens, D model width, V vocabulary.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from parallab.models.gpt import KVCache


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_logits(out: torch.Tensor) -> torch.Tensor:
    """Logits as a plain tensor: a tensor-parallel output layer may return a replicated DTensor."""
    from torch.distributed.tensor import DTensor

    return out.full_tensor() if isinstance(out, DTensor) else out


def make_caches(module: nn.Module, batch: int, *, heads: int, head_dim: int, max_len: int,
                dtype: torch.dtype, device: torch.device) -> list[KVCache]:
    """One cache per layer that ``module`` holds (a pipeline stage holds some of them), each
    [B, heads, max_len, head_dim]; ``heads`` is the local head count under tensor parallelism."""
    return [KVCache(batch, heads, max_len, head_dim, dtype=dtype, device=device)
            for _ in range(len(module.layers))]


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, heads: int,
                    head_dim: int, cache_len: int | None = None,
                    on_first_token: Callable[[], None] | None = None) -> torch.Tensor:
    """prompts [B, P] -> new tokens [B, N]: one prefill pass over the prompt, then one pass per
    token over the newest token only, attending to the cached keys and values.

    Under tensor parallelism every rank runs this with the same inputs; the logits come back
    replicated (all-gathered by the output layer), so every rank picks the same token."""
    B, P = prompts.shape
    dtype = next(model.parameters()).dtype
    caches = make_caches(model, B, heads=heads, head_dim=head_dim, max_len=cache_len or P + new_tokens,
                         dtype=dtype, device=prompts.device)
    logits = local_logits(model(prompts, caches, 0))          # prefill: [B, P, V]
    tok = logits[:, -1].argmax(-1)                            # [B]
    out = [tok]
    if on_first_token is not None:
        on_first_token()
    for i in range(1, new_tokens):
        logits = local_logits(model(tok[:, None], caches, P + i - 1))  # [B, 1, V]
        tok = logits[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, dim=1)


@torch.no_grad()
def greedy_generate_no_cache(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The same tokens recomputed from scratch each step (whole sequence, causal mask, no
    cache): the reference the cached decoding is tested against."""
    seq = prompts
    for _ in range(new_tokens):
        tok = local_logits(model(seq))[:, -1].argmax(-1)
        seq = torch.cat([seq, tok[:, None]], dim=1)
    return seq[:, prompts.shape[1]:]


@torch.no_grad()
def pipeline_generate(stage: nn.Module, prompts: torch.Tensor | None, new_tokens: int, *,
                      batch: int, prompt_len: int, stage_index: int, n_stages: int, group,
                      microbatches: int, heads: int, head_dim: int, d_model: int,
                      cache_len: int | None = None, device: torch.device,
                      on_first_token: Callable[[], None] | None = None) -> torch.Tensor | None:
    """Greedy decoding through pipeline stages; returns [B, N] on the last stage, else None.

    Communication, per decode step t and micro-batch j: stage s receives hidden states
    [b_j, T_t, D] from stage s-1 (T_0 = P for the prefill, then 1), runs its layers with its own
    KV caches, and sends the result on; the last stage picks the next tokens and sends them
    [b_j, 1] back to the first stage, which embeds them at step t+1. Each micro-batch has its
    own caches, so while the last stage decodes micro-batch j the first can already run j+1:
    with at least as many micro-batches as stages every stage stays busy. One micro-batch is
    the naive split (one stage works, the others wait).

    Sends are non-blocking; a send of step t-2 is waited for at the end of step t: by then every
    stage has finished step t-1 (the first stage needed step t-1's tokens to start step t),
    so its receiver has posted the matching receive and the wait cannot deadlock.
    """
    first, last = stage_index == 0, stage_index == n_stages - 1
    to_rank = lambda s: dist.get_global_rank(group, s)  # noqa: E731  (group rank -> global rank)
    next_rank = to_rank(stage_index + 1) if not last else to_rank(0)
    prev_rank = to_rank(stage_index - 1) if not first else to_rank(n_stages - 1)
    sizes = [len(r) for r in torch.arange(batch).tensor_split(microbatches)]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    dtype = next(stage.parameters()).dtype
    max_len = cache_len or prompt_len + new_tokens
    caches = [make_caches(stage, b, heads=heads, head_dim=head_dim, max_len=max_len, dtype=dtype,
                          device=device) for b in sizes]
    tokens: list[list[torch.Tensor]] = [[] for _ in sizes]
    pending: list[list] = []  # [step] -> works of that step's sends (holding their tensors)
    for t in range(new_tokens):
        T = prompt_len if t == 0 else 1
        pos = 0 if t == 0 else prompt_len + t - 1
        pending.append([])
        for j, b in enumerate(sizes):
            if first and t == 0:
                x = prompts[starts[j]:starts[j] + b]
            elif first:
                x = torch.empty(b, 1, dtype=torch.long, device=device)
                dist.recv(x, src=prev_rank, group=group)       # tokens from the last stage
            else:
                x = torch.empty(b, T, d_model, dtype=dtype, device=device)
                dist.recv(x, src=prev_rank, group=group)       # hidden states from stage s-1
            y = stage(x, caches[j], pos)
            if last:
                tok = local_logits(y)[:, -1].argmax(-1)       # [b]
                tokens[j].append(tok)
                if t + 1 < new_tokens and n_stages > 1:
                    msg = tok[:, None].contiguous()
                    pending[t].append((dist.isend(msg, dst=next_rank, group=group), msg))
            else:
                y = y.contiguous()
                pending[t].append((dist.isend(y, dst=next_rank, group=group), y))
        if t == 0 and on_first_token is not None:
            on_first_token()
        if t >= 2:
            for work, _ in pending[t - 2]:
                work.wait()
            pending[t - 2] = []
    for works in pending:
        for work, _ in works:
            work.wait()
    if not last:
        return None
    return torch.cat([torch.stack(tk, dim=1) for tk in tokens], dim=0)


def timed_generate(run: Callable[[Callable[[], None]], torch.Tensor | None], device: torch.device
                   ) -> tuple[torch.Tensor | None, float, float]:
    """(tokens, seconds to this rank's part of the first token, seconds to the end) of one
    request; ``run(on_first_token)`` does the generation."""
    marks: dict[str, float] = {}

    def first() -> None:
        sync(device)
        marks["first"] = time.perf_counter()

    sync(device)
    t0 = time.perf_counter()
    out = run(first)
    sync(device)
    end = time.perf_counter()
    return out, marks.get("first", end) - t0, end - t0
