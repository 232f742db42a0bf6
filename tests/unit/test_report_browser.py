"""report.html in a real browser (headless Chromium): the page loads without a script error or a
blocked load, shows its tables and images, escapes hostile text, and its header click sorts
numbers numerically. Skipped where Chromium is not installed (CI installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import parallab.bench.result  # noqa: F401
except ImportError:  # not installed yet (`make venv` installs it editable): use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from parallab.bench.result import append_row, make_row  # noqa: E402
from parallab.report import build_reports  # noqa: E402

HOSTILE = "<img src=x onerror=alert(1)><script>alert(2)</script>"
BROWSER_TIMEOUT_S = 120


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not installed: apt-get install chromium (CI installs it)")


def _row(config_id, strategy, devices, sps, **extra):
    values = dict(run_id="browser", mode="train", config_id=config_id, strategy=strategy,
                  devices=devices, status="ok", samples_per_s=sps, tokens_per_s=sps * 32,
                  step_time_median_s=8 / sps, step_time_p90_s=9 / sps, global_batch=8,
                  scaling="strong", dtype="float32", threads_per_device=1, cpu_cores=2,
                  peak_mem_bytes=int(sps) * 2 ** 20, verify_status="pass",
                  verify_max_loss_rel=1e-7, verify_max_weight_rel=2e-7, verify_tolerance=1e-5,
                  hostname="box", torch_version="2.13.0+cpu")
    return make_row(**(values | extra))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    rows = [_row("single-1", "single", 1, 100.0, verify_status="reference"),
            _row("ddp-2", "ddp", 2, 193.0),
            _row(HOSTILE, "ddp", 4, 150.0, oversubscribed=True),
            _row("pipeline-1f1b-m4-2", "pipeline", 2, 162.0, schedule="1f1b", microbatches=4),
            _row("pipeline-naive-2", "pipeline", 2, 98.0, schedule="gpipe", microbatches=1),
            make_row(run_id="browser", mode="train", config_id="fsdp-2", strategy="fsdp",
                     devices=2, status="failed", reason="boom")]
    for row in rows:
        append_row(run_dir / "results.jsonl", row)
    return build_reports(run_dir)["html"]


def _dump_dom(page: Path, tmp_path: Path) -> tuple[str, str]:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {BROWSER_TIMEOUT_S} s: {' '.join(cmd)}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


def _page_messages(stderr: str) -> list[str]:
    """Lines the page itself wrote to the console: script errors ('Uncaught ...'), console.error,
    and loads refused by the page's Content-Security-Policy. Our page logs nothing at all."""
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line or "Uncaught" in line or "Content Security Policy" in line]


def test_report_loads_cleanly_in_chromium(report, tmp_path):
    dom, stderr = _dump_dom(report, tmp_path)
    assert _page_messages(stderr) == []
    assert dom.count("<table") >= 4  # results, verification, machine, per-config settings
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 3
    assert 'class="sortable"' in dom and "<details>" in dom
    # The hostile config id is text, never an element: no extra img, no script that ran.
    assert "&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in dom
    assert "<img src=\"x\"" not in dom and "<script>alert(2)" not in dom


def test_header_click_sorts_numbers_numerically(report, tmp_path):
    # A copy of the page that clicks the samples/s header once, then records the row order.
    probe = ("<script>(function () {"
             "var t = document.querySelector('table.sortable');"
             "var th = t.querySelector('th[data-col=\"samples/s\"]'); th.click();"
             "var order = Array.prototype.map.call(t.tBodies[0].rows, function (r) {"
             " return r.cells[th.cellIndex].getAttribute('data-sort'); });"
             "document.body.setAttribute('data-order', order.join(' '));"
             "document.body.setAttribute('data-aria', th.getAttribute('aria-sort'));"
             "})();</script></body>")
    page = tmp_path / "sorted.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", probe),
                    encoding="utf-8")
    dom, stderr = _dump_dom(page, tmp_path)
    assert _page_messages(stderr) == []
    order = re.search(r'data-order="([^"]*)"', dom).group(1).split(" ")
    numbers = [float(x) for x in order if x]
    assert numbers == sorted(numbers) == [98.0, 100.0, 150.0, 162.0, 193.0]  # not "100" < "98"
    assert order[-1] == ""  # the failed row (no samples/s) sorts last
    assert 'data-aria="ascending"' in dom


def _infer_row(config_id, strategy, devices, workload, batch, sps, **extra):
    values = dict(run_id="browser", mode="infer", config_id=config_id, strategy=strategy,
                  devices=devices, status="ok", workload=workload, batch_size=batch,
                  global_batch=batch, samples_per_s=sps, tokens_per_s=sps * 32,
                  latency_p50_s=batch / sps, latency_p90_s=batch / sps, latency_p99_s=batch / sps,
                  dtype="float32", threads_per_device=1, cpu_cores=2, seq_len=32,
                  peak_mem_bytes=int(sps) * 2 ** 20, device_memory_budget_bytes=64 * 2 ** 20,
                  max_batch_fit=8, max_batch_fit_bound="exact",
                  verify_status="reference" if devices == 1 else "pass",
                  verify_max_logits_rel=None if devices == 1 else 1e-7,
                  verify_token_mismatches=None if devices == 1 else 0, verify_tolerance=1e-5)
    if workload == "generate":
        values.update(prompt_len=8, new_tokens=8, ttft_s=0.01, tpot_s=0.004,
                      output_tokens_per_s=sps * 8, tokens_per_s=sps * 8)
    return make_row(**(values | extra))


def test_report_with_inference_loads_cleanly(tmp_path):
    run_dir = tmp_path / "both"
    run_dir.mkdir()
    rows = [_row("single-1", "single", 1, 100.0, verify_status="reference"),
            _row("ddp-2", "ddp", 2, 193.0)]
    for cid, strategy, n, scale in (("infer-single-1", "single", 1, 1.0),
                                    ("infer-replicas-2", "replicas", 2, 1.8),
                                    (HOSTILE, "tp", 2, 1.2)):
        rows += [_infer_row(cid, strategy, n, "forward", 1, 50.0 * scale),
                 _infer_row(cid, strategy, n, "forward", 8, 300.0 * scale),
                 _infer_row(cid, strategy, n, "generate", 4, 40.0 * scale)]
    rows.append(make_row(run_id="browser", mode="infer", config_id="infer-pipeline-m2-2",
                         strategy="pipeline", devices=2, status="does_not_fit", workload="forward",
                         batch_size=8, reason="batch 8 needs 80 MiB", max_batch_fit=4,
                         max_batch_fit_bound="exact", device_memory_budget_bytes=64 * 2 ** 20))
    for row in rows:
        append_row(run_dir / "results.jsonl", row)
    page = build_reports(run_dir)["html"]
    dom, stderr = _dump_dom(page, tmp_path)
    assert _page_messages(stderr) == []
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 6  # 3 training, 3 inference
    assert dom.count('<table class="sortable">') == 3  # training, inference, verification
    assert '<section id="inference">' in dom and "does_not_fit" in dom
    assert "&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in dom
    assert "<img src=\"x\"" not in dom and "<script>alert(2)" not in dom
