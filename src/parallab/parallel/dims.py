"""The parallel degrees of a run and the device mesh they make."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

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
        names = self.active()
        if not names:
            return None
        shape = tuple(getattr(self, n) for n in names)
        return init_device_mesh(device_type, shape, mesh_dim_names=tuple(names))


def dims_for(strategy: str, devices: int) -> ParallelDims:
    """The degrees each strategy uses on ``devices`` devices."""
    if strategy == "single":
        return ParallelDims(world_size=devices)
    if strategy == "ddp":
        return ParallelDims(world_size=devices, dp_replicate=devices)
    if strategy == "pipeline":
        return ParallelDims(world_size=devices, pp=devices)
    raise ValueError(f"no parallel layout for strategy '{strategy}'")
