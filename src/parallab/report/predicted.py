"""Predicted against measured: the planner's step time and peak memory (plan/predict.py, filled
in when each training row is appended) beside what the run measured, with the error."""

from __future__ import annotations

from typing import Any, Iterable

from parallab.report.tables import (DAGGER, Table, fmt_mib, fmt_ms, fmt_pct, is_oversubscribed, mode_of,
                                    num, sorted_rows, text)

NOTE = ("Error = predicted / measured - 1. Targets on a 2-core CPU: peak memory within 10%, step "
        "time within 20%; step time is the noisier of the two on a shared machine.")


def prediction_table(rows: Iterable[dict[str, Any]]) -> Table | None:
    """One line per training row that has a prediction; None when no row has one."""
    rows = [r for r in sorted_rows(rows) if mode_of(r) == "train" and r.get("status") == "ok"
            and (r.get("pred_step_time_s") is not None or r.get("pred_peak_mem_bytes") is not None)]
    if not rows:
        return None
    table = Table(columns=["config", "devices", "step measured ms", "step predicted ms", "step error",
                           "peak measured MiB", "peak predicted MiB", "peak error"],
                  numeric=[False] + [True] * 7)
    for r in rows:
        keys = ("step_time_median_s", "pred_step_time_s", "pred_step_time_err",
                "peak_mem_bytes", "pred_peak_mem_bytes", "pred_peak_mem_err")
        cells = [text(r.get("config_id")) + (f" {DAGGER}" if is_oversubscribed(r) else ""), text(r.get("devices")),
                 fmt_ms(r.get(keys[0])), fmt_ms(r.get(keys[1])), fmt_pct(r.get(keys[2])),
                 fmt_mib(r.get(keys[3])), fmt_mib(r.get(keys[4])), fmt_pct(r.get(keys[5]))]
        table.cells.append(cells)
        table.values.append([text(r.get("config_id")), num(r.get("devices"))] + [num(r.get(k)) for k in keys])
        table.oversubscribed.append(is_oversubscribed(r))
        table.failed.append(False)
    return table
