"""Reading the pickles inside Megatron checkpoints without running code from them.

Three parts of a Megatron checkpoint are Python pickles: legacy ``torch``-format files (``model_optim_rng.pt``),
a torch_dist checkpoint's ``.metadata`` and its objects (``common.pt`` or the ``common_state`` entry with the
args, each layer's ``_extra_state``). Unpickling can call any function the file names, so:

* ``.metadata`` goes through :class:`MetadataUnpickler`, which builds only the dataclasses and enums of
  ``torch.distributed.checkpoint`` (and ``torch.Size``, dtypes, layouts);
* everything else goes through ``torch.load(weights_only=True)``, which builds tensors and plain containers, plus
  the allow-list Megatron-Core itself registers for its checkpoints (``megatron.core.safe_globals``: argparse
  ``Namespace``, Megatron's enums and ``OptimizerConfig``, numpy arrays of RNG states, ``PosixPath``);
* whatever needs anything else is refused with a :class:`ConversionError` naming the file and the global.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from megatron_tnllm.convert.errors import ConversionError

_DCP = "torch.distributed.checkpoint"
# What torch.distributed.checkpoint (torch 2.4 - 2.14) and Megatron-Core's torch_dist strategy pickle into .metadata.
METADATA_GLOBALS = frozenset(
    {
        (f"{_DCP}.metadata", name)
        for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
        )
    }
    | {(f"{_DCP}.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")}
    | {
        (f"{_DCP}.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        # StorageMeta.checkpoint_id of a checkpoint saved to a path (pathlib._local in Python 3.13).
        ("pathlib", "PosixPath"),
        ("pathlib._local", "PosixPath"),
        # Empty placeholder classes Megatron-Core keeps so that older checkpoints unpickle.
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
        ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
    }
)  # fmt: skip
_TORCH_DTYPES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype))
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch_dist ``.metadata``: only :data:`METADATA_GLOBALS` and torch dtypes may be named."""

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS or (module == "torch" and name in _TORCH_DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_dcp_metadata(directory: Path) -> Metadata:
    """The ``.metadata`` of a torch_dist checkpoint directory, unpickled through :class:`MetadataUnpickler`."""
    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise ConversionError(f"{path} is missing; the torch_dist checkpoint is incomplete")
    data = path.read_bytes()
    if not data:
        raise ConversionError(f"{path} is empty; the torch_dist checkpoint is incomplete")
    try:
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if m := _REFUSED_GLOBAL.search(str(e)):
            raise ConversionError(
                f"{path} names {m.group(1)}, which a torch_dist .metadata does not hold; refusing to unpickle it "
                "(a pickle can run code)"
            ) from None
        raise ConversionError(f"{path} is truncated or damaged ({e})") from None
    except Exception as e:  # EOFError, ValueError, ... from a cut or corrupted file
        raise ConversionError(f"{path} is truncated or damaged ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise ConversionError(f"{path} holds a {type(metadata).__name__}; expected a torch.distributed Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A DCP ``FileSystemReader`` whose ``.metadata`` goes through :func:`read_dcp_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _RawBytesLoadPlanner(DefaultLoadPlanner):
    """Keeps byte objects as bytes (the default planner unpickles them with ``weights_only=False``)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = value.getvalue()


def _megatron_safe_globals() -> list:
    from megatron.core.safe_globals import SAFE_GLOBALS

    return list(SAFE_GLOBALS)


def safe_torch_load(source: Path | bytes, what: Path | str, mmap: bool = False) -> object:
    """``torch.load(weights_only=True)`` with Megatron-Core's allow-list; ConversionError naming ``what`` (the file)
    and the refused global if the pickle needs anything else, or if it is damaged."""
    in_memory = isinstance(source, bytes)
    stream = io.BytesIO(source) if in_memory else source
    try:
        with torch.serialization.safe_globals(_megatron_safe_globals()):
            return torch.load(stream, weights_only=True, mmap=mmap and not in_memory, map_location="cpu")
    except pickle.UnpicklingError as e:
        if m := _REFUSED_GLOBAL.search(str(e)):
            raise ConversionError(
                f"{what} needs {m.group(1)}, which is not a type Megatron checkpoints hold; refusing to unpickle it "
                "(a pickle can run code). Load only checkpoints from trusted sources"
            ) from None
        raise ConversionError(f"cannot read {what} ({str(e).splitlines()[0]}); is it truncated?") from None
    except Exception as e:
        raise ConversionError(f"cannot read {what} ({type(e).__name__}: {e}); is it truncated?") from None


def read_dcp_objects(directory: Path, metadata: Metadata) -> dict[str, object]:
    """Every non-tensor entry of a torch_dist checkpoint (Megatron's ShardedObjects: the common state, the
    ``_extra_state`` of each linear layer), each unpickled by :func:`safe_torch_load`. Checking them all here
    means Megatron's own loader (``--verify``), which unpickles them without restriction, meets only safe ones."""
    keys = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if not keys:
        return {}
    import torch.distributed.checkpoint as dcp

    raw: dict[str, object] = {key: io.BytesIO() for key in keys}
    dcp.load(raw, storage_reader=SafeFileSystemReader(directory), planner=_RawBytesLoadPlanner(), no_dist=True)
    return {key: safe_torch_load(raw[key], f"{directory}/.metadata entry {key!r}") for key in keys}


def common_state_key() -> str:
    """DCP key of the object holding Megatron's non-tensor state ("common_state/shard_0_1")."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("common_state", None, (1,), (0,)).unique_key


def read_common_state(directory: Path, metadata: Metadata) -> dict:
    """Megatron's common state (args, iteration, ...): ``common.pt`` (older checkpoints) or the ``common_state``
    object; every object of the checkpoint is checked on the way (:func:`read_dcp_objects`)."""
    directory = Path(directory)
    objects = read_dcp_objects(directory, metadata)
    if (directory / "common.pt").is_file():
        return safe_torch_load(directory / "common.pt", directory / "common.pt")
    common = objects.get(common_state_key())
    if isinstance(common, list) and len(common) == 1:  # Megatron saves a ShardedObject as torch.save([obj])
        common = common[0]
    return common if isinstance(common, dict) else {}
