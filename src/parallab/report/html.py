"""Result rows -> one self-contained report.html (and compare.html for two sweeps).

Self-contained: plots are embedded as base64 data URIs, the CSS and the small sort script are
inline, and a Content-Security-Policy forbids every network load, so the file works offline, by
mail, and from a CI artifact. Every string from a row goes through ``html.escape``; no row value
ever reaches the script or an id attribute.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Iterable

from parallab.bench.result import ROW_KEYS

from .infer import infer_description, infer_table, is_infer, point_label
from .markdown import (MATCH_NOTE, compare_summary, compare_table, failures, machine_info, notes,
                       plot_groups, plot_title, run_ids, statements, write_text)
from .tables import (DASH, OVERSUBSCRIBED_NOTE, Table, fixed_description, headline, mode_of,
                     modes_of, summary_table, text, verification_table, with_scaling)

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
  margin: 0 auto; max-width: 1280px; padding: 0 14px 48px; }
h1 { font-size: 1.5em; margin: 0.8em 0 0.3em; overflow-wrap: anywhere; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
nav { display: flex; flex-wrap: wrap; gap: 0.2em 0.9em; }
nav a { white-space: nowrap; }
.headline li { margin: 0.25em 0; }
.muted, .note { color: #555; font-size: 0.92em; }
.table-wrap { overflow-x: auto; -webkit-overflow-scrolling: touch; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.4em 0; }
th, td { border: 1px solid #d6d6d6; padding: 0.28em 0.55em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #999; }
table.sortable th[aria-sort="ascending"]::after { content: " \\2191"; color: #222; }
table.sortable th[aria-sort="descending"]::after { content: " \\2193"; color: #222; }
tr.over td { background: #fff8e1; font-style: italic; }
tr.failed td { background: #fdecea; }
.fail { color: #b00020; font-weight: 600; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
details { margin: 0.3em 0; border: 1px solid #e2e2e2; border-radius: 4px; padding: 0.3em 0.6em; }
summary { cursor: pointer; overflow-wrap: anywhere; }
table.kv td:first-child { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
table.kv td { overflow-wrap: anywhere; max-width: 60em; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6; padding: 0.5em; }
@media (max-width: 600px) {
  body { font-size: 14px; padding: 0 8px 32px; }
  table { font-size: 0.82em; }
  /* plots keep a legible size on a phone and scroll sideways instead of shrinking */
  figure { overflow-x: auto; -webkit-overflow-scrolling: touch; }
  figure img { max-width: none; width: 640px; }
}
@media print {
  body { max-width: none; font-size: 10pt; }
  nav, .hint { display: none; }
  .table-wrap { overflow: visible; }
  table { font-size: 8pt; }
  table.sortable th::after { content: ""; }
  figure, tr, details { break-inside: avoid; }
  figure img { max-width: 100%; width: auto; }
  h2, h3 { break-after: avoid; }
  a { color: inherit; text-decoration: none; }
}
"""

# Click (or Enter on) a header to sort; numbers numerically from data-sort, empty values last.
SCRIPT = """
(function () {
  function key(cell, numeric) {
    var v = cell.getAttribute("data-sort");
    if (numeric) { var x = parseFloat(v); return isNaN(x) ? null : x; }
    return (v === null ? cell.textContent : v).toLowerCase();
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      function sort() {
        var numeric = th.getAttribute("data-type") === "num";
        var asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var pos = new Map(rows.map(function (r, i) { return [r, i]; }));
        rows.sort(function (a, b) {
          var x = key(a.cells[col], numeric), y = key(b.cells[col], numeric);
          if (x === null || y === null) {
            return (x === null) - (y === null) || pos.get(a) - pos.get(b);
          }
          var c = x < y ? -1 : x > y ? 1 : 0;
          return (asc ? c : -c) || pos.get(a) - pos.get(b);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
  window.addEventListener("beforeprint", function () {
    Array.prototype.forEach.call(document.querySelectorAll("details"), function (d) { d.open = true; });
  });
})();
"""


def esc(value: Any) -> str:
    """Every row value on its way into the page (text and attribute values alike)."""
    return html.escape(str(value), quote=True)


def table_html(table: Table, *, sortable: bool = False) -> str:
    head = "".join(
        f'<th scope="col" data-col="{esc(c)}"' + (' data-type="num" class="num"' if n else "")
        + f">{esc(c)}</th>" for c, n in zip(table.columns, table.numeric))
    body = []
    for i, cells in enumerate(table.cells):
        classes = (["over"] if table.oversubscribed[i] else []) + (["failed"] if table.failed[i] else [])
        tds = []
        for cell, value, numeric in zip(cells, table.values[i] if table.values else cells, table.numeric):
            attrs = ""
            if numeric:
                attrs = f' class="num" data-sort="{"" if value is None else esc(repr(float(value)))}"'
            elif cell.startswith("FAIL"):
                attrs = ' class="fail"'
            tds.append(f"<td{attrs}>{esc(cell)}</td>")
        cls = f' class="{" ".join(classes)}"' if classes else ""
        body.append(f"<tr{cls}>{''.join(tds)}</tr>")
    kind = ' class="sortable"' if sortable else ""
    return (f'<div class="table-wrap"><table{kind}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def figure_html(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    title = plot_title(path)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(title)}">'
            f"<figcaption>{esc(title)}</figcaption></figure>")


def page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        *body, f"<script>{SCRIPT}</script>", "</body>", "</html>", ""])


def _value_text(value: Any) -> str:
    if value is None:
        return DASH
    return value if isinstance(value, str) else json.dumps(value)


def config_details(rows: list[dict[str, Any]]) -> list[str]:
    """One collapsible block per row (inference: per configuration, workload and batch size)
    listing every key of the row."""
    out = []
    for row in rows:
        keys = [k for k in ROW_KEYS if k in row] + sorted(k for k in row if k not in ROW_KEYS)
        kv = "".join(f"<tr><td>{esc(k)}</td><td>{esc(_value_text(row[k]))}</td></tr>" for k in keys)
        point = f", {point_label(row)}" if is_infer(row) and row.get("workload") is not None else ""
        label = (f"{text(row.get('config_id'))}: {mode_of(row)}, {text(row.get('strategy'))}, "
                 f"{text(row.get('devices'))} devices{point}, {text(row.get('status'))}")
        out.append(f"<details><summary>{esc(label)}</summary>"
                   f'<div class="table-wrap"><table class="kv"><tbody>{kv}</tbody></table></div>'
                   "</details>")
    return out


def write_html(rows: Iterable[dict[str, Any]], out_path: str | Path, *, plots: list[Path]) -> Path:
    """The sweep's single-file report.html."""
    rows = with_scaling(rows)
    modes = modes_of(rows)
    train = [r for r in rows if not is_infer(r)]
    title = f"parallab report: {run_ids(rows)}"
    body = [f"<header><h1>{esc(title)}</h1>"]
    if rows:
        body.append('<p class="muted">' + "<br>".join(
            esc(infer_description(rows) if m == "infer" else fixed_description(rows, m))
            for m in modes) + "</p>")
    body.append('<nav><a href="#headline">Headline</a><a href="#plots">Plots</a>'
                + ('<a href="#results">Results</a>' if train else "")
                + ('<a href="#inference">Inference</a>' if len(train) < len(rows) else "")
                + '<a href="#verification">Verification</a>'
                '<a href="#failures">Failures</a><a href="#machine">Machine</a>'
                '<a href="#configs">Configurations</a><a href="#notes">Notes</a></nav></header>')
    if not rows:
        body.append("<p>No result rows: the sweep wrote nothing yet.</p>")
        return write_text(Path(out_path), page(title, body))

    body += ['<section id="headline"><h2>Headline</h2><ul class="headline">']
    body += [f"<li>{esc(s)}</li>" for s in headline(rows)]
    body.append("</ul>")
    body += [f"<p>{esc(s)}</p>" for s in statements(rows)]
    body.append("</section>")

    body.append('<section id="plots"><h2>Plots</h2>')
    for group, paths in plot_groups(plots):
        body += ([f"<h3>{esc(group)}</h3>"] if group else []) + [figure_html(p) for p in paths]
    if not plots:
        body.append("<p>No plots (nothing ran ok).</p>")
    body.append("</section>")

    hint = '<p class="hint muted">Click a column header to sort; empty values sort last.</p>'
    if train:
        table = summary_table(train, full=True)
        body += ['<section id="results"><h2>All results</h2>', hint,
                 table_html(table, sortable=True)]
        if any(table.oversubscribed):
            body.append(f'<p class="note">{esc(OVERSUBSCRIBED_NOTE)}</p>')
        body.append("</section>")
    if len(train) < len(rows):
        table = infer_table(rows, full=True)
        body += ['<section id="inference"><h2>Inference</h2>',
                 '<p class="muted">One row per configuration, workload and batch size; speedup '
                 "against the 1-device row of the same workload and batch.</p>",
                 hint, table_html(table, sortable=True)]
        if any(table.oversubscribed):
            body.append(f'<p class="note">{esc(OVERSUBSCRIBED_NOTE)}</p>')
        body.append("</section>")

    body += ['<section id="verification"><h2>Verification</h2>',
             table_html(verification_table(rows), sortable=True), "</section>"]

    from parallab.report.predicted import NOTE, prediction_table

    predicted = prediction_table(rows)
    if predicted is not None:
        body += ['<section id="predicted"><h2>Predicted against measured</h2>', f"<p>{esc(NOTE)}</p>",
                 table_html(predicted, sortable=True), "</section>"]

    body.append('<section id="failures"><h2>Failures</h2>')
    fails = failures(rows)
    if not fails:
        body.append("<p>None: every configuration ran, and none failed verification.</p>")
    for f in fails:
        body.append(f"<p><strong>{esc(f['label'])}</strong> ({esc(f['mode'])}, "
                    f"{esc(f['devices'])} devices): <span class=\"fail\">{esc(f['status'])}</span></p>"
                    f"<pre>{esc(f['reason'])}</pre>")
    body.append("</section>")

    body.append('<section id="machine"><h2>Machine and versions</h2><div class="table-wrap">'
                '<table class="kv"><tbody>')
    body += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in machine_info(rows)]
    body.append("</tbody></table></div></section>")

    body += ['<section id="configs"><h2>Configurations</h2>',
             '<p class="muted">Every key of every result row.</p>', *config_details(rows),
             "</section>"]
    body += ['<section id="notes"><h2>Notes</h2><ul>', *[f"<li>{esc(n)}</li>" for n in notes(rows)],
             "</ul></section>"]
    return write_text(Path(out_path), page(title, body))


def write_compare_html(rows_a: Iterable[dict[str, Any]], rows_b: Iterable[dict[str, Any]],
                       label_a: str, label_b: str, out_dir: str | Path, *,
                       plots: list[Path] | None = None) -> Path:
    """compare.html in ``out_dir``: rows matched by ``markdown.match_key``, A, B and B/A for
    samples/s and peak memory, and the overlaid throughput plot (made here if not given)."""
    rows_a, rows_b = with_scaling(rows_a), with_scaling(rows_b)
    out_dir = Path(out_dir)
    if plots is None:
        from .plots import write_compare_plot
        plots = write_compare_plot(rows_a, rows_b, label_a, label_b, out_dir / "plots")
    table = compare_table(rows_a, rows_b, label_a, label_b)
    title = f"parallab comparison: A = {label_a}, B = {label_b}"
    body = [f"<h1>{esc(title)}</h1>",
            f"<p>{esc(compare_summary(rows_a, rows_b, label_a, label_b))}</p>",
            f'<p class="muted">A: run {esc(run_ids(rows_a))}; B: run {esc(run_ids(rows_b))}. '
            f"{esc(MATCH_NOTE)}</p>",
            '<p class="hint muted">Click a column header to sort.</p>',
            table_html(table, sortable=True)]
    if any(table.oversubscribed):
        body.append(f'<p class="note">{esc(OVERSUBSCRIBED_NOTE)}</p>')
    body += [figure_html(p) for p in plots]
    return write_text(out_dir / "compare.html", page(title, body))
