"""The planner against real runs (gloo, torchrun): the memory model against the tracked peak
of DDP and pipeline runs at world sizes 2 and 4, the per-device budget (refused on 1 device,
fits on 2 with a pipeline), and bench-comm at world size 2. Step times are not asserted
(MEASURING.md: a timed assertion is a flaky test); benchmarks/ reports them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from parity import base_args, variant

from parallab.bench.launch import RunFolder, launch
from parallab.config import validate_train
from parallab.plan.memory import step_memory
from parallab.plan.predict import layout_of_row, optimizer_of_row, predict_for_row
from parallab.plan.shapes import model_shape

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

BUDGET = "5MiB"  # debug model, global batch 8, first step tracked: 1 device ~6.0 MiB, 2-stage 1F1B ~2.6 MiB


def _run(tmp_path, name: str, args) -> dict:
    validate_train(args)
    folder = RunFolder(tmp_path / name).create()
    return launch(args, folder, run_id=name, reference=None, save_reference=False, peak_flops=None,
                  peak_flops_source=None, timeout_s=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan-measured")
    base = base_args(tmp, steps=3, global_batch=8)  # warmup_steps=1: the tracked step is the first
    budget = dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, device_memory=BUDGET))
    configs = {
        "ddp-2": variant(base, "ddp", 2),
        "pipeline-1f1b-m4-2": variant(budget, "pipeline", 2, schedule="1f1b", microbatches=4),
        "ddp-4": variant(base, "ddp", 4),
        "pipeline-gpipe-m2-4": variant(base, "pipeline", 4, schedule="gpipe", microbatches=2),
        "single-1-budget": variant(budget, "single", 1),
    }
    return {name: _run(tmp, name, args) for name, args in configs.items()}


@pytest.mark.parametrize("cid", ["ddp-2", "pipeline-1f1b-m4-2", "ddp-4", "pipeline-gpipe-m2-4"])
def test_memory_model_matches_tracked_runs(runs, cid):
    row = runs[cid]
    assert row["status"] == "ok", row["reason"]
    pred = predict_for_row(row, None, probe=False)
    assert pred["pred_peak_mem_bytes"] is not None
    assert abs(pred["pred_peak_mem_err"]) <= 0.05, (cid, pred, row["peak_mem_bytes"])
    # Every rank, not only the busiest: the replay of each pipeline stage.
    shape = model_shape("gpt", "debug")
    lay = layout_of_row(row)
    m = step_memory(shape, lay, global_batch=row["global_batch"], tracked=True, first_step=True,
                    optimizer=optimizer_of_row(row))  # the parity harness trains with SGD
    assert optimizer_of_row(row) == "sgd"
    per_rank = row["peak_mem_per_rank"]
    if lay.pp > 1:
        for rank, measured in enumerate(per_rank):
            assert m.per_stage[rank] == pytest.approx(measured, rel=0.05), (cid, rank)
    if lay.pp == 1:  # DDP: every rank holds the whole model, exactly as modelled
        assert row["mem_params_bytes"] == m.params


def test_budget_refused_on_one_device(runs):
    row = runs["single-1-budget"]
    assert row["status"] == "does_not_fit", (row["status"], row["reason"])
    assert "DoesNotFit" in row["reason"] and "5MiB" in row["reason"]
    assert row["device_memory_budget_bytes"] == 5 * 2**20
    assert row["fits_budget"] is False


def test_budget_fits_with_pipeline_on_two(runs):
    row = runs["pipeline-1f1b-m4-2"]
    assert row["status"] == "ok", row["reason"]
    assert row["device_memory_budget_bytes"] == 5 * 2**20
    assert row["fits_budget"] is True and row["peak_mem_bytes"] <= 5 * 2**20


def test_comm_bench_two_ranks(tmp_path):
    from parallab.commbench import run_comm_bench
    from parallab.plan.profiles import bus_factor, cpu_profile, load_machine_profile

    cache = tmp_path / ".cache"
    block = (32, 2, 4, 16, 4)  # a model's width to measure TP and FSDP at: tiny, for speed
    out = run_comm_bench(devices=2, sizes=(4096, 65536, 1 << 20), iters=3, warmup=1, out_dir=str(tmp_path),
                         run_id="comm", cache_dir=cache, block=block)
    rows = out["rows"]
    assert len(rows) == 4 * 3
    for r in rows:
        assert r["world_size"] == 2 and r["time_s"] > 0
        assert r["algbw_Bps"] == pytest.approx(r["bytes"] / r["time_s"])
        assert r["busbw_Bps"] == pytest.approx(r["algbw_Bps"] * bus_factor(r["collective"], 2))
    assert set(out["fits"]) == {"all_reduce", "all_gather", "reduce_scatter", "send_recv"}
    assert out["plot"].stat().st_size > 1000
    assert json.loads(out["profile"].read_text())["links"] == out["fits"]
    assert len((tmp_path / "comm" / "comm.jsonl").read_text().splitlines()) == 12
    # The fits are now this machine's measured links.
    assert load_machine_profile(cache)["links"] == out["fits"]
    prof = cpu_profile(cache, probe=False)
    assert prof.intra["all_reduce"].busbw == pytest.approx(out["fits"]["all_reduce"]["busbw"])
    # Two devices computing at once against one alone: measured, kept in the run's profile and,
    # on a machine with the cores for it, in the planner's.
    conc = json.loads(out["profile"].read_text())["concurrency"]
    assert len(conc["together_s"]) == len(conc["alone_s"]) == conc["rounds"] == 12
    assert min(conc["together_s"] + conc["alone_s"]) > 0
    assert 1.0 <= conc["concurrency_x"] < 10
    from parallab.runtime.device import cpu_cores

    expected = conc["concurrency_x"] if cpu_cores() >= 2 else 1.0
    assert prof.concurrency_x == pytest.approx(expected)
    # TP's and FSDP's fixed cost per block over the plain model, measured on the same ranks.
    from parallab.plan.strategy_cost import overhead_per_block

    saved = json.loads(out["profile"].read_text())
    steps = saved["overhead"]["step_s"]
    assert set(steps) == {"plain", "tp", "fsdp"} and min(steps.values()) > 0
    assert steps["tp"] > steps["plain"]  # DTensor dispatch and 18 all-reduces are not free
    per = saved["overhead_per_block_s"]
    assert per == pytest.approx(overhead_per_block(saved["overhead"], out["fits"]))
    if cpu_cores() >= 2:
        assert prof.tp_overhead_x == pytest.approx(per["tp"] / 1e-3)  # no compute probe cached
    # TP and FSDP at the given width: every run timed, the costs derived from them and cached
    # under the width for predictions (plan/predict.measured_block_extra).
    from parallab.plan.strategy_cost import block_extra, block_key

    (measured,) = saved["block"]
    assert measured["block"] == list(block) and measured["layers"] == 2
    assert set(measured["step_s"]) == {"tp", "plain-tp", "tp-layers", "plain-tp-layers", "fsdp", "plain-fsdp"}
    assert min(measured["step_s"].values()) > 0
    extra = block_extra(measured, out["fits"])
    assert saved["block_extra_s"] == {block_key(*block[:4]): {"b4-n2": extra}}
    assert min(extra.values()) >= 0
    if cpu_cores() >= 2:
        assert load_machine_profile(cache)["block_extra_s"] == saved["block_extra_s"]


def test_comm_bench_refuses_a_block_that_does_not_split(tmp_path):
    from parallab.commbench import run_comm_bench
    from parallab.config import ConfigError

    with pytest.raises(ConfigError, match=r"block=\[32, 3, 4, 16, 4\]: n_heads must split 2 ways"):
        run_comm_bench(devices=2, out_dir=str(tmp_path), block=(32, 3, 4, 16, 4))
    assert not list(tmp_path.iterdir())  # refused before anything was launched or written
