"""Hugging Face checkpoint directories: a lazy reader (safetensors or PyTorch .bin, sharded or not) and a
streaming safetensors writer. Neither ever holds more than one tensor (a fused one: qkvu, qkv, or [l1; l2]) at a
time."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_tnllm.configs import TNLConfig
from megatron_tnllm.convert.errors import ConversionError
from megatron_tnllm.convert.layout import HF_EMBEDDING, hf_group_shapes, tnl_from_hf_config
from megatron_tnllm.hf.configuration_transnormer import TransnormerConfig

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_FROM_SAFETENSORS = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
# Tensors a TNL checkpoint may hold beyond the model's: the tied output layer, a Metaseq leftover.
IGNORED_TENSORS = ("lm_head.weight", "decoder.version")


def _describe(tnl: TNLConfig) -> str:
    hybrid = f", softmax_attention_layers={list(tnl.softmax_layers)}" if tnl.softmax_layers else ""
    return (
        f"decoder_layers={tnl.num_layers}, decoder_embed_dim={tnl.hidden_size}, "
        f"decoder_attention_heads={tnl.num_heads}, glu_dim={tnl.glu_size}, vocab_size={tnl.vocab_size}{hybrid}"
    )


def read_json(path: Path) -> dict:
    """A JSON object file; ConversionError naming the file if it is not valid JSON or not an object."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}; expected an object")
    return value


def _check_header(path: Path, header: object) -> dict:
    """A parsed safetensors header: every entry has a dtype, a shape and [begin, end] data offsets."""
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has an invalid safetensors header: a JSON {type(header).__name__}")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in info["shape"])
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ConversionError(
                f"{path} has an invalid safetensors header entry {name!r}: {str(info)[:100]}; "
                "expected dtype, shape and data_offsets"
            )
    return header


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file; ConversionError if the file is shorter than the header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ConversionError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}")
        try:
            header = _check_header(path, json.loads(f.read(n)))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} has an invalid safetensors header (not JSON: {e})") from None
    end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end > size:
        raise ConversionError(f"{path} is truncated: its header describes {end} bytes, the file has {size}")
    if end < size:
        raise ConversionError(f"{path} is damaged: its header describes {end} bytes, the file has {size}")
    return header


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch .bin state dict, memory-mapped (tensors are read when touched)."""
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for damaged files
        raise ConversionError(f"cannot read {path} ({e}); is it truncated or not a PyTorch checkpoint?") from None


class HFCheckpoint:
    """A Hugging Face TNL directory (OpenNLPLab layout or an export of this repository).

    Opening reads config.json and every shard's header and checks them against each other; :meth:`read`
    then reads one tensor.
    """

    def __init__(self, path: Path, seq_length: int | None = None) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{self.path} has no config.json; expected a Hugging Face TransNormerLLM directory")
        raw = read_json(config_path)
        if raw.get("model_type") != "transnormer":
            raise ConversionError(f"{config_path} has model_type {raw.get('model_type')!r}; expected 'transnormer'")
        try:
            self.config = TransnormerConfig.from_dict(raw)
            self.tnl = tnl_from_hf_config(self.config, seq_length or raw.get("model_max_length") or 2048)
        except (TypeError, ValueError) as e:  # a value of the wrong type (ConversionError is neither)
            raise ConversionError(f"{config_path} does not describe a TransNormerLLM ({e})") from None
        self.files = self._weight_files()
        self.stored = self._stored_tensors()
        self._check_tensors()
        self.dtype = self.stored[HF_EMBEDDING][1]
        tokenizer = self.path / "tokenizer.model"
        self.tokenizer_model = tokenizer if tokenizer.is_file() else None

    def _weight_files(self) -> dict[str, Path] | list[Path]:
        """name -> shard from an index json, or the single weight file."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ConversionError(f"{index} has no weight_map of tensor names to shard files")
                for shard in sorted(set(weight_map.values())):
                    if not (self.path / shard).is_file():
                        raise ConversionError(f"shard {shard} listed in {index} is missing")
                return {name: self.path / shard for name, shard in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return [self.path / single]
        raise ConversionError(
            f"{self.path} has no weights: expected model.safetensors, pytorch_model.bin or an index json of shards"
        )

    def _stored_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, Path]]:
        """name -> (shape, dtype, file) of every stored tensor, from safetensors headers or mmap-ed .bin files."""
        files = sorted(set(self.files.values())) if isinstance(self.files, dict) else self.files
        stored = {}
        self.offsets: dict[str, int] = {}  # safetensors: name -> file offset of the tensor's bytes
        for path in files:
            if path.suffix == ".safetensors":
                header = safetensors_header(path)
                with open(path, "rb") as f:
                    start = 8 + struct.unpack("<Q", f.read(8))[0]
                for name, info in header.items():
                    if name != "__metadata__":
                        stored[name] = (tuple(info["shape"]), _FROM_SAFETENSORS.get(info["dtype"], info["dtype"]), path)
                        self.offsets[name] = start + info["data_offsets"][0]
            else:
                for name, tensor in _load_bin(path).items():
                    stored[name] = (tuple(tensor.shape), tensor.dtype, path)
        return stored

    def _check_tensors(self) -> None:
        expected = {}
        for group in range(self.tnl.num_layers + 1):
            expected.update(hf_group_shapes(self.tnl, group))
        for name, shape in expected.items():
            if name not in self.stored:
                raise ConversionError(
                    f"{name} is missing from {self.path}, whose config.json says {_describe(self.tnl)}"
                )
            stored_shape, dtype, path = self.stored[name]
            if stored_shape != shape:
                raise ConversionError(
                    f"{name} has shape {list(stored_shape)} in {path.name}, but config.json ({_describe(self.tnl)}) "
                    f"implies {list(shape)}"
                )
            if dtype not in SAFETENSORS_DTYPES:
                raise ConversionError(f"{name} in {path.name} is {dtype}; expected float32, bfloat16 or float16")
        unexpected = sorted(n for n in self.stored if n not in expected and n not in IGNORED_TENSORS)
        if unexpected:
            raise ConversionError(
                f"{self.path} holds tensors that a TNL with config.json's {_describe(self.tnl)} does not have: "
                + ", ".join(unexpected[:5])
                + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            )

    def read(self, name: str) -> torch.Tensor:
        """One stored tensor, read whole (safetensors: with a plain read, so no mapped pages stay resident)."""
        shape, dtype, path = self.stored[name]
        if path.suffix != ".safetensors":
            return _load_bin(path)[name]
        tensor = torch.empty(shape, dtype=dtype)
        with open(path, "rb") as f:
            f.seek(self.offsets[name])
            f.readinto(tensor.view(-1).view(torch.uint8).numpy())
        return tensor


def parse_size(size: str | int) -> int:
    """Bytes in "5GB", "500MB", "2GiB" or an int (decimal units as in transformers, binary with "i")."""
    if isinstance(size, int):
        return size
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
    }
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    if text.endswith("B"):
        text = text[:-1]
    try:
        return int(text)
    except ValueError:
        raise ConversionError(
            f"cannot read size {size!r}; expected e.g. 5GB, 500MB, 2GiB or a number of bytes"
        ) from None


class SafetensorsWriter:
    """Writes tensors whose names, shapes and dtypes are known in advance into safetensors shards, one tensor at a
    time (the headers come first, so the layout is fixed before any data). Shards stay under ``max_shard_bytes``
    unless one tensor is larger; more than one shard gets ``model.safetensors.index.json``."""

    def __init__(
        self, directory: Path, specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
    ) -> None:
        self.directory = Path(directory)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        used = 0
        for name, shape, dtype in specs:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            used += nbytes
        n = len(shards)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.order = [
            (name, shape, dtype, shard) for shard, items in enumerate(shards) for name, shape, dtype, _ in items
        ]
        self.position = 0
        self.handle = None
        self.current = -1

    def _open(self, shard: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header, offset = {}, 0
        for name, shape, dtype, nbytes in self.shards[shard]:
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        data = json.dumps(header, separators=(",", ":")).encode()
        data += b" " * (-len(data) % 8)  # 8-byte alignment of the tensor data, like the safetensors library
        self.handle = open(self.directory / self.files[shard], "wb")
        self.handle.write(struct.pack("<Q", len(data)) + data)
        self.current = shard

    def write(self, name: str, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Appends the next tensor; its name, shape and dtype must be the next ones announced. A list of tensors is
        written as their concatenation along dim 0, part after part (never built whole)."""
        parts = tensor if isinstance(tensor, list) else [tensor]
        want, shape, dtype, shard = self.order[self.position]
        got = (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) if parts[0].dim() else ()
        if (name, got, parts[0].dtype) != (want, shape, dtype) or any(
            (p.shape[1:], p.dtype) != (parts[0].shape[1:], parts[0].dtype) for p in parts
        ):
            shapes = " + ".join(str(list(p.shape)) for p in parts)
            raise RuntimeError(f"expected {want} {list(shape)} {dtype}, got {name} {shapes} {parts[0].dtype}")
        if shard != self.current:
            self._open(shard)
        for part in parts:
            self.handle.write(part.detach().contiguous().cpu().view(torch.uint8).numpy().data)
        self.position += 1

    def close(self) -> None:
        """Finishes the last shard and writes the index (several shards); every announced tensor must be written."""
        if self.position != len(self.order):
            raise RuntimeError(f"{len(self.order) - self.position} announced tensors were not written")
        if self.handle is not None:
            self.handle.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[shard] for name, _, _, shard in self.order}
            total = sum(nbytes for items in self.shards for *_, nbytes in items)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
