"""Model families beyond the built-in GPT, in one process: clear refusals before launch,
counted FLOPs, and the Hugging Face wrapper against Hugging Face's own forward."""

import dataclasses
import fnmatch
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from parallab.config import (ConfigError, DataSection, InferArgs, ModelSection, ParallelSection,
                             TrainArgs, validate_train)
from parallab.models.flops import count_flops
from parallab.models.registry import build_meta, count_params, get_family, param_generator, presets

HF_REASON = "transformers is not installed (optional dependency: pip install 'parallab[hf]')"
USER_FILE = Path(__file__).parent.parent / "distributed" / "user_model.py"


def train_args(tmp_path, strategy="ddp", devices=2, **model) -> TrainArgs:
    model.setdefault("preset", "debug")
    args = TrainArgs(model=ModelSection(**model), data=DataSection(global_batch=8),
                     parallel=ParallelSection(strategy=strategy, devices=devices, microbatches=2))
    args.runtime.out_dir = str(tmp_path)
    return args


def refused(args) -> str:
    with pytest.raises(ConfigError) as e:
        validate_train(args)
    message = str(e.value)
    assert "\n" not in message
    return message


def materialized(family, cfg, seed=0):
    model = build_meta(family, cfg)
    model.to_empty(device="cpu")
    init = getattr(family, "init_weights", None)
    init(model, param_generator(seed)) if init else model.init_weights(param_generator(seed))
    return model


# ---------------------------------------------------------------- refusals


def test_resnet_refuses_tp_inference_and_token_data(tmp_path):
    assert "no tensor-parallel plan" in refused(train_args(tmp_path, "tp", name="resnet"))
    args = train_args(tmp_path, name="resnet")
    args.data.source = "stdlib"
    assert "must be synthetic" in refused(args)
    from parallab.infer.settings import validate_infer

    infer = InferArgs(model=ModelSection(name="resnet", preset="debug"),
                      parallel=ParallelSection(strategy="replicas", devices=2))
    with pytest.raises(ConfigError, match="image classifier"):
        validate_infer(infer, check_output=False)


def test_resnet_runs_the_other_strategies(tmp_path):
    for strategy in ("ddp", "fsdp", "pipeline"):
        cfg = validate_train(train_args(tmp_path, strategy, name="resnet"))
        assert cfg.n_layers == 4 and cfg.seq_len == 1


def test_user_module_refusals(tmp_path):
    plain = f"{USER_FILE}:build_plain"
    msg = refused(train_args(tmp_path, "tp", name="user", entry=plain))
    assert "needs a tensor-parallel plan" in msg and "tp_plan" in msg
    assert "model.entry" in refused(train_args(tmp_path, name="user"))
    assert "does not exist" in refused(train_args(tmp_path, name="user", entry="nowhere/x.py:build"))
    assert "has no function" in refused(train_args(tmp_path, name="user", entry=f"{USER_FILE}:nope"))
    net = tmp_path / "net.py"
    net.write_text("import torch.nn as nn\n"
                   "class Net(nn.Module):\n"
                   "    def __init__(self):\n"
                   "        super().__init__(); self.a = nn.Linear(4, 4); self.b = nn.Linear(4, 2)\n"
                   "    def forward(self, x):\n"
                   "        return self.b(self.a(x).relu())\n"
                   "def build():\n    return Net()\n")
    assert "nn.Sequential" in refused(train_args(tmp_path, "pipeline", name="user", entry=f"{net}:build"))
    assert validate_train(train_args(tmp_path, "fsdp", name="user", entry=f"{net}:build")).n_layers == 1
    # A module given by package path, and a plan given: tp is accepted.
    sys.path.insert(0, str(USER_FILE.parent))
    try:
        assert validate_train(train_args(tmp_path, "tp", name="user", entry="user_model:build")).has_plan
    finally:
        sys.path.remove(str(USER_FILE.parent))


def test_gpt_rejects_the_other_families_settings(tmp_path):
    assert "unknown model setting" in refused(train_args(tmp_path, name="gpt", entry="x.py:build"))
    assert "unknown model" in refused(train_args(tmp_path, name="bert"))


def test_hf_without_transformers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    assert "pip install 'parallab[hf]'" in refused(train_args(tmp_path, name="hf-llama"))


def test_hf_refusals(tmp_path):
    pytest.importorskip("transformers", reason=HF_REASON)
    validate_train(train_args(tmp_path, "tp", name="hf-gpt2"))  # its fused q|k|v split by heads
    assert "n_heads=4" in refused(train_args(tmp_path, "tp", devices=8, name="hf-gpt2"))
    args = train_args(tmp_path, "tp", name="hf-llama")
    args.parallel.sequence_parallel = True
    assert "sequence parallelism" in refused(args)
    assert "num_key_value_heads=2" in refused(train_args(tmp_path, "tp", devices=4, name="hf-llama"))
    assert "untied" in refused(train_args(tmp_path, "pipeline", name="hf-gpt2", tie_embeddings=True))
    assert "model_type" in refused(train_args(tmp_path, name="hf"))
    assert "unknown model preset" in refused(train_args(tmp_path, name="hf-llama", preset="huge"))
    over = train_args(tmp_path, "tp", name="hf-llama", hf_config='{"num_key_value_heads": 4}')
    assert validate_train(over).n_kv_heads == 4
    assert presets("hf-llama") == ["debug", "tiny", "small"]


# ---------------------------------------------------------------- FLOPs


def test_count_flops_of_a_small_mlp():
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False))
    x, y = torch.zeros(1, 8), torch.zeros(1, dtype=torch.long)
    c = count_flops(model, x, y, nn.functional.cross_entropy)
    assert c["forward"] == 2 * (8 * 16 + 16 * 4)
    # Backward: both weight gradients, and the input gradient of the second layer only (the
    # input itself needs none).
    assert c["backward"] == 2 * (8 * 16 + 16 * 4) + 2 * 16 * 4
    assert next(model.parameters()).device.type == "cpu"  # counted on a meta copy


def test_resnet_flops_are_counted_per_block():
    fam = get_family("resnet")
    cfg = fam.config("debug", {})
    units = fam.pipeline_units(cfg)
    forward = fam.flops_per_sample(cfg, training=False)
    assert sum(u.flops_per_token for u in units) == pytest.approx(forward, rel=1e-3)
    # The first 3x3 convolution on 16x16 images: 2 * 3 * 8 * 9 * 16 * 16 FLOPs, in the stem.
    assert forward > 2 * 3 * 8 * 9 * 16 * 16
    assert fam.flops_per_sample(cfg) > 2 * forward


def test_user_flops_counted_on_its_own_sample():
    fam = get_family("user")
    cfg = fam.config("debug", {"entry": f"{USER_FILE}:build"})
    w, i, k = 32, 16, 5
    assert fam.flops_per_sample(cfg, training=False) == 2 * (i * w + w * w + w * w + w * k)


def test_hf_llama_counted_flops_equal_the_matmul_count():
    pytest.importorskip("transformers", reason=HF_REASON)
    fam = get_family("hf-llama")
    c = fam.config("debug", {})
    d, hd, T = c.d_model, c.head_dim, c.seq_len
    per_layer = d * hd * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * d * c.ffn_dim
    forward = 2 * T * (c.n_layers * per_layer + d * c.vocab_size) + c.n_layers * 4 * T * T * c.n_heads * hd
    assert fam.flops_per_sample(c, training=False) == forward
    assert fam.flops_per_token(c, training=True) == fam.flops_per_sample(c) / T


# ---------------------------------------------------------------- Hugging Face wrapper


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama"])
def test_hf_wrapper_matches_hugging_face_forward_and_generates(name):
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    from parallab.infer.generate import greedy_generate, greedy_generate_no_cache

    fam = get_family(name)
    cfg = fam.config("debug", {})
    model = materialized(fam, cfg)
    hf = transformers.AutoModelForCausalLM.from_config(cfg.hf_config(), attn_implementation="sdpa")
    hf.load_state_dict(model.state_dict(), strict=True)  # the same parameter names
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-5)
    prompts = x[:, :5]
    assert torch.equal(greedy_generate(model, prompts, 6, heads=cfg.n_heads, head_dim=cfg.head_dim),
                       greedy_generate_no_cache(model, prompts, 6))
    assert count_params(model) == sum(p.numel() for p in hf.parameters())


def test_hf_stage_keeps_hugging_face_names():
    pytest.importorskip("transformers", reason=HF_REASON)
    fam = get_family("hf-llama")
    cfg = fam.config("debug", {})
    meta = build_meta(fam, cfg)
    units = [u.name for u in fam.pipeline_units(cfg)]
    assert units[0] == "model.layers.0"
    first = fam.make_stage(meta, units[:2], first=True, last=False)
    last = fam.make_stage(meta, units[2:], first=False, last=True)
    names = {n for n, _ in meta.named_parameters()}
    a, b = {n for n, _ in first.named_parameters()}, {n for n, _ in last.named_parameters()}
    assert a | b == names and not a & b
    assert "model.embed_tokens.weight" in a and "lm_head.weight" in b


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-llama"])
def test_hf_tp_plan_names_real_modules(name):
    pytest.importorskip("transformers", reason=HF_REASON)
    from parallab.parallel.tp import STYLES

    fam = get_family(name)
    cfg = fam.config("debug", {})
    modules = [n for n, _ in build_meta(fam, cfg).named_modules()]
    for pattern, style in fam.tp_plan(cfg).items():  # every plan entry names real modules
        assert style in STYLES
        assert any(fnmatch.fnmatchcase(m, pattern) for m in modules), pattern


@pytest.mark.parametrize("name,tied", [("hf-gpt2", True), ("hf-llama", False)])
def test_hf_loads_a_local_folder_by_name(tmp_path, name, tied):
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    cfg = get_family(name).config("debug", {"tie_embeddings": tied})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg.hf_config())
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors (tied: no lm_head copy)
    fam = get_family("hf")
    loaded_cfg = fam.config("ignored", {"path": str(tmp_path)})
    assert loaded_cfg.model_type == name.removeprefix("hf-") and loaded_cfg.tie_embeddings == tied
    model = materialized(fam, loaded_cfg, seed=99)  # the seed is not used: weights come from disk
    want = hf.state_dict()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=0, atol=0)
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    hf.eval()
    torch.testing.assert_close(model(x), hf(x).logits, rtol=0, atol=1e-5)


def test_user_and_resnet_init_is_deterministic_by_name():
    for name, over in (("user", {"entry": f"{USER_FILE}:build"}), ("resnet", {})):
        fam = get_family(name)
        cfg = fam.config("debug", over)
        a, b = materialized(fam, cfg), materialized(fam, cfg)
        for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)


def test_resnet_batches_shard_like_one_device():
    fam = get_family("resnet")
    cfg = fam.config("debug", {})
    data = fam.make_data(cfg, 8, 3)
    x, y = data.batch(2)
    parts = [data.batch(2, rank=r, world=4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert x.shape == (8, 3, 16, 16) and y.dtype == torch.long


def test_model_section_overrides_include_the_new_settings():
    m = ModelSection(name="user", entry="a.py:build")
    assert m.overrides() == {"entry": "a.py:build"}
    assert {f.name for f in dataclasses.fields(ModelSection)} >= {"entry", "path", "hf_config"}


def test_resnet_learns_the_synthetic_task():
    """Each class is a fixed pattern plus noise: a few dozen SGD steps separate them."""
    fam = get_family("resnet")
    cfg = fam.config("debug", {})
    model = materialized(fam, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = fam.make_data(cfg, 16, 0)
    losses = []
    for step in range(30):
        x, y = data.batch(step)
        loss = fam.loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_hf_activation_checkpointing_gives_the_same_gradients():
    pytest.importorskip("transformers", reason=HF_REASON)
    from parallab.parallel.ac import apply_ac

    fam = get_family("hf-llama")
    cfg = fam.config("debug", {})
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    grads = []
    for ac in (False, True):
        model = materialized(fam, cfg)
        if ac:
            apply_ac(model)
        fam.loss(model(x), x).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)


def test_report_names_each_model_with_parameters_and_flops():
    from parallab.bench.result import make_row
    from parallab.report.markdown import notes

    rows = [make_row(model="resnet", preset="debug", n_params=78002, flops_per_sample=6.1e6,
                     config_id="single-1", status="ok")]
    line = next(n for n in notes(rows) if n.startswith("Model resnet debug"))
    assert "78,002 parameters" in line and "GFLOP per training sample" in line
