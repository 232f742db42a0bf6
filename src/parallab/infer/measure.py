"""Timing and memory of the inference workloads, and the largest batch a memory budget allows.

Timing follows MEASURING.md: every rank starts a repetition together (a barrier, outside the
clock), GPUs are synchronized around it, and a repetition's time is the slowest rank's.
Memory per device: CUDA max allocated on GPUs, tracked tensor memory on CPU
(metrics.memory.TensorMemoryTracker, which starts from the weights); the largest rank counts.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from parallab.infer.generate import sync, timed_generate
from parallab.metrics.memory import TensorMemoryTracker, state_bytes


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _distributed():
        dist.barrier()


def gather_values(value: float, device: torch.device) -> list[float]:
    """``value`` of every rank (all-gather), in rank order."""
    if not _distributed():
        return [float(value)]
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (the slowest rank's time of each repetition)."""
    if not _distributed() or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def make_tokens(seed: int, batch: int, length: int, vocab: int, salt: int = 0) -> torch.Tensor:
    """Deterministic token ids [batch, length], identical on every rank (a CPU generator)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return torch.randint(vocab, (batch, length), generator=g)


def time_forward(engine, tokens: torch.Tensor, *, warmup: int, requests: int) -> list[float]:
    """Seconds per batch of the timed repetitions (slowest rank)."""
    times = []
    for _ in range(warmup + requests):
        barrier()
        sync(engine.device)
        t0 = time.perf_counter()
        engine.forward(tokens)
        sync(engine.device)
        times.append(time.perf_counter() - t0)
    return reduce_max(times[warmup:], engine.device)


def time_generate(engine, prompts: torch.Tensor, new_tokens: int, *, warmup: int,
                  requests: int) -> tuple[list[float], list[float]]:
    """(time to first token, end-to-end latency) of each timed request, slowest rank."""
    ttft, e2e = [], []
    for _ in range(warmup + requests):
        barrier()
        _, first, end = timed_generate(
            lambda mark: engine.generate(prompts, new_tokens, on_first_token=mark), engine.device)
        ttft.append(first)
        e2e.append(end)
    n = len(ttft)
    both = reduce_max(ttft[warmup:] + e2e[warmup:], engine.device)
    k = n - warmup
    return both[:k], both[k:]


def weight_bytes(engine) -> list[float]:
    """Bytes of this configuration's weights on each rank (local shards for DTensors)."""
    return gather_values(state_bytes(engine.parameters()), engine.device)


def peak_memory(engine, fn: Callable[[], object]) -> list[float]:
    """Peak device memory of each rank while ``fn`` runs, weights included; ``inf`` for a
    rank that ran out of GPU memory (it does not fit, whatever the budget)."""
    device = engine.device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            fn()
            sync(device)
            peak = float(torch.cuda.max_memory_allocated(device))
        except torch.cuda.OutOfMemoryError:
            # Every rank must still reach the gather below; a rank that fails inside a
            # collective leaves the others waiting until the collective timeout.
            torch.cuda.empty_cache()
            peak = float("inf")
    else:
        with TensorMemoryTracker({"params": list(engine.parameters())}) as tracker:
            fn()
        peak = float(tracker.peak)
    return gather_values(peak, device)


def search_max_batch(fits: Callable[[int], bool], limit: int) -> tuple[int, str]:
    """The largest batch in [1, limit] for which ``fits`` holds, assuming fitting is monotone
    in the batch: doubling (1, 2, 4, ...) to the first batch that does not fit, then bisection
    between the last fit and it. Returns (batch, 'exact'), (0, 'exact') when batch 1 does not
    fit, or (limit, 'search_limit') when the limit itself fits (a lower bound)."""
    lo, b = 0, 1
    while True:
        if not fits(b):
            hi = b
            break
        lo = b
        if b >= limit:
            return limit, "search_limit"
        b = min(2 * b, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, "exact"


class MemoryProbe:
    """Peak memory of one workload at a given global batch, measured once per batch size
    (the search and the rows share the measurements). Every rank calls with the same batch
    sizes in the same order: the probes run the real, communicating workload."""

    def __init__(self, engine, workload: str, *, seed: int, length: int, prompt_len: int = 0,
                 new_tokens: int = 0):
        self.engine, self.workload, self.seed = engine, workload, seed
        self.length, self.prompt_len, self.new_tokens = length, prompt_len, new_tokens
        self.peaks: dict[int, list[float]] = {}

    def __call__(self, batch: int) -> list[float]:
        if batch not in self.peaks:
            e, vocab = self.engine, self.engine.cfg.vocab_size
            if self.workload == "forward":
                fn = lambda: e.forward(make_tokens(self.seed, batch, self.length, vocab, salt=1))  # noqa: E731
            else:
                # The cache is allocated for the whole request up front; after the prefill and
                # a decode step or two the memory stays flat, so two steps find the peak.
                prompts = make_tokens(self.seed, batch, self.prompt_len, vocab, salt=2)
                fn = lambda: e.generate(prompts, min(2, self.new_tokens),  # noqa: E731
                                        cache_len=self.prompt_len + self.new_tokens)
            self.peaks[batch] = peak_memory(e, fn)
        return self.peaks[batch]

    def peak(self, batch: int) -> float:
        return max(self(batch))

    def fits(self, batch: int, budget: int) -> bool:
        return self.peak(batch) <= budget
