"""Run under torchrun (2 ranks) by test_models_parity.py: Hugging Face models served by each
inference strategy against the single-device outputs every rank computes in-process (batched
forward logits and greedy KV-cache generation). Rank 0 writes {'family/strategy': result}.
'hf-gpt2-folder' loads a saved Hugging Face GPT-2 (safetensors) by name under TP, where c_attn
is stored as [D, 3, D] (parallel/tp.py colwise_conv1d_qkv)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import torch.distributed as dist

from parallab.infer.engine import InferEngine
from parallab.infer.measure import make_tokens
from parallab.models.registry import get_family
from parallab.runtime.dist import init_distributed, shutdown
from parallab.train.verify import relative_deviation

SEED, NEW_TOKENS = 1234, 8
CASES = {"hf-llama": [("replicas", 1), ("pipeline", 2), ("tp", 1)],
         "hf-gpt2": [("replicas", 1), ("pipeline", 2), ("tp", 1)],
         "hf-gpt2-folder": [("tp", 1)]}


def save_gpt2(folder: Path, is_main: bool) -> None:
    """A Hugging Face GPT-2 (debug shape, its own random init) as config.json + safetensors."""
    if is_main:
        cfg = get_family("hf-gpt2").config("debug", {})
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg.hf_config()).save_pretrained(folder)
    dist.barrier()


def outputs(engine: InferEngine, inputs: dict) -> dict:
    out = {}
    for key, tokens in inputs.items():
        got = engine.generate(tokens, NEW_TOKENS) if key.startswith("gen") else engine.forward(tokens)
        held = engine.holds_output(tokens.shape[0])
        out[key] = (got.cpu(), engine.rows(tokens.shape[0])) if held else None
    return out


def main(path: str) -> int:
    info = init_distributed(backend="gloo", timeout_s=120, threads=1)
    try:
        results = {}
        folder = Path(path).parent / "gpt2-folder"
        save_gpt2(folder, info.is_main)
        for name, strategies in CASES.items():
            if name == "hf-gpt2-folder":
                family = get_family("hf")
                cfg = family.config("debug", {"path": str(folder)})
            else:
                family = get_family(name)
                cfg = family.config("debug", {})
            inputs = {"forward-4": make_tokens(SEED, 4, cfg.seq_len, cfg.vocab_size, salt=1),
                      "gen-4": make_tokens(SEED, 4, 6, cfg.vocab_size, salt=3)}
            single = InferEngine.build(family=family, cfg=cfg, strategy="single", devices=1,
                                       device=info.device, seed=SEED)
            ref = outputs(single, inputs)
            for strategy, mb in strategies:
                engine = InferEngine.build(family=family, cfg=cfg, strategy=strategy,
                                           devices=info.world_size, device=info.device, seed=SEED,
                                           microbatches=mb)
                rel, mismatch, held = 0.0, 0, 0
                for key, value in outputs(engine, inputs).items():
                    if value is None:
                        continue
                    t, rows = value
                    want = ref[key][0][rows.start:rows.stop]
                    held += 1
                    if key.startswith("gen"):
                        mismatch += int((t != want).sum()) if t.shape == want.shape else want.numel()
                    else:
                        rel = max(rel, relative_deviation(t.float(), want.float()))
                gathered = [None] * info.world_size
                dist.all_gather_object(gathered, (rel, mismatch, held))
                results[f"{name}/{strategy}"] = {"logits_rel": max(g[0] for g in gathered),
                                                 "token_mismatch": sum(g[1] for g in gathered),
                                                 "outputs_held": sum(g[2] for g in gathered)}
        if info.is_main:
            with open(path, "w") as f:
                json.dump(results, f)
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    from parallab.runtime.dist import worker_entry

    worker_entry(lambda: main(sys.argv[1]))  # leaves without gloo's teardown, like parallab's workers
