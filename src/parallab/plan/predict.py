"""Predicted against measured: the plan's models applied to a configuration that really ran.

``predict_for_row(row, baseline)`` gives the predicted step time and peak memory of a result
row, and their relative errors against what the row measured (``pred / measured - 1``):

* memory: the replayed step of plan/memory.py, in the tracker's terms on CPUs (what
  TensorMemoryTracker sees on the tracked warm-up step) and the device's on GPUs;
* step time: plan/speed.py with the compute rate calibrated on the sweep's 1-device run of the
  same job (``baseline``) when there is one, else the profile's; links from the measured
  machine profile (``parallab bench-comm`` cached under runs/.cache) on CPUs.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from parallab.plan.memory import Layout, Precision, step_memory
from parallab.plan.profiles import BUILTIN, DeviceProfile, cpu_profile
from parallab.plan.shapes import ModelShape, model_shape
from parallab.plan.speed import step_time

PRED_KEYS = ("pred_step_time_s", "pred_peak_mem_bytes", "pred_step_time_err", "pred_peak_mem_err")
_SHAPES: dict[tuple, ModelShape] = {}


def _degrees_from_name(row: dict, n: int) -> tuple[int, int, int, int]:
    """(dp, fsdp, tp, pp) of a row without degrees (a run that failed before measuring), from
    its strategy and configuration id ('fsdp+tp-2x2-4' is fsdp x tp, 'pipeline+ddp-...-2x2-4'
    is pp x dp)."""
    strategy = row.get("strategy") or "single"
    pair = re.search(r"-(\d+)x(\d+)-\d+$", row.get("config_id") or "")
    a, b = (int(pair.group(1)), int(pair.group(2))) if pair else (n // 2, 2)
    return {"ddp": (n, 1, 1, 1), "fsdp": (1, n, 1, 1), "tp": (1, 1, n, 1), "pipeline": (1, 1, 1, n),
            "fsdp+tp": (1, a, b, 1), "pipeline+ddp": (b, 1, 1, a)}.get(strategy, (1, 1, 1, 1))


def layout_of_row(row: dict) -> Layout:
    """The layout a result row ran with, from its degrees (from its strategy's name and
    configuration id when it has none)."""
    from parallab import config

    multi = getattr(config, "MULTI_STAGE_SCHEDULES", {})
    n = int(row["devices"])
    if row.get("pp_degree") is None and row.get("dp_degree") is None:
        dp, fsdp, tp, pp = _degrees_from_name(row, n)
    else:
        pp = int(row.get("pp_degree") or 1)
        tp = int(row.get("tp_degree") or 1)
        fsdp = int(row.get("fsdp_degree") or 1)
        dp = max(1, int(row.get("dp_degree") or 1) // fsdp)
    sched = row.get("schedule") or "1f1b"
    v = (row.get("stages_per_device") or multi.get(sched, 1)) if pp > 1 else 1
    kind = "gpipe" if sched == "gpipe" else ("1f1b" if v == 1 else "interleaved1f1b")
    # Options the row has no key for are in its configuration id (config.config_id).
    cid = f"-{row.get('config_id') or ''}-"
    m = re.search(r"-v(\d+)-m\d+-", cid)
    if m and pp > 1:
        v = int(m.group(1))
        kind = "interleaved1f1b" if v > 1 else kind
    return Layout(strategy=row.get("strategy") or "single", devices=n, dp=dp, fsdp=fsdp, tp=tp, pp=pp,
                  microbatches=int(row.get("microbatches") or 1), schedule=kind,
                  stages_per_device=int(v), zero2=bool(row.get("fsdp_zero2")) or "-zero2-" in cid,
                  sp=bool(row.get("sequence_parallel")) or "-sp-" in cid,
                  ac=bool(row.get("activation_checkpointing")) or "-ac-" in cid)


def _shape(row: dict, overrides: dict | None) -> ModelShape | None:
    key = (row.get("model") or "gpt", row.get("preset"), tuple(sorted((overrides or {}).items())))
    if key not in _SHAPES:
        _SHAPES[key] = model_shape(key[0], key[1], dict(overrides or {}))
    shape = _SHAPES[key]
    if row.get("n_params") and int(row["n_params"]) != shape.n_params:
        return None  # the run overrode the preset's shape in a way the row does not record
    return shape


def _profile_for(row: dict, cache_dir: Path | None, probe: bool) -> DeviceProfile:
    if (row.get("device_type") or "cpu") == "cpu":
        return cpu_profile(cache_dir, probe=probe)
    name = (row.get("device_name") or "").lower()
    for key, prof in (("h100 pcie", "h100-pcie"), ("h100", "h100-sxm-nvlink"), ("h200", "h100-sxm-nvlink"),
                      ("a100", "a100-sxm"), ("l4", "l4-pcie"), ("4090", "rtx4090-pcie")):
        if key in name:
            return BUILTIN[prof]
    return BUILTIN["h100-sxm-nvlink"]


def calibrated_rate(shape: ModelShape, baseline: dict, prof: DeviceProfile,
                    optimizer: str = "adamw") -> float | None:
    """FLOP/s of one device on this job, from its measured 1-device step: the step minus the
    modelled per-block overhead and optimizer step, over the step's model FLOPs."""
    t = baseline.get("step_time_median_s")
    if not t or baseline.get("status") != "ok":
        return None
    flops = shape.flops_per_token_train * baseline["global_batch"] * shape.seq_len
    if baseline.get("activation_checkpointing"):
        flops *= 4 / 3
    opt = prof.optimizer_time(shape.n_params) * (1.0 if optimizer == "adamw" else 0.3)
    busy = t - shape.n_layers * prof.block_overhead_s - opt
    return flops / max(busy, 0.25 * t)


def _same_job(row: dict, baseline: dict | None) -> bool:
    if not baseline:
        return False
    keys = ("model", "preset", "global_batch", "dtype", "seq_len", "threads_per_device", "device_type")
    return all(baseline.get(k) == row.get(k) for k in keys)


def optimizer_of_row(row: dict) -> str:
    """The row's optimizer: its own key when it has one, else told by the optimizer state it
    measured (AdamW keeps two states per parameter, SGD with momentum one)."""
    if row.get("optimizer"):
        return row["optimizer"]
    params, optim = row.get("mem_params_bytes"), row.get("mem_optim_bytes")
    if params and optim is not None and optim < 1.5 * params:
        return "sgd"
    return "adamw"


def measured_block_extra(shape: ModelShape, lay: Layout, global_batch: int,
                         prof: DeviceProfile) -> dict[str, float] | None:
    """TP's and FSDP's measured cost per block beyond a rank's share and its modelled
    collectives (``parallab bench-comm`` with a model's block, plan/strategy_cost.block_cost), for this
    model's width, the layout's micro-batch and degree; None when not measured. GPT blocks are
    what it measures, so only the gpt family takes it."""
    if (lay.tp < 2 and lay.fsdp < 2) or shape.family != "gpt":
        return None
    from parallab.plan.strategy_cost import block_key

    seqs = global_batch // lay.dp // (lay.microbatches if lay.pp > 1 else 1)
    table = (prof.measured.get("block_extra_s") or {}).get(
        block_key(shape.d_model, shape.n_heads, shape.mlp_ratio, shape.seq_len)) or {}
    out = {}
    for name, degree in (("tp", lay.tp), ("fsdp", lay.fsdp)):
        point = table.get(f"b{seqs}-n{degree}") if degree > 1 else None
        if point and point.get(name) is not None:
            out[name] = point[name]
            if name == "tp":
                out["tp_root"] = point.get("tp_root", 0.0)
    return out or None


def predict_for_row(row: dict, baseline: dict | None = None, *, cache_dir: str | Path | None = None,
                    probe: bool = True, overrides: dict | None = None, optimizer: str | None = None) -> dict:
    """``pred_step_time_s``, ``pred_peak_mem_bytes`` and their relative errors for a result row.

    ``baseline``: the sweep's 1-device row of the same job (calibrates the compute rate; it is
    ignored when it ran another model, batch or dtype). ``cache_dir``: the run's cache folder
    (runs/.cache). ``probe``: measure this CPU's compute once when the cache has no numbers.
    ``optimizer``: adamw or sgd (default: from the row, see ``optimizer_of_row``).
    Keys are None where the row cannot be predicted (an overridden shape, a failed run)."""
    out = dict.fromkeys(PRED_KEYS)
    if not row.get("devices") or not row.get("global_batch") or not row.get("preset"):
        return out
    try:
        shape = _shape(row, overrides)
    except (ValueError, ImportError, AttributeError, TypeError):
        return out  # a family the planner has no activation formula for (ConfigError), or none installed
    if shape is None:
        return out
    lay = layout_of_row(row)
    optimizer = optimizer or optimizer_of_row(row)
    dtype = row.get("dtype") or "float32"
    prec = Precision.for_dtype(dtype, mixed=False)  # parallab trains in one dtype throughout
    cpu = (row.get("device_type") or "cpu") == "cpu"
    warmup = row.get("warmup_steps")
    if not cpu or (warmup or 0) > 0:
        first = cpu and warmup == 1  # the trainer tracks step min(1, warmup-1)
        mem = step_memory(shape, lay, global_batch=int(row["global_batch"]), prec=prec,
                          tracked=cpu, first_step=first, optimizer=optimizer)
        out["pred_peak_mem_bytes"] = int(mem.tracked_total if cpu else mem.total)
    prof = _profile_for(row, Path(cache_dir) if cache_dir else None, probe)
    rate = calibrated_rate(shape, baseline, prof, optimizer) if _same_job(row, baseline) else None
    if rate is None and not cpu and row.get("peak_flops_per_device"):
        prof = replace(prof, peak_flops={**prof.peak_flops, dtype: row["peak_flops_per_device"]})
    factor = None
    if cpu and rate is not None:  # per-FLOP cost relative to the calibration run's micro-batch
        from parallab.plan.efficiency import cost_factor

        ref_tokens = baseline["global_batch"] / (baseline.get("microbatches") or 1) * shape.seq_len
        cdir = Path(cache_dir) if cache_dir else None
        factor = lambda tokens, tp: cost_factor(shape, tokens, tp, ref_tokens,  # noqa: E731
                                                cache_dir=cdir, probe=probe)
    st = step_time(shape, lay, global_batch=int(row["global_batch"]), prof=prof, dtype=dtype,
                   prec=prec, rate=rate, optimizer=optimizer, cost_factor=factor,
                   block_extra=measured_block_extra(shape, lay, int(row["global_batch"]), prof) if cpu else None)
    out["pred_step_time_s"] = st.total_s
    if row.get("step_time_median_s"):
        out["pred_step_time_err"] = st.total_s / row["step_time_median_s"] - 1
    if row.get("peak_mem_bytes") and out["pred_peak_mem_bytes"]:
        out["pred_peak_mem_err"] = out["pred_peak_mem_bytes"] / row["peak_mem_bytes"] - 1
    return out
