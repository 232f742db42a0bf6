"""One result row per configuration: the fixed key set every strategy and mode writes.

A row is a flat JSON object. Every row carries every key in ``ROW_KEYS`` (missing values are
``None``), so that a report, a spreadsheet or ``jq`` never has to guess which strategy wrote it.
This module has no torch import: the report reads rows with it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1

# Status of a configuration. "ok" is the only status with measurements.
STATUSES = ("ok", "failed", "oom", "does_not_fit", "timeout")

ROW_KEYS: tuple[str, ...] = (
    # identity
    "schema", "run_id", "config_id", "mode", "status", "reason", "timestamp",
    # what ran
    "strategy", "schedule", "devices", "nodes", "threads_per_device", "oversubscribed",
    "dp_degree", "pp_degree", "tp_degree", "fsdp_degree",
    "model", "preset", "n_params", "flops_per_token", "flops_per_sample", "dtype",
    "data", "seq_len", "global_batch", "per_device_batch", "microbatches", "microbatch_size",
    "scaling", "steps", "warmup_steps", "timed_steps", "activation_checkpointing",
    # speed
    "step_time_median_s", "step_time_p90_s", "step_time_min_s", "step_time_max_s",
    "samples_per_s", "tokens_per_s", "samples_per_s_per_device", "tokens_per_s_per_device",
    "speedup", "efficiency", "baseline_config_id",
    "mfu", "peak_flops_per_device", "peak_flops_source",
    # memory (bytes, maximum over ranks)
    "peak_mem_bytes", "peak_mem_per_rank", "mem_params_bytes", "mem_grads_bytes",
    "mem_optim_bytes", "mem_activations_bytes", "mem_source", "cuda_reserved_bytes",
    "device_memory_budget_bytes", "fits_budget",
    # the plan's prediction for this configuration and its error, pred / measured - 1
    # (plan/predict.py: predict_for_row)
    "pred_step_time_s", "pred_peak_mem_bytes", "pred_step_time_err", "pred_peak_mem_err",
    # inference (mode "infer"): one row per workload and batch size; latency per batch or request
    "workload", "batch_size", "prompt_len", "new_tokens", "ttft_s", "tpot_s",
    "latency_p50_s", "latency_p90_s", "latency_p99_s", "output_tokens_per_s",
    "max_batch_fit", "max_batch_fit_bound",
    "verify_max_logits_rel", "verify_token_mismatches",
    # correctness
    "loss_first", "loss_last", "losses",
    "verify_status", "verify_max_loss_rel", "verify_max_weight_rel", "verify_tolerance",
    # reliability: the step a resumed run started at, torchrun restarts, newest checkpoint
    "resumed_from_step", "restarts", "last_checkpoint",
    # machine and versions
    "backend", "device_type", "device_name", "hostname", "cpu_model", "cpu_cores",
    "torch_version", "python_version", "parallab_version", "git_rev",
    # several nodes: each node's host (node order), the node of rank 0, GPU memory and links
    # within a node, the interface inter-node traffic takes (runtime/device.machine_info)
    "hosts", "node_rank", "devices_per_node", "gpu_memory_gib", "gpu_topology", "network_interface",
    "wall_s",
)


def make_row(**values: Any) -> dict[str, Any]:
    """A row with every key of the schema; unknown keys are a programming error."""
    unknown = set(values) - set(ROW_KEYS)
    assert not unknown, f"keys outside the row schema: {sorted(unknown)}"
    row = {key: None for key in ROW_KEYS}
    row.update(values)
    row["schema"] = SCHEMA_VERSION
    return row


def append_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one row as one whole line: written in a single write and flushed to disk,
    so a crash leaves at worst a torn last line that ``read_rows`` skips."""
    line = json.dumps(row, sort_keys=False, allow_nan=False, default=str) + "\n"
    try:  # after a torn last line, start a new one: this row must not be glued onto it
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
    except OSError:
        pass  # no file yet, or an empty one
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a results file. A line that is not a whole JSON object (a torn write after a
    crash) is skipped with a warning rather than failing the report."""
    rows: list[dict[str, Any]] = []
    text = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: skipped a line that is not a whole JSON row "
                          "(torn by an interrupted write?)", stacklevel=2)
            continue
        if not isinstance(row, dict):
            warnings.warn(f"{path}:{number}: skipped a line that is not a JSON object", stacklevel=2)
            continue
        rows.append({key: row.get(key) for key in ROW_KEYS} | row)
    return rows


def baseline_of(rows: Iterable[dict[str, Any]], mode: str = "train") -> dict[str, Any] | None:
    """The 1-device reference row of a sweep (strategy ``single`` at 1 device) for ``mode``."""
    for row in rows:
        if row.get("mode") == mode and row.get("strategy") == "single" \
                and row.get("devices") == 1 and row.get("status") == "ok":
            return row
    return None


def scaling_key(row: dict[str, Any]) -> tuple:
    """Rows comparable for speedup: the same mode, workload and batch size."""
    return row.get("mode"), row.get("workload"), row.get("batch_size")


def add_scaling_rows(rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]]) -> None:
    """Speedup and efficiency of each row against the baseline row of the same key."""
    ref = {scaling_key(r): r for r in baseline_rows if r.get("status") == "ok"}
    for row in rows:
        add_scaling(row, ref.get(scaling_key(row)))


def add_scaling(row: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Fill speedup and efficiency against the 1-device run of the same sweep.

    Strong scaling (same global batch): S = X_N / X_1, E = S / N.
    Weak scaling (same per-device batch): S = X_N / X_1 and E = X_N / (N * X_1), the same formula.
    """
    if baseline is None or row.get("status") != "ok" or not row.get("samples_per_s") \
            or not baseline.get("samples_per_s"):
        return row
    speedup = row["samples_per_s"] / baseline["samples_per_s"]
    row["speedup"] = speedup
    row["efficiency"] = speedup / row["devices"]
    row["baseline_config_id"] = baseline["config_id"]
    return row
