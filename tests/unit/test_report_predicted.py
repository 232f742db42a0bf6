"""The report's predicted-against-measured section."""

from parallab.bench.result import append_row, make_row
from parallab.report import build_reports


def test_predictions_appear_beside_measurements(tmp_path):
    common = dict(mode="train", status="ok", preset="debug", global_batch=8, samples_per_s=100.0)
    append_row(tmp_path / "results.jsonl", make_row(
        config_id="single-1", strategy="single", devices=1, step_time_median_s=0.080, peak_mem_bytes=8 * 2**20,
        pred_step_time_s=0.088, pred_step_time_err=0.1, pred_peak_mem_bytes=7 * 2**20,
        pred_peak_mem_err=-0.125, **common))
    append_row(tmp_path / "results.jsonl", make_row(config_id="ddp-2", strategy="ddp", devices=2, **common))
    build_reports(tmp_path)
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Predicted against measured"):]
    assert "| single-1 | 1 | 80.0 | 88.0 | 10% | 8.0 | 7.0 | -12% |" in section.replace("12.5%", "12%")
    assert "ddp-2 |" not in section.split("##")[1]  # no prediction: not listed
    assert 'id="predicted"' in (tmp_path / "report.html").read_text()
