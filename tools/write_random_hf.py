"""Write a random-init Hugging Face TNL checkpoint of any preset, one tensor at a time; or check one bitwise.

    python tools/write_random_hf.py tnl-175b OUT --layers 4 --dtype bf16 --seed 0     # ~16 GB, 4 of 96 layers
    python tools/write_random_hf.py tnl-175b OUT --layers 4 --dtype bf16 --seed 0 --check DIR

Every matrix is N(0, 0.02) (LRPE's theta too), drawn from a generator seeded by ``--seed`` and the tensor's
name, in blocks of rows, so the model never exists in memory: the peak is the largest tensor in ``--dtype`` plus
one fp32 block (64 MiB). The files are an export of this repository (config.json with ``auto_map``, the
modeling code, sharded ``model-*.safetensors`` and their index), so the converter and ``AutoModelForCausalLM``
both read them. ``--check DIR`` draws the same tensors again and compares them with DIR's (any sharding), one
tensor at a time, exiting 1 at the first difference: the oracle of a round trip through the converter.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_tnllm.configs import PRESETS, TNLConfig, get_preset
from megatron_tnllm.convert.hf_format import SafetensorsWriter, parse_size
from megatron_tnllm.convert.layout import hf_config_from_tnl, hf_group_shapes
from megatron_tnllm.hf.export import write_export_files
from megatron_tnllm.planning.memory import OneLineParser

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCK = 16 * 2**20  # fp32 elements drawn at a time
STD = 0.02


def cut(tnl: TNLConfig, layers: int | None) -> TNLConfig:
    """``tnl`` with its first ``layers`` layers (its own LRPE layers among them); all of them if None."""
    if layers is None:
        return tnl
    if not 1 <= layers <= tnl.num_layers:
        raise ValueError(f"--layers {layers}: expected 1..{tnl.num_layers} for {tnl.name}")
    return tnl.replace(num_layers=layers, lrpe_layers=tuple(i for i in tnl.lrpe_layers if i < layers))


def tensor_specs(tnl: TNLConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor, embedding first, then layer by layer."""
    return [item for group in range(tnl.num_layers + 1) for item in hf_group_shapes(tnl, group).items()]


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """N(0, STD) of ``shape`` in ``dtype``, the same for the same (name, shape, seed) whatever else is drawn."""
    # torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: hash seed and name together
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), BLOCK):
        stop = min(start + BLOCK, flat.numel())
        flat[start:stop] = torch.randn(stop - start, generator=generator).mul_(STD)
    return out


def random_tensors(tnl: TNLConfig, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in tensor_specs(tnl):
        yield name, random_tensor(name, shape, seed, dtype)


def write(tnl: TNLConfig, out: Path, seed: int, dtype: torch.dtype, max_shard_bytes: int) -> int:
    """Writes the checkpoint into the new directory ``out``; returns the bytes of its tensors."""
    out.mkdir(parents=True)
    specs = [(name, shape, dtype) for name, shape in tensor_specs(tnl)]
    writer = SafetensorsWriter(out, specs, max_shard_bytes)
    size = 0
    for name, tensor in random_tensors(tnl, seed, dtype):
        writer.write(name, tensor)
        size += tensor.numel() * tensor.element_size()
        del tensor
    writer.close()
    write_export_files(out, hf_config_from_tnl(tnl), str(dtype).removeprefix("torch."), None)
    return size


def check(tnl: TNLConfig, directory: Path, seed: int, dtype: torch.dtype) -> str | None:
    """None if every tensor of ``directory`` equals its draw bitwise (and none is extra), else the first difference."""
    if not directory.is_dir():
        return f"{directory} is not a directory"
    stored: dict[str, Path] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            stored.update(dict.fromkeys(f.keys(), path))
    expected = [name for name, _ in tensor_specs(tnl)]
    extra = sorted(set(stored) - set(expected))
    if extra:
        return f"{directory} holds tensors that were not drawn: {', '.join(extra[:5])}"
    for name, tensor in random_tensors(tnl, seed, dtype):
        if name not in stored:
            return f"{name} is missing from {directory}"
        with safe_open(stored[name], framework="pt") as f:
            got = f.get_tensor(name)
        if got.dtype != tensor.dtype or got.shape != tensor.shape or not torch.equal(got, tensor):
            return (
                f"{name} differs: {list(got.shape)} {got.dtype} in {stored[name].name}, "
                f"drawn {list(tensor.shape)} {tensor.dtype}"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("out", type=Path, help="directory to create (must not exist)")
    p.add_argument("--layers", type=int, help="keep the first N layers (default: all)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--check", action="store_true", help="compare OUT's tensors with the draws instead of writing")
    args = p.parse_args(argv)
    tnl = get_preset(args.preset)
    try:
        if args.vocab_size is not None:
            tnl = tnl.replace(vocab_size=args.vocab_size)
        tnl = cut(tnl, args.layers)
        if args.seed < 0:
            raise ValueError(f"--seed {args.seed}: expected a non-negative integer")
        max_shard = parse_size(args.max_shard_size)
        if max_shard < 1:
            raise ValueError(f"--max-shard-size {args.max_shard_size}: expected a positive size")
    except Exception as e:  # ValueError from the checks above and TNLConfig, ConversionError from parse_size
        p.error(str(e))
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    if args.check:
        problem = check(tnl, args.out, args.seed, dtype)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        print(f"{args.out}: every tensor equals its draw ({time.perf_counter() - start:.0f} s)")
        return 0
    if args.out.exists():
        p.error(f"{args.out} already exists")
    size = write(tnl, args.out, args.seed, dtype, max_shard)
    print(
        f"wrote {args.out}: {tnl.num_parameters() / 1e9:.3f}B parameters ({tnl.num_layers} layers of {tnl.name}), "
        f"{size / 1e9:.3f} GB {args.dtype} in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
