"""The console summary of a sweep (rich): headline, the training table and the inference table.

Oversubscribed rows are marked with a dagger and dimmed; the footnote explains them. Every row
string goes into a ``Text`` (never markup), so '[bold]' in a config id prints as it is.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from .infer import infer_table, is_infer
from .tables import (DASH, OVERSUBSCRIBED_NOTE, Table, headline, scaling_statement,
                     summary_table, with_scaling)

_CONSOLE_TITLES = {"schedule, micro-batches m": "schedule", "devices": "N", "samples/s": "samples/s",
                   "step median (ms)": "step ms", "step p90 (ms)": "p90 ms", "efficiency": "eff.",
                   "peak mem / device (MiB)": "MiB/dev", "verification": "verified",
                   "latency p50 (ms)": "p50 ms", "p90 (ms)": "p90 ms", "p99 (ms)": "p99 ms",
                   "TTFT (ms)": "TTFT ms", "TPOT (ms)": "TPOT ms", "max batch in budget": "max batch",
                   "tokens/s (generate: output)": "tokens/s"}
_FIT = {"status", "workload"}  # kept on one line; config ids may fold, numbers never do


def print_summary(rows: Iterable[dict[str, Any]], console: Any = None) -> None:
    """Headline and summary table on the console (rich). Oversubscribed rows are marked with a
    dagger and dimmed; the footnote explains them."""
    from rich.console import Console
    from rich.text import Text

    rows = with_scaling(rows)
    console = console or Console()
    narrow, tiny = console.width < 150, console.width < 110
    for sentence in headline(rows):
        console.print(Text(sentence))  # Text, not markup: row strings may contain '[...]'
    train = [r for r in rows if not is_infer(r)]
    infer = [r for r in rows if is_infer(r)]
    over = False
    if train or not infer:
        console.print(Text(scaling_statement(train)))
        table = summary_table(train)
        # Short headers, and on a narrow terminal fewer columns, so that the numbers stay on one line.
        drop = {"strategy", "tokens/s", "step p90 (ms)", "MFU"} if narrow else set()
        if tiny:  # the config id names the schedule; samples/s carries the step time
            drop |= {"schedule, micro-batches m", "step median (ms)"}
        over |= _print_table(console, table, drop, narrow)
    if infer:
        console.print(Text("Inference:"))
        # narrow: the config id names the strategy; p50 and TPOT stand for the latencies
        drop = {"strategy", "p90 (ms)", "p99 (ms)", "TTFT (ms)", "tokens/s (generate: output)",
                "peak mem / device (MiB)"} if narrow else set()
        if tiny:
            drop |= {"latency p50 (ms)", "max batch in budget"}
        table = infer_table(infer)
        # a column with nothing in it (no budget: max batch; no generate: TTFT, TPOT) is left out
        drop |= {c for i, c in enumerate(table.columns) if all(cells[i] == DASH for cells in table.cells)}
        over |= _print_table(console, table, drop, narrow)
    if over:
        console.print(Text(OVERSUBSCRIBED_NOTE))


def _short(label: str) -> str:
    """'pass (max rel 3e-7)' -> 'pass 3e-7', 'FAIL (max rel 0.02 > tol 1e-5, 3 token
    mismatches)' -> 'FAIL 0.02, 3 tokens' (no mismatches: nothing said about tokens)."""
    m = re.match(r"^(pass|FAIL) \(max rel ([^\s,]+)[^,]*(?:, (\d+) token mismatch(?:es)?)?\)$", label)
    if not m:
        return label
    return f"{m[1]} {m[2]}" + (f", {m[3]} tokens" if m[3] not in (None, "0") else "")


def _print_table(console: Any, table: Table, drop: set[str], narrow: bool) -> bool:
    """One table on the console; returns whether a row of it was oversubscribed."""
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    rich = RichTable(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    keep = [i for i, c in enumerate(table.columns) if c not in drop]
    for i in keep:
        rich.add_column(_CONSOLE_TITLES.get(table.columns[i], table.columns[i]),
                        justify="right" if table.numeric[i] else "left",
                        overflow="fold",  # numbers are never cropped, at worst wrapped
                        min_width=min(24, max((len(c[i]) for c in table.cells), default=1))
                        if table.numeric[i] or table.columns[i] in _FIT else None)
    for cells, over, failed in zip(table.cells, table.oversubscribed, table.failed):
        styled = [Text(_short(cells[i]) if narrow and table.columns[i] == "verification"
                       else cells[i]) for i in keep]
        for c in styled:
            if c.plain.startswith("FAIL"):
                c.stylize("bold red")
        if failed:
            styled[keep.index(table.columns.index("status"))].stylize("red")
        rich.add_row(*styled, style="dim italic" if over else None)
    console.print(rich)
    return any(table.oversubscribed)
