"""Layouts of the sharded strategies and their refusals before launch (no process group)."""

import dataclasses
import subprocess
import sys

import pytest

from parallab import config as C
from parallab.config import (ConfigError, DataSection, ModelSection, ParallelSection, RuntimeSection,
                             SweepArgs, SweepSection, TrainArgs, TrainSection, config_id,
                             parse_strategy, validate_sweep, validate_train)
from parallab.parallel.dims import dims_for


def args(tmp_path, strategy="single", devices=1, *, model=None, **parallel) -> TrainArgs:
    return TrainArgs(model=ModelSection(preset="debug", **(model or {})),
                     data=DataSection(global_batch=16),
                     parallel=ParallelSection(strategy=strategy, devices=devices, **parallel),
                     train=TrainSection(steps=3, warmup_steps=1),
                     runtime=RuntimeSection(out_dir=str(tmp_path), backend="gloo"))


# ---------------------------------------------------------------- degrees


@pytest.mark.parametrize("strategy, n, kw, degrees", [
    ("fsdp", 4, {}, dict(dp_shard=4)),
    ("tp", 4, {}, dict(tp=4)),
    ("fsdp+tp", 4, {}, dict(dp_shard=2, tp=2)),
    ("fsdp+tp", 8, dict(tp=4), dict(dp_shard=2, tp=4)),
    ("fsdp+tp", 2, {}, dict(tp=2)),
    ("pipeline+ddp", 4, {}, dict(pp=2, dp_replicate=2)),
    ("pipeline+ddp", 8, dict(pp=4), dict(pp=4, dp_replicate=2)),
])
def test_dims_for_each_strategy(strategy, n, kw, degrees):
    dims = dims_for(strategy, n, **kw)
    expected = {**dict(pp=1, dp_replicate=1, dp_shard=1, tp=1), **degrees}
    assert {k: getattr(dims, k) for k in expected} == expected


def test_data_parallel_degree_counts_only_the_dp_dimensions():
    assert C.data_parallel_degree("fsdp+tp", 4) == 2
    assert C.data_parallel_degree("pipeline+ddp", 4) == 2
    assert C.data_parallel_degree("tp", 4) == 1
    assert C.data_parallel_degree("fsdp", 4) == 4


def test_degree_product_not_the_world_size_names_every_number(tmp_path):
    with pytest.raises(ConfigError) as e:
        validate_train(args(tmp_path, "fsdp+tp", 4, tp=3))
    msg = str(e.value)
    assert "tp=3" in msg and "dp_shard=1" in msg and "= 3" in msg and "world size is 4" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=r"tp=2 = 2, but the world size is 4"):
        validate_train(args(tmp_path, "tp", 4, tp=2))
    with pytest.raises(ConfigError, match=r"pp=3 x dp_replicate=1 .* = 3, but the world size is 4"):
        validate_train(args(tmp_path, "pipeline+ddp", 4, pp=3))


# ---------------------------------------------------------------- tensor parallelism


def test_tp_refuses_indivisible_heads(tmp_path):
    # debug: n_heads=4, d_model=64, mlp_ratio=4, vocab 256
    with pytest.raises(ConfigError, match=r"n_heads=4, which is not divisible by 3") as e:
        validate_train(args(tmp_path, "tp", 3))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"vocab_size=250, which is not divisible by 4"):
        validate_train(args(tmp_path, "tp", 4, model=dict(vocab_size=250)))
    with pytest.raises(ConfigError, match=r"seq_len=30, which is not divisible by 4"):
        validate_train(args(tmp_path, "tp", 4, sequence_parallel=True, model=dict(seq_len=30)))
    with pytest.raises(ConfigError, match="untied embeddings"):
        validate_train(args(tmp_path, "fsdp+tp", 4, model=dict(tie_embeddings=True)))


def test_tp_refusal_through_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "parallab", "train", "--parallel.strategy", "tp",
                           "--parallel.devices", "3", "--model.preset", "debug",
                           "--runtime.out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "n_heads=4" in lines[0] and "3" in lines[0]


# ---------------------------------------------------------------- pipeline schedules


def test_schedule_refused_on_gloo(tmp_path, monkeypatch):
    monkeypatch.setitem(C.GLOO_UNSUPPORTED_SCHEDULES, "zbv", "hangs in a probe (for this test)")
    a = args(tmp_path, "pipeline", 2, schedule="zbv", microbatches=4)
    with pytest.raises(ConfigError, match=r"schedule zbv is not supported on gloo: hangs") as e:
        validate_train(a)
    assert "\n" not in str(e.value)


def test_every_schedule_passes_validation_on_gloo(tmp_path):
    # What the probes found to run on gloo (docs/TORCH-NOTES-parallab.md) is accepted.
    for sched in C.SCHEDULES:
        if sched in C.GLOO_UNSUPPORTED_SCHEDULES:
            continue
        validate_train(args(tmp_path, "pipeline", 2, schedule=sched, microbatches=4))


def test_stage_counts_checked(tmp_path):
    # debug has 4 layers: 4 devices x 2 stages per device = 8 stages do not fit.
    with pytest.raises(ConfigError, match=r"4 devices x 2 stages per device = 8 stages .* n_layers=4"):
        validate_train(args(tmp_path, "pipeline", 4, schedule="interleaved1f1b", microbatches=4))
    with pytest.raises(ConfigError, match=r"exactly 2 stages per device, not stages_per_device=3"):
        validate_train(args(tmp_path, "pipeline", 2, schedule="zbv", stages_per_device=3,
                            model=dict(n_layers=8)))
    with pytest.raises(ConfigError, match=r"1f1b runs 1 stage per device, not stages_per_device=2"):
        validate_train(args(tmp_path, "pipeline", 2, schedule="1f1b", stages_per_device=2))
    with pytest.raises(ConfigError, match=r"microbatches=2 < 4"):
        validate_train(args(tmp_path, "pipeline", 4, schedule="1f1b", microbatches=2))
    with pytest.raises(ConfigError, match=r"dualpipev needs microbatches >= stages: microbatches=2 < "
                                          r"2 devices x 2 = 4"):
        validate_train(args(tmp_path, "pipeline", 2, schedule="dualpipev", microbatches=2))


def test_stage_placement_loop_and_v():
    from parallab.parallel.pp import stage_placement

    assert stage_placement(2, 2, style="loop") == [[0, 2], [1, 3]]
    assert stage_placement(4, 2, style="v") == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert stage_placement(2, 1) == [[0], [1]]


# ---------------------------------------------------------------- labels and sweep specs


def test_parse_strategy_specs():
    assert parse_strategy("fsdp") == ("fsdp", None, None)
    assert parse_strategy("fsdp+tp") == ("fsdp+tp", None, None)
    assert parse_strategy("pipeline:interleaved1f1b") == ("pipeline", "interleaved1f1b", None)
    assert parse_strategy("pipeline+ddp:zbv") == ("pipeline+ddp", "zbv", None)
    assert parse_strategy("pipeline+ddp:naive") == ("pipeline+ddp", "gpipe", 1)
    with pytest.raises(ConfigError, match="only pipeline and pipeline\\+ddp take a schedule"):
        parse_strategy("tp:zbv")
    with pytest.raises(ConfigError, match="unknown strategy"):
        parse_strategy("zero3")


def test_config_ids_are_readable_and_unique(tmp_path):
    cases = {
        ("fsdp", 4, ()): "fsdp-4",
        ("fsdp", 4, (("fsdp_reshard_after_forward", False),)): "fsdp-zero2-4",
        ("tp", 2, (("sequence_parallel", True),)): "tp-sp-2",
        ("fsdp+tp", 4, ()): "fsdp+tp-2x2-4",
        ("pipeline+ddp", 4, (("microbatches", 4),)): "pipeline+ddp-1f1b-m4-2x2-4",
        ("pipeline", 2, (("schedule", "zbv"), ("microbatches", 4))): "pipeline-zbv-v2-m4-2",
        ("ddp", 2, (("activation_checkpointing", True),)): "ddp-ac-2",
        ("ddp", 2, (("sequence_parallel", True),)): "ddp-2",  # an option the strategy ignores
    }
    for (strategy, n, kw), expected in cases.items():
        assert config_id(args(tmp_path, strategy, n, **dict(kw))) == expected


def test_sweep_accepts_the_new_strategies(tmp_path):
    base = args(tmp_path)
    sweep = SweepArgs(model=dataclasses.replace(base.model, n_layers=8), data=base.data,
                      parallel=dataclasses.replace(base.parallel, microbatches=4), train=base.train,
                      runtime=base.runtime,
                      sweep=SweepSection(strategies=("fsdp", "tp", "fsdp+tp", "pipeline+ddp",
                                                     "pipeline:interleaved1f1b", "pipeline:zbv"),
                                         device_counts=(1, 2, 4)))
    ids = [config_id(c) for c in validate_sweep(sweep)]
    assert len(ids) == len(set(ids))
    assert {"fsdp+tp-1x2-2", "fsdp+tp-2x2-4", "pipeline+ddp-1f1b-m4-2x1-2",
            "pipeline-interleaved1f1b-v2-m4-4", "pipeline-zbv-v2-m4-2"} <= set(ids)


# ---------------------------------------------------------------- activation checkpointing


def test_activation_checkpointing_keeps_names_and_gradients():
    import torch

    from parallab.models.registry import get_family, param_generator
    from parallab.parallel.ac import apply_ac

    family = get_family("gpt")
    cfg = family.config("debug", {})
    models = []
    for checkpointed in (False, True):
        m = family.build(cfg)
        m.init_weights(param_generator(0))
        if checkpointed:
            apply_ac(apply_ac(m))  # twice: still one level of recomputation
        x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
        family.loss(m(x[:, :-1]), x[:, 1:]).backward()
        models.append(m)
    plain, ckpt = (dict(m.named_parameters()) for m in models)
    assert list(plain) == list(ckpt)  # no '_checkpoint_wrapped_module.' in any name
    for name in plain:
        torch.testing.assert_close(ckpt[name].grad, plain[name].grad, rtol=0, atol=0)
