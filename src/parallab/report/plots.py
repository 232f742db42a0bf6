"""Result rows -> PNG plots (matplotlib, Agg canvas; no pyplot, so no global backend switch and
no window ever opens).

One set of plots per mode (train, or any other mode string found): throughput against devices
with the ideal line, speedup and efficiency, and memory per device. Each strategy is drawn at its
best configuration per device count (the same choice as the headline). Oversubscribed points are
hollow and say so in the legend. Failed rows (no metrics) are simply not drawn. Inference rows
(one per workload and batch size) get their own plots: ``infer_plots.py``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any, Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, NullLocator

from parallab.bench.result import baseline_of

from .infer import infer_description, is_infer
from .tables import (DAGGER, MIB, best_per_strategy, fixed_description, is_ok, is_oversubscribed,
                     mode_of, modes_of, num, strategy_label, text, with_scaling)

DPI = 110
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#7f7f7f")
_LABEL_ORDER = ("single", "ddp", "replicas", "fsdp", "pipeline", "naive split", "tp")
_OVER_NOTE = f"hollow, faded / {DAGGER}:\noversubscribed (not a claim)"
MEM_PARTS = (("parameters", "mem_params_bytes", "#4c72b0"), ("gradients", "mem_grads_bytes", "#dd8452"),
             ("optimizer state", "mem_optim_bytes", "#55a868"),
             ("activations", "mem_activations_bytes", "#c44e52"))


def _t(s: Any) -> str:
    """Row text made safe for matplotlib: '$' would start mathtext (and can fail to parse),
    a leading '_' hides a legend entry."""
    s = str(s).replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _label_key(label: str) -> tuple:
    head = next((i for i, p in enumerate(_LABEL_ORDER) if label.startswith(p)), len(_LABEL_ORDER))
    return head, label


def _colors(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    labels = sorted({strategy_label(r) for r in rows}, key=_label_key)
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(labels)}


def _slug(mode: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", mode).strip("-")[:40] or "mode"
    base, i = slug, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def _figure(width: float = 9.5, height: float = 4.8, ncols: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _title(fig: Figure, what: str, fixed: str) -> None:
    fig.suptitle(_t(what) + "\n" + "\n".join(textwrap.wrap(_t(fixed), 95)), fontsize=10)


def _device_axis(ax, counts: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(counts))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(c) for c in counts])
    ax.set_xlabel("devices N (log scale)")
    ax.grid(True, alpha=0.3)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _series(rows, mode, key):
    """strategy label -> [(devices, value, oversubscribed, own point)] from the best row per
    device count. Every strategy's line starts at the 1-device run (drawn as 'single' only), so
    the slope from it reads as scaling."""
    out: dict[str, list[tuple[int, float, bool, bool]]] = {}
    for (label, n), row in sorted(best_per_strategy(rows, mode).items(),
                                  key=lambda kv: (_label_key(kv[0][0]), kv[0][1])):
        value = num(row.get(key))
        if value is not None:
            out.setdefault(label, []).append((n, value, is_oversubscribed(row), True))
    base = baseline_of(rows, mode)
    start = None if base is None else num(base.get(key))
    if start is not None:
        for label, pts in out.items():
            if pts[0][0] > 1:
                pts.insert(0, (1, start, False, False))
    return out


def _draw_series(ax, series, colors, *, scale=1.0, linestyle="-", marker="o") -> bool:
    """Lines between points (faded into oversubscribed ones), filled or hollow markers.
    Returns whether any point was oversubscribed."""
    any_over = False
    for label, pts in series.items():
        color = colors.get(label, "#333333")
        for (n0, v0, o0, _), (n1, v1, o1, _) in zip(pts, pts[1:]):
            ax.plot([n0, n1], [v0 * scale, v1 * scale], color=color, linestyle=linestyle,
                    linewidth=1.6, alpha=0.35 if (o0 or o1) else 1.0)
        for n, v, over, own in pts:
            if not own:
                continue
            any_over |= over
            ax.plot([n], [v * scale], marker=marker, markersize=7, linestyle="none",
                    markeredgecolor=color, markeredgewidth=1.6,
                    markerfacecolor="none" if over else color)
    return any_over


def _legend(ax, labels, colors, extra=(), over=False, marker="o") -> None:
    handles = [Line2D([], [], color=colors.get(lb, "#333333"), marker=marker, label=_t(lb))
               for lb in labels]
    handles += list(extra)
    if over:
        handles.append(Line2D([], [], color="#555555", marker=marker, markerfacecolor="none",
                              alpha=0.6, label=_OVER_NOTE))
    # Outside the axes, on the right: a legend never hides a point.
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0)


def _counts(rows, mode) -> list[int]:
    counts = {int(num(r["devices"])) for r in rows
              if mode_of(r) == mode and is_ok(r) and num(r.get("devices"))}
    return sorted(counts | {1})


def _plot_throughput(rows, mode, colors, path: Path) -> Path | None:
    series = _series(rows, mode, "samples_per_s")
    if not series:
        return None
    fig, (ax,) = _figure()
    counts = _counts(rows, mode)
    over = _draw_series(ax, series, colors)
    extra = []
    base = baseline_of(rows, mode)
    if base is not None and num(base.get("samples_per_s")):
        x1 = num(base["samples_per_s"])
        ax.plot(counts, [x1 * n for n in counts], "--", color="#888888", linewidth=1.2)
        extra.append(Line2D([], [], color="#888888", linestyle="--",
                            label="ideal linear: N x 1-device throughput"))
    ax.set_ylabel("throughput (samples/s, global)")
    ax.set_ylim(bottom=0)
    _device_axis(ax, counts)
    _legend(ax, list(series), colors, extra, over)
    _title(fig, "Throughput vs devices (best configuration per strategy at each N)",
           fixed_description(rows, mode))
    return _save(fig, path)


def _plot_scaling(rows, mode, colors, path: Path) -> Path | None:
    speed = _series(rows, mode, "speedup")
    eff = _series(rows, mode, "efficiency")
    if not speed:
        return None
    fig, (ax_s, ax_e) = _figure(13.0, 4.8, ncols=2)
    counts = _counts(rows, mode)
    over = _draw_series(ax_s, speed, colors)
    _draw_series(ax_e, eff, colors, scale=100.0)
    ax_s.plot(counts, counts, "--", color="#888888", linewidth=1.2)
    ax_e.axhline(100.0, linestyle="--", color="#888888", linewidth=1.2)
    ideal = Line2D([], [], color="#888888", linestyle="--", label="ideal (linear)")
    ax_s.set_ylabel("speedup S(N) = X_N / X_1 (x)")
    ax_e.set_ylabel("efficiency E (% of ideal)")
    ax_s.set_title("speedup", fontsize=10)
    ax_e.set_title("efficiency", fontsize=10)
    ax_s.set_ylim(bottom=0)
    ax_e.set_ylim(0, max(110.0, 10 + max((p[1] * 100 for pts in eff.values() for p in pts),
                                         default=0)))
    for ax in (ax_s, ax_e):
        _device_axis(ax, counts)
    _legend(ax_e, list(speed), colors, [ideal], over)
    _title(fig, "Speedup and efficiency against the 1-device run",
           fixed_description(rows, mode))
    return _save(fig, path)


def _plot_memory(rows, mode, path: Path) -> Path | None:
    mrows = [r for r in rows if mode_of(r) == mode and is_ok(r)
             and (num(r.get("peak_mem_bytes")) is not None
                  or any(num(r.get(k)) is not None for _, k, _ in MEM_PARTS))]
    if not mrows:
        return None
    parts = [p for p in MEM_PARTS if any(num(r.get(p[1])) is not None for r in mrows)]
    fig, (ax,) = _figure(max(8.5, 1.1 * len(mrows) + 3.0), 5.2)
    xs = list(range(len(mrows)))
    handles = []
    bottoms = [0.0] * len(mrows)
    for name, key, color in parts:
        heights = [(num(r.get(key)) or 0.0) / MIB for r in mrows]
        ax.bar(xs, heights, bottom=bottoms, color=color, width=0.65)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
        handles.append(Patch(color=color, label=name))
    peaks = [num(r.get("peak_mem_bytes")) for r in mrows]
    rest = [max(0.0, p / MIB - b) if p is not None else 0.0 for p, b in zip(peaks, bottoms)]
    if any(rest):
        ax.bar(xs, rest, bottom=bottoms, color="#bbbbbb", width=0.65)
        handles.append(Patch(color="#bbbbbb", label="peak" if not parts else "other / unattributed"))
    px = [(x, p / MIB) for x, p in zip(xs, peaks) if p is not None]
    if px:
        ax.plot([x for x, _ in px], [p for _, p in px], linestyle="none", marker="_",
                markersize=22, markeredgewidth=2.2, color="black")
        handles.append(Line2D([], [], linestyle="none", marker="_", markersize=12,
                              markeredgewidth=2.2, color="black", label="peak (measured)"))
    top = max(max(bottoms[i] + rest[i] for i in xs), max((p for _, p in px), default=0.0))
    budgets = sorted({num(r.get("device_memory_budget_bytes")) for r in mrows} - {None})
    for budget in budgets:
        if budget / MIB <= 3 * top:
            ax.axhline(budget / MIB, color="#d62728", linestyle="--", linewidth=1.2)
            handles.append(Line2D([], [], color="#d62728", linestyle="--",
                                  label=f"per-device budget ({budget / MIB:,.0f} MiB)"))
        else:
            handles.append(Line2D([], [], color="none",
                                  label=f"budget {budget / MIB:,.0f} MiB (off scale)"))
    labels = [_t(text(r.get("config_id"))) + (f" {DAGGER}" if is_oversubscribed(r) else "")
              + f"\n{text(r.get('devices'))} dev" for r in mrows]
    ax.set_xticks(xs)
    tilt = len(mrows) > 8 or max(len(lb.split("\n")[0]) for lb in labels) > 20
    ax.set_xticklabels(labels, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                       fontsize=8)
    ax.set_xlabel("configuration (devices)")
    ax.set_ylabel("memory per device (MiB, max over ranks)")
    ax.grid(True, axis="y", alpha=0.3)
    if any(is_oversubscribed(r) for r in mrows):
        handles.append(Line2D([], [], color="none",
                              label=f"{DAGGER} oversubscribed (memory still valid)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)  # outside the axes: never over a bar
    _title(fig, "Peak memory per device", fixed_description(rows, mode))
    return _save(fig, path)


def write_plots(rows: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Throughput, speedup/efficiency and memory PNGs per mode into ``out_dir`` (inference:
    ``infer_plots.write_infer_plots``); returns the paths written (plots with nothing to draw are
    skipped)."""
    from .infer_plots import write_infer_plots

    rows = with_scaling(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = _colors([r for r in rows if not is_infer(r)])
    written: list[Path] = []
    taken: set[str] = set()
    for mode in modes_of(rows):
        slug = _slug(mode, taken)
        if mode == "infer":
            written += write_infer_plots(rows, out_dir, slug, _colors(r for r in rows if is_infer(r)))
            continue
        for path in (_plot_throughput(rows, mode, colors, out_dir / f"{slug}_throughput.png"),
                     _plot_scaling(rows, mode, colors, out_dir / f"{slug}_scaling.png"),
                     _plot_memory(rows, mode, out_dir / f"{slug}_memory.png")):
            if path is not None:
                written.append(path)
    return written


def write_compare_plot(rows_a: Iterable[dict[str, Any]], rows_b: Iterable[dict[str, Any]],
                       label_a: str, label_b: str, out_dir: str | Path) -> list[Path]:
    """Throughput vs devices of two sweeps overlaid, per mode: A solid, B dashed. Inference:
    the forward workload at its largest batch size (both sweeps' rows at that batch)."""
    rows_a, rows_b = with_scaling(rows_a), with_scaling(rows_b)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, taken = [], set()
    for mode in modes_of(rows_a + rows_b):
        ma, mb = ([r for r in rows if mode_of(r) == mode] for rows in (rows_a, rows_b))
        # The colours of the sweep reports: one set for inference, one for the other modes.
        colors = _colors(r for r in rows_a + rows_b if is_infer(r) == (mode == "infer"))
        fixed_a, fixed_b = fixed_description(ma, mode), fixed_description(mb, mode)
        what = "Throughput vs devices"
        if mode == "infer":
            ma, mb, batch = _forward_at_largest_batch(ma, mb)
            fixed_a, fixed_b = infer_description(ma, "forward"), infer_description(mb, "forward")
            what = f"Forward throughput at batch {batch} vs devices"
        sa, sb = _series(ma, mode, "samples_per_s"), _series(mb, mode, "samples_per_s")
        if not (sa or sb):
            continue
        fig, (ax,) = _figure()
        over = _draw_series(ax, sa, colors, linestyle="-", marker="o")
        over |= _draw_series(ax, sb, colors, linestyle="--", marker="s")
        labels = sorted(set(sa) | set(sb), key=_label_key)
        extra = [Line2D([], [], color="#333333", linestyle="-", marker="o", label=f"A: {_t(label_a)}"),
                 Line2D([], [], color="#333333", linestyle="--", marker="s", label=f"B: {_t(label_b)}")]
        ax.set_ylabel("throughput (samples/s, global)")
        ax.set_ylim(bottom=0)
        _device_axis(ax, sorted(set(_counts(ma, mode)) | set(_counts(mb, mode))))
        _legend(ax, labels, colors, extra, over)
        _title(fig, f"{what}: A ({label_a}, solid) vs B ({label_b}, dashed)",
               _same_or_both(fixed_a, fixed_b))
        written.append(_save(fig, out_dir / f"compare_{_slug(mode, taken)}_throughput.png"))
    return written


def _forward_at_largest_batch(rows_a: list, rows_b: list) -> tuple[list, list, int | None]:
    """Both sweeps' forward rows at the largest batch size that ran ok in either."""
    batches = {num(r.get("batch_size")) for r in rows_a + rows_b
               if r.get("workload") == "forward" and is_ok(r)} - {None}
    batch = max(batches) if batches else None

    def pick(rows):
        return [r for r in rows if r.get("workload") == "forward" and num(r.get("batch_size")) == batch]
    return pick(rows_a), pick(rows_b), None if batch is None else int(batch)


def _same_or_both(a: str, b: str) -> str:
    return a if a == b else f"A: {a}; B: {b}"
