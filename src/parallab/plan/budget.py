"""A per-device memory budget on real runs (``runtime.device_memory``, e.g. "24GiB").

* On GPUs the caching allocator is capped at the budget (a per-process memory fraction), so a
  configuration that needs more fails with a real ``torch.cuda.OutOfMemoryError``; it is turned
  into ``DoesNotFit`` with the numbers.
* On CPUs nothing can cap the process, so the tracked peak of the memory-tracked warm-up step
  (metrics/memory.py) is compared with the budget on every rank, and the run stops with
  ``DoesNotFit`` before its timed steps when the busiest rank is over.

The launcher (bench/launch.failure_reason) maps a log containing "DoesNotFit" to the status
``does_not_fit``; a row that ran carries ``device_memory_budget_bytes`` and ``fits_budget``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from parallab.plan.shapes import fmt_bytes, parse_bytes


class DoesNotFit(RuntimeError):
    """The configuration needs more memory per device than the budget allows."""


def budget_bytes(device_memory: str | int | None) -> int | None:
    """The budget in bytes (None when unset); ConfigError naming a bad value."""
    if device_memory is None or device_memory == "":
        return None
    return parse_bytes(device_memory, what="runtime.device_memory")


@dataclass
class MemoryBudget:
    budget: int | None
    setting: str | None
    device: object
    world_size: int = 1

    @classmethod
    def for_run(cls, runtime, info) -> "MemoryBudget":
        """The budget of a run (from its RuntimeSection), installed on the rank's device."""
        setting = getattr(runtime, "device_memory", None)
        b = cls(budget_bytes(setting), setting, info.device, info.world_size)
        b.install()
        return b

    def install(self) -> None:
        import torch

        if self.budget is None or self.device.type != "cuda":
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.budget / total), self.device)

    @contextmanager
    def guard(self):
        """Around a step: a CUDA out-of-memory under a budget becomes DoesNotFit."""
        import torch

        try:
            yield
        except torch.cuda.OutOfMemoryError as e:
            if self.budget is None:
                raise
            try:
                used = torch.cuda.max_memory_allocated(self.device)
                at_peak = f"; {used} bytes ({fmt_bytes(used)}) allocated at the peak before the failure"
            except (RuntimeError, AssertionError):
                at_peak = ""
            raise DoesNotFit(f"DoesNotFit: out of memory under runtime.device_memory={self.setting} "
                             f"({self.budget} bytes){at_peak}: {str(e).splitlines()[0]}") from e

    def check_tracked(self, peak: int | None) -> None:
        """After the tracked step on CPUs: stop every rank when the busiest one is over."""
        if self.budget is None or peak is None or self.device.type == "cuda":
            return
        worst = int(peak)
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            t = torch.tensor([worst], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            worst = int(t.item())
        if worst > self.budget:
            raise DoesNotFit(f"DoesNotFit: tracked peak {worst} bytes ({fmt_bytes(worst)}) on the busiest "
                             f"device exceeds runtime.device_memory={self.setting} ({self.budget} bytes, "
                             f"{fmt_bytes(self.budget)})")


def budget_fields(runtime, peak: int | None) -> dict:
    """The row's ``device_memory_budget_bytes`` and ``fits_budget`` (None without a budget)."""
    b = budget_bytes(getattr(runtime, "device_memory", None))
    return {"device_memory_budget_bytes": b,
            "fits_budget": (peak <= b) if b is not None and peak is not None else None}
