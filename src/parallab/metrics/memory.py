"""Peak memory per device.

On GPUs: the CUDA caching allocator's own statistics (max allocated and reserved).
On CPUs there is no allocator to ask, so ``TensorMemoryTracker`` counts tensor storages: the
ones that exist when tracking starts (parameters, gradients, optimizer state) plus every
storage an operator creates while it runs (activations, temporaries), each counted until it is
freed. That is "tracked tensor memory": what the model's tensors hold, without the Python
process's own overhead. Buffers that C++ code allocates outside the dispatcher (for example
the gloo transport's staging copies) are not seen.

Tracking costs a Python callback per operator, so a run tracks one warm-up step and times the
others untracked.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(tensors: Iterable) -> Iterable[torch.UntypedStorage]:
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if is_traceable_wrapper_subclass(t):
            # A wrapper without storage of its own (for example the asynchronous result of a
            # functional collective under tensor parallelism): count the tensors it wraps.
            attrs, _ = t.__tensor_flatten__()
            yield from _storages(getattr(t, a) for a in attrs)
            continue
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            yield t.untyped_storage()


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages on one process (see module docstring)."""

    def __init__(self, static: dict[str, Iterable[torch.Tensor]] | None = None):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.static_bytes: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        for category, tensors in (static or {}).items():
            before = self.current
            for st in _storages(tensors):
                self._add(st)
            self.static_bytes[category] = self.current - before
        self.peak = self.current

    def _add(self, st: torch.UntypedStorage) -> None:
        key = st.data_ptr()
        if key == 0 or key in self._live:
            return
        n = st.nbytes()
        self._live[key] = (StorageWeakRef(st), n)
        self.current += n

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def account_persistent(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count storages alive now that no operator created while tracking: they were
        allocated outside the dispatcher and alive throughout, so they add to the peak too."""
        for st in _storages(tensors):
            key = st.data_ptr()
            if key and key not in self._live:
                self._add(st)
                self.peak += st.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Free first, then count what this operator created: the peak is the largest live sum.
        self._sweep()
        for st in _storages(tree_flatten(out)[0]):
            self._add(st)
        self.peak = max(self.peak, self.current)
        return out


def cuda_memory_stats(device: torch.device) -> dict[str, int]:
    return {"max_allocated": torch.cuda.max_memory_allocated(device),
            "max_reserved": torch.cuda.max_memory_reserved(device)}


def state_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by distinct storages among ``tensors`` (local shards for DTensors)."""
    seen: dict[int, int] = {}
    for st in _storages(tensors):
        seen.setdefault(st.data_ptr(), st.nbytes())
    return sum(seen.values())
