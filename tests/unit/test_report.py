"""The report layer: rows -> tables, plots, report.md, report.html (no torch, no processes)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

try:
    import parallab.bench.result  # noqa: F401
except ImportError:  # not installed yet (`make venv` installs it editable): use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from parallab.bench.result import append_row, make_row  # noqa: E402
from parallab.report import build_reports, compare_runs, print_summary  # noqa: E402
from parallab.report.markdown import md_escape  # noqa: E402
from parallab.report.tables import headline, summary_table, verification_label  # noqa: E402

HOSTILE = "<script>alert(1)</script>|x\ny"
MIB = 1024 ** 2
MACHINE = dict(hostname="box-1", cpu_model="Test CPU 9000", cpu_cores=2, device_type="cpu",
               device_name="cpu", backend="gloo", torch_version="2.13.0+cpu",
               python_version="3.11.9", parallab_version="0.1.0", git_rev="abc1234")
COMMON = dict(run_id="run-test", mode="train", model="gpt", preset="debug", dtype="float32",
              global_batch=16, seq_len=64, scaling="strong", threads_per_device=1,
              warmup_steps=2, timed_steps=5, steps=7, n_params=1_000_000, **MACHINE)


def _ok(config_id, strategy, devices, sps, *, schedule=None, microbatches=None,
        oversubscribed=False, verify="pass", rel=3e-7, **extra):
    values = dict(COMMON, config_id=config_id, strategy=strategy, devices=devices,
                  schedule=schedule, microbatches=microbatches, status="ok",
                  oversubscribed=oversubscribed, per_device_batch=16 // devices,
                  samples_per_s=sps, tokens_per_s=sps * 64, step_time_median_s=16 / sps,
                  step_time_p90_s=16 / sps * 1.1, mfu=0.05 * sps / 100,
                  peak_mem_bytes=int((40 + 30 / devices) * MIB),
                  mem_params_bytes=int(4 * MIB), mem_grads_bytes=int(4 * MIB),
                  mem_optim_bytes=int(8 * MIB), mem_activations_bytes=int(20 / devices * MIB),
                  mem_source="tracked", verify_status=verify, verify_tolerance=1e-5,
                  verify_max_loss_rel=None if verify == "reference" else rel,
                  verify_max_weight_rel=None if verify == "reference" else rel / 2)
    values.update(extra)
    return make_row(**values)


def sweep_rows(config_id_of_ddp2="ddp-2", scale=1.0):
    return [
        _ok("single-1", "single", 1, 100.0 * scale, verify="reference"),
        _ok(config_id_of_ddp2, "ddp", 2, 193.0 * scale),
        _ok("ddp-4", "ddp", 4, 150.0 * scale, oversubscribed=True),
        _ok("pipeline-1f1b-m8-2", "pipeline", 2, 162.0 * scale, schedule="1f1b", microbatches=8),
        _ok("pipeline-naive-2", "pipeline", 2, 98.0 * scale, schedule="gpipe", microbatches=1),
        make_row(**COMMON, config_id="fsdp-2", strategy="fsdp", devices=2, status="oom",
                 reason="CUDA out of memory | tried to allocate 2 GiB\nsecond line",
                 per_device_batch=8),
    ]


def write_run(run_dir: Path, rows) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        append_row(run_dir / "results.jsonl", row)
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run-test", sweep_rows())


def test_headline_best_per_strategy_and_oversubscribed_excluded():
    lines = headline(sweep_rows())
    two = next(s for s in lines if s.startswith("2 devices:"))
    assert two.startswith("2 devices: 1.93x with ddp, 1.62x with pipeline 1f1b, 0.98x with naive split")
    assert "fsdp-2 (oom)" in two
    four = next(s for s in lines if s.startswith("4 devices:"))
    assert "1.50x" not in four and "no speedup claimed" in four and "oversubscribed" in four


def test_headline_does_not_claim_a_wrong_answer():
    rows = sweep_rows()
    rows[1]["verify_status"] = "fail"  # ddp-2 fast but wrong
    two = next(s for s in headline(rows) if s.startswith("2 devices:"))
    assert two.startswith("2 devices: 1.62x with pipeline 1f1b, 0.98x with naive split")
    assert "not claimed, verification failed: ddp-2" in two


def test_summary_and_verification_labels():
    table = summary_table(sweep_rows())
    col = {c: i for i, c in enumerate(table.columns)}
    by_id = {cells[0].split()[0]: cells for cells in table.cells}
    assert by_id["ddp-2"][col["speedup"]] == "1.93x"
    assert by_id["ddp-2"][col["efficiency"]] == "96%"
    assert by_id["ddp-2"][col["verification"]] == "pass (max rel 3e-7)"
    assert by_id["single-1"][col["verification"]] == "reference"
    assert by_id["pipeline-naive-2"][col["schedule, micro-batches m"]] == "naive split"
    assert by_id["ddp-4"][0] == "ddp-4 †"
    assert by_id["fsdp-2"][col["samples/s"]] == "—"  # failed row: no metrics, no crash
    fail = _ok("x", "ddp", 2, 1.0, verify="fail", rel=0.021)
    assert verification_label(fail) == "FAIL (max rel 0.021 > tol 1e-5)"


def test_build_reports_writes_everything(run_dir):
    paths = build_reports(run_dir)
    assert paths["markdown"] == run_dir / "report.md"
    assert paths["html"] == run_dir / "report.html"
    plots = sorted(p.name for k, p in paths.items() if k.startswith("plot:"))
    assert plots == ["train_memory.png", "train_scaling.png", "train_throughput.png"]
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
        assert p.parent in (run_dir, run_dir / "plots")
    assert (run_dir / "plots" / "train_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_content(run_dir):
    md = build_reports(run_dir)["markdown"].read_text()
    assert "- 2 devices: 1.93x with ddp, 1.62x with pipeline 1f1b, 0.98x with naive split" in md
    assert "Strong scaling" in md
    assert "pass (max rel 3e-7)" in md and "| reference |" in md
    assert "CUDA out of memory \\| tried to allocate 2 GiB second line" in md  # failure reason
    assert "| ddp-4 † |" in md and "† oversubscribed" in md  # marked, and the footnote
    assert "![train: throughput vs devices](plots/train_throughput.png)" in md
    assert "| torch_version | 2.13.0+cpu |" in md and "| git_rev | abc1234 |" in md
    for row_line in (line for line in md.splitlines() if line.startswith("| ")):
        assert row_line.endswith(" |")  # no cell broke its table row


def test_html_self_contained(run_dir):
    page = build_reports(run_dir)["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page and "https://" not in page
    targets = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert targets and all(t.startswith(("data:image/png;base64,", "#")) for t in targets)
    assert '<meta name="viewport"' in page and "@media print" in page
    assert 'class="sortable"' in page and 'data-type="num"' in page
    assert "<details><summary>ddp-2: train, ddp, 2 devices, ok</summary>" in page
    assert "abc1234" in page and "CUDA out of memory" in page


def test_hostile_strings_are_escaped(tmp_path):
    rows = sweep_rows(config_id_of_ddp2=HOSTILE)
    rows[0]["hostname"] = "<img src=x onerror=alert(2)>"
    paths = build_reports(write_run(tmp_path / "hostile", rows))
    page = paths["html"].read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    md = paths["markdown"].read_text()
    assert "<script>" not in md and "<img" not in md
    assert "&lt;script>alert(1)&lt;/script>\\|x y" in md
    assert md_escape("a|b\nc_d") == "a\\|b c\\_d"


def test_rebuild_is_byte_identical(run_dir):
    first = build_reports(run_dir)["markdown"].read_bytes()
    second = build_reports(run_dir)["markdown"].read_bytes()
    assert first == second


def test_torn_last_line_is_skipped_with_a_warning(run_dir):
    with open(run_dir / "results.jsonl", "a", encoding="utf-8") as f:
        f.write('{"config_id": "tp-2", "status": "o')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn"):
        paths = build_reports(run_dir)
    md = paths["markdown"].read_text()
    assert "tp-2" not in md and "ddp-2" in md


def test_unknown_mode_and_odd_infer_rows_do_not_crash(tmp_path):
    rows = sweep_rows()
    infer = [dict(r, mode="infer") for r in sweep_rows(scale=3.0)]  # no workload, no batch size
    odd = [dict(r, mode="distill") for r in sweep_rows()[:2]]
    odd.append(make_row(config_id="bare", status="failed"))  # no mode, no devices, nothing
    paths = build_reports(write_run(tmp_path / "modes", rows + infer + odd))
    names = {p.name for k, p in paths.items() if k.startswith("plot:")}
    assert {"train_throughput.png", "distill_throughput.png"} <= names
    assert not any(n.startswith("infer_") for n in names)  # no workload point to plot
    md = paths["markdown"].read_text()
    assert "- Training, 2 devices: 1.93x with ddp" in md
    assert "- Inference, 2 devices: no speedup claimed" in md
    assert "- Distill, " not in md and "Mode 'distill', 2 devices: 1.93x with ddp" in md


def test_empty_results_file(tmp_path):
    (tmp_path / "results.jsonl").write_text("")
    paths = build_reports(tmp_path)
    assert "No result rows" in paths["markdown"].read_text()
    assert paths["html"].is_file()


def test_only_failed_rows(tmp_path):
    rows = [make_row(**COMMON, config_id=f"ddp-{n}", strategy="ddp", devices=n, status="timeout",
                     reason="no step within 600 s") for n in (1, 2)]
    paths = build_reports(write_run(tmp_path / "failed", rows))
    md = paths["markdown"].read_text()
    assert "No plots" in md and "no step within 600 s" in md
    assert "no successful 1-device 'single' run" in md


def test_compare_runs(tmp_path):
    a = write_run(tmp_path / "a", sweep_rows())
    b_rows = sweep_rows(scale=1.5)
    b_rows.append(_ok("tp-2", "tp", 2, 120.0))
    b = write_run(tmp_path / "b", b_rows)
    paths = compare_runs(a, b, tmp_path / "cmp")
    md = paths["markdown"].read_text()
    assert "| ddp-2 | train | 2 | 193 | 290 | 1.50x | 55.0 | 55.0 | 1.00x | ok | ok |" in md
    assert "| tp-2 | train | 2 | — | 120 | — |" in md and "absent" in md
    assert "geometric mean 1.50x" in md
    page = paths["html"].read_text()
    assert 'src="data:image/png;base64,' in page and "https://" not in page
    assert paths["plot:compare_train_throughput"].is_file()


def test_print_summary_marks_oversubscribed():
    from rich.console import Console

    console = Console(record=True, width=250)
    rows = sweep_rows(config_id_of_ddp2="[bold]ddp-2")  # rich markup in a row is shown as text
    print_summary(rows, console=console)
    out = console.export_text()
    assert "ddp-4 †" in out and "oversubscribed" in out and "[bold]ddp-2" in out
    assert "2 devices: 1.93x with ddp" in out


def test_report_does_not_import_torch():
    import subprocess

    src = Path(__file__).resolve().parents[2] / "src"
    code = ("import sys; sys.path.insert(0, %r); import parallab.report; "
            "assert 'torch' not in sys.modules, 'report imported torch'" % str(src))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_plots_leave_no_pyplot_figures_open(run_dir):
    build_reports(run_dir)
    if "matplotlib.pyplot" in sys.modules:  # the report itself never imports pyplot
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


# ---------------------------------------------------------------- inference rows

INFER = dict(COMMON, mode="infer", dtype="float32", seq_len=64, timed_steps=3, warmup_steps=1,
             steps=4, device_memory_budget_bytes=64 * MIB, verify_tolerance=1e-5)
GEN = dict(prompt_len=8, new_tokens=8)


def _infer(config_id, strategy, devices, workload, batch, *, sps=None, tpot=None, fit=None,
           bound="exact", verify="pass", microbatches=None, status="ok", **extra):
    values = dict(INFER, config_id=config_id, strategy=strategy, devices=devices, workload=workload,
                  batch_size=batch, global_batch=batch, status=status, microbatches=microbatches,
                  schedule="forward-only" if strategy == "pipeline" else None,
                  max_batch_fit=fit, max_batch_fit_bound=None if fit is None else bound,
                  verify_status=verify, verify_max_logits_rel=None if verify == "reference" else 2e-7,
                  verify_token_mismatches=None if verify == "reference" else 0,
                  peak_mem_bytes=int((20 + batch) * MIB))
    if workload == "generate":
        values.update(GEN, seq_len=16)
    if status == "ok":
        if workload == "forward":
            values.update(samples_per_s=sps, tokens_per_s=sps * 64, latency_p50_s=batch / sps,
                          latency_p90_s=batch / sps * 1.1, latency_p99_s=batch / sps * 1.3)
        else:  # a request: ttft + 7 tokens at tpot
            e2e = 0.02 + 7 * tpot
            values.update(ttft_s=0.02, tpot_s=tpot, latency_p50_s=e2e, latency_p90_s=e2e * 1.05,
                          latency_p99_s=e2e * 1.2, samples_per_s=batch / e2e,
                          tokens_per_s=batch / e2e * 8, output_tokens_per_s=batch / e2e * 8)
    values.update(extra)
    return make_row(**values)


def infer_rows(config_id_of_tp2="infer-tp-2"):
    """A budgeted inference sweep: forward at batch 1 and 16, generation of 4 x (8+8) tokens."""
    rows = []
    for cid, strategy, n, f1, f16, tpot, fit, m in (
            ("infer-single-1", "single", 1, 50.0, 400.0, 0.010, 32, None),
            ("infer-replicas-2", "replicas", 2, 48.0, 720.0, 0.009, 1024, None),
            ("infer-pipeline-m4-2", "pipeline", 2, 40.0, 520.0, 0.0111, 64, 4),
            (config_id_of_tp2, "tp", 2, 55.0, None, 0.008, 12, None),
            ("infer-tp-4", "tp", 4, 30.0, 300.0, 0.02, 24, None)):
        common = dict(verify="reference" if n == 1 else "pass", microbatches=m,
                      oversubscribed=n == 4, bound="search_limit" if fit == 1024 else "exact")
        rows.append(_infer(cid, strategy, n, "forward", 1, sps=f1, fit=fit, **common))
        if f16 is None:
            rows.append(_infer(cid, strategy, n, "forward", 16, fit=fit, status="does_not_fit",
                               reason="batch 16 needs 80.0 MiB per device, more than the budget "
                                      "infer.device_memory=64MiB (largest batch that fits: 12)",
                               **common))
        else:
            rows.append(_infer(cid, strategy, n, "forward", 16, sps=f16, fit=fit, **common))
        rows.append(_infer(cid, strategy, n, "generate", 4, tpot=tpot, fit=fit // 2, **common))
    return rows


def test_infer_table_rows_are_distinct_and_formatted():
    from parallab.report.infer import infer_table
    from parallab.report.tables import with_scaling

    table = infer_table(with_scaling(sweep_rows() + infer_rows()))
    col = {c: i for i, c in enumerate(table.columns)}
    assert {"workload", "batch", "latency p50 (ms)", "TTFT (ms)", "TPOT (ms)",
            "max batch in budget", "verification"} <= set(col)
    keys = [(c[col["config"]], c[col["workload"]], c[col["batch"]]) for c in table.cells]
    assert len(keys) == len(set(keys)) == 15  # training rows are not in this table
    rows = {(c[col["config"]], c[col["workload"]], c[col["batch"]]): c for c in table.cells}
    fwd16 = rows[("infer-replicas-2", "forward", "16")]
    assert fwd16[col["speedup"]] == "1.80x" and fwd16[col["max batch in budget"]] == "≥1024"
    assert fwd16[col["latency p50 (ms)"]] == "22.2" and fwd16[col["samples/s"]] == "720"
    assert fwd16[col["verification"]] == "pass (max rel 2e-7, 0 token mismatches)"
    gen = rows[("infer-pipeline-m4-2", "generate 8+8", "4")]
    assert gen[col["strategy"]] == "pipeline, m=4"
    assert gen[col["TTFT (ms)"]] == "20.0" and gen[col["TPOT (ms)"]] == "11.1"
    assert gen[col["tokens/s (generate: output)"]] == "328"  # 4 x 8 tokens per 97.7 ms request
    no_fit = rows[("infer-tp-2", "forward", "16")]
    assert no_fit[col["status"]] == "does_not_fit" and no_fit[col["samples/s"]] == "—"
    assert no_fit[col["max batch in budget"]] == "12" and no_fit[col["peak mem / device (MiB)"]] == "36.0"
    assert rows[("infer-tp-4 †", "forward", "1")][col["status"]] == "ok"


def test_infer_headline():
    lines = headline(sweep_rows() + infer_rows())
    assert lines[0].startswith("Training, 2 devices: 1.93x with ddp")
    two = next(s for s in lines if s.startswith("Inference, 2 devices:"))
    assert two == ("Inference, 2 devices: forward x1: 1.10x with tp, 0.96x with replicas, 0.80x with "
                   "pipeline; forward x16: 1.80x with replicas, 1.30x with pipeline; generation "
                   "4x(8+8): TPOT 1.25x with tp, 1.11x with replicas, 0.90x with pipeline; did not "
                   "fit the memory budget: infer-tp-2 (forward x16)")
    four = next(s for s in lines if s.startswith("Inference, 4 devices:"))
    assert four.startswith("Inference, 4 devices: no speedup claimed; excluded (oversubscribed")
    assert "infer-tp-4" in four and "0.75x" not in four
    rows = infer_rows()
    for r in rows:
        if r["config_id"] == "infer-replicas-2":
            r["verify_status"] = "fail"  # fast but wrong: never claimed
    two = next(s for s in headline(rows) if s.startswith("Inference, 2 devices:"))
    assert "with replicas" not in two and "not claimed, verification failed: infer-replicas-2" in two


def test_build_reports_with_inference(tmp_path):
    run_dir = write_run(tmp_path / "both", sweep_rows() + infer_rows())
    paths = build_reports(run_dir)
    plots = sorted(p.name for k, p in paths.items() if k.startswith("plot:"))
    assert plots == ["infer_batch-throughput.png", "infer_generate-latency.png",
                     "infer_max-batch.png", "train_memory.png", "train_scaling.png",
                     "train_throughput.png"]
    for name in plots:
        assert (run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert "- Training, 2 devices: 1.93x with ddp" in md
    assert "- Inference, 2 devices: forward x1: 1.10x with tp" in md
    summary = md.split("## Summary")[1].split("## Inference")[0]
    assert "| ddp-2 |" in summary and "infer-" not in summary and "| mode |" not in summary
    infer = md.split("## Inference")[1].split("## Verification")[0]
    assert "| infer-replicas-2 | replicas | 2 | forward | 16 | ok | 720 |" in infer
    assert "| infer-tp-2 | tp | 2 | forward | 16 | does\\_not\\_fit |" in infer
    assert "≥1024" in infer and "Inference: each configuration" in md
    verification = md.split("## Verification")[1].split("## Failures")[0]
    assert verification.count("| infer-replicas-2 |") == 1  # one line per configuration
    assert "- infer-tp-2 (forward, batch 16) (infer, 2 devices): **does\\_not\\_fit**" in md
    assert "![infer: largest batch within the memory budget](plots/infer_max-batch.png)" in md
    page = paths["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 6
    assert page.count('<table class="sortable">') == 3  # training, inference, verification
    assert '<section id="inference">' in page and 'href="#inference"' in page
    assert "<details><summary>infer-tp-2: infer, tp, 2 devices, forward x16, does_not_fit" in page
    assert build_reports(run_dir)["markdown"].read_text() == md  # byte-identical rebuild
    assert paths["html"].read_text() == page


def test_inference_without_budget_and_hostile_ids(tmp_path):
    rows = [dict(r, device_memory_budget_bytes=None, max_batch_fit=None, max_batch_fit_bound=None)
            for r in infer_rows(config_id_of_tp2=HOSTILE) if r["status"] == "ok"]
    paths = build_reports(write_run(tmp_path / "infer-only", rows))
    names = sorted(p.name for k, p in paths.items() if k.startswith("plot:"))
    assert names == ["infer_batch-throughput.png", "infer_generate-latency.png"]  # no budget
    md = paths["markdown"].read_text()
    assert "## Summary" not in md and "## Inference" in md and "<script>" not in md
    assert "&lt;script>alert(1)&lt;/script>\\|x y" in md
    page = paths["html"].read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="#results"' not in page


def test_infer_only_failed_and_compare(tmp_path):
    failed = [make_row(**INFER, config_id="infer-single-1", strategy="single", devices=1,
                       status="failed", reason="boom")]
    md = build_reports(write_run(tmp_path / "f", failed))["markdown"].read_text()
    assert "Inference, no successful 1-device 'single' run" in md and "boom" in md
    a = write_run(tmp_path / "a", sweep_rows() + infer_rows())
    b = write_run(tmp_path / "b", sweep_rows() + [dict(r, samples_per_s=r["samples_per_s"] * 2)
                                                   if r["samples_per_s"] else r for r in infer_rows()])
    paths = compare_runs(a, b, tmp_path / "cmp")
    md = paths["markdown"].read_text()
    assert "| infer-replicas-2 (forward, batch 16) | infer | 2 | 720 | 1,440 | 2.00x |" in md
    assert "| infer-replicas-2 (generate, batch 4) | infer | 2 |" in md
    assert paths["plot:compare_infer_throughput"].is_file()


def test_print_summary_with_inference():
    from rich.console import Console

    for width in (250, 120, 90):
        console = Console(record=True, width=width)
        print_summary(sweep_rows() + infer_rows(), console=console)
        out = console.export_text()
        assert "Inference, 2 devices: forward x1: 1.10x with tp" in out.replace("\n", " ")
        assert "Inference:" in out and "does_not_fit" in out and "ddp-2" in out
