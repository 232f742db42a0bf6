"""FLOPs counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` around a forward
(and backward) of one sample on the meta device. Meta tensors carry shapes only, so counting a
billion-parameter model costs no memory and no arithmetic; the counter sees every matmul,
convolution and attention kernel the model really dispatches (2 FLOPs per multiply-add; the
backward of a matmul counts twice its forward).

What it does not count: elementwise work (norms, activations, softmax), which is why counted
numbers sit slightly below analytic ones that add it, and why MFU conventionally leaves it out.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

_CACHE: dict[tuple, dict] = {}


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    return value


def count_flops(model: nn.Module, x, y, loss: Callable, *, key: tuple | None = None,
                per_module: bool = False) -> dict:
    """Counted FLOPs of one batch ``(x, y)`` (normally one sample) through ``model`` on meta:
    {'forward', 'backward', 'training' (= forward + backward), and with ``per_module`` the
    forward FLOPs by module path ('by_module': {'layers.0': ...})}. A model not on meta is
    copied there; ``key`` caches the result for this process."""
    if key is not None and key in _CACHE:
        return _CACHE[key]
    if any(p.device.type != "meta" for p in model.parameters()):
        import copy

        model = copy.deepcopy(model).to("meta")  # never move the caller's model
    x, y = _to_meta(x), _to_meta(y)
    with FlopCounterMode(display=False) as fwd_counter:
        out = model(x)
        value = loss(out, y)
    forward = fwd_counter.get_total_flops()
    by_module: dict[str, int] = {}
    if per_module:
        # Keys are 'Global', the root's class name, then 'Root.child.grandchild' paths.
        root = type(model).__name__
        for name, counts in fwd_counter.get_flop_counts().items():
            if name.startswith(root + "."):
                by_module[name[len(root) + 1:]] = int(sum(counts.values()))
    with FlopCounterMode(display=False) as bwd_counter:
        value.backward()
    backward = bwd_counter.get_total_flops()
    result = {"forward": int(forward), "backward": int(backward),
              "training": int(forward + backward), "by_module": by_module}
    if key is not None:
        _CACHE[key] = result
    return result
