"""The model, the registry and pipeline partitioning, on one process without a process group."""

import pytest
import torch

from parallab.models.gpt import GPT
from parallab.models.registry import (GPT_PRESETS, build_meta, count_params, get_family,
                                      param_generator)
from parallab.parallel.parallelize import stage_plan
from parallab.parallel.pp import partition

FAMILY = get_family("gpt")


def materialized(preset="debug", seed=0, **over):
    cfg = FAMILY.config(preset, over)
    model = build_meta(FAMILY, cfg)
    model.to_empty(device="cpu")
    model.init_weights(param_generator(seed))
    return cfg, model


def test_debug_preset_is_small_and_billion_presets_are_big():
    assert count_params(build_meta(FAMILY, FAMILY.config("debug", {}))) < 1_000_000
    n7 = count_params(build_meta(FAMILY, FAMILY.config("7b", {})))  # meta: no memory used
    assert 6e9 < n7 < 8e9
    assert all(p.is_meta for p in build_meta(FAMILY, FAMILY.config("13b", {})).parameters())


def test_flat_stable_names():
    names = {n for n, _ in build_meta(FAMILY, FAMILY.config("debug", {})).named_parameters()}
    for expected in ("tok_emb.weight", "pos_emb.weight", "layers.0.attn.wq.weight", "layers.3.mlp.w2.weight",
                     "layers.1.attn_norm.weight", "norm.bias", "output.weight"):
        assert expected in names


def test_init_is_deterministic_per_name_and_seed():
    _, a = materialized(seed=3)
    _, b = materialized(seed=3)
    _, c = materialized(seed=4)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
        if p.dim() == 2:
            assert not torch.equal(p, r), n


def test_stages_compose_to_the_whole_model():
    cfg, model = materialized()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    ref = model(x)
    plan = stage_plan(FAMILY, cfg, 2)
    stages = [FAMILY.make_stage(model, units, first=i == 0, last=i == 1) for i, units in enumerate(plan)]
    h = x
    for s in stages:
        h = s(h)
    torch.testing.assert_close(h, ref, rtol=0, atol=0)
    # Names inside a stage are those of the whole model.
    whole = dict(model.named_parameters())
    for s in stages:
        for n, p in s.named_parameters():
            assert torch.equal(p, whole[n])


def test_partition_minimizes_the_slowest_stage():
    assert [list(r) for r in partition([1, 1, 1, 1], 2)] == [[0, 1], [2, 3]]
    # A heavy last unit (a large output layer) gets fewer layers on its stage.
    ranges = partition([1, 1, 1, 1, 1, 3], 2)
    assert [len(r) for r in ranges] == [4, 2]
    with pytest.raises(ValueError, match="cannot cut 2 layers into 3"):
        partition([1, 1], 3)


def test_balancing_uses_cost_not_only_layer_count():
    # With a 50k vocabulary the output layer costs as much as several blocks of a narrow model.
    cfg = FAMILY.config("medium", {"n_layers": 8, "d_model": 256, "n_heads": 4})
    plan = stage_plan(FAMILY, cfg, 2)
    assert len(plan[0]) > len(plan[1])


def test_flops_per_token_matches_the_6n_rule():
    cfg = FAMILY.config("7b", {})
    n = count_params(build_meta(FAMILY, cfg))
    f = FAMILY.flops_per_token(cfg, training=True)
    assert 6 * n * 0.9 < f < 6 * n * 1.3  # 6N plus attention, minus the embedding lookups


def test_kv_cache_generation_equals_full_recompute():
    from parallab.models.gpt import KVCache

    cfg, model = materialized()
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    caches = [KVCache(2, cfg.n_heads, cfg.seq_len, cfg.head_dim, dtype=torch.float32, device="cpu")
              for _ in range(cfg.n_layers)]
    with torch.no_grad():
        full = model(x)
        first = model(x[:, :5], caches, 0)
        rest = model(x[:, 5:], caches, 5)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_bad_model_settings():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        FAMILY.config("huge", {})
    with pytest.raises(ValueError, match="d_model=65 is not divisible by n_heads=4"):
        FAMILY.config("debug", {"d_model": 65})
    with pytest.raises(ValueError, match="unknown model 'bert'"):
        get_family("bert")
