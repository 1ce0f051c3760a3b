"""Megatron-LM checkpoint directories: a streaming torch_dist writer and readers of torch_dist and legacy ``torch``.

Layout that ``pretrain_gpt.py --load ROOT`` reads (megatron/training/checkpointing.py, core_v0.19):

    ROOT/latest_checkpointed_iteration.txt     the iteration number (or "release")
    ROOT/iter_0000000/metadata.json            {"sharded_backend": "torch_dist", ...}: a torch_dist checkpoint
    ROOT/iter_0000000/.metadata, __*_0.distcp  PyTorch DCP: every tensor at its global (TP/PP-free) shape
                                               plus the "common_state" object: args, checkpoint_version, iteration

The writer saves one DCP checkpoint per group (embedding, then each layer) into sub-directories and merges them:
their data files are moved next to each other and their metadata joined into one ``.metadata``, so memory holds
one group at a time whatever the model size. Readers use ``torch.distributed.checkpoint`` without a process
group, one group of keys at a time (DCP reads only the entries asked for). Every pickle in a checkpoint is read
through :mod:`megatron_tnllm.convert.safe_load`, which refuses anything but the types Megatron checkpoints hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata

from megatron_tnllm.checkpoint_tracker import TRACKER
from megatron_tnllm.configs import TNLConfig
from megatron_tnllm.convert.errors import ConversionError, note
from megatron_tnllm.convert.layout import (
    MEGATRON_EMBEDDING,
    from_megatron,
    matching_preset,
    megatron_group_shapes,
    megatron_keys,
    merge_tensor_parallel,
    split_torch_dist,
)
from megatron_tnllm.convert.safe_load import SafeFileSystemReader, read_common_state, read_dcp_metadata, safe_torch_load
from megatron_tnllm.spec_table import SPECS, spec_for, spec_of_args

CHECKPOINT_VERSION = 3.0
# What Megatron's save records with the model (megatron/training/checkpointing.py, _build_sharded_state_dict_metadata
# without a distributed optimizer).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
_LEGACY_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------- locating


def checkpoint_directory(root: Path, iteration: int | None = None) -> Path:
    """The directory holding one checkpoint: ROOT/iter_N (N from ``iteration`` or the tracker file), ROOT/release,
    or ROOT itself when it is such a directory."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{root} does not exist or is not a directory; expected a Megatron checkpoint")
    if iteration is None and (root / TRACKER).is_file():
        text = (root / TRACKER).read_text().strip()
        if text == "release":
            return _existing(root / "release", root / TRACKER)
        try:
            iteration = int(text)
        except ValueError:
            raise ConversionError(
                f"{root / TRACKER} holds {text!r}; expected an iteration number or 'release'"
            ) from None
    if iteration is not None:
        return _existing(root / f"iter_{iteration:07d}", root / TRACKER)
    if checkpoint_format(root, strict=False):
        return root
    raise ConversionError(
        f"{root} is not a Megatron checkpoint: no {TRACKER}, metadata.json (torch_dist) or mp_rank_* (torch) found"
    )


def _existing(path: Path, named_by: Path) -> Path:
    if not path.is_dir():
        raise ConversionError(f"{path} is missing (named by {named_by}); expected the checkpoint directory")
    return path


def checkpoint_format(directory: Path, strict: bool = True) -> str | None:
    """ "torch_dist" (metadata.json) or "torch" (mp_rank_* directories)."""
    if (directory / "metadata.json").is_file():
        return "torch_dist"
    if any(_LEGACY_RANK_DIR.match(p.name) for p in directory.iterdir()):
        return "torch"
    if strict:
        raise ConversionError(f"{directory} holds neither metadata.json (torch_dist) nor mp_rank_* directories (torch)")
    return None


def open_checkpoint(
    root: Path, iteration: int | None = None, **model_options
) -> MegatronDistCheckpoint | MegatronLegacyCheckpoint:
    """A reader of the Megatron checkpoint at ``root`` (see :func:`resolve_model` for ``model_options``)."""
    directory = checkpoint_directory(root, iteration)
    model_options.setdefault("root", Path(root))
    if checkpoint_format(directory) == "torch_dist":
        return MegatronDistCheckpoint(directory, **model_options)
    return MegatronLegacyCheckpoint(directory, **model_options)


# ------------------------------------------------------------------------------------ model from args


def _spec_scale(spec) -> bool | None:
    """Embedding scale of a ``--spec megatron_tnllm.specs NAME`` (None if the spec is not one of ours)."""
    info = spec_of_args(spec)
    return None if info is None else info.scale_embedding


def tokenizer_pieces(path: Path) -> int:
    """Number of pieces of a SentencePiece model (ConversionError if it is not one)."""
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{path} is not a SentencePiece model ({e})") from None


def _find_tokenizer(args: argparse.Namespace, given: Path | None, places: list[Path]) -> Path | None:
    """``given`` (must exist), else ``args.tokenizer_model`` if that file exists, else a ``tokenizer.model`` in
    ``places`` (a moved checkpoint: the args hold a path that is gone); says so when none is found."""
    if given is not None:
        if not Path(given).is_file():
            raise ConversionError(f"--tokenizer-model {given} does not exist; expected a SentencePiece model file")
        return Path(given)
    recorded = getattr(args, "tokenizer_model", None)
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    for place in dict.fromkeys(places):
        if (place / "tokenizer.model").is_file():
            if recorded:
                note(f"the args' tokenizer model {recorded} does not exist; using {place / 'tokenizer.model'}")
            return place / "tokenizer.model"
    note(
        f"no tokenizer model found (args: {recorded or 'none'}; no tokenizer.model in "
        f"{' or '.join(map(str, dict.fromkeys(places)))}): the export has no tokenizer (--tokenizer-model adds one)"
    )
    return None


def _true_vocab_size(
    args: argparse.Namespace, where: Path, padded_vocab: int, vocab_size: int | None, tokenizer_model: Path | None
) -> int:
    """The vocabulary size of the export: ``vocab_size``, else the args' (what the converter records), else the
    tokenizer's. Never below the tokenizer's size; every row dropped or unused is reported."""
    pieces = tokenizer_pieces(tokenizer_model) if tokenizer_model is not None else None
    recorded = getattr(args, "vocab_size", None)
    chosen = vocab_size or recorded or pieces
    if chosen is None:
        raise ConversionError(
            f"cannot tell the true vocabulary size of {where} (padded to {padded_vocab}): "
            "pass --vocab-size or --tokenizer-model"
        )
    if pieces is not None and chosen < pieces:
        raise ConversionError(
            f"vocabulary size {chosen} is below the {pieces} pieces of the tokenizer {tokenizer_model}; "
            f"expected at least {pieces}"
        )
    if chosen > padded_vocab:
        raise ConversionError(f"vocabulary size {chosen} exceeds the checkpoint's embedding rows ({padded_vocab})")
    if vocab_size and recorded and vocab_size != recorded:
        note(f"--vocab-size {vocab_size} differs from the vocabulary size {recorded} in the args of {where}")
    if chosen < padded_vocab:
        source = "--vocab-size" if vocab_size else "the args" if recorded else "the tokenizer"
        note(f"keeping {chosen} of the {padded_vocab} embedding rows (vocabulary size from {source}); "
             f"the last {padded_vocab - chosen} are Megatron's padding and are dropped")  # fmt: skip
    if pieces is not None and chosen > pieces:
        note(f"the model has {chosen} vocabulary rows, its tokenizer {pieces} pieces: ids {pieces}..{chosen - 1} "
             "have no piece")  # fmt: skip
    return chosen


def resolve_model(
    args: argparse.Namespace,
    where: Path,
    layer_count: int,
    lrpe_layers: tuple[int, ...],
    softmax_layers: tuple[int, ...],
    padded_vocab: int,
    vocab_size: int | None = None,
    tokenizer_model: Path | None = None,
    scale_embedding: bool | None = None,
    root: Path | None = None,
) -> tuple[TNLConfig, Path | None, TNLConfig]:
    """The TNLConfig of a checkpoint from its Megatron args and what its tensors show, its tokenizer model, and
    the model as saved (for ``--verify``: the args' embedding scale even when ``scale_embedding`` overrides it).

    The true vocabulary size: ``vocab_size``, else ``args.vocab_size``, else the tokenizer model's (given, else
    ``args.tokenizer_model`` if it exists, else ``tokenizer.model`` in ``root`` or ``where``). The embedding scale:
    ``scale_embedding``, else ``args.spec``'s.
    """
    if args is None:
        raise ConversionError(f"{where} holds no Megatron args; expected a checkpoint saved by pretrain_gpt.py")
    if not isinstance(args, argparse.Namespace):
        raise ConversionError(f"{where}: the args are a {type(args).__name__}; expected an argparse.Namespace")
    saved_scale = _spec_scale(getattr(args, "spec", None))
    if scale_embedding is None:
        scale_embedding = saved_scale
        if scale_embedding is None:
            raise ConversionError(
                f"{where} was trained with --spec {getattr(args, 'spec', None)}, so its embedding scale is unknown; "
                "expected a spec of megatron_tnllm.specs, or pass --scale-embedding / --no-scale-embedding"
            )
    elif saved_scale is not None and scale_embedding != saved_scale:
        note(
            f"{'--scale-embedding' if scale_embedding else '--no-scale-embedding'} overrides the embedding scale of "
            f"{where} (--spec {' '.join(args.spec)}); the export is a different model"
        )
    if args.num_layers != layer_count:
        raise ConversionError(
            f"{where}: args.num_layers is {args.num_layers} but the checkpoint has {layer_count} layers"
        )
    tokenizer_model = _find_tokenizer(args, tokenizer_model, [p for p in (root, where) if p is not None])
    vocab_size = _true_vocab_size(args, where, padded_vocab, vocab_size, tokenizer_model)
    tnl = tnl_from_args(args, where, lrpe_layers, vocab_size, scale_embedding, softmax_layers)
    saved_vocab = min(getattr(args, "vocab_size", None) or vocab_size, padded_vocab)
    saved_scale = scale_embedding if saved_scale is None else saved_scale
    saved = tnl_from_args(args, where, lrpe_layers, saved_vocab, saved_scale, softmax_layers)
    return tnl, tokenizer_model, saved


def tnl_from_args(
    args: argparse.Namespace,
    where: Path,
    lrpe_layers: tuple[int, ...],
    vocab_size: int,
    scale_embedding: bool,
    softmax_layers: tuple[int, ...] = (),
) -> TNLConfig:
    """The TNLConfig that Megatron args describe (shape, norm epsilon, sequence length) with the given vocabulary,
    LRPE layers and embedding scale, which the args do not hold.

    ``softmax_layers`` are the layers whose tensors are a softmax attention's; a ``--spec`` of this package
    must build softmax attention on exactly those (a checkpoint whose tensors and spec disagree is refused).
    """
    info = spec_of_args(getattr(args, "spec", None))
    if info is not None and info.softmax_layers_of(args.num_layers) != tuple(softmax_layers):
        raise ConversionError(
            f"{where}: --spec {' '.join(args.spec)} builds softmax attention on layers "
            f"{list(info.softmax_layers_of(args.num_layers))}, but the checkpoint holds softmax-attention tensors "
            f"(self_attention.qkv_proj) on layers {list(softmax_layers)}; expected the same layers"
        )
    tnl = TNLConfig(
        name="custom",
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_heads=args.num_attention_heads,
        glu_size=args.ffn_hidden_size,
        vocab_size=vocab_size,
        scale_embedding=scale_embedding,
        lrpe_layers=lrpe_layers,
        softmax_layers=tuple(softmax_layers),
        norm_eps=args.layernorm_epsilon,
        seq_length=getattr(args, "seq_length", None) or 2048,
    )
    if getattr(args, "kv_channels", None) not in (None, tnl.head_dim):
        raise ConversionError(
            f"{where}: args.kv_channels is {args.kv_channels}; TNL needs hidden_size / heads = {tnl.head_dim}"
        )
    preset = matching_preset(tnl)
    return tnl.replace(name=preset.name) if preset else tnl


def saved_model(directory: Path) -> tuple[TNLConfig, int]:
    """(TNLConfig, embedding rows) of a torch_dist checkpoint directory as its own args describe it: the args'
    vocabulary size and ``--spec`` embedding scale, no option applied (what ``--verify`` compares against)."""
    metadata = read_dcp_metadata(directory)
    stored = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
    args = read_common_state(directory, metadata).get("args")
    padded = stored[MEGATRON_EMBEDDING][0]
    scale = _spec_scale(getattr(args, "spec", None))
    if args is None or scale is None:
        raise ConversionError(f"{directory}: its args do not name a megatron_tnllm spec; cannot rebuild the model")
    vocab = args.vocab_size or padded
    return tnl_from_args(args, directory, _lrpe_layers(stored), vocab, scale, _softmax_layers(stored)), padded


def _check_shapes(tnl: TNLConfig, padded_vocab: int, stored: dict[str, tuple[int, ...]], where: Path) -> None:
    """Every Megatron key of the model is stored, at the shape the args imply."""
    for group in range(tnl.num_layers + 1):
        for key, shape in megatron_group_shapes(tnl, group, padded_vocab).items():
            if key not in stored:
                raise ConversionError(f"{key} is missing from {where}")
            if tuple(stored[key]) != shape:
                raise ConversionError(
                    f"{key} has shape {list(stored[key])} in {where}, but its args (num_layers={tnl.num_layers}, "
                    f"hidden_size={tnl.hidden_size}, num_attention_heads={tnl.num_heads}, "
                    f"ffn_hidden_size={tnl.glu_size}) imply {list(shape)}"
                )


def _require_tnl(keys, probe: str, where: Path) -> None:
    """A TNL checkpoint has the embedding and ``probe`` (layer 0's token-mixer projection; layer 0 is never a
    softmax layer, since every spec puts LRPE there)."""
    if probe not in keys or not any(k.startswith(MEGATRON_EMBEDDING) for k in keys):
        sample = ", ".join(sorted(k for k in keys if k.startswith("decoder.layers.0."))[:3]) or ", ".join(
            sorted(keys)[:3]
        )
        raise ConversionError(f"{where} is not a TransNormerLLM checkpoint: it has no {probe} (it has {sample})")


def _lrpe_layers(keys) -> tuple[int, ...]:
    return tuple(sorted(int(_LAYER_KEY.match(k).group(1)) for k in keys if k.endswith("self_attention.lrpe_theta")))


def _softmax_layers(keys) -> tuple[int, ...]:
    """Layers holding a softmax attention's qkv_proj (torch_dist: its sections; legacy: the per-rank tensor)."""
    found = {int(m.group(1)) for k in keys if ".self_attention.qkv_proj.weight" in k and (m := _LAYER_KEY.match(k))}
    return tuple(sorted(found))


def _shift_layer(key: str, offset: int) -> str:
    """decoder.layers.{j}.x -> decoder.layers.{offset + j}.x (local to global layer numbers)."""
    return _LAYER_KEY.sub(lambda m: f"decoder.layers.{offset + int(m.group(1))}.", key, count=1)


def _layer_count(keys) -> int:
    indices = {int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))}
    return max(indices) + 1 if indices else 0


# ------------------------------------------------------------------------------------------ torch_dist


class MegatronDistCheckpoint:
    """A torch_dist checkpoint directory read group by group (tensors at their global shapes)."""

    def __init__(self, directory: Path, **model_options) -> None:
        self.path = Path(directory)
        metadata = read_dcp_metadata(self.path)
        self.reader = SafeFileSystemReader(self.path)
        self._check_files(metadata)
        stored = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
        _require_tnl(stored, "decoder.layers.0.self_attention.qkvu_proj.weight.query", self.path)
        self.dtypes = {k: v.properties.dtype for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
        args = read_common_state(self.path, metadata).get("args")
        self.padded_vocab = stored[MEGATRON_EMBEDDING][0]
        self.tnl, self.tokenizer_model, self.saved_tnl = resolve_model(
            args,
            self.path,
            _layer_count(stored),
            _lrpe_layers(stored),
            _softmax_layers(stored),
            self.padded_vocab,
            **model_options,
        )
        _check_shapes(self.tnl, self.padded_vocab, stored, self.path)
        self.dtype = self.dtypes[MEGATRON_EMBEDDING]

    def _check_files(self, metadata: Metadata) -> None:
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            path = self.path / name
            if not path.is_file():
                raise ConversionError(f"{path} is missing; {self.path}/.metadata stores tensors in it")
            if path.stat().st_size < size:
                raise ConversionError(
                    f"{path} is truncated: {self.path}/.metadata needs {size} bytes, the file has {path.stat().st_size}"
                )

    def group(self, index: int, names: list[str] | None = None) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Group ``index`` under HF names (0: embedding without padding rows; i + 1: layer i), or only its HF
        tensors ``names`` (one of :func:`hf_tensor_sets`: only their torch_dist keys are read)."""
        shapes = megatron_group_shapes(self.tnl, index, self.padded_vocab)
        keys = shapes if names is None else megatron_keys(index, names)
        state = {key: torch.empty(shapes[key], dtype=self.dtypes[key]) for key in keys}
        dcp.load(state, storage_reader=self.reader, no_dist=True)
        return from_megatron(index, state, self.tnl.vocab_size)


# ------------------------------------------------------------------------------------------ legacy torch


def _model_keys(state: object, path: Path) -> list[str]:
    """The model entries of a legacy rank file: ["model"], or ["model0", ..., "model{V-1}"] with a virtual
    pipeline of V chunks per rank."""
    keys = sorted(state, key=str) if isinstance(state, dict) else []
    if "model" in keys:
        return ["model"]
    chunks = sorted(int(m.group(1)) for k in keys if isinstance(k, str) and (m := re.fullmatch(r"model(\d+)", k)))
    if not chunks or chunks != list(range(len(chunks))):
        raise ConversionError(
            f"{path} has no model state (keys {keys[:5]}); expected 'model' or 'model0', 'model1', ... "
            "(virtual pipeline chunks)"
        )
    return [f"model{v}" for v in chunks]


class MegatronLegacyCheckpoint:
    """A legacy ``torch`` checkpoint: ``mp_rank_TT[_PPP]/model_optim_rng.pt`` per rank, per-rank tensors; with a
    virtual pipeline each file holds V chunks ``model0`` ... ``model{V-1}``, chunk v of stage p holding the layers
    that Megatron's interleaved schedule places there (v-major, then p: chunk (p, v) starts after the layers of
    all chunks (p', v') with v' < v, or v' = v and p' < p)."""

    def __init__(self, directory: Path, **model_options) -> None:
        self.path = Path(directory)
        ranks = {}
        for child in self.path.iterdir():
            if m := _LEGACY_RANK_DIR.match(child.name):
                ranks[(int(m.group(1)), int(m.group(2) or 0))] = child / "model_optim_rng.pt"
        self.tp = 1 + max(t for t, _ in ranks)
        self.pp = 1 + max(p for _, p in ranks)
        self.files = {}
        for tp in range(self.tp):
            for pp in range(self.pp):
                path = ranks.get((tp, pp))
                if path is None or not path.is_file():
                    name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if self.pp > 1 else "")
                    raise ConversionError(
                        f"{self.path / name / 'model_optim_rng.pt'} is missing (TP {self.tp} x PP {self.pp})"
                    )
                self.files[(tp, pp)] = path
        first = self._load(self.files[(0, 0)])
        self.model_keys = _model_keys(first, self.files[(0, 0)])
        # Per chunk in layer order: (first global layer, layer count, stage, model key); shapes of TP rank 0.
        self.chunks: list[tuple[int, int, int, str]] = []
        stages, local_shapes, dtypes, total = {0: first}, {}, {}, 0
        for model_key in self.model_keys:
            for pp in range(self.pp):
                if pp not in stages:
                    stages[pp] = self._load(self.files[(0, pp)])
                model = stages[pp].get(model_key)
                if not isinstance(model, dict):
                    raise ConversionError(f"{self.files[(0, pp)]} has no {model_key!r} state like {self.files[(0, 0)]}")
                for key, tensor in model.items():
                    if not isinstance(tensor, torch.Tensor) or key.startswith("output_layer."):
                        continue
                    global_key = _shift_layer(key, total)
                    local_shapes[global_key], dtypes[global_key] = tuple(tensor.shape), tensor.dtype
                self.chunks.append((total, _layer_count(model), pp, model_key))
                total += _layer_count(model)
        del stages
        _require_tnl(local_shapes, "decoder.layers.0.self_attention.qkvu_proj.weight", self.path)
        self.padded_vocab = local_shapes[MEGATRON_EMBEDDING][0] * self.tp
        self.tnl, self.tokenizer_model, self.saved_tnl = resolve_model(
            first.get("args"),
            self.path,
            total,
            _lrpe_layers(local_shapes),
            _softmax_layers(local_shapes),
            self.padded_vocab,
            **model_options,
        )
        _check_shapes(self.tnl, self.padded_vocab, self._global_shapes(local_shapes), self.path)
        self.dtype = dtypes[MEGATRON_EMBEDDING]
        self._stage: tuple[int, list[dict]] | None = None

    def _load(self, path: Path) -> dict:
        """A rank's file, memory-mapped, through the weights-only unpickler (args: Megatron's allow-list)."""
        return safe_torch_load(path, path, mmap=True)

    def _global_shapes(self, local: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for key, shape in local.items():
            if key.endswith("_extra_state"):
                continue
            fake = [torch.empty(shape, device="meta")] * self.tp
            merged = merge_tensor_parallel(key, fake)
            shapes.update({k: tuple(v.shape) for k, v in split_torch_dist(key, merged).items()})
        return shapes

    def _stage_states(self, pp: int) -> list[dict]:
        """The TP ranks' files of pipeline stage ``pp`` (the previous stage's are released)."""
        if self._stage is None or self._stage[0] != pp:
            self._stage = None
            self._stage = (pp, [self._load(self.files[(tp, pp)]) for tp in range(self.tp)])
        return self._stage[1]

    def group(self, index: int, names: list[str] | None = None) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Group ``index`` under HF names, merged across tensor-parallel ranks; or only its HF tensors ``names``."""
        if index == 0:
            files, model_key = self._stage_states(0), self.model_keys[0]
            prefix = global_prefix = MEGATRON_EMBEDDING
        else:
            layer = index - 1
            offset, _, pp, model_key = next(c for c in self.chunks if c[0] <= layer < c[0] + c[1])
            files = self._stage_states(pp)
            prefix, global_prefix = f"decoder.layers.{layer - offset}.", f"decoder.layers.{layer}."
        states = [f[model_key] for f in files]
        wanted = None if names is None else megatron_keys(index, names)
        merged = {}
        for key in states[0]:
            global_key = global_prefix + key[len(prefix) :]
            if not key.startswith(prefix) or key.endswith("_extra_state"):
                continue
            if wanted is None or any(k.startswith(global_key) for k in wanted):  # qkvu: the sections' prefix
                tensor = merge_tensor_parallel(key, [state[key] for state in states])
                merged.update(split_torch_dist(global_key, tensor))
        return from_megatron(index, merged, self.tnl.vocab_size)


# ------------------------------------------------------------------------------------------ writing


class _RawBytesSavePlanner(DefaultSavePlanner):
    """Stores byte objects as given: Megatron keeps a ShardedObject as the bytes of ``torch.save([obj])``."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def transform_object(self, write_item, object):  # noqa: A002 - the base class's name
        return object


def save_dcp_part(directory: Path, tensors: dict[str, torch.Tensor], objects: dict[str, object]) -> None:
    """One DCP checkpoint of whole tensors (global shape, one chunk each) and Megatron-style objects."""
    state: dict[str, torch.Tensor | io.BytesIO] = dict(tensors)
    for key, obj in objects.items():
        buffer = io.BytesIO()
        torch.save([obj], buffer)
        state[key] = buffer
    directory.mkdir(parents=True)
    dcp.save(
        state, storage_writer=FileSystemWriter(directory, thread_count=1), planner=_RawBytesSavePlanner(), no_dist=True
    )


def merge_dcp_parts(parts: list[Path], directory: Path) -> None:
    """Moves the data files of DCP checkpoints ``parts`` into ``directory`` (renamed ``__{part}_{n}.distcp``) and
    writes the ``.metadata`` of their union; the part directories are removed."""
    tensors, storage, version = {}, {}, None
    for k, part in enumerate(parts):
        metadata = read_dcp_metadata(part)
        renamed: dict[str, str] = {}
        for index, info in metadata.storage_data.items():
            new = renamed.setdefault(info.relative_path, f"__{k}_{len(renamed)}.distcp")
            storage[index] = dataclasses.replace(info, relative_path=new)
        for old, new in renamed.items():
            os.replace(part / old, directory / new)
        duplicated = tensors.keys() & metadata.state_dict_metadata.keys()
        if duplicated:
            raise RuntimeError(f"keys saved twice: {sorted(duplicated)[:3]}")
        tensors.update(metadata.state_dict_metadata)
        version = metadata.version
        shutil.rmtree(part)
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata=tensors, storage_data=storage, version=version), f)


def megatron_args(
    tnl: TNLConfig,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    padded_vocab: int,
    make_vocab_size_divisible_by: int,
    dtype: torch.dtype,
    tokenizer_model: Path | None,
    virtual_stages: int = 1,
) -> argparse.Namespace:
    """The args namespace ``pretrain_gpt.py`` would save for this model, parsed by Megatron's own parser.

    Checkpoint args record no optimizer and no RNG state, so ``--load`` does not look for them.
    """
    from megatron.training.arguments import add_megatron_arguments

    argv = tnl.to_megatron_args()
    spec = spec_for(tnl)
    if spec is None and tnl.softmax_layers:
        # The placements a spec builds for this model (shape, LRPE layers, embedding scale): the table's only.
        layouts = [s.softmax_layers_of(tnl.num_layers) for s in SPECS.values()]
        fitting = [
            x for x in dict.fromkeys(layouts) if x and max(x) < tnl.num_layers and not set(x) & set(tnl.lrpe_layers)
        ]
        placements = [list(x) for x in fitting if spec_for(tnl.replace(softmax_layers=x))]
        raise ConversionError(
            f"no spec of megatron_tnllm.specs builds softmax attention on layers {list(tnl.softmax_layers)} of this "
            f"{tnl.num_layers}-layer model (LRPE on layers {list(tnl.lrpe_layers)}); expected softmax_attention_layers "
            + (" or ".join(map(str, placements)) if placements else "of a hybrid spec (none builds this model)")
        )
    if spec is None:
        raise ConversionError(
            f"no spec of megatron_tnllm.specs builds LRPE on layers {list(tnl.lrpe_layers)} "
            "(the generic specs put it on layer 0 only); expected a preset's LRPE layers or [0]"
        )
    argv[-2:] = [spec.module, spec.name]
    argv += [
        "--tensor-model-parallel-size", str(tensor_parallel),
        "--pipeline-model-parallel-size", str(pipeline_parallel),
        "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by),
        "--ckpt-format", "torch_dist",
        "--no-save-optim",
        "--no-save-rng",
        "--no-gradient-accumulation-fusion",
    ]  # fmt: skip
    if virtual_stages > 1:
        argv += ["--num-virtual-stages-per-pipeline-rank", str(virtual_stages)]
    if tokenizer_model is not None:
        argv += ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tokenizer_model)]
    argv += {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"]}.get(dtype, [])
    args = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args(argv)
    # What validate_args() derives (it needs CUDA, so it cannot run here).
    args.rank, args.world_size, args.data_parallel_size = 0, tensor_parallel * pipeline_parallel, 1
    args.padded_vocab_size, args.vocab_size = padded_vocab, tnl.vocab_size
    args.params_dtype = dtype
    args.virtual_pipeline_model_parallel_size = virtual_stages if virtual_stages > 1 else None
    args.use_dist_ckpt = True
    args.consumed_train_samples = args.skipped_train_samples = args.consumed_valid_samples = 0
    return args


def write_checkpoint_metadata(root: Path, iteration: int) -> None:
    """The tracker file and ``metadata.json`` that make ``root/iter_N`` a torch_dist checkpoint for ``--load``."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    save_config(CheckpointingConfig("torch_dist", 1), str(root / f"iter_{iteration:07d}"))
    (root / TRACKER).write_text(str(iteration))


def save_megatron_checkpoint(
    model: torch.nn.Module,
    tnl: TNLConfig,
    root: Path,
    iteration: int,
    *,
    padded_vocab: int,
    tokenizer_model: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Saves a TNL ``GPTModel`` (built at TP = PP = 1 in a running process group) as ``pretrain_gpt.py`` would:
    ``root/iter_N`` in torch_dist with the args of :func:`megatron_args`, the tracker file and a copy of the
    tokenizer model, so that ``--load root`` and the converter read it. Returns ``root/iter_N``."""
    from megatron.core import dist_checkpointing

    directory = Path(root) / f"iter_{iteration:07d}"
    directory.mkdir(parents=True)
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, Path(root) / "tokenizer.model")
        tokenizer_model = Path(root).absolute() / "tokenizer.model"
    args = megatron_args(
        tnl, tensor_parallel=1, pipeline_parallel=1, padded_vocab=padded_vocab, make_vocab_size_divisible_by=1,
        dtype=dtype, tokenizer_model=tokenizer_model,
    )  # fmt: skip
    args.iteration = iteration
    common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    dist_checkpointing.save({"model": model.sharded_state_dict(), **common}, str(directory))
    (Path(root) / TRACKER).write_text(str(iteration))
    return directory
