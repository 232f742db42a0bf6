"""Reading torch.distributed.checkpoint (DCP) files without executing anything from them.

DCP's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle.load`` and its default
load planner reads non-tensor items with ``torch.load(weights_only=False)``: a crafted
checkpoint could run code. Here the metadata unpickler admits only DCP's metadata classes,
torch.Size, dtypes and layouts, and non-tensor items are read with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

_META_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint._extension")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only its data classes, torch.Size, dtypes and
    layouts: a crafted file cannot name a function to call."""

    def find_class(self, module: str, name: str):
        if module in _META_MODULES and not name.startswith("__"):
            obj = getattr(__import__(module, fromlist=[name]), name)
            if isinstance(obj, type):
                return obj
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                               (torch.dtype, torch.layout,
                                                                torch.memory_format))):
            return getattr(torch, name)
        if (module, name) in (("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")):
            return getattr(__import__(module, fromlist=[name]), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(step_dir: Path):
    """DCP's index of a checkpoint (tensor shapes, dtypes, where each chunk lies)."""
    with open(Path(step_dir) / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


class SafeReader(FileSystemReader):
    """DCP's file reader with the restricted metadata unpickler."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (optimizer hyperparameters) read with
    ``weights_only=True`` (the default planner unpickles them without restriction)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
