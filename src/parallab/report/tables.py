"""Result rows -> table data: pure functions, plus one rich renderer for the console.

Every function here takes the flat rows of ``bench/result.py`` and returns plain Python values
(strings, numbers, lists), so the markdown, HTML and console reports show the same numbers.
Strings that come from rows are returned raw: each writer escapes them for its own format.
No torch import (the report reads result files only).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from parallab.bench.result import add_scaling, baseline_of, scaling_key

MIB = 1024 ** 2
DASH = "—"
DAGGER = "†"
OVERSUBSCRIBED_NOTE = (
    f"{DAGGER} oversubscribed: more CPU devices (processes) than CPU cores, so ranks share cores "
    "and the timings measure contention, not the strategy. They are shown for completeness but "
    "left out of speedup claims, the headline and the scaling lines."
)
MODE_TITLES = {"train": "Training", "infer": "Inference"}
_MODE_ORDER = {"train": 0, "infer": 1}
_STRATEGY_ORDER = {"single": 0, "ddp": 1, "replicas": 1, "fsdp": 2, "pipeline": 3, "tp": 4}
_WORKLOAD_ORDER = {"forward": 0, "generate": 1}
_DTYPES = {"float32": "fp32", "torch.float32": "fp32", "bfloat16": "bf16",
           "torch.bfloat16": "bf16", "float16": "fp16", "torch.float16": "fp16"}


# ---------------------------------------------------------------- value helpers

def num(value: Any) -> float | None:
    """A finite number, or None (missing, text, bool, NaN: rows may come from any file)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def text(value: Any) -> str:
    """A row value as raw text (still to be escaped by the writer); None -> dash."""
    return DASH if value is None else str(value)


def is_ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok"


def is_oversubscribed(row: dict[str, Any]) -> bool:
    return bool(row.get("oversubscribed"))


def mode_of(row: dict[str, Any]) -> str:
    mode = row.get("mode")
    return "unknown" if mode is None else str(mode)


def mode_title(mode: str) -> str:
    return MODE_TITLES.get(mode, f"Mode {mode!r}")


def modes_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Modes present, train first, then infer, then any other in name order."""
    return sorted({mode_of(r) for r in rows}, key=lambda m: (_MODE_ORDER.get(m, 9), m))


def row_sort_key(row: dict[str, Any]) -> tuple:
    """A total, deterministic order: mode, devices, strategy, config id, then (inference) the
    workload, forward first, and the batch size."""
    devices = num(row.get("devices"))
    strategy = text(row.get("strategy"))
    workload, batch = text(row.get("workload")), num(row.get("batch_size"))
    return (_MODE_ORDER.get(mode_of(row), 9), mode_of(row),
            devices if devices is not None else math.inf,
            _STRATEGY_ORDER.get(strategy, 9), strategy, text(row.get("config_id")),
            _WORKLOAD_ORDER.get(workload, 9), workload, batch if batch is not None else math.inf)


def sorted_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=row_sort_key)


def references(rows: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """``scaling_key`` -> the first ok 1-device ``single`` row with that key: the reference of
    each mode (training), or of each workload and batch size (inference)."""
    ref: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row.get("strategy") == "single" and row.get("devices") == 1 and is_ok(row):
            ref.setdefault(scaling_key(row), row)
    return ref


def with_scaling(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the rows, sorted, with speedup/efficiency filled where missing, against the
    1-device ``single`` row of the same mode, workload and batch size (``scaling_key``)."""
    rows = sorted_rows(dict(r) for r in rows)
    ref = references(rows)
    for row in rows:
        if row.get("speedup") is None and num(row.get("devices")):
            add_scaling(row, ref.get(scaling_key(row)))
    return rows


# ---------------------------------------------------------------- formatting

def fmt_num(value: Any) -> str:
    """Throughput-style number: 3 significant digits below 100, thousands separators above."""
    return _fmt(value, lambda x: f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10
                else f"{x:.3g}")


def fmt_sci(value: Any) -> str:
    """Small relative errors: 2 significant digits, short exponent (3.2e-7)."""
    x = num(value)
    if x is None:
        return DASH
    if x == 0:
        return "0"
    s = f"{x:.2g}"
    if "e" in s:
        mantissa, exp = s.split("e")
        s = f"{mantissa}e{int(exp)}"
    return s


def _fmt(value: Any, fmt) -> str:
    x = num(value)
    return DASH if x is None else fmt(x)


def fmt_ms(seconds: Any) -> str:
    return _fmt(seconds, lambda x: f"{x * 1e3:.1f}")


def fmt_x(value: Any) -> str:
    return _fmt(value, lambda x: f"{x:.2f}x")


def fmt_pct(fraction: Any) -> str:
    return _fmt(fraction, lambda x: f"{x * 100:.0f}%")


def fmt_mib(nbytes: Any) -> str:
    return _fmt(nbytes, lambda x: f"{x / MIB:,.1f}")


def fmt_mfu(fraction: Any) -> str:
    """MFU is stored as a fraction; shown in percent."""
    return _fmt(fraction, lambda x: f"{x * 100:.2g}%")


def fmt_dtype(dtype: Any) -> str:
    return DASH if dtype is None else _DTYPES.get(str(dtype), str(dtype))


def _naive(row: dict[str, Any]) -> bool:
    if mode_of(row) == "infer":
        # An inference pipeline splits each batch into at most its configured micro-batches
        # (batch 1: one), so a row's own count does not name the configuration: its id does
        # ('infer-pipeline-naive-2', 'infer-pipeline-m4-2', infer/settings.infer_config_id).
        m = re.search(r"-(naive|m[0-9]+)-[0-9]+$", text(row.get("config_id")))
        if m:
            return m.group(1) in ("naive", "m1")
    return row.get("microbatches") == 1 or row.get("schedule") == "naive"


def strategy_label(row: dict[str, Any]) -> str:
    """What the headline calls a strategy: 'ddp', 'pipeline 1f1b', 'naive split' (a pipeline with
    one micro-batch is the plain layer split: one stage works at a time). Inference pipelines
    have one (forward-only) schedule: 'pipeline' or 'naive split'."""
    strategy = text(row.get("strategy"))
    schedule = row.get("schedule")
    if mode_of(row) == "infer":
        return ("naive split" if _naive(row) else "pipeline") if strategy == "pipeline" else strategy
    if strategy == "pipeline":
        if _naive(row):
            return "naive split"
        return "pipeline" if schedule is None else f"pipeline {schedule}"
    return strategy if schedule is None else f"{strategy} {schedule}"


def schedule_label(row: dict[str, Any]) -> str:
    if row.get("strategy") == "pipeline" and _naive(row):
        return "naive split"
    schedule, micro = row.get("schedule"), row.get("microbatches")
    if schedule is None:
        return DASH if micro in (None, 1) else f"m={micro}"
    return str(schedule) if micro is None else f"{schedule}, m={micro}"


def verification_label(row: dict[str, Any]) -> str:
    """'reference', 'pass (max rel 3e-7)', 'FAIL (max rel 0.02 > tol 1e-5)' or a dash."""
    status = row.get("verify_status")
    if status is None:
        return DASH
    rels = [x for x in (num(row.get(k)) for k in ("verify_max_loss_rel", "verify_max_weight_rel",
                                                  "verify_max_logits_rel")) if x is not None]
    detail = f"max rel {fmt_sci(max(rels))}" if rels else ""
    if status == "reference":
        return "reference"
    if status == "fail":
        tol = num(row.get("verify_tolerance"))
        if detail and tol is not None:
            detail += f" > tol {fmt_sci(tol)}"
    wrong = num(row.get("verify_token_mismatches"))  # inference: greedy tokens that differ
    if wrong is not None:
        detail += (", " if detail else "") + f"{wrong:.0f} token mismatch{'' if wrong == 1 else 'es'}"
    if status in ("pass", "fail"):
        word = "pass" if status == "pass" else "FAIL"
        return f"{word} ({detail})" if detail else word
    return str(status)


# ---------------------------------------------------------------- tables

@dataclass
class Table:
    """Table data: display strings, plus sort values for numeric columns (None sorts last)."""
    columns: list[str]
    numeric: list[bool]
    cells: list[list[str]] = field(default_factory=list)
    values: list[list[float | str | None]] = field(default_factory=list)
    oversubscribed: list[bool] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)


def _column_spec(multi_mode: bool, full: bool) -> list[tuple[str, bool, Any]]:
    # (title, numeric, function row -> (display, sort value))
    def n(key, fmt, scale=1.0):
        return lambda r: (fmt(r.get(key)), None if num(r.get(key)) is None else num(r.get(key)) * scale)

    def config(r):
        cid = text(r.get("config_id"))
        return (f"{cid} {DAGGER}" if is_oversubscribed(r) else cid), cid

    spec: list[tuple[str, bool, Any]] = [("config", False, config)]
    if multi_mode:
        spec.append(("mode", False, lambda r: (mode_of(r),) * 2))
    spec += [
        ("strategy", False, lambda r: (text(r.get("strategy")),) * 2),
        ("schedule, micro-batches m", False, lambda r: (schedule_label(r),) * 2),
        ("devices", True, n("devices", lambda v: text(v))),
        ("status", False, lambda r: (text(r.get("status")),) * 2),
        ("samples/s", True, n("samples_per_s", fmt_num)),
        ("tokens/s", True, n("tokens_per_s", fmt_num)),
        ("step median (ms)", True, n("step_time_median_s", fmt_ms, 1e3)),
        ("step p90 (ms)", True, n("step_time_p90_s", fmt_ms, 1e3)),
        ("speedup", True, n("speedup", fmt_x)),
        ("efficiency", True, n("efficiency", fmt_pct, 100.0)),
        ("peak mem / device (MiB)", True, n("peak_mem_bytes", fmt_mib, 1 / MIB)),
        ("MFU", True, n("mfu", fmt_mfu, 100.0)),
        ("verification", False, lambda r: (verification_label(r),) * 2),
    ]
    if full:
        spec += [
            ("global batch", True, n("global_batch", text)),
            ("per-device batch", True, n("per_device_batch", text)),
            ("dtype", False, lambda r: (fmt_dtype(r.get("dtype")),) * 2),
            ("samples/s per device", True, n("samples_per_s_per_device", fmt_num)),
            ("timed steps", True, n("timed_steps", text)),
            ("wall (s)", True, n("wall_s", fmt_num)),
        ]
    return spec


def summary_table(rows: Iterable[dict[str, Any]], *, full: bool = False) -> Table:
    """The summary: one line per configuration, in a fixed order. ``full`` adds batch, dtype,
    per-device throughput and wall time (the HTML's sortable table)."""
    rows = with_scaling(rows)
    spec = _column_spec(len(modes_of(rows)) > 1, full)
    table = Table(columns=[s[0] for s in spec], numeric=[s[1] for s in spec])
    for row in rows:
        pairs = [fn(row) for _, _, fn in spec]
        table.cells.append([p[0] for p in pairs])
        table.values.append([p[1] for p in pairs])
        table.oversubscribed.append(is_oversubscribed(row))
        table.failed.append(not is_ok(row))
    return table


def verification_table(rows: Iterable[dict[str, Any]]) -> Table:
    """One line per configuration (an inference configuration's rows, one per workload and batch
    size, share one verification); logits and token columns only where inference rows are."""
    rows = sorted_rows(rows)
    infer = any(mode_of(r) == "infer" for r in rows)
    keys = ["verify_max_loss_rel", "verify_max_weight_rel"]
    columns = ["config", "mode", "devices", "verification", "max loss rel", "max weight rel"]
    if infer:
        keys += ["verify_max_logits_rel", "verify_token_mismatches"]
        columns += ["max logits rel", "token mismatches"]
    table = Table(columns=columns + ["tolerance"],
                  numeric=[False, False, True, False] + [True] * (len(keys) + 1))
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if (mode_of(row), text(row.get("config_id"))) in seen:
            continue
        seen.add((mode_of(row), text(row.get("config_id"))))
        cid = text(row.get("config_id")) + (f" {DAGGER}" if is_oversubscribed(row) else "")
        cells = [cid, mode_of(row), text(row.get("devices")),
                 text(row.get("verify_status")) if row.get("verify_status") != "fail" else "FAIL"]
        cells += [text(row.get(k)) if k == "verify_token_mismatches" else fmt_sci(row.get(k))
                  for k in keys] + [fmt_sci(row.get("verify_tolerance"))]
        table.cells.append(cells)
        table.values.append([text(row.get("config_id")), cells[1], num(row.get("devices")), cells[3]]
                            + [num(row.get(k)) for k in keys + ["verify_tolerance"]])
        table.oversubscribed.append(is_oversubscribed(row))
        table.failed.append(row.get("verify_status") == "fail")
    return table


# ---------------------------------------------------------------- sentences

def scaling_kind(rows: Iterable[dict[str, Any]]) -> str:
    """'strong', 'weak', 'mixed' or 'unknown'; inferred from the batch sizes where rows lack it."""
    rows = [r for r in rows if is_ok(r)] or list(rows)
    kinds = {r.get("scaling") for r in rows} - {None}
    if len(kinds) > 1:
        return "mixed"
    if kinds:
        return str(kinds.pop())
    if len({r.get("global_batch") for r in rows} - {None}) == 1:
        return "strong"
    if len({r.get("per_device_batch") for r in rows} - {None}) == 1:
        return "weak"
    return "unknown"


def _one(rows: list[dict[str, Any]], key: str) -> str | None:
    values = sorted({str(r[key]) for r in rows if r.get(key) is not None})
    return None if not values else values[0] if len(values) == 1 else ", ".join(values)


def scaling_statement(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    kind = scaling_kind(rows)
    if kind == "strong":
        gb = _one(rows, "global_batch")
        return (f"Strong scaling: the global batch is held fixed ({gb or '?'} samples per step) and "
                "split over the devices. Speedup S(N) = X_N / X_1 (samples/s against the 1-device "
                "run of the same sweep), efficiency E = S / N.")
    if kind == "weak":
        pb = _one(rows, "per_device_batch")
        return (f"Weak scaling: the per-device batch is held fixed ({pb or '?'} samples), so the "
                "global batch grows with N. Speedup S(N) = X_N / X_1, efficiency "
                "E = X_N / (N * X_1).")
    return (f"Scaling kind: {kind}. Speedup S(N) = X_N / X_1 against the 1-device run; "
            "efficiency E = S / N.")


def fixed_description(rows: Iterable[dict[str, Any]], mode: str | None = None) -> str:
    """What a plot held fixed: 'Training, model gpt small, global batch 16 (strong scaling),
    fp32, 1 thread/device'."""
    rows = [r for r in rows if mode is None or mode_of(r) == mode]
    parts = [mode_title(mode)] if mode is not None else []
    model = " ".join(v for v in (_one(rows, "model"), _one(rows, "preset")) if v)
    if model:
        parts.append(f"model {model}")
    kind = scaling_kind(rows)
    if kind == "weak":
        parts.append(f"per-device batch {_one(rows, 'per_device_batch') or '?'} (weak scaling)")
    else:
        gb = _one(rows, "global_batch")
        parts.append(f"global batch {gb or '?'} ({kind} scaling)")
    seq = _one(rows, "seq_len")
    if seq:
        parts.append(f"seq {seq}")
    dtypes = sorted({fmt_dtype(r.get("dtype")) for r in rows if r.get("dtype") is not None})
    if dtypes:
        parts.append(", ".join(dtypes))
    threads = _one(rows, "threads_per_device")
    if threads and _one(rows, "device_type") in (None, "cpu"):
        parts.append(f"{threads} thread{'' if threads == '1' else 's'}/device")
    return ", ".join(parts)


def best_per_strategy(rows: Iterable[dict[str, Any]], mode: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(strategy label, devices) -> the ok row with the highest samples/s, preferring rows that
    were not oversubscribed. Rows must already carry speedup (see ``with_scaling``)."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        devices = num(row.get("devices"))
        if mode_of(row) != mode or not is_ok(row) or devices is None \
                or num(row.get("samples_per_s")) is None:
            continue
        key = (strategy_label(row), int(devices))
        cur = best.get(key)
        rank = (not is_oversubscribed(row), num(row.get("samples_per_s")))
        if cur is None or rank > (not is_oversubscribed(cur), num(cur.get("samples_per_s"))):
            best[key] = row
    return best


def _wrong(row: dict[str, Any]) -> bool:
    return row.get("verify_status") == "fail"


def headline(rows: Iterable[dict[str, Any]]) -> list[str]:
    """One sentence per device count: the best speedup of each strategy there, best first.
    Oversubscribed measurements and verification failures are excluded and named, so are
    configurations that did not run. Inference: one clause per workload point (infer.py)."""
    from .infer import infer_headline

    rows = with_scaling(rows)
    modes = modes_of(rows)
    out: list[str] = []
    for mode in modes:
        if mode == "infer":
            out += infer_headline([r for r in rows if mode_of(r) == mode])
            continue
        prefix = f"{mode_title(mode)}, " if len(modes) > 1 else ""
        mrows = [r for r in rows if mode_of(r) == mode]
        base = baseline_of(mrows, mode)
        if base is None:
            out.append(f"{prefix}no successful 1-device 'single' run: no speedup can be computed.")
            continue
        counts = sorted({int(num(r["devices"])) for r in mrows
                         if num(r.get("devices")) is not None and num(r["devices"]) > 1})
        for n in counts:
            at_n = [r for r in mrows if num(r.get("devices")) == n]
            # A claim needs a clean measurement and the right answer.
            claimable = [r for r in at_n if not is_oversubscribed(r) and not _wrong(r)
                         and num(r.get("speedup")) is not None]
            best = {label: r for (label, _), r in best_per_strategy(claimable, mode).items()}
            ranked = sorted(best.items(), key=lambda kv: (-kv[1]["speedup"], kv[0]))
            claims = [f"{fmt_x(r['speedup'])} with {label}" for label, r in ranked]
            over = [text(r.get("config_id")) for r in at_n if is_ok(r) and is_oversubscribed(r)]
            failed = [text(r.get("config_id")) + ("" if r.get("status") == "failed"
                                                  else f" ({text(r.get('status'))})")
                      for r in at_n if not is_ok(r)]
            wrong = [text(r.get("config_id")) for r in at_n
                     if is_ok(r) and _wrong(r) and not is_oversubscribed(r)]
            sentence = f"{prefix}{n} devices: " + (", ".join(claims) if claims else "no speedup claimed")
            if over:
                why = f"oversubscribed {DAGGER}, {n} CPU devices on {_one(at_n, 'cpu_cores') or '?'} cores"
                sentence += (f"; excluded ({why}): {', '.join(over)}" if claims else
                             f": {', '.join(over)} ran {why}; timings shown in the table only")
            if wrong:
                sentence += f"; not claimed, verification failed: {', '.join(wrong)}"
            if failed:
                sentence += f"; failed: {', '.join(failed)}"
            out.append(sentence)
        if not counts:
            out.append(f"{prefix}only 1-device runs: nothing to scale.")
    return out
