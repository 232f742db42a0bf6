"""Reports of a sweep: results.jsonl -> report.md, report.html and plots/*.png.

Reads result rows only (``bench/result.py``); no torch import, so a report can be rebuilt on any
machine from a copied run directory. The same results.jsonl always gives the same report.md.
Training rows and inference rows (mode "infer", one per workload and batch size) get their own
tables, headline sentences and plots (inference: ``infer.py``, ``infer_plots.py``).
"""

from __future__ import annotations

from pathlib import Path

from parallab.bench.result import read_rows

from .console import print_summary
from .html import write_compare_html, write_html
from .infer import infer_table
from .markdown import write_compare_markdown, write_markdown
from .plots import write_compare_plot, write_plots
from .tables import headline, summary_table, with_scaling

__all__ = ["build_reports", "compare_runs", "headline", "infer_table", "print_summary",
           "summary_table", "write_compare_html", "write_compare_markdown", "write_html",
           "write_markdown", "write_plots"]


def _rows(run_dir: Path) -> list[dict]:
    results = Path(run_dir) / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"no results file at {results}: run a sweep into {run_dir} first")
    # read_rows skips a torn last line (an interrupted write) with a warning.
    return with_scaling(read_rows(results))


def build_reports(run_dir: str | Path) -> dict[str, Path]:
    """Write ``run_dir/plots/*.png``, ``run_dir/report.md`` and ``run_dir/report.html`` from
    ``run_dir/results.jsonl``. Returns {"markdown": ..., "html": ..., "plot:<name>": ...}."""
    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    plots = write_plots(rows, run_dir / "plots")
    paths = {"markdown": write_markdown(rows, run_dir / "report.md", plots=plots),
             "html": write_html(rows, run_dir / "report.html", plots=plots)}
    paths.update({f"plot:{p.stem}": p for p in plots})
    return paths


def compare_runs(run_a: str | Path, run_b: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Compare two sweeps (A = ``run_a``, B = ``run_b``) into ``out_dir``: compare.md,
    compare.html and plots/compare_*.png. Labels are the run directories' names."""
    run_a, run_b, out_dir = Path(run_a), Path(run_b), Path(out_dir)
    label_a, label_b = run_a.resolve().name, run_b.resolve().name
    if label_a == label_b:
        label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
    rows_a, rows_b = _rows(run_a), _rows(run_b)
    plots = write_compare_plot(rows_a, rows_b, label_a, label_b, out_dir / "plots")
    paths = {"markdown": write_compare_markdown(rows_a, rows_b, label_a, label_b, out_dir, plots=plots),
             "html": write_compare_html(rows_a, rows_b, label_a, label_b, out_dir, plots=plots)}
    paths.update({f"plot:{p.stem}": p for p in plots})
    return paths
