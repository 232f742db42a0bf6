"""A plan as a rich table (console), markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from parallab.plan.planner import Plan, StrategyResult
from parallab.plan.shapes import fmt_bytes

ASSUMPTIONS = (
    "Memory: the step replayed allocation by allocation (plan/memory.py), calibrated against "
    "TensorMemoryTracker on CPU for single, DDP and pipelines; FSDP and TP terms are modelled, "
    "not calibrated. Peak = the busiest device at its busiest moment.",
    "AdamW: two states per parameter (+ an fp32 master copy under bf16 mixed precision); foreach "
    "AdamW allocates one parameter-sized intermediate in the optimizer step.",
    "Pipelines keep every micro-batch's logits on the last stage until the step ends (torch "
    "pipelining with return_outputs, as parallab runs it) and one receive buffer per micro-batch.",
    "Time: compute = model FLOPs / (peak x efficiency, or the measured rate) + per-block overhead; "
    "collectives t = alpha * ceil(log2 n) + S * busbw factor / busbw (nccl-tests factors); bubble "
    "(p-1)/v of m + (p-1)/v micro-batch slots; overlap as stated per strategy.",
    "Mesh order (pp, dp, fsdp, tp), tp innermost: a group larger than a node uses the inter-node link.",
)


def _row_cells(r: StrategyResult) -> list[str]:
    c = r.best
    if c is None:
        return [r.strategy, "-", "-", "-", "-", r.verdict.replace("[", r"\[")]
    m, t = c.memory, c.time
    from rich.markup import escape

    layout = escape(c.layout.label.split(" ", 1)[1])
    mem = (f"{fmt_bytes(m.total)}\n[dim]p {fmt_bytes(m.params)}, g {fmt_bytes(m.grads)}, "
           f"o {fmt_bytes(m.optimizer)}, a {fmt_bytes(m.activations)}, t {fmt_bytes(m.temporary)}[/]")
    terms = [f"compute {t.compute_s:.3g}"]
    if t.comm_s:
        terms.append(f"comm {t.exposed_comm_s:.3g}" + (f" of {t.comm_total_s:.3g}" if t.hidden_s > 0 else ""))
    if c.layout.pp > 1:
        terms.append(f"bubble {t.bubble_s:.3g} ({t.bubble_fraction:.0%})")
    terms.append(f"optim {t.optimizer_s:.3g}")
    if t.copies_s:
        terms.append(f"copies {t.copies_s:.3g}")
    fits = "yes" if c.fits else "[red]no[/]"
    return [f"{r.strategy}\n[dim]{layout}[/]", mem, fits, f"{t.total_s:.3g}", ", ".join(terms), escape(r.verdict)]


def rich_tables(p: Plan) -> list:
    from rich.table import Table

    tables = []
    for n, rows in p.results.items():
        table = Table(title=f"plan: {p.shape.preset} ({p.shape.n_params / 1e9:.3g}B params) on {n} x "
                            f"{p.profile.name}, global batch {p.global_batch} x {p.shape.seq_len} tokens, "
                            f"{p.dtype}, {fmt_bytes(p.usable_bytes)} usable per device "
                            "(p params, g grads, o optimizer, a activations, t temporary)",
                      title_justify="left", show_lines=True)
        table.add_column("strategy / layout", overflow="fold", ratio=2)
        table.add_column("memory / device", overflow="fold", ratio=2)
        table.add_column("fits")
        table.add_column("step s", justify="right")
        table.add_column("terms (s)", overflow="fold", ratio=2)
        table.add_column("verdict", overflow="fold", ratio=3)
        for r in sorted(rows, key=_order):
            table.add_row(*_row_cells(r))
        tables.append(table)
    return tables


def _order(r: StrategyResult):
    return (r.rank is None, r.rank or 0, r.best is None, r.best.memory.total if r.best else 0)


def to_json(p: Plan) -> dict:
    return {
        "model": {"family": p.shape.family, "preset": p.shape.preset, "n_params": p.shape.n_params,
                  "d_model": p.shape.d_model, "n_layers": p.shape.n_layers, "n_heads": p.shape.n_heads,
                  "seq_len": p.shape.seq_len, "vocab_size": p.shape.vocab_size,
                  "flops_per_token_train": p.shape.flops_per_token_train},
        "profile": {"name": p.profile.name, "description": p.profile.description, "source": p.profile.source,
                    "peak_flops": p.profile.peak_flops, "efficiency": p.profile.efficiency,
                    "overlap": p.profile.overlap, "devices_per_node": p.profile.devices_per_node,
                    "intra": {k: vars(v) for k, v in p.profile.intra.items()},
                    "inter": {k: vars(v) for k, v in p.profile.inter.items()}},
        "dtype": p.dtype, "global_batch": p.global_batch, "memory_bytes": p.memory_bytes,
        "usable_bytes": p.usable_bytes, "assumptions": list(ASSUMPTIONS),
        "devices": {str(n): {
            "recommended": next((r.strategy for r in rows if r.rank == 1), None),
            "runner_up": next((r.strategy for r in rows if r.rank == 2), None),
            "strategies": [{"strategy": r.strategy, "rank": r.rank, "verdict": r.verdict,
                            "skipped": r.skipped, "layouts_tried": r.tried,
                            "best": r.best.as_dict(p.shape, p.global_batch, p.profile, p.dtype) if r.best else None}
                           for r in sorted(rows, key=_order)]}
            for n, rows in p.results.items()},
    }


def to_markdown(p: Plan) -> str:
    lines = [f"# Plan: {p.shape.preset} on {p.profile.name}", "",
             f"{p.shape.n_params:,} parameters, global batch {p.global_batch} x {p.shape.seq_len} tokens, "
             f"{p.dtype}; {fmt_bytes(p.memory_bytes)} per device, {fmt_bytes(p.usable_bytes)} usable. "
             f"Profile: {p.profile.description} ({p.profile.source}).", ""]
    for n, rows in p.results.items():
        rec = next((r for r in rows if r.rank == 1), None)
        lines += [f"## {n} device(s)", "",
                  f"**Recommended: {rec.strategy} {rec.best.layout.label.split(' ', 1)[1]}** "
                  f"({rec.best.time.total_s:.3g} s/step, {fmt_bytes(rec.best.memory.total)} per device)."
                  if rec else "**Nothing fits.**", "",
                  "| strategy | layout | memory/device (params, grads, optim, act, temp) | fits | step s | "
                  "compute s | exposed comm s | bubble | optim s | verdict |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rows, key=_order):
            c = r.best
            if c is None:
                lines.append(f"| {r.strategy} | - | - | - | - | - | - | - | - | {r.verdict} |")
                continue
            m, t = c.memory, c.time
            mem = (f"{fmt_bytes(m.total)} ({fmt_bytes(m.params)}, {fmt_bytes(m.grads)}, {fmt_bytes(m.optimizer)}, "
                   f"{fmt_bytes(m.activations)}, {fmt_bytes(m.temporary)})")
            bubble = f"{t.bubble_s:.3g} s ({t.bubble_fraction:.0%})" if c.layout.pp > 1 else "-"
            lines.append(f"| {r.strategy} | {c.layout.label.split(' ', 1)[1]} | {mem} | {'yes' if c.fits else 'no'} | "
                         f"{t.total_s:.3g} | {t.compute_s:.3g} | {t.exposed_comm_s:.3g} | {bubble} | "
                         f"{t.optimizer_s:.3g} | {r.verdict} |")
        lines.append("")
        comm_lines = [f"- {r.strategy}: " + ", ".join(f"{k} {v:.3g} s" for k, v in r.best.time.comm_s.items())
                      + f"; overlap: {r.best.time.overlap}" for r in rows if r.best and r.best.time.comm_s]
        if comm_lines:
            lines += ["Communication per step:", *comm_lines, ""]
    lines += ["## Assumptions", "", *[f"- {a}" for a in ASSUMPTIONS], ""]
    return "\n".join(lines)


def write_outputs(p: Plan, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "plan.json", out_dir / "plan.md"
    js.write_text(json.dumps(to_json(p), indent=1, default=str))
    md.write_text(to_markdown(p))
    return {"json": js, "markdown": md}
