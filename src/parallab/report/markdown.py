"""Result rows -> report.md, and the comparison of two sweeps (table data and compare.md).

Deterministic: the same rows give the same bytes (no "generated at" time; rows are sorted).
Every string that comes from a row goes through ``md_escape``: a pipe or newline in a config id
must not break a table, and ``<script>`` must show as text in a renderer that allows raw HTML.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

from .infer import INFER_NOTES, infer_statement, infer_table, is_infer
from .tables import (DAGGER, DASH, OVERSUBSCRIBED_NOTE, Table, fmt_mib, fmt_num, fmt_x, headline,
                     is_ok, is_oversubscribed, mode_of, mode_title, modes_of, num, row_sort_key,
                     scaling_statement, sorted_rows, summary_table, text, verification_label,
                     verification_table, with_scaling)

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
REASON_MAX_CHARS = 1500
PLOT_TITLES = {"throughput": "throughput vs devices", "scaling": "speedup and efficiency",
               "memory": "peak memory per device",
               "batch-throughput": "forward throughput vs batch size",
               "generate-latency": "generation latency and tokens/s vs devices",
               "max-batch": "largest batch within the memory budget"}


def md_escape(value: Any) -> str:
    """Text safe inside a markdown table cell or paragraph: one line, no raw HTML, no markup."""
    s = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ")
    s = s.replace("&", "&amp;").replace("<", "&lt;")  # no raw HTML tag or entity gets through
    return _MD_SPECIAL.sub(r"\\\1", s)


def md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(md_escape(c) for c in table.columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in table.numeric) + "|"]
    for cells in table.cells:
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return lines


def write_text(path: Path, content: str) -> Path:
    """Write through a temporary file and rename: a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8", newline="\n")
    os.replace(tmp, path)
    return path


def plot_title(path: Path) -> str:
    """'train_throughput.png' -> 'train: throughput vs devices' (plots.py names the files)."""
    stem = Path(path).stem
    mode, _, kind = stem.rpartition("_")
    return f"{mode.removeprefix('compare_')}: {PLOT_TITLES.get(kind, kind)}" if mode else stem


def plot_links(plots: Iterable[Path], base: Path) -> list[str]:
    lines = []
    for p in plots:
        rel = Path(os.path.relpath(Path(p).resolve(), Path(base).resolve())).as_posix()
        lines += [f"![{md_escape(plot_title(p))}]({urllib.parse.quote(rel)})", ""]
    return lines


def plot_groups(plots: Iterable[Path]) -> list[tuple[str | None, list[Path]]]:
    """Plots grouped by mode (the file name's prefix), in the given order: [(title, paths)];
    one group without a title where all plots are of one mode."""
    groups: dict[str, list[Path]] = {}
    for p in plots:
        groups.setdefault(Path(p).stem.removeprefix("compare_").rpartition("_")[0], []).append(Path(p))
    if len(groups) <= 1:
        return [(None, paths) for paths in groups.values()]
    return [(mode_title(mode), paths) for mode, paths in groups.items()]


def run_ids(rows: Iterable[dict[str, Any]]) -> str:
    ids = sorted({str(r["run_id"]) for r in rows if r.get("run_id") is not None})
    return ", ".join(ids) if ids else "(no run id)"


def model_notes(rows: list[dict[str, Any]]) -> list[str]:
    """'Model hf-llama tiny: 1,234,567 parameters, 12.3 GFLOP per training sample ...', one
    line per model of the rows (FLOPs counted on the meta device, models/flops.py)."""
    out = []
    for model, preset in sorted({(text(r.get("model")), text(r.get("preset"))) for r in rows
                                 if r.get("model") and r.get("n_params")}):
        row = next(r for r in rows if text(r.get("model")) == model and text(r.get("preset")) == preset
                   and r.get("n_params"))
        line = f"Model {model} {preset}: {fmt_num(row['n_params'])} parameters"
        if row.get("flops_per_sample"):
            line += (f", {fmt_num(row['flops_per_sample'] / 1e9)} GFLOP per training sample "
                     "(forward + backward, counted by torch's FlopCounterMode)")
        out.append(line + ".")
    return out


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """The explanations every report carries (shared with the HTML)."""
    over = sorted({text(r.get("config_id")) for r in rows if r.get("oversubscribed")})
    warm = sorted({str(r["warmup_steps"]) for r in rows if r.get("warmup_steps") is not None})
    timed = sorted({str(r["timed_steps"]) for r in rows if r.get("timed_steps") is not None})
    peak_src = sorted({str(r["peak_flops_source"]) for r in rows if r.get("peak_flops_source")})
    mem_src = sorted({str(r["mem_source"]) for r in rows if r.get("mem_source")})
    out = [OVERSUBSCRIBED_NOTE + (f" Oversubscribed here: {', '.join(over)}." if over
                                  else " No configuration of this sweep was oversubscribed.")]
    out += model_notes(rows)
    out.append("Step time: wall clock of a whole training/inference step, the maximum over ranks; "
               f"median and 90th percentile over {'/'.join(timed) or '?'} timed steps after "
               f"{'/'.join(warm) or '?'} warm-up steps. samples/s uses the global batch.")
    out.append("Speedup and efficiency compare each configuration's samples/s with the 1-device "
               "'single' run of the same sweep and mode; the headline and the plots take the best "
               "configuration of each strategy at each device count.")
    out.append("MFU: model FLOPs per second achieved, divided by the peak FLOP/s of all devices "
               f"used (peak source: {', '.join(peak_src) or DASH}).")
    out.append("Memory: peak per device, the maximum over ranks "
               f"(source: {', '.join(mem_src) or DASH}). 1 MiB = 2^20 bytes.")
    out.append("Verification: losses and final weights of each configuration compared with the "
               "1-device reference; 'max rel' is the largest relative difference of losses or "
               "weights, checked against the tolerance.")
    if any(is_infer(r) for r in rows):
        out += INFER_NOTES
    return out


def statements(rows: list[dict[str, Any]]) -> list[str]:
    """The paragraph under the headline per mode: how speedups were computed (shared with the
    HTML)."""
    modes = modes_of(rows)
    out = []
    for mode in modes:
        mrows = [r for r in rows if mode_of(r) == mode]
        if mode == "infer":
            out.append(infer_statement(mrows))
            continue
        prefix = f"{mode_title(mode)}: " if len(modes) > 1 else ""
        out.append(prefix + scaling_statement(mrows))
    return out


def write_markdown(rows: Iterable[dict[str, Any]], out_path: str | Path, *,
                   plots: list[Path]) -> Path:
    """The sweep's report.md: headline, scaling kind, summary (training), inference, verification,
    failures, plots, machine and versions, notes."""
    rows = with_scaling(rows)
    out_path = Path(out_path)
    lines = [f"# parallab report: {md_escape(run_ids(rows))}", ""]
    if not rows:
        lines += ["No result rows: the sweep wrote nothing yet.", ""]
        return write_text(out_path, "\n".join(lines))

    lines += ["## Headline", ""]
    lines += [f"- {md_escape(s)}" for s in headline(rows)]
    lines.append("")
    for statement in statements(rows):
        lines += [md_escape(statement), ""]

    train = [r for r in rows if not is_infer(r)]
    over = False
    if train:
        table = summary_table(train)
        lines += ["## Summary", ""] + md_table(table) + [""]
        over |= any(table.oversubscribed)
    if len(train) < len(rows):
        table = infer_table(rows)
        lines += ["## Inference", "", "One row per configuration, workload and batch size; "
                  "speedup against the 1-device row of the same workload and batch.", ""]
        lines += md_table(table) + [""]
        over |= any(table.oversubscribed)
    if over:
        lines += [md_escape(OVERSUBSCRIBED_NOTE), ""]

    lines += ["## Verification", ""] + md_table(verification_table(rows)) + [""]

    from parallab.report.predicted import NOTE, prediction_table

    predicted = prediction_table(rows)
    if predicted is not None:
        lines += ["## Predicted against measured", "", md_escape(NOTE), ""] + md_table(predicted) + [""]

    lines += ["## Failures", ""]
    fails = failures(rows)
    if not fails:
        lines.append("None: every configuration ran, and none failed verification.")
    for f in fails:
        reason = f["reason"]
        if len(reason) > REASON_MAX_CHARS:
            reason = reason[:REASON_MAX_CHARS] + " … (cut; the full reason is in results.jsonl)"
        lines.append(f"- {md_escape(f['label'])} ({md_escape(f['mode'])}, "
                     f"{md_escape(f['devices'])} devices): **{md_escape(f['status'])}**: "
                     f"{md_escape(reason)}")
    lines.append("")

    lines += ["## Plots", ""]
    for title, paths in plot_groups(plots):
        lines += ([f"### {md_escape(title)}", ""] if title else []) + plot_links(paths, out_path.parent)
    if not plots:
        lines += ["No plots (nothing ran ok).", ""]

    lines += ["## Machine and versions", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {md_escape(v)} |" for k, v in machine_info(rows)]
    lines.append("")

    lines += ["## Notes", ""] + [f"- {md_escape(n)}" for n in notes(rows)] + [""]
    return write_text(out_path, "\n".join(lines))


def failures(rows: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Configurations that did not finish, or finished with a verification failure. 'label'
    names the inference workload and batch size too; a verification failure of an inference
    configuration is listed once, not once per workload point."""
    out, seen = [], set()
    for row in sorted_rows(rows):
        base = {"config_id": text(row.get("config_id")), "mode": mode_of(row),
                "devices": text(row.get("devices"))}
        if not is_ok(row):
            out.append(base | {"label": match_label(row), "status": text(row.get("status")),
                               "reason": text(row.get("reason"))})
        elif row.get("verify_status") == "fail" and (base["mode"], base["config_id"]) not in seen:
            seen.add((base["mode"], base["config_id"]))
            out.append(base | {"label": base["config_id"], "status": "verification failed",
                               "reason": verification_label(row)})
    return out


MACHINE_KEYS = ("hostname", "hosts", "devices_per_node", "cpu_model", "cpu_cores", "device_type",
                "device_name", "gpu_memory_gib", "gpu_topology", "network_interface", "backend",
                "torch_version", "python_version", "parallab_version", "git_rev")


def machine_info(rows: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, value) per machine/version key; several distinct values are joined with ' / '."""
    rows = list(rows)
    out = []
    for key in MACHINE_KEYS:
        # hosts (one per node) as "a, b": a sweep over nodes shows "a / a, b" (one node, two).
        values = sorted({", ".join(map(str, r[key])) if isinstance(r[key], list) else str(r[key])
                         for r in rows if r.get(key) is not None})
        out.append((key, " / ".join(values) if values else DASH))
    return out


MATCH_NOTE = ("Configurations are matched by (mode, config id), inference rows also by workload "
              "and batch size; B/A above 1 means B has more throughput or uses more memory.")


def match_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """How two sweeps' rows are paired: (mode, config_id), plus the inference workload and batch
    size where a row has them (an inference sweep writes one row per workload and batch size)."""
    return (mode_of(row), text(row.get("config_id")), text(row.get("workload")),
            text(row.get("batch_size")))


def match_label(row: dict[str, Any]) -> str:
    extra = [str(row[k]) if k == "workload" else f"batch {row[k]}"
             for k in ("workload", "batch_size") if row.get(k) is not None]
    return text(row.get("config_id")) + (f" ({', '.join(extra)})" if extra else "")


def compare_table(rows_a: Iterable[dict[str, Any]], rows_b: Iterable[dict[str, Any]],
                  label_a: str, label_b: str) -> Table:
    """Configurations matched by ``match_key``: samples/s and peak memory of A and B and the
    ratio B/A. A configuration present on one side only gets dashes on the other."""
    a = {match_key(r): r for r in rows_a}
    b = {match_key(r): r for r in rows_b}
    keys = sorted(set(a) | set(b), key=lambda k: (row_sort_key(a.get(k) or b[k]), k))
    table = Table(columns=["config", "mode", "devices", f"samples/s {label_a}",
                           f"samples/s {label_b}", "samples/s B/A",
                           f"peak MiB {label_a}", f"peak MiB {label_b}", "peak mem B/A",
                           f"status {label_a}", f"status {label_b}"],
                  numeric=[False, False, True, True, True, True, True, True, True, False, False])
    for key in keys:
        ra, rb = a.get(key, {}), b.get(key, {})
        ref = ra or rb

        def ratio(k, ra=ra, rb=rb):
            x, y = num(ra.get(k)), num(rb.get(k))
            return None if x in (None, 0.0) or y is None else y / x
        over = is_oversubscribed(ra) or is_oversubscribed(rb)
        cid = match_label(ref) + (f" {DAGGER}" if over else "")
        sa, sb = ra.get("samples_per_s"), rb.get("samples_per_s")
        ma, mb = ra.get("peak_mem_bytes"), rb.get("peak_mem_bytes")
        table.cells.append([cid, key[0], text(ref.get("devices")), fmt_num(sa), fmt_num(sb),
                            fmt_x(ratio("samples_per_s")), fmt_mib(ma), fmt_mib(mb),
                            fmt_x(ratio("peak_mem_bytes")),
                            text(ra.get("status")) if ra else "absent",
                            text(rb.get("status")) if rb else "absent"])
        table.values.append([match_label(ref), key[0], num(ref.get("devices")), num(sa), num(sb),
                             ratio("samples_per_s"), num(ma), num(mb), ratio("peak_mem_bytes"),
                             text(ra.get("status")), text(rb.get("status"))])
        table.oversubscribed.append(over)
        table.failed.append(not (is_ok(ra) and is_ok(rb)))
    return table


def compare_summary(rows_a, rows_b, label_a: str, label_b: str) -> str:
    """Geometric mean of the samples/s ratio B/A over rows matched by ``match_key``, ok on both
    sides and not oversubscribed on either; one per mode where the sweeps have several."""
    rows_a, rows_b = list(rows_a), list(rows_b)
    a = {match_key(r): r for r in rows_a}
    modes = modes_of(rows_a + rows_b)
    parts = []
    for mode in modes:
        ratios = []
        for rb in rows_b:
            ra = a.get(match_key(rb))
            if mode_of(rb) == mode and ra and is_ok(ra) and is_ok(rb) \
                    and not (is_oversubscribed(ra) or is_oversubscribed(rb)):
                x, y = num(ra.get("samples_per_s")), num(rb.get("samples_per_s"))
                if x and y:
                    ratios.append(y / x)
        prefix = f"{mode_title(mode)}: " if len(modes) > 1 else ""
        if not ratios:
            parts.append(f"{prefix}no configuration ran ok, without oversubscription, in both "
                         f"{label_a} and {label_b}.")
            continue
        gmean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        what = "matched configuration(s)" if mode != "infer" else \
            "matched (configuration, workload, batch) point(s)"
        parts.append(f"{prefix}samples/s {label_b} / {label_a}: geometric mean {gmean:.2f}x over "
                     f"{len(ratios)} {what} (range {min(ratios):.2f}x to {max(ratios):.2f}x).")
    if not any("geometric" in part for part in parts):
        return f"No configuration ran ok, without oversubscription, in both {label_a} and {label_b}."
    return " ".join(parts) + " Two separate runs: the ratios include machine noise."


def write_compare_markdown(rows_a: Iterable[dict[str, Any]], rows_b: Iterable[dict[str, Any]],
                           label_a: str, label_b: str, out_dir: str | Path, *,
                           plots: list[Path] | None = None) -> Path:
    """compare.md in ``out_dir``: rows matched by ``match_key``, A, B and B/A for
    samples/s and peak memory, and the overlaid throughput plot (made here if not given)."""
    rows_a, rows_b = with_scaling(rows_a), with_scaling(rows_b)
    out_dir = Path(out_dir)
    if plots is None:
        from .plots import write_compare_plot
        plots = write_compare_plot(rows_a, rows_b, label_a, label_b, out_dir / "plots")
    table = compare_table(rows_a, rows_b, label_a, label_b)
    lines = [f"# parallab comparison: A = {md_escape(label_a)}, B = {md_escape(label_b)}", "",
             md_escape(compare_summary(rows_a, rows_b, label_a, label_b)), "",
             f"A: run {md_escape(run_ids(rows_a))}; B: run {md_escape(run_ids(rows_b))}. "
             f"{MATCH_NOTE}", ""]
    lines += md_table(table) + [""]
    if any(table.oversubscribed):
        lines += [md_escape(OVERSUBSCRIBED_NOTE), ""]
    lines += plot_links(plots, out_dir)
    return write_text(out_dir / "compare.md", "\n".join(lines))
