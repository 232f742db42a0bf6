"""Inference end to end on the debug model: the sweep's inference mode (what `parallab sweep
--sweep.modes infer` runs) launches one torchrun per configuration and writes complete rows; a budget below the
whole model's weights makes one device does_not_fit while 2 devices serve it, verified."""

import json

import pytest

from parallab.bench.result import ROW_KEYS
from parallab.cli import cmd_sweep
from parallab.config import InferSection, ModelSection, RuntimeSection, SweepArgs, SweepSection
from parallab.infer.settings import weight_bytes_per_device
from parallab.models.registry import get_family

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer-cli")
    family = get_family("gpt")
    whole = weight_bytes_per_device(family, family.config("debug", {}), "single", 1, "float32")
    args = SweepArgs(
        model=ModelSection(preset="debug"),
        infer=InferSection(batch_sizes=(1, 4), prompt_len=8, new_tokens=8, requests=2,
                           device_memory=str(int(whole * 0.75)), max_batch_search=64, seed=7),
        runtime=RuntimeSection(out_dir=str(tmp), run_id="e2e", collective_timeout_s=120),
        sweep=SweepSection(modes=("infer",), infer_strategies=("replicas", "pipeline", "tp"),
                           device_counts=(1, 2), config_timeout_s=300))
    assert cmd_sweep(args) == 0
    folder = tmp / "e2e"
    assert (folder / "report.md").exists()
    lines = (folder / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_every_row_has_every_key(rows):
    assert len(rows) == 4 * 3  # 4 configurations x (forward at 2 batch sizes + generate)
    for r in rows:
        assert set(ROW_KEYS) <= set(r), sorted(set(ROW_KEYS) - set(r))
        assert r["mode"] == "infer" and r["run_id"] == "e2e" and r["wall_s"] > 0


def test_one_device_does_not_fit_two_devices_serve(rows):
    by = {}
    for r in rows:
        by.setdefault(r["config_id"], []).append(r)
    assert set(by) == {"infer-single-1", "infer-replicas-2", "infer-pipeline-m8-2", "infer-tp-2"}
    for cid in ("infer-single-1", "infer-replicas-2"):  # the whole model on every device
        for r in by[cid]:
            assert r["status"] == "does_not_fit" and "weights need" in r["reason"], r["reason"]
            assert r["max_batch_fit"] == 0
    for cid in ("infer-pipeline-m8-2", "infer-tp-2"):
        # Served: each row measured where its batch fits the budget, does_not_fit where not,
        # consistently with the searched largest batch.
        assert {r["status"] for r in by[cid] if r["batch_size"] == 1} == {"ok"}
        assert {r["status"] for r in by[cid] if r["workload"] == "generate"} == {"ok"}
        for r in by[cid]:
            fits = r["peak_mem_bytes"] <= r["device_memory_budget_bytes"]
            assert r["fits_budget"] is fits and (r["batch_size"] <= r["max_batch_fit"]) is fits
            if fits:
                assert r["status"] == "ok" and r["samples_per_s"] > 0, r["reason"]
            else:
                assert r["status"] == "does_not_fit" and f"batch {r['batch_size']} needs" in r["reason"]
            assert r["max_batch_fit_bound"] == "exact"
            assert r["verify_status"] == "pass"
            assert r["verify_max_logits_rel"] <= 1e-5 and r["verify_token_mismatches"] == 0
    # The reference is saved even where one device cannot serve within the budget.
    assert {r["verify_status"] for r in by["infer-single-1"]} == {"reference"}


def test_workload_metrics(rows):
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["latency_p50_s"] > 0 and r["samples_per_s"] > 0
        if r["workload"] == "generate":
            assert r["batch_size"] == 4 and r["prompt_len"] == 8 and r["new_tokens"] == 8
            assert r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["output_tokens_per_s"] > 0
            assert r["latency_p99_s"] >= r["latency_p50_s"]
        else:
            assert r["batch_size"] in (1, 4) and r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 32)
        if r["strategy"] == "pipeline":
            assert r["microbatches"] == (1 if r["batch_size"] == 1 else 4)
