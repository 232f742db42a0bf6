"""DDP and pipeline schedules against the single-device run, at world sizes 2 and 4 (gloo)."""

import pytest

from parity import assert_matches_single, base_args, run_against_single, variant

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-parity")
    base = base_args(tmp, steps=5, global_batch=16)
    variants = []
    for n in (2, 4):
        variants += [
            variant(base, "ddp", n),
            variant(base, "pipeline", n, schedule="gpipe", microbatches=4),
            variant(base, "pipeline", n, schedule="1f1b", microbatches=4),
            variant(base, "pipeline", n, schedule="gpipe", microbatches=1),
        ]
    return run_against_single(tmp, base, variants)


@pytest.mark.parametrize("cid", ["ddp-2", "ddp-4", "pipeline-gpipe-m4-2", "pipeline-gpipe-m4-4",
                                 "pipeline-1f1b-m4-2", "pipeline-1f1b-m4-4",
                                 "pipeline-naive-2", "pipeline-naive-4"])
def test_matches_single_device(rows, cid):
    row = rows[cid]
    assert_matches_single(row)
    assert row["losses"] and len(row["losses"]) == 5
    assert row["losses"] == pytest.approx(rows["single-1"]["losses"], rel=1e-5)


def test_reference_row(rows):
    ref = rows["single-1"]
    assert ref["verify_status"] == "reference"
    assert ref["devices"] == 1 and ref["status"] == "ok"


def test_scaling_fields_filled(rows):
    for cid, row in rows.items():
        assert row["speedup"] is not None and row["efficiency"] is not None, cid
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["devices"])
        assert row["peak_mem_bytes"] and row["peak_mem_bytes"] > 0
    # 4 CPU devices on a machine with fewer cores are marked.
    import os
    if len(os.sched_getaffinity(0)) < 4:
        assert rows["ddp-4"]["oversubscribed"] is True
