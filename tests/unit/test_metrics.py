"""Metrics without a process group: percentiles, tracked memory, the row schema."""

import json
import warnings

import pytest
import torch

from parallab.bench.result import ROW_KEYS, add_scaling, append_row, make_row, read_rows
from parallab.metrics.memory import TensorMemoryTracker, state_bytes
from parallab.metrics.processor import percentile


def test_percentile():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([7], 99) == 7


def test_tracker_counts_static_then_live_activations():
    w = torch.zeros(1024, 256)  # 1 MiB
    with TensorMemoryTracker({"params": [w]}) as t:
        a = torch.ones(1024, 256)       # +1 MiB
        b = a * 2                        # +1 MiB
        del a, b
        c = torch.ones(512, 256)         # +0.5 MiB after the two were freed
    assert t.static_bytes["params"] == 2**20
    assert t.peak == 3 * 2**20
    assert t.current == 2**20 + 2**19
    del c


def test_tracker_counts_persistent_storages_allocated_outside():
    outside = torch.zeros(256, 256)
    with TensorMemoryTracker() as t:
        torch.ones(10)
        t.account_persistent([outside])
    assert t.peak >= outside.nbytes


def test_state_bytes_counts_shared_storage_once():
    x = torch.zeros(100)
    assert state_bytes([x, x[10:], x.view(10, 10)]) == 400


def test_rows_have_every_key_and_scaling():
    base = make_row(config_id="single-1", mode="train", strategy="single", devices=1, status="ok",
                    samples_per_s=10.0)
    row = make_row(config_id="ddp-2", mode="train", strategy="ddp", devices=2, status="ok", samples_per_s=19.0)
    add_scaling(row, base)
    assert set(row) == set(ROW_KEYS)
    assert row["speedup"] == pytest.approx(1.9) and row["efficiency"] == pytest.approx(0.95)
    with pytest.raises(AssertionError):
        make_row(not_a_key=1)


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, make_row(config_id="a", status="ok"))
    with open(path, "a") as f:
        f.write('{"config_id": "b", "sta')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = read_rows(path)
    assert [r["config_id"] for r in rows] == ["a"]
    assert any("torn" in str(w.message) for w in caught)
    json.loads(path.read_text().splitlines()[0])
