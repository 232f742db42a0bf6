"""Equivalence with one device for inference: the same logits (within the dtype's tolerance,
relative, norm-wise as in train/verify.py) and exactly the same greedy tokens.

The single-device run computes logits over fixed prompts and greedily generates from them,
and saves both as the reference; every other configuration runs the same prompts through its
own code path (replica rows, pipeline micro-batches, tensor-parallel shards) and compares the
rows it holds. The largest deviation over ranks is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from parallab.infer.measure import make_tokens
from parallab.train.verify import relative_deviation

# fp32: the bound for logits; one forward pass reorders few sums (an all-reduce of
# partial products, a different batch split), ~1e-7 relative. bf16 keeps ~3 significant digits.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}

# Divisible by 1, 2 and 4 replicas and by up to 4 micro-batches, so the check runs the
# micro-batched pipeline and gives every replica rows.
VERIFY_BATCH = 4


def verify_prompts(engine, *, seed: int, prompt_len: int) -> torch.Tensor:
    return make_tokens(seed, VERIFY_BATCH, prompt_len, engine.cfg.vocab_size, salt=7)


def verify_outputs(engine, prompts: torch.Tensor, new_tokens: int):
    """(logits [b, P, V], tokens [b, N], rows) this rank holds; (None, None, rows) elsewhere."""
    logits = engine.forward(prompts)
    tokens = engine.generate(prompts, new_tokens)
    rows = engine.rows(prompts.shape[0])
    if not engine.holds_output(prompts.shape[0]):
        return None, None, rows
    return logits.float().cpu(), tokens.cpu(), rows


def save_reference(path: Path, prompts, logits, tokens) -> None:
    """Rank 0 of the single-device run writes the reference (whole, then renamed)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"prompts": prompts.cpu(), "logits": logits, "tokens": tokens}, tmp)
    os.replace(tmp, path)


def compare(engine, path: Path, prompts, logits, tokens, rows) -> tuple[float, int]:
    """(largest relative logits deviation, token mismatches) over every rank."""
    ref = torch.load(path, map_location="cpu", weights_only=True)
    if not torch.equal(ref["prompts"], prompts.cpu()):
        raise ValueError(f"the reference {path} was made from other prompts (another seed or "
                         "prompt length): the runs of one sweep must share infer settings")
    dev, wrong = 0.0, 0
    if logits is not None:
        dev = relative_deviation(logits, ref["logits"][rows.start:rows.stop])
        want = ref["tokens"][rows.start:rows.stop]
        wrong = int((tokens != want).sum()) if tokens.shape == want.shape else want.numel()
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([dev], dtype=torch.float64, device=engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        w = torch.tensor([wrong], dtype=torch.int64, device=engine.device)
        # Replicas hold disjoint rows (their mismatches add up); elsewhere every holder has
        # all rows, and the worst holder is the count.
        op = dist.ReduceOp.SUM if engine.strategy == "replicas" else dist.ReduceOp.MAX
        dist.all_reduce(w, op=op)
        dev, wrong = float(t.item()), int(w.item())
    return dev, wrong


def run_verification(engine, *, seed: int, prompt_len: int, new_tokens: int, dtype: str,
                     reference: Path | None, save: bool, is_main: bool) -> dict:
    """The row's verify_* fields: 'reference' (saved), 'pass'/'fail', or no status when
    there is no reference to compare with."""
    prompts = verify_prompts(engine, seed=seed, prompt_len=prompt_len)
    logits, tokens, rows = verify_outputs(engine, prompts, new_tokens)
    out = {"verify_tolerance": TOLERANCE[dtype]}
    if reference is None:
        return out
    if save:
        if is_main:
            save_reference(reference, prompts, logits, tokens)
        out["verify_status"] = "reference"
    elif reference.exists():
        dev, wrong = compare(engine, reference, prompts, logits, tokens, rows)
        ok = dev <= out["verify_tolerance"] and wrong == 0
        out.update(verify_status="pass" if ok else "fail", verify_max_logits_rel=dev,
                   verify_token_mismatches=wrong)
    return out
