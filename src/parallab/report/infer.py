"""Inference rows (mode "infer", ``infer/rows.py``) -> table data, headline sentences and the
descriptions the writers and plots share.

An inference configuration writes one row per workload point: ``forward`` at each batch size, and
``generate`` (a batch of prompts decoded to ``new_tokens``). Speedups compare a row with the
1-device ``single`` row of the same workload and batch size (``bench.result.scaling_key``).
Pure functions, raw strings (each writer escapes them); no torch import.
"""

from __future__ import annotations

from typing import Any, Iterable

from parallab.bench.result import scaling_key

from .tables import (DAGGER, DASH, MIB, Table, _one, fmt_dtype, fmt_mib, fmt_ms,
                     fmt_num, fmt_x, is_ok, is_oversubscribed, mode_of, num,
                     references, sorted_rows, strategy_label, text, verification_label)

GE = "≥"
INFER_NOTES = (
    "Inference: one row per configuration, workload and batch size. forward = one batched "
    "forward pass over the whole sequence (a prefill); samples/s = rows of the batch per second, "
    "latency = seconds per batch. generate = one request, a batch of prompts decoded greedily "
    "with a KV cache; latency = end to end per request, TTFT = prefill and first token, TPOT = "
    "each further token (medians over requests), tokens/s = generated (output) tokens per second.",
    "Inference speedup: samples/s against the 1-device 'single' row of the same workload and "
    "batch size (for generate: finished sequences per second, end to end). The headline's TPOT "
    "ratio for generation is the 1-device TPOT divided by this TPOT: above 1x decodes faster.",
    f"Max batch: the largest batch whose measured peak memory per device stays within the "
    f"budget (infer.device_memory), found by doubling then bisection; {GE} marks a lower bound "
    "(the search stopped at its limit, infer.max_batch_search); 0 means not even the weights fit.",
    "Inference verification: logits of the reference prompts compared with the 1-device "
    "reference (max relative difference against the tolerance), and the greedily generated "
    "tokens, which must all match.",
)


def is_infer(row: dict[str, Any]) -> bool:
    return mode_of(row) == "infer"


def workload_of(row: dict[str, Any]) -> str:
    return text(row.get("workload"))


def point_key(row: dict[str, Any]) -> tuple:
    """Order of workload points: forward by batch size, then generate."""
    batch = num(row.get("batch_size"))
    return ({"forward": 0, "generate": 1}.get(workload_of(row), 9), workload_of(row),
            batch if batch is not None else float("inf"))


def point_label(row: dict[str, Any]) -> str:
    """'forward x16', 'generation 4x(32+32)' (batch x (prompt + new tokens)), or the workload."""
    workload, batch = row.get("workload"), row.get("batch_size")
    if workload == "forward" and batch is not None:
        return f"forward x{batch}"
    if workload == "generate" and batch is not None:
        tokens = (f"({row['prompt_len']}+{row['new_tokens']})"
                  if row.get("prompt_len") is not None and row.get("new_tokens") is not None else "")
        return f"generation {batch}x{tokens}"
    return DASH if workload is None else str(workload)


def workload_cell(row: dict[str, Any]) -> str:
    """The table's workload column: 'forward' or 'generate 32+32' (prompt + new tokens)."""
    if row.get("workload") == "generate" and row.get("prompt_len") is not None \
            and row.get("new_tokens") is not None:
        return f"generate {row['prompt_len']}+{row['new_tokens']}"
    return workload_of(row)


def max_batch_cell(row: dict[str, Any]) -> str:
    fit = num(row.get("max_batch_fit"))
    if fit is None:
        return DASH
    bound = row.get("max_batch_fit_bound")
    return (f"{GE}{fit:.0f}" if bound not in (None, "exact") else f"{fit:.0f}")


def infer_strategy_cell(row: dict[str, Any]) -> str:
    label = strategy_label(row)
    micro = row.get("microbatches")
    return f"{label}, m={micro}" if label == "pipeline" and micro is not None else label


def tpot_ratio(row: dict[str, Any], ref: dict[tuple, dict[str, Any]]) -> float | None:
    """1-device TPOT / this TPOT (above 1: each token comes faster)."""
    base = ref.get(scaling_key(row))
    mine, theirs = num(row.get("tpot_s")), num(base.get("tpot_s")) if base else None
    return None if not mine or theirs is None else theirs / mine


# ---------------------------------------------------------------- table

def _column_spec(full: bool) -> list[tuple[str, bool, Any]]:
    def n(key, fmt, scale=1.0):
        return lambda r: (fmt(r.get(key)), None if num(r.get(key)) is None else num(r.get(key)) * scale)

    def config(r):
        cid = text(r.get("config_id"))
        return (f"{cid} {DAGGER}" if is_oversubscribed(r) else cid), cid

    spec: list[tuple[str, bool, Any]] = [
        ("config", False, config),
        ("strategy", False, lambda r: (infer_strategy_cell(r),) * 2),
        ("devices", True, n("devices", text)),
        ("workload", False, lambda r: (workload_cell(r),) * 2),
        ("batch", True, n("batch_size", text)),
        ("status", False, lambda r: (text(r.get("status")),) * 2),
        ("samples/s", True, n("samples_per_s", fmt_num)),
        ("tokens/s (generate: output)", True,
         lambda r: n("output_tokens_per_s" if r.get("workload") == "generate" else "tokens_per_s",
                     fmt_num)(r)),
        ("latency p50 (ms)", True, n("latency_p50_s", fmt_ms, 1e3)),
        ("p90 (ms)", True, n("latency_p90_s", fmt_ms, 1e3)),
        ("p99 (ms)", True, n("latency_p99_s", fmt_ms, 1e3)),
        ("TTFT (ms)", True, n("ttft_s", fmt_ms, 1e3)),
        ("TPOT (ms)", True, n("tpot_s", fmt_ms, 1e3)),
        ("speedup", True, n("speedup", fmt_x)),
        ("peak mem / device (MiB)", True, n("peak_mem_bytes", fmt_mib, 1 / MIB)),
        ("max batch in budget", True,
         lambda r: (max_batch_cell(r), num(r.get("max_batch_fit")))),
        ("verification", False, lambda r: (verification_label(r),) * 2),
    ]
    if full:
        spec += [
            ("budget / device (MiB)", True, n("device_memory_budget_bytes", fmt_mib, 1 / MIB)),
            ("seq len", True, n("seq_len", text)),
            ("dtype", False, lambda r: (fmt_dtype(r.get("dtype")),) * 2),
            ("timed requests", True, n("timed_steps", text)),
            ("wall (s)", True, n("wall_s", fmt_num)),
        ]
    return spec


def infer_table(rows: Iterable[dict[str, Any]], *, full: bool = False) -> Table:
    """The inference summary: one line per configuration, workload and batch size. Rows must
    carry speedup already (``tables.with_scaling``)."""
    spec = _column_spec(full)
    table = Table(columns=[s[0] for s in spec], numeric=[s[1] for s in spec])
    for row in sorted_rows(r for r in rows if is_infer(r)):
        pairs = [fn(row) for _, _, fn in spec]
        table.cells.append([p[0] for p in pairs])
        table.values.append([p[1] for p in pairs])
        table.oversubscribed.append(is_oversubscribed(row))
        table.failed.append(not is_ok(row))
    return table


# ---------------------------------------------------------------- sentences

def _claim(row: dict[str, Any], ref) -> tuple[float, str] | None:
    """(ratio, what) a headline claims for a row: speedup for forward, TPOT ratio for
    generation (end-to-end speedup where TPOT is missing)."""
    if row.get("workload") == "generate":
        ratio = tpot_ratio(row, ref)
        if ratio is not None:
            return ratio, "TPOT "
    speedup = num(row.get("speedup"))
    return None if speedup is None else (speedup, "" if row.get("workload") != "generate"
                                         else "end to end ")


def _names(rows: Iterable[dict[str, Any]], with_points: bool) -> list[str]:
    """'cfg (forward x16, generation 4x(8+8))' per configuration, in row order."""
    out: dict[str, list[str]] = {}
    for row in rows:
        points = out.setdefault(text(row.get("config_id")), [])
        if with_points and row.get("workload") is not None:
            points.append(point_label(row))
    return [cid + (f" ({', '.join(p)})" if p else "") for cid, p in out.items()]


def infer_headline(rows: Iterable[dict[str, Any]]) -> list[str]:
    """'Inference, 2 devices: forward x16 1.80x with replicas, 1.30x with pipeline; generation
    4x(32+32): TPOT 0.90x with tp; ...'. Oversubscribed points, wrong answers and rows that did
    not run (did not fit, failed) are never claimed; they are named after the claims."""
    rows = sorted_rows(r for r in rows if is_infer(r))
    ref = references(rows)
    prefix = "Inference, "
    if not ref:
        singles = [r for r in rows if r.get("strategy") == "single" and num(r.get("devices")) == 1]
        why = ", ".join(dict.fromkeys(f"{text(r.get('config_id'))}: {text(r.get('status'))}"
                                      for r in singles))
        return [f"{prefix}no successful 1-device 'single' run{f' ({why})' if why else ''}: "
                "no speedup can be computed."]
    counts = sorted({int(num(r["devices"])) for r in rows
                     if num(r.get("devices")) is not None and num(r["devices"]) > 1})
    out = []
    for n in counts:
        at_n = [r for r in rows if num(r.get("devices")) == n]
        clauses = []
        for key in sorted({point_key(r) for r in at_n if r.get("workload") is not None}):
            here = [r for r in at_n if point_key(r) == key]
            label = point_label(here[0])
            if scaling_key(here[0]) not in ref:
                clauses.append(f"{label}: no 1-device reference ran ok")
                continue
            clean = [r for r in here if not is_oversubscribed(r) and r.get("verify_status") != "fail"
                     and _claim(r, ref) is not None]
            best: dict[str, tuple[float, str]] = {}
            for row in clean:
                value = _claim(row, ref)
                name = strategy_label(row)
                if name not in best or value[0] > best[name][0]:
                    best[name] = value
            ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
            if ranked:  # the metric's name once, where every claim is of the same metric
                same = len({what for _, (_, what) in ranked}) == 1
                clauses.append(f"{label}: " + (ranked[0][1][1] if same else "") + ", ".join(
                    f"{'' if same else what}{fmt_x(v)} with {name}" for name, (v, what) in ranked))
        sentence = f"{prefix}{n} devices: " + ("; ".join(clauses) if clauses else "no speedup claimed")
        over = _names([r for r in at_n if is_ok(r) and is_oversubscribed(r)], False)
        wrong = _names([r for r in at_n if is_ok(r) and r.get("verify_status") == "fail"
                        and not is_oversubscribed(r)], False)
        no_fit = _names([r for r in at_n if r.get("status") == "does_not_fit"], True)
        failed = [f"{cid} ({status})" for cid, status in dict.fromkeys(
            (text(r.get("config_id")), text(r.get("status"))) for r in at_n
            if not is_ok(r) and r.get("status") != "does_not_fit")]
        if over:
            sentence += (f"; excluded (oversubscribed {DAGGER}, {n} CPU devices on "
                         f"{_one(at_n, 'cpu_cores') or '?'} cores): {', '.join(over)}")
        if wrong:
            sentence += f"; not claimed, verification failed: {', '.join(wrong)}"
        if no_fit:
            sentence += f"; did not fit the memory budget: {', '.join(no_fit)}"
        if failed:
            sentence += f"; failed: {', '.join(failed)}"
        out.append(sentence)
    if not counts:
        out.append(f"{prefix}only 1-device runs: nothing to scale.")
    return out


def _budgets(rows: list[dict[str, Any]]) -> list[float]:
    return sorted({num(r.get("device_memory_budget_bytes")) for r in rows} - {None})


def infer_description(rows: Iterable[dict[str, Any]], workload: str | None = None) -> str:
    """What inference plots held fixed: 'Inference, model gpt small, forward seq 64 at batch 1, 16;
    generate batch 4, 8+8 tokens, fp32, 1 thread/device, budget 64 MiB/device'."""
    rows = [r for r in rows if is_infer(r)]
    parts = ["Inference"]
    model = " ".join(v for v in (_one(rows, "model"), _one(rows, "preset")) if v)
    if model:
        parts.append(f"model {model}")
    fwd = [r for r in rows if r.get("workload") == "forward"]
    gen = [r for r in rows if r.get("workload") == "generate"]
    if fwd and workload in (None, "forward"):
        batches = sorted({int(b) for b in (num(r.get("batch_size")) for r in fwd) if b is not None})
        parts.append(f"forward seq {_one(fwd, 'seq_len') or '?'}"
                     + (f" at batch {', '.join(map(str, batches))}" if workload is None else ""))
    if gen and workload in (None, "generate"):
        parts.append(f"generate batch {_one(gen, 'batch_size') or '?'}, "
                     f"{_one(gen, 'prompt_len') or '?'}+{_one(gen, 'new_tokens') or '?'} "
                     "tokens (prompt + new)")
    dtypes = sorted({fmt_dtype(r.get("dtype")) for r in rows if r.get("dtype") is not None})
    if dtypes:
        parts.append(", ".join(dtypes))
    threads = _one(rows, "threads_per_device")
    if threads and _one(rows, "device_type") in (None, "cpu"):
        parts.append(f"{threads} thread{'' if threads == '1' else 's'}/device")
    budgets = _budgets(rows)
    if budgets:
        parts.append("budget " + " / ".join(f"{b / MIB:,.0f} MiB" for b in budgets) + "/device")
    return ", ".join(parts)


def infer_statement(rows: Iterable[dict[str, Any]]) -> str:
    rows = [r for r in rows if is_infer(r)]
    budgets = _budgets(rows)
    return ("Inference: each configuration is measured at every workload point (forward at each "
            "batch size, generation of one batch of requests); speedup = samples/s against the "
            "1-device 'single' row of the same workload and batch size, for generation the "
            "headline gives the TPOT ratio (1-device TPOT / TPOT). "
            + (f"Memory budget per device: {', '.join(f'{b / MIB:,.0f} MiB' for b in budgets)}; "
               "points over it are 'does_not_fit' rows." if budgets else
               "No memory budget was set (infer.device_memory), so no max batch was searched."))
