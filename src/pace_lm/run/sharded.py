"""FSDP2 checkpoints: the sharded tensors apart from the rest, in torch.distributed.checkpoint (DCP) format.

state.pt keeps each tensor as a mark {"dcp": key}; dcp/ holds the tensors, every rank writing its shards.
DCP pickles its metadata file: it is read by an unpickler that builds nothing but DCP's metadata classes.
"""

import os
import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from pace_lm import PaceLMError


def split_tensors(tree):
    """({key: tensor}, `tree` with each tensor replaced by {"dcp": key}); keys are paths joined by '/'."""
    tensors = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"dcp": path}
        if isinstance(x, dict):
            return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x))
        return x

    return tensors, walk(tree, "")


def join_tensors(tree, tensors):
    """The inverse of split_tensors: each {"dcp": key} in `tree` replaced by tensors[key]."""
    if isinstance(tree, dict):
        if set(tree) == {"dcp"}:
            return tensors[tree["dcp"]]
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(join_tensors(v, tensors) for v in tree)
    return tree


def marked_keys(tree):
    """The keys of the {"dcp": key} marks in `tree` (empty for a checkpoint without dcp/)."""
    if isinstance(tree, dict):
        if set(tree) == {"dcp"}:
            return {tree["dcp"]}
        return set().union(*(marked_keys(v) for v in tree.values()))
    if isinstance(tree, (list, tuple)):
        return set().union(*(marked_keys(v) for v in tree))
    return set()


def load_sharded(folder, template):
    """Fill `template` ({key: tensor or DTensor}, in place) from checkpoint `folder`'s dcp/."""
    path = os.path.join(folder, "dcp")
    if not os.path.isdir(path):
        raise PaceLMError(f"checkpoint {folder} has no dcp/ (sharded tensors)")
    reader = SafeFileSystemReader(path)
    try:
        dcp.load(template, storage_reader=reader)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        why = reader.refused or f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        raise PaceLMError(f"the sharded tensors of checkpoint {folder} do not load ({why})") from e


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata (dataclasses of sizes, dtypes and offsets) and refuses every other global."""

    DCP = {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
        "_StorageInfo",
    }

    def find_class(self, module, name):
        obj = None
        if module.startswith("torch.distributed.checkpoint") and name in self.DCP:
            obj = super().find_class(module, name)
        elif module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        ):
            obj = getattr(torch, name)
        elif (module, name) in {
            ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
        }:
            obj = super().find_class(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")
        return obj


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with the metadata file read by _MetadataUnpickler instead of pickle.load."""

    refused = None  # why the metadata was refused (DCP goes on to look for another file, and fails on that)

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                self.refused = str(e)
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
