"""The two conversions, streamed group by group (embedding, then each layer) with a progress bar.

Output is written into a temporary directory next to the target and renamed at the end, after ``verify``
passed (:mod:`megatron_tnllm.convert.staging`): an error or signal at any point leaves neither a partial target
nor the temporary directory behind; an existing target is replaced only with ``force``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_tnllm.configs import padded_vocab_size
from megatron_tnllm.convert.errors import ConversionError, note
from megatron_tnllm.convert.hf_format import HFCheckpoint, SafetensorsWriter, parse_size
from megatron_tnllm.convert.layout import (
    hf_config_from_tnl,
    hf_group_shapes,
    hf_tensor_sets,
    megatron_group_objects,
    to_megatron,
)
from megatron_tnllm.convert.megatron_format import (
    CHECKPOINT_VERSION,
    CONTENT_METADATA,
    MegatronDistCheckpoint,
    megatron_args,
    merge_dcp_parts,
    open_checkpoint,
    save_dcp_part,
    saved_model,
    tokenizer_pieces,
    write_checkpoint_metadata,
)
from megatron_tnllm.convert.safe_load import common_state_key
from megatron_tnllm.convert.staging import staged_output
from megatron_tnllm.hf.export import write_export_files

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ConversionResult:
    """What a conversion wrote (sizes of the converted tensors) and, with ``verify``, the largest logit difference
    relative to the largest logit."""

    output: Path
    tensors: int
    bytes: int
    vocab_size: int
    padded_vocab_size: int
    relative_logit_difference: float | None = None


def _require(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ConversionError(f"{name} is {value!r}; expected an integer >= {minimum}")


def _dtype(name: str, source_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        return source_dtype
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _token_ids(tokenizer_model: Path | None) -> dict[str, int]:
    """pad/bos/eos ids of a SentencePiece model (TNL's 0/1/2 without one; pad falls back to 0 like TNL)."""
    if tokenizer_model is None:
        return {}
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    bos, eos = sp.bos_id(), sp.eos_id()
    return {
        "pad_token_id": max(sp.pad_id(), 0),
        "bos_token_id": bos if bos >= 0 else None,
        "eos_token_id": eos if eos >= 0 else None,
    }


def _progress(total: int, description: str, show: bool):
    return tqdm(total=total, desc=description, unit="layer", disable=not show, dynamic_ncols=True)


def hf_to_megatron(
    source: Path,
    target: Path,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_stages: int = 1,
    make_vocab_size_divisible_by: int = 128,
    padded_vocab: int | None = None,
    dtype: str = "auto",
    iteration: int = 0,
    seq_length: int | None = None,
    force: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Hugging Face directory ``source`` -> Megatron torch_dist checkpoint at ``target`` (the ``--load`` directory).

    The embedding is zero-padded to ``padded_vocab`` rows, by default Megatron's padding for training at
    ``tensor_parallel`` (a multiple of ``make_vocab_size_divisible_by * tensor_parallel``). ``tensor_parallel``
    and ``pipeline_parallel`` (and ``virtual_stages``, the virtual pipeline chunks per stage) are recorded in the
    args only: torch_dist loads at any TP/PP/VPP.
    """
    for name, value, minimum in (
        ("--tensor-model-parallel-size", tensor_parallel, 1),
        ("--pipeline-model-parallel-size", pipeline_parallel, 1),
        ("--num-virtual-stages-per-pipeline-rank", virtual_stages, 1),
        ("--make-vocab-size-divisible-by", make_vocab_size_divisible_by, 1),
        ("--padded-vocab-size", padded_vocab, 1),
        ("--iteration", iteration, 0),
        ("--seq-length", seq_length, 1),
    ):
        _require(name, value, minimum)
    hf = HFCheckpoint(source, seq_length)
    tnl = hf.tnl
    if hf.tokenizer_model is not None and tnl.vocab_size < (pieces := tokenizer_pieces(hf.tokenizer_model)):
        raise ConversionError(
            f"{source}/config.json has vocab_size {tnl.vocab_size}, below the {pieces} pieces of its tokenizer.model; "
            f"expected at least {pieces}"
        )
    if tnl.num_heads % tensor_parallel or tnl.num_layers % (pipeline_parallel * virtual_stages):
        raise ConversionError(
            f"TP {tensor_parallel} x PP {pipeline_parallel} x VPP {virtual_stages} does not divide {tnl.num_heads} "
            f"heads and {tnl.num_layers} layers; expected TP | heads and PP x VPP | layers"
        )
    if virtual_stages > 1 and pipeline_parallel == 1:
        raise ConversionError(
            f"--num-virtual-stages-per-pipeline-rank {virtual_stages} needs --pipeline-model-parallel-size >= 2"
        )
    padded = padded_vocab or padded_vocab_size(tnl.vocab_size, make_vocab_size_divisible_by, tensor_parallel)
    if padded < tnl.vocab_size:
        raise ConversionError(f"--padded-vocab-size {padded} is smaller than the vocabulary ({tnl.vocab_size})")
    if padded > tnl.vocab_size:
        multiple = make_vocab_size_divisible_by * tensor_parallel
        rule = "--padded-vocab-size" if padded_vocab else f"a multiple of {multiple}"
        note(f"padding the vocabulary from {tnl.vocab_size} to {padded} embedding rows with zeros ({rule}); "
             "megatron-to-hf drops them again")  # fmt: skip
    out_dtype = _dtype(dtype, hf.dtype)
    target = Path(target).absolute()
    final_tokenizer = target / "tokenizer.model" if hf.tokenizer_model else None
    args = megatron_args(
        tnl,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        virtual_stages=virtual_stages,
        padded_vocab=padded,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        dtype=out_dtype,
        tokenizer_model=final_tokenizer,
    )
    common = {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": 0,
        "content_metadata": dict(CONTENT_METADATA),
    }
    count = size = 0
    with staged_output(source, target, force) as staging:
        checkpoint = staging / f"iter_{iteration:07d}"
        checkpoint.mkdir()
        parts = []
        with _progress(tnl.num_layers + 1, "hf -> megatron", progress) as bar:
            for group in range(tnl.num_layers + 1):
                objects = dict.fromkeys(megatron_group_objects(tnl, group))
                if group == 0:
                    objects[common_state_key()] = common
                # One DCP part per set of HF tensors: memory holds one fused tensor, not a layer.
                for names in hf_tensor_sets(tnl, group):
                    tensors = to_megatron(group, {n: hf.read(n).to(out_dtype) for n in names}, padded)
                    parts.append(checkpoint / ".parts" / f"{len(parts):05d}")
                    save_dcp_part(parts[-1], tensors, objects)
                    objects = {}
                    count += len(tensors)
                    size += sum(t.numel() * t.element_size() for t in tensors.values())
                    del tensors
                bar.update()
        merge_dcp_parts(parts, checkpoint)
        (checkpoint / ".parts").rmdir()
        write_checkpoint_metadata(staging, iteration)
        if hf.tokenizer_model:
            shutil.copyfile(hf.tokenizer_model, staging / "tokenizer.model")
        result = ConversionResult(target, count, size, tnl.vocab_size, padded)
        if verify:
            from megatron_tnllm.convert import verify as check

            converted, rows = saved_model(checkpoint)
            result.relative_logit_difference = check.verify(
                Path(source), checkpoint, converted, rows,
                token_limit=_token_limit(hf.tokenizer_model, tnl.vocab_size),
                limit=check.tolerance(hf.dtype, out_dtype),
            )  # fmt: skip
    return result


def megatron_to_hf(
    source: Path,
    target: Path,
    *,
    iteration: int | None = None,
    vocab_size: int | None = None,
    tokenizer_model: Path | None = None,
    scale_embedding: bool | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Megatron checkpoint ``source`` (torch_dist or legacy torch, any TP/PP/VPP) -> Hugging Face export at ``target``.

    The vocabulary padding is dropped (true size: ``vocab_size``, else the args', else the tokenizer model's; never
    below the tokenizer's), with a note.
    """
    _require("--iteration", iteration, 0)
    _require("--vocab-size", vocab_size, 1)
    checkpoint = open_checkpoint(
        source, iteration, vocab_size=vocab_size, tokenizer_model=tokenizer_model, scale_embedding=scale_embedding
    )
    if verify and not isinstance(checkpoint, MegatronDistCheckpoint):
        raise ConversionError(
            "--verify needs a torch_dist source (Megatron loads legacy checkpoints only at their TP/PP)"
        )
    tnl = checkpoint.tnl
    out_dtype = _dtype(dtype, checkpoint.dtype)
    max_bytes = parse_size(max_shard_size)
    specs = [
        (name, shape, out_dtype)
        for group in range(tnl.num_layers + 1)
        for name, shape in hf_group_shapes(tnl, group).items()
    ]
    size = 0
    with staged_output(source, target, force) as staging:
        writer = SafetensorsWriter(staging, specs, max_bytes)
        with _progress(tnl.num_layers + 1, "megatron -> hf", progress) as bar:
            for group in range(tnl.num_layers + 1):
                for names in hf_tensor_sets(tnl, group):
                    tensors = checkpoint.group(group, names)
                    for name in names:
                        tensor = tensors.pop(name)
                        parts = [p.to(out_dtype) for p in (tensor if isinstance(tensor, list) else [tensor])]
                        writer.write(name, parts)
                        size += sum(p.numel() * p.element_size() for p in parts)
                    del tensors, tensor, parts
                bar.update()
        writer.close()
        dtype_name = str(out_dtype).removeprefix("torch.")
        config = hf_config_from_tnl(tnl, **_token_ids(checkpoint.tokenizer_model))
        write_export_files(staging, config, dtype_name, checkpoint.tokenizer_model)
        result = ConversionResult(Path(target).absolute(), len(specs), size, tnl.vocab_size, checkpoint.padded_vocab)
        if verify:
            from megatron_tnllm.convert import verify as check

            result.relative_logit_difference = check.verify(
                staging, checkpoint.path, checkpoint.saved_tnl, checkpoint.padded_vocab,
                token_limit=_token_limit(checkpoint.tokenizer_model, tnl.vocab_size),
                limit=check.tolerance(checkpoint.dtype, out_dtype),
            )  # fmt: skip
    return result


def _token_limit(tokenizer_model: Path | None, vocab_size: int) -> int:
    """Token ids to verify with: the tokenizer's pieces (ids a user can feed), else the whole vocabulary."""
    return min(vocab_size, tokenizer_pieces(tokenizer_model)) if tokenizer_model is not None else vocab_size
