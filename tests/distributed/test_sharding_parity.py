"""FSDP, tensor parallelism, their 2-D mixes, multi-stage pipeline schedules and activation
checkpointing against the single-device run, at world sizes 2 and 4 (real torchrun, gloo).

All configurations share one module-scoped run (one single-device reference); each torchrun
costs 5-15 s on two cores.
"""

import pytest

from parity import assert_matches_single, base_args, run_against_single, variant

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

STEPS = 4
MB = dict(microbatches=4)
AC = dict(activation_checkpointing=True)

# config id -> (strategy, devices, parallel settings). 8 layers: 4 devices x 2 stages each.
CONFIGS = {
    "fsdp-zero2-2": ("fsdp", 2, dict(fsdp_reshard_after_forward=False)),
    "fsdp-4": ("fsdp", 4, {}),
    "fsdp-ac-4": ("fsdp", 4, AC),
    "ddp-ac-2": ("ddp", 2, AC),
    "tp-sp-2": ("tp", 2, dict(sequence_parallel=True)),
    "tp-4": ("tp", 4, {}),
    "fsdp+tp-2x2-4": ("fsdp+tp", 4, {}),
    "fsdp+tp-2x2-zero2-sp-ac-4": ("fsdp+tp", 4, dict(fsdp_reshard_after_forward=False,
                                                     sequence_parallel=True, **AC)),
    "pipeline+ddp-1f1b-m4-2x2-4": ("pipeline+ddp", 4, dict(schedule="1f1b", **MB)),
    "pipeline-interleaved1f1b-v2-m4-2": ("pipeline", 2, dict(schedule="interleaved1f1b", **MB)),
    "pipeline-interleaved1f1b-v2-m4-4": ("pipeline", 4, dict(schedule="interleaved1f1b", **MB)),
    "pipeline-loopedbfs-v2-m4-2": ("pipeline", 2, dict(schedule="loopedbfs", **MB)),
    "pipeline-interleavedzb-v2-m4-2": ("pipeline", 2, dict(schedule="interleavedzb", **MB)),
    "pipeline-zbv-v2-m4-ac-2": ("pipeline", 2, dict(schedule="zbv", **MB, **AC)),
    "pipeline-zbv-v2-m4-4": ("pipeline", 4, dict(schedule="zbv", **MB)),
    "pipeline-dualpipev-v2-m4-2": ("pipeline", 2, dict(schedule="dualpipev", **MB)),
}

# (dp, pp, tp, fsdp) degrees each configuration must report.
DEGREES = {
    "fsdp-zero2-2": (2, 1, 1, 2), "fsdp-4": (4, 1, 1, 4),
    "fsdp-ac-4": (4, 1, 1, 4), "ddp-ac-2": (2, 1, 1, 1), "tp-sp-2": (1, 1, 2, 1),
    "tp-4": (1, 1, 4, 1), "fsdp+tp-2x2-4": (2, 1, 2, 2), "fsdp+tp-2x2-zero2-sp-ac-4": (2, 1, 2, 2),
    "pipeline+ddp-1f1b-m4-2x2-4": (2, 2, 1, 1),
    "pipeline-interleaved1f1b-v2-m4-2": (1, 2, 1, 1), "pipeline-interleaved1f1b-v2-m4-4": (1, 4, 1, 1),
    "pipeline-loopedbfs-v2-m4-2": (1, 2, 1, 1), "pipeline-interleavedzb-v2-m4-2": (1, 2, 1, 1),
    "pipeline-zbv-v2-m4-ac-2": (1, 2, 1, 1), "pipeline-zbv-v2-m4-4": (1, 4, 1, 1),
    "pipeline-dualpipev-v2-m4-2": (1, 2, 1, 1),
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding-parity")
    base = base_args(tmp, steps=STEPS, global_batch=16, n_layers=8)
    variants = [variant(base, strategy, n, **settings) for strategy, n, settings in CONFIGS.values()]
    return run_against_single(tmp, base, variants, run_id="sharding")


def test_config_ids_are_the_expected_labels(rows):
    assert set(rows) == {"single-1", *CONFIGS}


@pytest.mark.parametrize("cid", list(CONFIGS))
def test_matches_single_device(rows, cid):
    row = rows[cid]
    # 1e-5 relative (verify's norm-wise bound) holds for every configuration: the reordered
    # sums (all-reduce, reduce-scatter, micro-batches, vocabulary-parallel softmax) move the
    # results by ~1e-6 at most here.
    assert_matches_single(row, tolerance=1e-5)
    assert len(row["losses"]) == STEPS
    assert row["losses"] == pytest.approx(rows["single-1"]["losses"], rel=1e-5)


@pytest.mark.parametrize("cid", list(CONFIGS))
def test_row_reports_the_layout(rows, cid):
    row = rows[cid]
    assert (row["dp_degree"], row["pp_degree"], row["tp_degree"], row["fsdp_degree"]) == DEGREES[cid]
    assert row["activation_checkpointing"] is ("-ac-" in cid)
    assert row["devices"] == CONFIGS[cid][1]


def test_sharded_parameter_and_optimizer_memory_falls_with_devices(rows):
    """Per-device parameter memory (the largest rank's local shards) is about 1/N of one
    device's under FSDP; under TP the norms and position embedding stay replicated."""
    single = rows["single-1"]

    def ratio(cid, key):
        return rows[cid][key] / single[key]

    assert 0.24 <= ratio("fsdp-4", "mem_params_bytes") <= 0.27
    assert 0.48 <= ratio("fsdp-zero2-2", "mem_params_bytes") <= 0.52
    assert 0.20 <= ratio("tp-4", "mem_params_bytes") <= 0.35
    assert 0.20 <= ratio("fsdp+tp-2x2-4", "mem_params_bytes") <= 0.30
    assert single["mem_grads_bytes"] > 0 and single["mem_optim_bytes"] > 0
    for cid in ("fsdp-4", "tp-4", "fsdp+tp-2x2-4"):
        # Gradients and momentum buffers are sharded like the parameters.
        assert ratio(cid, "mem_grads_bytes") <= 0.35, cid
        assert ratio(cid, "mem_optim_bytes") <= 0.35, cid
    # Replication (DDP) keeps a whole copy per device.
    assert ratio("ddp-ac-2", "mem_params_bytes") == pytest.approx(1.0)


def test_activation_checkpointing_lowers_peak_memory(rows):
    # Same layout with and without recomputation: only the stored activations differ.
    assert rows["fsdp-ac-4"]["peak_mem_bytes"] < rows["fsdp-4"]["peak_mem_bytes"]
