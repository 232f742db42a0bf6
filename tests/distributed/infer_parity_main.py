"""Run under torchrun by test_infer_parity.py: every inference strategy at this world size,
all in one process group (one launch per world size), against single-device outputs that each
rank computes in-process. Rank 0 writes {strategy: result} as JSON to argv[1]."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from parallab.infer.engine import InferEngine
from parallab.infer.measure import make_tokens
from parallab.models.registry import get_family
from parallab.runtime.dist import init_distributed, shutdown
from parallab.train.verify import relative_deviation

SEED = 1234
NEW_TOKENS = 12
# (name, strategy, micro-batches): pipeline with 4 and 2 micro-batches and the naive split.
VARIANTS = [("replicas", "replicas", 1), ("pipeline-m4", "pipeline", 4),
            ("pipeline-m2", "pipeline", 2), ("pipeline-naive", "pipeline", 1), ("tp", "tp", 1)]


def outputs(engine: InferEngine, inputs: dict) -> dict:
    """This rank's outputs for each input, with the rows they cover (None where it holds none)."""
    out = {}
    for key, tokens in inputs.items():
        if key.startswith("gen"):
            got = engine.generate(tokens, NEW_TOKENS)
        else:
            got = engine.forward(tokens)
        rows = engine.rows(tokens.shape[0])
        held = engine.holds_output(tokens.shape[0])
        out[key] = (got.float().cpu() if got.is_floating_point() else got.cpu(), rows) if held else None
    return out


def main(path: str) -> int:
    info = init_distributed(backend="gloo", timeout_s=120, threads=1)
    try:
        n = info.world_size
        family = get_family("gpt")
        cfg = family.config("debug", {})
        vocab = cfg.vocab_size
        inputs = {
            "forward-4": make_tokens(SEED, 4, cfg.seq_len, vocab, salt=1),   # full context
            "forward-3": make_tokens(SEED, 3, 10, vocab, salt=2),            # uneven splits
            "gen-4": make_tokens(SEED, 4, 8, vocab, salt=3),
            "gen-3": make_tokens(SEED, 3, 5, vocab, salt=4),
        }
        # The reference: the whole model on this rank alone (no communication).
        single = InferEngine.build(family=family, cfg=cfg, strategy="single", devices=1,
                                   device=info.device, seed=SEED)
        ref = outputs(single, inputs)
        del single
        results = {}
        for name, strategy, mb in VARIANTS:
            engine = InferEngine.build(family=family, cfg=cfg, strategy=strategy, devices=n,
                                       device=info.device, seed=SEED, microbatches=mb)
            got = outputs(engine, inputs)
            logits_rel, token_mismatch, holders = 0.0, 0, 0
            for key, value in got.items():
                if value is None:
                    continue
                t, rows = value
                want = ref[key][0][rows.start:rows.stop]
                holders += 1
                if key.startswith("gen"):
                    token_mismatch += int((t != want).sum()) if t.shape == want.shape else want.numel()
                else:
                    logits_rel = max(logits_rel, relative_deviation(t, want))
            gathered = [None] * n
            dist.all_gather_object(gathered, {"logits_rel": logits_rel, "token_mismatch": token_mismatch,
                                              "holders": holders,
                                              "cache_heads": engine._heads()[0]})
            results[name] = {
                "logits_rel": max(g["logits_rel"] for g in gathered),
                "token_mismatch": sum(g["token_mismatch"] for g in gathered),
                "outputs_held": sum(g["holders"] for g in gathered),
                "cache_heads": gathered[0]["cache_heads"],
            }
            del engine
        results["n_heads"] = cfg.n_heads
        if info.is_main:
            with open(path, "w") as f:
                json.dump(results, f)
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    from parallab.runtime.dist import worker_entry

    worker_entry(lambda: main(sys.argv[1]))  # leaves without gloo's teardown, like parallab's workers
