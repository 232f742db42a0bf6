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
    ``weights_only=True`` (the default planner unpickles them without restriction), and
    values that describe their own blocks (``__get_tensor_shard__``) resolved by them."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # DCP's set-up (_init_state_dict) replaces, in place, values that are neither tensors
        # nor plain data by None; a value describing its own blocks is put back.
        kept: dict[tuple, tuple] = {}

        def walk(d: dict, path: tuple) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, (*path, k))
                elif not isinstance(v, torch.Tensor) and hasattr(v, "__get_tensor_shard__"):
                    kept[(*path, k)] = (d, k, v)

        walk(state_dict, ())
        super().set_up_planner(state_dict, metadata, is_coordinator)
        for d, k, v in kept.values():
            d[k] = v
        if self.flatten_state_dict:
            for flat, path in self.mappings.items():
                if tuple(path) in kept:
                    self.state_dict[flat] = kept[tuple(path)][2]
        else:
            for path, (_, _, v) in kept.items():
                if len(path) == 1:
                    self.state_dict[path[0]] = v

    def lookup_tensor(self, index):
        # A value that is no tensor but names its own blocks (train/checkpoint.InCheckpointShape;
        # DCP's default lookup asks only tensors).
        obj = self.state_dict.get(index.fqn)
        if not isinstance(obj, torch.Tensor) and hasattr(obj, "__get_tensor_shard__"):
            return obj.__get_tensor_shard__(index)
        return super().lookup_tensor(index)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
