"""The parallel degrees of a run and the device mesh they make."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only to build a mesh: config validation uses dims_for
    from torch.distributed.device_mesh import DeviceMesh

# Mesh dimensions, outermost first. The communication-heavy dimensions (tensor parallelism,
# FSDP sharding) are innermost so that consecutive ranks, which share a node, carry them.
MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in MESH_ORDER:
            if getattr(self, name) < 1:
                raise ValueError(f"parallel degree {name}={getattr(self, name)} must be at least 1")
        product = self.pp * self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ValueError(f"parallel degrees pp={self.pp} x dp_replicate={self.dp_replicate} x "
                             f"dp_shard={self.dp_shard} x tp={self.tp} = {product}, "
                             f"but the world size is {self.world_size}")

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of the global batch run at once."""
        return self.dp_replicate * self.dp_shard

    def active(self) -> list[str]:
        return [n for n in MESH_ORDER if getattr(self, n) > 1]

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """A named mesh over the dimensions larger than 1 (None for one device)."""
        from torch.distributed.device_mesh import init_device_mesh

        names = self.active()
        if not names:
            return None
        shape = tuple(getattr(self, n) for n in names)
        return init_device_mesh(device_type, shape, mesh_dim_names=tuple(names))


def dims_for(strategy: str, devices: int, *, tp: int = 0, pp: int = 0) -> ParallelDims:
    """The degrees each strategy uses on ``devices`` devices.

    ``tp`` / ``pp`` choose the tensor / pipeline degree of the mixes (0 = automatic: 2 for
    fsdp+tp and pipeline+ddp, the data-parallel degree taking the rest; all devices for tp and
    pipeline alone). The product is checked against ``devices`` (every number in the error).
    """
    if strategy == "single":
        return ParallelDims(world_size=devices)
    if strategy == "ddp":
        return ParallelDims(world_size=devices, dp_replicate=devices)
    if strategy == "fsdp":
        return ParallelDims(world_size=devices, dp_shard=devices)
    if strategy == "tp":
        return ParallelDims(world_size=devices, tp=tp or devices)
    if strategy == "pipeline":
        return ParallelDims(world_size=devices, pp=pp or devices)
    if strategy == "fsdp+tp":
        tp = tp or _auto_inner(devices)
        return ParallelDims(world_size=devices, dp_shard=max(1, devices // tp), tp=tp)
    if strategy == "pipeline+ddp":
        pp = pp or _auto_inner(devices)
        return ParallelDims(world_size=devices, pp=pp, dp_replicate=max(1, devices // pp))
    raise ValueError(f"no parallel layout for strategy '{strategy}'")


def _auto_inner(devices: int) -> int:
    """Default tp / pp degree of a 2-D mix: pairs of devices (2 x devices/2), all of them when
    the count is odd."""
    return 2 if devices % 2 == 0 else devices
