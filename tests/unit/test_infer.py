"""Inference on one process: KV-cache decoding against recomputation, the batch-fit search,
rows, settings and their one-line errors."""

import dataclasses

import pytest
import torch

from parallab.bench.result import ROW_KEYS
from parallab.config import (ConfigError, InferArgs, InferSection, InferSweepArgs, ModelSection,
                             ParallelSection, RuntimeSection, SweepSection, from_dict, to_dict)
from parallab.infer.engine import InferEngine
from parallab.infer.generate import greedy_generate_no_cache
from parallab.infer.measure import MemoryProbe, make_tokens, search_max_batch
from parallab.infer.settings import (infer_config_id, parse_bytes, parse_infer_strategy,
                                     validate_infer, validate_infer_sweep, weight_bytes_per_device)
from parallab.models.registry import get_family


@pytest.fixture(scope="module")
def debug():
    family = get_family("gpt")
    cfg = family.config("debug", {})
    torch.set_num_threads(1)
    engine = InferEngine.build(family=family, cfg=cfg, strategy="single", devices=1,
                               device=torch.device("cpu"), seed=3)
    return family, cfg, engine


def args_for(tmp_path, strategy="single", devices=1, **infer) -> InferArgs:
    return InferArgs(model=ModelSection(preset="debug"),
                     parallel=ParallelSection(strategy=strategy, devices=devices, microbatches=4),
                     infer=InferSection(**{"prompt_len": 8, "new_tokens": 8, "requests": 2, **infer}),
                     runtime=RuntimeSection(out_dir=str(tmp_path)))


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("batch,prompt_len,new_tokens", [(1, 1, 5), (3, 7, 12), (4, 16, 16)])
def test_kv_cache_generation_equals_recomputation(debug, batch, prompt_len, new_tokens):
    _, cfg, engine = debug
    prompts = make_tokens(11, batch, prompt_len, cfg.vocab_size, salt=batch)
    cached = engine.generate(prompts, new_tokens)
    recomputed = greedy_generate_no_cache(engine.module, prompts, new_tokens)
    assert cached.shape == (batch, new_tokens)
    assert torch.equal(cached, recomputed)
    # A cache longer than needed changes nothing (the mask hides the unused tail).
    assert torch.equal(engine.generate(prompts, new_tokens, cache_len=cfg.seq_len), cached)
    assert len(set(cached.flatten().tolist())) > 1  # not a degenerate constant output


def test_cached_decode_logits_equal_full_forward(debug):
    from parallab.infer.generate import make_caches

    _, cfg, engine = debug
    seq = make_tokens(5, 2, 12, cfg.vocab_size)
    full = engine.forward(seq)  # [2, 12, V]
    caches = make_caches(engine.module, 2, heads=cfg.n_heads, head_dim=cfg.head_dim, max_len=12,
                         dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        steps = [engine.module(seq[:, :8], caches, 0)] + \
                [engine.module(seq[:, i:i + 1], caches, i) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- batch-fit search


@pytest.mark.parametrize("edge", [1, 2, 3, 37, 64, 100, 1023])
def test_search_finds_the_edge_in_log_probes(edge):
    probes = []

    def fits(b):
        probes.append(b)
        return b <= edge

    assert search_max_batch(fits, 1024) == (edge, "exact")
    assert len(probes) <= 2 * 11 + 1


def test_search_limits():
    assert search_max_batch(lambda b: False, 64) == (0, "exact")
    assert search_max_batch(lambda b: True, 48) == (48, "search_limit")
    assert search_max_batch(lambda b: b <= 40, 48) == (40, "exact")


@pytest.mark.parametrize("workload", ["forward", "generate"])
def test_batch_search_on_the_debug_model(debug, workload):
    _, cfg, engine = debug
    probe = MemoryProbe(engine, workload, seed=0, length=cfg.seq_len, prompt_len=8, new_tokens=8)
    weights = sum(p.numel() * 4 for p in engine.parameters())
    assert probe.peak(1) > weights  # activations on top of the weights
    budget = int(probe.peak(1) + 9.5 * (probe.peak(2) - probe.peak(1)))  # room for ~10 samples
    best, bound = search_max_batch(lambda b: probe.fits(b, budget), 1024)
    assert bound == "exact" and 5 <= best <= 20, best
    assert probe.peak(best) <= budget < probe.peak(best + 1)
    # memory grows with the batch
    assert probe.peak(best + 1) > probe.peak(best) > probe.peak(1)


def test_rows_have_every_key_and_respect_the_budget(debug, tmp_path):
    from parallab.infer.rows import base_fields
    from parallab.infer.worker import serve
    from parallab.runtime.dist import DistInfo
    from parallab.worker import WorkerSpec

    _, cfg, engine = debug
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    spec = WorkerSpec(args={}, run_id="r", config_id="infer-single-1", result_path="", cache_dir="")
    probe = MemoryProbe(engine, "forward", seed=0, length=cfg.seq_len)
    budget = int(probe.peak(4) + 0.5 * (probe.peak(8) - probe.peak(4)))  # fits 4..7, not 8
    args = args_for(tmp_path, batch_sizes=(1, 8), device_memory=str(budget))
    base = base_fields(spec=spec, args=args, engine=engine, info=info, machine={"cpu_cores": 2},
                       verify={"verify_tolerance": 1e-5})
    rows = serve(engine, args, base)
    assert [(r["workload"], r["batch_size"], r["status"]) for r in rows] == [
        ("forward", 1, "ok"), ("forward", 8, "does_not_fit"), ("generate", 4, "ok")]
    for r in rows:
        assert set(r) == set(ROW_KEYS) and r["mode"] == "infer"
    ok, big, gen = rows
    assert 4 <= ok["max_batch_fit"] < 8 and ok["fits_budget"] is True
    assert ok["latency_p50_s"] > 0 and ok["samples_per_s"] > 0 and ok["tokens_per_s"] == ok["samples_per_s"] * 32
    assert "batch 8 needs" in big["reason"] and big["samples_per_s"] is None
    assert gen["ttft_s"] > 0 and gen["tpot_s"] > 0 and gen["output_tokens_per_s"] > 0
    assert gen["latency_p50_s"] <= gen["latency_p90_s"] <= gen["latency_p99_s"]
    # Weights above the budget: nothing is served.
    tiny = dataclasses.replace(args, infer=dataclasses.replace(args.infer, device_memory="1KiB"))
    rows = serve(engine, tiny, base)
    assert {r["status"] for r in rows} == {"does_not_fit"} and "weights need" in rows[0]["reason"]


# ---------------------------------------------------------------- settings


def test_parse_bytes():
    assert parse_bytes("64MiB") == 64 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes("1000") == 1000 and parse_bytes(None) is None
    for bad in ("64 apples", "MiB", "-5MiB", "0"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_config_ids_and_strategy_specs(tmp_path):
    assert infer_config_id(args_for(tmp_path)) == "infer-single-1"
    assert infer_config_id(args_for(tmp_path, "replicas", 2)) == "infer-replicas-2"
    assert infer_config_id(args_for(tmp_path, "tp", 4)) == "infer-tp-4"
    assert infer_config_id(args_for(tmp_path, "pipeline", 2)) == "infer-pipeline-m4-2"
    a = args_for(tmp_path, "pipeline", 2)
    a.parallel.microbatches = 1
    assert infer_config_id(a) == "infer-pipeline-naive-2"
    assert parse_infer_strategy("pipeline:m8") == ("pipeline", 8)
    assert parse_infer_strategy("pipeline:naive") == ("pipeline", 1)
    for bad in ("ddp", "tp:m2", "pipeline:x"):
        with pytest.raises(ConfigError):
            parse_infer_strategy(bad)


def test_settings_round_trip_through_the_worker_spec(tmp_path):
    a = args_for(tmp_path, "pipeline", 2, batch_sizes=(2, 8), device_memory="3MiB")
    assert from_dict(InferArgs, to_dict(a)) == a
    # A partial section keeps the inference defaults (micro-batches 4, inference strategies).
    s = from_dict(InferSweepArgs, {"parallel": {"devices": 2}, "sweep": {"device_counts": [1, 2]}})
    assert s.parallel.microbatches == 4 and s.parallel.devices == 2
    assert "replicas" in s.sweep.strategies and s.sweep.device_counts == (1, 2)


@pytest.mark.parametrize("change,message", [
    (dict(prompt_len=40), "longer than the model's context seq_len=32"),
    (dict(new_tokens=0), "new_tokens=0 must be at least 1"),
    (dict(prompt_len=20, new_tokens=13), "20 + new_tokens=13 = 33 exceeds the model's context seq_len=32"),
    (dict(device_memory="100KiB"), "smaller than the weights alone"),
    (dict(device_memory="lots"), "device_memory='lots' is not a size"),
    (dict(batch_sizes=(4, 0)), "batch size 0"),
    (dict(workloads=("score",)), "infer.workloads=['score']"),
    (dict(forward_len=33), "forward_len=33"),
    (dict(requests=0), "requests=0"),
    (dict(dtype="float16"), "dtype 'float16'"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, change, message):
    with pytest.raises(ConfigError) as e:
        validate_infer(args_for(tmp_path, **change))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("strategy,devices,message", [
    ("single", 2, "strategy single runs on 1 device"),
    ("replicas", 1, "needs at least 2 devices"),
    ("pipeline", 8, "needs at least 8 layers"),
    ("tp", 3, "n_heads=4 is not divisible by 3"),
    ("ddp", 2, "unknown inference strategy 'ddp'"),
])
def test_bad_layouts(tmp_path, strategy, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate_infer(args_for(tmp_path, strategy, devices))


def test_budget_checks_of_a_sweep(tmp_path):
    family = get_family("gpt")
    cfg = family.config("debug", {})
    whole = weight_bytes_per_device(family, cfg, "single", 1, "float32")
    assert whole == sum(p.numel() for p in family.build(cfg).parameters()) * 4
    tp4 = weight_bytes_per_device(family, cfg, "tp", 4, "float32")
    pp4 = weight_bytes_per_device(family, cfg, "pipeline", 4, "float32")
    assert tp4 < whole / 2 and pp4 < whole / 2
    base = args_for(tmp_path)
    sweep = InferSweepArgs(model=base.model, parallel=base.parallel, runtime=base.runtime,
                           infer=dataclasses.replace(base.infer, device_memory=str(int(whole * 0.75))),
                           sweep=SweepSection(strategies=("replicas", "pipeline", "pipeline:naive", "tp"),
                                              device_counts=(1, 2, 4)))
    # Too small for one device, enough for two: the sweep runs; single-1 will say does_not_fit.
    ids = [infer_config_id(c) for c in validate_infer_sweep(sweep)]
    assert ids[0] == "infer-single-1" and "infer-pipeline-naive-4" in ids and "infer-tp-2" in ids
    with pytest.raises(ConfigError, match="no batch can fit"):
        validate_infer(ids and dataclasses.replace(base, infer=sweep.infer))
    # Smaller than the weights on a device of every configuration: refused up front.
    sweep.infer = dataclasses.replace(sweep.infer, device_memory=str(min(tp4, pp4) - 1))
    with pytest.raises(ConfigError, match="every configuration"):
        validate_infer_sweep(sweep)
