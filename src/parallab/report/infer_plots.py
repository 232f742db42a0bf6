"""Inference rows -> PNG plots (matplotlib Agg canvas, no pyplot), written by ``plots.write_plots``.

- ``infer_batch-throughput.png``: forward samples/s against batch size, one line per (strategy,
  device count), the best configuration of each at each batch size.
- ``infer_generate-latency.png``: for the generate workload, latency per request (p50/p90/p99),
  TTFT and TPOT, and output tokens/s against device count, per strategy.
- ``infer_max-batch.png``: the largest batch that fits the memory budget per strategy and device
  count (grouped bars), only when a budget was set.

Oversubscribed points are hollow and faded; rows that did not run ok (``does_not_fit``, failed:
no metrics) are not drawn as measurements (forward: an x at the bottom marks a batch that did not
fit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

from .infer import GE, infer_description, is_infer
from .plots import _OVER_NOTE, _device_axis, _figure, _label_key, _save, _t, _title
from .tables import best_per_strategy, is_ok, is_oversubscribed, num, references, strategy_label

_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"))
_PERCENTILES = (("p50", "latency_p50_s", "-", "o"), ("p90", "latency_p90_s", "--", "s"),
                ("p99", "latency_p99_s", ":", "^"))
_FLOOR = 0.5  # bottom of the max-batch axis (log2): below batch 1
_BAR_COLORS = ("#9ecae1", "#4292c6", "#08519c", "#08306b", "#6a51a3", "#54278f")


class _MinorPlain(LogFormatter):
    """Minor tick labels of a log axis as plain numbers (300, 0.3), only where matplotlib's log
    formatter would label them at all (an axis spanning about a decade or less)."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:,.0f}" if x >= 10 else f"{x:g}"


def _int(value: Any) -> int | None:
    x = num(value)
    return None if x is None else int(x)


def _legend(ax, handles: list, over: bool = False) -> None:
    if over:
        handles = handles + [Line2D([], [], color="#555555", marker="o", markerfacecolor="none",
                                    alpha=0.6, label=_OVER_NOTE)]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              borderaxespad=0.0)  # outside the axes: a legend never hides a point


def _line(ax, pts, color, linestyle, marker, scale=1.0) -> bool:
    """pts = [(x, y, oversubscribed, own point)]: segments faded into oversubscribed points,
    hollow markers there; a point not its own (the shared 1-device start) gets no marker."""
    for (x0, y0, o0, _), (x1, y1, o1, _) in zip(pts, pts[1:]):
        ax.plot([x0, x1], [y0 * scale, y1 * scale], color=color, linestyle=linestyle,
                linewidth=1.5, alpha=0.35 if (o0 or o1) else 1.0)
    over = False
    for x, y, o, own in pts:
        if own:
            over |= o
            ax.plot([x], [y * scale], marker=marker, markersize=6.5, linestyle="none",
                    markeredgecolor=color, markeredgewidth=1.5, markerfacecolor="none" if o else color)
    return over


def _batch_throughput(rows, colors, path: Path) -> Path | None:
    fwd = [r for r in rows if r.get("workload") == "forward" and _int(r.get("batch_size"))]
    batches = sorted({_int(r["batch_size"]) for r in fwd})
    lines: dict[tuple[str, int], list] = {}
    for b in batches:
        best = best_per_strategy([r for r in fwd if _int(r["batch_size"]) == b], "infer")
        for key, row in best.items():
            lines.setdefault(key, []).append((b, num(row["samples_per_s"]), is_oversubscribed(row), True))
    if not lines:
        return None
    missing = sorted({(strategy_label(r), _int(r.get("devices")) or 0, _int(r["batch_size"]))
                      for r in fwd if r.get("status") == "does_not_fit"})
    counts = sorted({n for _, n in lines} | {n for _, n, _ in missing})
    style = {n: _STYLES[i % len(_STYLES)] for i, n in enumerate(counts)}
    fig, (ax,) = _figure()
    over, handles = False, []
    for (label, n) in sorted(lines, key=lambda k: (_label_key(k[0]), k[1])):
        ls, marker = style[n]
        color = colors.get(label, "#333333")
        over |= _line(ax, lines[(label, n)], color, ls, marker)
        handles.append(Line2D([], [], color=color, linestyle=ls, marker=marker,
                              label=f"{_t(label)}, {n} device{'' if n == 1 else 's'}"))
    for label, n, b in missing:  # x on the x axis: this batch did not fit the budget
        ax.plot([b], [0.0], transform=ax.get_xaxis_transform(), marker="X", markersize=9,
                linestyle="none", color=colors.get(label, "#333333"), clip_on=False, zorder=5)
    if missing:
        handles.append(Line2D([], [], color="#555555", marker="X", linestyle="none",
                              label="X on the batch axis: did not fit\nthe memory budget (not measured)"))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batches))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlim(batches[0] / 1.4, batches[-1] * 1.4)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    ax.yaxis.set_major_formatter(plain)  # 600, not 6 x 10^2; minor labels when few decades
    ax.yaxis.set_minor_formatter(_MinorPlain(labelOnlyBase=False, minor_thresholds=(1.2, 0.6)))
    ax.set_xlabel("batch size (sequences per forward pass, log scale)")
    ax.set_ylabel("throughput (samples/s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, handles, over)
    _title(fig, "Forward throughput vs batch size (best configuration per strategy and device "
                "count)", infer_description(rows, "forward"))
    return _save(fig, path)


def _generate_rows(rows) -> list[dict[str, Any]]:
    """The generate rows of one workload point: the (batch, prompt, new tokens) with the most ok
    rows (a sweep has one; merged results may have several)."""
    gen = [r for r in rows if r.get("workload") == "generate"]
    points: dict[tuple, int] = {}
    for r in gen:
        key = (_int(r.get("batch_size")) or 0, _int(r.get("prompt_len")) or 0,
               _int(r.get("new_tokens")) or 0)
        points[key] = points.get(key, 0) + is_ok(r)
    if not points:
        return []
    point = max(sorted(points), key=lambda k: points[k])
    return [r for r in gen if (_int(r.get("batch_size")) or 0, _int(r.get("prompt_len")) or 0,
                               _int(r.get("new_tokens")) or 0) == point]


def _generate_latency(rows, colors, path: Path) -> Path | None:
    gen = _generate_rows(rows)
    best = best_per_strategy(gen, "infer")
    if not best:
        return None
    ref = next(iter(references(gen).values()), None)
    labels = sorted({label for label, _ in best}, key=_label_key)
    counts = sorted({n for _, n in best} | {1})

    def series(label: str, key: str) -> list:
        pts = [(n, num(row.get(key)), is_oversubscribed(row), True)
               for (lb, n), row in sorted(best.items(), key=lambda kv: kv[0][1])
               if lb == label and num(row.get(key)) is not None]
        start = None if ref is None else num(ref.get(key))
        if pts and pts[0][0] > 1 and start is not None:  # every line starts at the 1-device run
            pts.insert(0, (1, start, False, False))
        return pts

    fig, (ax_l, ax_t, ax_x) = _figure(15.5, 5.0, ncols=3)
    over = False
    for label in labels:
        color = colors.get(label, "#333333")
        for _, key, ls, marker in _PERCENTILES:
            over |= _line(ax_l, series(label, key), color, ls, marker, scale=1e3)
        over |= _line(ax_t, series(label, "ttft_s"), color, "-.", "D", scale=1e3)
        over |= _line(ax_t, series(label, "tpot_s"), color, "-", "o", scale=1e3)
        over |= _line(ax_x, series(label, "output_tokens_per_s"), color, "-", "o")
    ax_l.set_ylabel("latency per request, end to end (ms)")
    ax_t.set_ylabel("TTFT and TPOT (ms, median over requests)")
    ax_x.set_ylabel("output tokens/s (generated tokens, all devices)")
    ax_l.set_title("request latency: p50, p90, p99", fontsize=10)
    ax_t.set_title("TTFT (prefill + 1st token), TPOT (per next token)", fontsize=10)
    ax_x.set_title("output throughput", fontsize=10)
    for ax in (ax_l, ax_t, ax_x):
        ax.set_ylim(bottom=0)
        _device_axis(ax, counts)
    handles = [Line2D([], [], color=colors.get(lb, "#333333"), linewidth=3, label=_t(lb))
               for lb in labels]
    handles += [Line2D([], [], color="#555555", linestyle=ls, marker=m, label=f"{name} (left)")
                for name, _, ls, m in _PERCENTILES]
    handles += [Line2D([], [], color="#555555", linestyle="-.", marker="D", label="TTFT (middle)"),
                Line2D([], [], color="#555555", linestyle="-", marker="o", label="TPOT (middle)")]
    _legend(ax_x, handles, over)
    _title(fig, "Generation vs devices (best configuration per strategy at each N; lines start at "
                "the 1-device run)", infer_description(gen, "generate"))
    return _save(fig, path)


def _max_batch(rows, path: Path) -> Path | None:
    fits = [r for r in rows if num(r.get("max_batch_fit")) is not None
            and r.get("workload") in ("forward", "generate")]
    if not fits or not any(num(r.get("device_memory_budget_bytes")) for r in rows):
        return None
    workloads = [w for w in ("forward", "generate") if any(r["workload"] == w for r in fits)]
    counts = sorted({_int(r.get("devices")) or 0 for r in fits})
    color = {n: _BAR_COLORS[i % len(_BAR_COLORS)] for i, n in enumerate(counts)}
    fig, axes = _figure(max(9.0, 5.0 * len(workloads) + 2.5), 4.8, ncols=len(workloads))
    top = 0.0
    for ax, workload in zip(axes, workloads):
        best: dict[tuple[str, int], tuple[float, bool]] = {}
        for r in fits:
            if r["workload"] != workload:
                continue
            key = (strategy_label(r), _int(r.get("devices")) or 0)
            value = (num(r["max_batch_fit"]), r.get("max_batch_fit_bound") not in (None, "exact"))
            best[key] = max(best.get(key, value), value)
        labels = sorted({lb for lb, _ in best}, key=_label_key)
        width = 0.8 / max(1, max(sum(1 for k in best if k[0] == lb) for lb in labels))
        for i, label in enumerate(labels):
            ns = sorted(n for lb, n in best if lb == label)
            for j, n in enumerate(ns):
                value, lower = best[(label, n)]
                x = i + (j - (len(ns) - 1) / 2) * width
                # log2 axis from 1/2: a bar of 0 (nothing fits) has no height, only its label
                ax.bar([x], [max(value, _FLOOR) - _FLOOR], bottom=_FLOOR, width=width * 0.92,
                       color=color[n], edgecolor="#222222", linewidth=0.6,
                       hatch="//" if lower else None)
                ax.annotate(f"{GE if lower else ''}{value:.0f}", (x, max(value, _FLOOR)),
                            textcoords="offset points", xytext=(0, 2), ha="center", va="bottom",
                            fontsize=8)
                top = max(top, value)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([_t(lb) for lb in labels])
        ax.set_xlabel("strategy")
        ax.set_ylabel("largest batch within the budget (sequences, log scale)")
        ax.set_title(_what([r for r in fits if r["workload"] == workload], workload), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    ticks = [2 ** k for k in range(0, max(1, int(top)).bit_length() + 1)]
    for ax in axes:
        ax.set_yscale("log", base=2)
        ax.set_ylim(_FLOOR, max(2.0, top) * 2.2)  # room for the labels above the bars
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    handles = [Patch(facecolor=color[n], edgecolor="#222222", label=f"{n} device{'' if n == 1 else 's'}")
               for n in counts]
    handles.append(Patch(facecolor="white", edgecolor="#222222", hatch="//",
                         label=f"{GE}: lower bound (the search\nstopped at its limit)"))
    _legend(axes[-1], handles)
    _title(fig, "Largest batch that fits the per-device memory budget (best configuration per "
                "strategy; 0: not even the weights fit)", infer_description(rows))
    return _save(fig, path)


def _what(rows, workload: str) -> str:
    if workload == "generate":
        r = rows[0]
        return _t(f"generate ({r.get('prompt_len')}+{r.get('new_tokens')} tokens per sequence)")
    lengths = sorted({_int(r.get("seq_len")) for r in rows} - {None})
    return f"forward (seq {', '.join(map(str, lengths)) or '?'})"


def write_infer_plots(rows: list[dict[str, Any]], out_dir: Path, slug: str,
                      colors: dict[str, str]) -> list[Path]:
    """The inference plots of ``rows`` (already with speedups, see ``tables.with_scaling``)."""
    rows = [r for r in rows if is_infer(r)]
    written = [_batch_throughput(rows, colors, out_dir / f"{slug}_batch-throughput.png"),
               _generate_latency(rows, colors, out_dir / f"{slug}_generate-latency.png"),
               _max_batch(rows, out_dir / f"{slug}_max-batch.png")]
    return [p for p in written if p is not None]
