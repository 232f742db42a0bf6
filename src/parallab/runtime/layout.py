"""Where a run's mesh dimensions fall on a cluster: within a node or across nodes.

Ranks are numbered node by node (torchrun gives each node a block of consecutive ranks), and a
device mesh is those ranks laid out row-major, outermost dimension first. The innermost
dimensions therefore vary fastest and stay within a node as far as they fit, so the default
order (``parallel.dims.MESH_ORDER``: pp, dp_replicate, dp_shard, tp) keeps tensor parallelism
(collectives in every layer, forward and backward) and FSDP's all-gathers and reduce-scatters
inside a node, and puts pipeline sends and data-parallel gradient all-reduces (once a step)
across nodes. ``parallel.mesh_order`` overrides the order (outermost first), for example to
measure what crossing the node boundary with tensor parallelism costs.

No torch import at module level (settings validation uses this).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from parallab.parallel.dims import MESH_ORDER, ParallelDims

# Which mesh dimensions carry traffic in every layer (inside a node where possible).
COMM_HEAVY = ("tp", "dp_shard")


def check_mesh_order(order) -> tuple[str, ...]:
    """The override's names, checked: each of MESH_ORDER exactly once, outermost first
    (empty: the default). Raises ValueError naming the value."""
    order = tuple(order or ())
    if not order:
        return ()
    unknown = [n for n in order if n not in MESH_ORDER]
    if unknown or sorted(order) != sorted(MESH_ORDER):
        raise ValueError(f"parallel.mesh_order={' '.join(order)!r} must name each of "
                         f"{', '.join(MESH_ORDER)} exactly once, outermost first "
                         f"(default: {' '.join(MESH_ORDER)})")
    return order


@dataclass(frozen=True)
class OrderedDims(ParallelDims):
    """``ParallelDims`` whose mesh lays its dimensions out in ``order`` (outermost first)
    instead of MESH_ORDER; everything else about the degrees is the same."""
    order: tuple[str, ...] = MESH_ORDER

    def active(self) -> list[str]:
        return [n for n in self.order if getattr(self, n) > 1]


def with_order(dims: ParallelDims, order) -> ParallelDims:
    """``dims`` laid out in ``order`` (unchanged when the order is empty or the default)."""
    order = check_mesh_order(order)
    if not order or order == MESH_ORDER:
        return dims
    values = {f.name: getattr(dims, f.name) for f in dataclasses.fields(ParallelDims)}
    return OrderedDims(**values, order=order)


def mesh_groups(dims: ParallelDims) -> dict[str, list[list[int]]]:
    """For each active mesh dimension, its process groups (lists of global ranks), the same
    layout ``init_device_mesh`` makes: ranks 0..N-1 row-major over the active dimensions."""
    names = dims.active()
    shape = [getattr(dims, n) for n in names]
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    groups: dict[str, list[list[int]]] = {}
    for d, name in enumerate(names):
        others = [range(s) if i != d else range(1) for i, s in enumerate(shape)]
        groups[name] = [[sum(c * st for c, st in zip(coord, strides)) + k * strides[d]
                         for k in range(shape[d])] for coord in itertools.product(*others)]
    return groups


def placement(dims: ParallelDims, devices_per_node: int) -> dict[str, str]:
    """For each active dimension: 'within nodes' (every group on one node), 'across nodes'
    (every group spans nodes) or 'partly across nodes'."""
    out = {}
    for name, groups in mesh_groups(dims).items():
        spans = [len({r // devices_per_node for r in g}) > 1 for g in groups]
        out[name] = "across nodes" if all(spans) else "partly across nodes" if any(spans) \
            else "within nodes"
    return out


def describe(dims: ParallelDims, nodes: int, devices_per_node: int) -> str:
    """One line, e.g. '2 nodes x 2 devices: tp within nodes, dp_shard across nodes'."""
    where = placement(dims, devices_per_node)
    parts = [f"{n}={getattr(dims, n)} {w}" for n, w in where.items()] or ["one device"]
    text = f"{nodes} node(s) x {devices_per_node} device(s): " + ", ".join(parts)
    heavy = [n for n in COMM_HEAVY if where.get(n, "within nodes") != "within nodes"]
    if heavy and nodes > 1:
        text += f" ({', '.join(heavy)} cross the node boundary: expect the slower link to show)"
    return text
