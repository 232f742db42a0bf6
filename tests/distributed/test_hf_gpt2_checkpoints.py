"""Checkpoints of Hugging Face GPT-2 under tensor parallelism (gloo, real torchrun, debug shape,
world size 2). Under tp the fused q|k|v ``c_attn`` is stored [D, 3, D] split by heads
(parallel/tp.py); checkpoints keep Hugging Face's [D, 3D] under every strategy
(train/checkpoint.InCheckpointShape). Mirrors test_reliability.py: a tp run resumes exactly,
a tp checkpoint reshards into fsdp, back into tp and onto one device bit for bit, a ddp run
continues a tp checkpoint, and export gives the Hugging Face layout.

Each torchrun costs 5-20 s here; every subprocess has a timeout."""

import json

import pytest
import torch

from parallab.config import DataSection, ModelSection, ParallelSection, RuntimeSection, TrainArgs, TrainSection
from test_reliability import (_torchrun_reshard, assert_identical, out_dir, parallab, rows, saved,
                              weights)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

HF_REASON = "transformers is not installed (optional dependency: pip install 'parallab[hf]')"
# Four AdamW steps of hf-gpt2 under tp on 2, a checkpoint every two.
COMMON = ["train", "--model.name", "hf-gpt2", "--model.preset", "debug", "--data.global-batch", "8",
          "--train.steps", "4", "--train.warmup-steps", "1", "--train.checkpoint-every", "2"]
TP = ["--parallel.strategy", "tp", "--parallel.devices", "2"]
QKV = "transformer.h.0.attn.c_attn"


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    pytest.importorskip("transformers", reason=HF_REASON)
    tmp = tmp_path_factory.mktemp("hf-gpt2-ckpt")
    proc = parallab(*COMMON, *TP, *out_dir(tmp), "--runtime.run-id", "full")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = rows(tmp / "full")
    return tmp, row, tmp / "full/checkpoints/tp-2"


def test_tp_checkpoints_hold_the_hugging_face_layout(tp_run):
    tmp, _, ckpt = tp_run
    sd = saved(ckpt / "step-2", "")
    assert sd[f"model.{QKV}.weight"].shape == (64, 192) and sd[f"model.{QKV}.bias"].shape == (192,)
    assert sd[f"optim.state.{QKV}.weight.exp_avg"].shape == (64, 192)
    # Export: {Hugging Face name: tensor}, loadable into transformers' own GPT-2 as it is.
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    w = weights(ckpt, tmp)
    assert w[f"{QKV}.weight"].shape == (64, 192) and w[f"{QKV}.bias"].shape == (192,)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=32, vocab_size=256,
                                  tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg)
    missing, unexpected = model.load_state_dict(w, strict=False)
    assert not unexpected and not [k for k in missing if k in dict(model.named_parameters())]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), w[name]), name


def test_a_tp_run_resumes_exactly_from_its_own_checkpoint(tp_run):
    tmp, full, ckpt = tp_run
    proc = parallab(*COMMON, *TP, *out_dir(tmp), "--runtime.run-id", "resumed",
                    "--train.resume-from", ckpt / "step-2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = rows(tmp / "resumed")
    assert row["status"] == "ok" and row["resumed_from_step"] == 2
    assert row["losses"] == full["losses"]  # the same per-step losses, to the bit
    assert_identical(weights(tmp / "resumed/checkpoints/tp-2", tmp), weights(ckpt, tmp))


def _args(strategy: str, devices: int) -> TrainArgs:
    return TrainArgs(model=ModelSection(name="hf-gpt2", preset="debug"), data=DataSection(global_batch=8),
                     parallel=ParallelSection(strategy=strategy, devices=devices),
                     train=TrainSection(steps=4, warmup_steps=1), runtime=RuntimeSection())


def test_tp_checkpoints_reshard_to_fsdp_back_to_tp_and_to_one_device(tp_run):
    tmp, _, ckpt = tp_run
    a = ckpt / "step-2"
    src, dirs = a, []
    for name, args in [("fsdp", _args("fsdp", 2)), ("tp", _args("tp", 2)), ("single", _args("single", 1))]:
        _torchrun_reshard(tmp, name, args, src, tmp / f"re-{name}")
        src = tmp / f"re-{name}" / "step-2"
        dirs.append(src)
    ref_w, ref_o = saved(a, "model."), saved(a, "optim.state.")
    assert ref_w and any(k.endswith(".exp_avg_sq") for k in ref_o)
    for d in dirs:  # weights and optimizer state identical, to the bit
        assert_identical(saved(d, "model."), ref_w)
        assert_identical(saved(d, "optim.state."), ref_o)
        assert json.loads((d / "parallab.json").read_text())["step"] == 2


def test_a_ddp_run_continues_a_tp_checkpoint(tp_run):
    tmp, full, ckpt = tp_run
    proc = parallab(*COMMON, "--parallel.strategy", "ddp", "--parallel.devices", "2", *out_dir(tmp),
                    "--runtime.run-id", "ddp", "--train.resume-from", ckpt / "step-2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = rows(tmp / "ddp")
    assert row["resumed_from_step"] == 2 and row["losses"][:2] == full["losses"][:2]
    assert row["losses"] == pytest.approx(full["losses"], rel=1e-4)  # tp and ddp differ in rounding
    w_ddp, w_tp = weights(tmp / "ddp/checkpoints/ddp-2", tmp), weights(ckpt, tmp)
    for k in w_tp:
        rel = float((w_ddp[k].double() - w_tp[k].double()).norm() / w_tp[k].double().norm().clamp(min=1e-30))
        assert rel <= 1e-4, (k, rel)
