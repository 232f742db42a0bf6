"""``parallab plan``: for a model, device counts, a per-device memory size and a device profile,
the memory and step time of every strategy and mix, and which one to use.

For each strategy the planner tries the layouts it allows (degrees that divide the device count,
pipeline schedules and micro-batch counts) and keeps the fastest that fits; it then ranks the
strategies: the fastest that fits is recommended, the next is the runner-up, and every other one
is given the reason it loses (slower, and by which term) or does not fit (needs how much) or
cannot run at all (skipped, and why).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from parallab.config import ConfigError
from parallab.plan.memory import Layout, MemoryBreakdown, Precision, step_memory
from parallab.plan.predict import measured_block_extra
from parallab.plan.profiles import DeviceProfile
from parallab.plan.shapes import ModelShape, fmt_bytes
from parallab.plan.speed import StepTime, step_time

STRATEGIES = ("single", "ddp", "fsdp", "fsdp-zero2", "tp", "pipeline", "fsdp+tp", "pipeline+ddp")
SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b")


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryBreakdown
    time: StepTime
    fits: bool

    def as_dict(self, shape: ModelShape, global_batch: int, prof: DeviceProfile, dtype: str) -> dict:
        tokens = global_batch * shape.seq_len / self.time.total_s
        peak = prof.peak_flops.get(dtype) or 0
        return {"layout": self.layout.label, "degrees": {k: getattr(self.layout, k) for k in (
                    "dp", "fsdp", "tp", "pp", "microbatches", "stages_per_device")},
                "schedule": self.layout.schedule if self.layout.pp > 1 else None,
                "memory": self.memory.as_dict(), "fits": self.fits, "time": self.time.as_dict(),
                "tokens_per_s": tokens,
                "mfu": tokens * shape.flops_per_token_train / (peak * self.layout.devices) if peak else None}


@dataclass
class StrategyResult:
    strategy: str
    devices: int
    best: Candidate | None = None
    tried: int = 0
    skipped: str | None = None
    verdict: str = ""
    rank: int | None = None


@dataclass
class Plan:
    shape: ModelShape
    profile: DeviceProfile
    dtype: str
    global_batch: int
    memory_bytes: int
    usable_bytes: int
    results: dict[int, list[StrategyResult]] = field(default_factory=dict)

    def recommended(self, devices: int) -> StrategyResult | None:
        return next((r for r in self.results[devices] if r.rank == 1), None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _microbatch_options(local_batch: int, pp: int) -> list[int]:
    """Micro-batch counts worth trying: the naive split, multiples of the stage count, all."""
    opts = {1, local_batch}
    for k in (1, 2, 4, 8, 16):
        if local_batch % (k * pp) == 0:
            opts.add(k * pp)
    return sorted(o for o in opts if local_batch % o == 0)


def layouts_for(strategy: str, n: int, shape: ModelShape, global_batch: int, *,
                ac: bool = False) -> tuple[list[Layout], str | None]:
    """Every layout ``strategy`` may use on ``n`` devices, or ([], why none)."""
    heads, layers = shape.n_heads, shape.n_layers
    if strategy == "single":
        return ([Layout("single", 1, ac=ac)], None) if n == 1 else ([], f"uses one device, not {n}")
    if n < 2:
        return [], "needs at least 2 devices"
    if strategy in ("ddp", "fsdp", "fsdp-zero2"):
        if global_batch % n:
            return [], f"global batch {global_batch} is not divisible by {n} replicas"
        if strategy == "ddp":
            return [Layout("ddp", n, dp=n, ac=ac)], None
        return [Layout(strategy, n, fsdp=n, zero2=strategy == "fsdp-zero2", ac=ac)], None
    if strategy == "tp":
        if heads % n:
            return [], f"n_heads={heads} is not divisible by tp={n}"
        return [Layout("tp", n, tp=n, ac=ac)], None
    if strategy in ("fsdp+tp", "pipeline+ddp") and n < 4:
        return [], f"needs at least 4 devices (both degrees at least 2), not {n}"
    if strategy == "fsdp+tp":
        out = [Layout("fsdp+tp", n, tp=t, fsdp=n // t, ac=ac) for t in _divisors(n)
               if 2 <= t < n and heads % t == 0 and global_batch % (n // t) == 0]
        return out, None if out else (f"no tp degree in 2..{n // 2} divides both n_heads={heads} and {n}"
                                      f" with the global batch {global_batch} divisible by the rest")
    if strategy in ("pipeline", "pipeline+ddp"):
        pps = [n] if strategy == "pipeline" else [p for p in _divisors(n) if 2 <= p < n]
        out = []
        for p in pps:
            dp = n // p
            if p > layers or global_batch % dp:
                continue
            local = global_batch // dp
            for sched in SCHEDULES:
                v = 2 if sched == "interleaved1f1b" else 1
                if p * v > layers:
                    continue
                for m in _microbatch_options(local, p):
                    if sched != "gpipe" and m == 1:
                        continue  # one micro-batch is the naive split: listed once, as gpipe
                    if sched == "interleaved1f1b" and m % p:
                        continue  # torch's interleaved schedules need m divisible by p
                    out.append(Layout(strategy, n, dp=dp, pp=p, microbatches=m, schedule=sched,
                                      stages_per_device=v, ac=ac))
        if not out:
            if strategy == "pipeline":
                return [], (f"{n} stages need at least {n} layers (n_layers={layers})" if n > layers
                            else f"global batch {global_batch} cannot be split into micro-batches")
            return [], f"no pipeline degree in 2..{n // 2} with at most {layers} stages and the batch divisible"
        return out, None
    raise ConfigError(f"unknown strategy '{strategy}' (valid: {', '.join(STRATEGIES)})")


def plan(shape: ModelShape, *, devices: list[int], profile: DeviceProfile, memory_bytes: int | None = None,
         global_batch: int = 256, dtype: str = "bfloat16", mixed_precision: bool = True,
         rate: float | None = None, headroom: float = 0.1, strategies: tuple[str, ...] = STRATEGIES,
         ac: bool | None = None) -> Plan:
    """Memory and step time of every strategy at every device count; ranks them.
    ``ac``: activation checkpointing on, off, or None to try both (it costs a forward)."""
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ConfigError(f"unknown strategy '{bad[0]}' (valid: {', '.join(STRATEGIES)})")
    if not devices:
        raise ConfigError("no device counts given (e.g. 8 64 1024)")
    for n in devices:
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"device count {n!r} must be an integer >= 1: no strategy runs on it "
                              "(e.g. 8 64 1024)")
    if global_batch < 1:
        raise ConfigError(f"global_batch={global_batch} must be at least 1")
    if not 0 <= headroom < 1:
        raise ConfigError(f"headroom={headroom} must be in [0, 1) (fraction of memory kept free)")
    memory = memory_bytes or profile.memory_bytes
    usable = int(memory * (1 - headroom))
    prec = Precision.for_dtype(dtype, mixed=mixed_precision)
    result = Plan(shape, profile, dtype, global_batch, memory, usable)
    for n in sorted(set(devices)):
        rows = []
        for strategy in strategies:
            layouts, why = layouts_for(strategy, n, shape, global_batch, ac=bool(ac))
            # Sequence parallelism only saves memory under TP (same traffic: all-gather and
            # reduce-scatter instead of all-reduce); activation checkpointing trades a forward.
            layouts += [replace(lay, sp=True) for lay in layouts if lay.tp > 1]
            if ac is None:
                layouts += [replace(lay, ac=True) for lay in layouts]
            res = StrategyResult(strategy, n, tried=len(layouts), skipped=why)
            for lay in layouts:
                mem = step_memory(shape, lay, global_batch=global_batch, prec=prec)
                # On the measured CPU profile, TP's and FSDP's costs at this width where
                # bench-comm --calibrate-model measured them (an empty table elsewhere).
                st = step_time(shape, lay, global_batch=global_batch, prof=profile, dtype=dtype,
                               prec=prec, rate=rate,
                               block_extra=measured_block_extra(shape, lay, global_batch, profile))
                cand = Candidate(lay, mem, st, mem.total <= usable)
                if res.best is None or _better(cand, res.best):
                    res.best = cand
            rows.append(res)
        _rank(rows, usable)
        result.results[n] = rows
    if all(r.best is None for rows in result.results.values() for r in rows):
        reasons = "; ".join(f"{r.strategy}: {r.skipped}" for rows in result.results.values() for r in rows)
        raise ConfigError(f"no strategy can run on device counts {sorted(set(devices))} ({reasons})")
    return result


def _better(a: Candidate, b: Candidate) -> bool:
    """Fitting beats not fitting; then faster; among the non-fitting, smaller."""
    if a.fits != b.fits:
        return a.fits
    if a.fits:
        return a.time.total_s < b.time.total_s
    return a.memory.total < b.memory.total


def _dominant(c: Candidate, best: Candidate) -> str:
    """The term by which ``c`` is slower than ``best``."""
    terms = {"compute": c.time.compute_s - best.time.compute_s,
             "pipeline bubble": c.time.bubble_s - best.time.bubble_s,
             "exposed communication": c.time.exposed_comm_s - best.time.exposed_comm_s,
             "optimizer step": c.time.optimizer_s - best.time.optimizer_s}
    name, extra = max(terms.items(), key=lambda kv: kv[1])
    detail = ""
    if name == "exposed communication" and c.time.comm_s:
        k, v = max(c.time.comm_s.items(), key=lambda kv: kv[1])
        detail = f"; largest: {k} {v:.3g} s"
    if name == "pipeline bubble":
        detail = f" ({c.time.bubble_fraction:.0%} idle)"
    return f"+{extra:.3g} s {name}{detail}"


def _rank(rows: list[StrategyResult], usable: int) -> None:
    fitting = sorted((r for r in rows if r.best and r.best.fits), key=lambda r: r.best.time.total_s)
    for i, r in enumerate(fitting, start=1):
        r.rank = i
    best = fitting[0].best if fitting else None
    for r in rows:
        if r.best is None:
            r.verdict = f"skipped: {r.skipped}"
        elif not r.best.fits:
            m = r.best.memory
            parts = {"parameters": m.params, "gradients": m.grads, "optimizer state": m.optimizer,
                     "activations": m.activations, "temporary buffers": m.temporary}
            big = max(parts, key=parts.get)
            r.verdict = (f"does not fit: needs {fmt_bytes(m.total)} per device > {fmt_bytes(usable)} usable "
                         f"(largest part: {big} {fmt_bytes(parts[big])})")
        elif r.rank == 1:
            r.verdict = "recommended: fastest that fits"
        else:
            ratio = r.best.time.total_s / best.time.total_s
            prefix = "runner-up" if r.rank == 2 else "slower"
            r.verdict = f"{prefix}: {ratio:.2f}x the step time ({_dominant(r.best, best)})"
