"""Streaming: converting a 1.6 GB model (tnl-385m, fp32) keeps peak memory far below the model's size.

The checkpoint is generated layer by layer with the converter's own safetensors writer (random weights), then
converted hf -> megatron -> hf, each direction in a fresh interpreter that reports its resident set size after
its imports (baseline) and at its peak (ru_maxrss).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import torch
from safetensors import safe_open

from megatron_tnllm.configs import get_preset
from megatron_tnllm.convert.hf_format import SafetensorsWriter
from megatron_tnllm.convert.layout import hf_config_from_tnl, hf_group_shapes

MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import psutil
    import megatron.core.dist_checkpointing, megatron.training.arguments  # imported by the conversion anyway
    from megatron_tnllm.convert.cli import main

    baseline = psutil.Process().memory_info().rss
    code = main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"code": code, "baseline": baseline, "peak": peak}))
    """
)


def _write_random_checkpoint(directory, tnl) -> int:
    """An HF directory of random fp32 weights, written one tensor at a time; returns its size in bytes."""
    directory.mkdir()
    hf_config_from_tnl(tnl).save_pretrained(directory)
    groups = [hf_group_shapes(tnl, g) for g in range(tnl.num_layers + 1)]
    specs = [(name, shape, torch.float32) for group in groups for name, shape in group.items()]
    writer = SafetensorsWriter(directory, specs, max_shard_bytes=2 * 10**9)
    generator = torch.Generator().manual_seed(0)
    for name, shape, _ in specs:
        writer.write(name, torch.randn(shape, generator=generator) * 0.02)
    writer.close()
    return sum(torch.Size(shape).numel() * 4 for _, shape, _ in specs)


def _convert_measured(*argv: str) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE, *argv, "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    return result


def _tensor(directory, name) -> torch.Tensor:
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name)


def test_conversion_memory_is_bounded_by_a_few_layers(tmp_path):
    try:
        _check_streaming(tmp_path)
    finally:  # 4.8 GB of checkpoints; pytest would keep them with its last temporary directories
        for name in ("hf", "megatron", "back"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)


def _check_streaming(tmp_path):
    tnl = get_preset("tnl-385m")
    model_bytes = _write_random_checkpoint(tmp_path / "hf", tnl)
    assert model_bytes >= 1.5e9
    largest = max(
        torch.Size(s).numel() * 4 for g in range(tnl.num_layers + 1) for s in hf_group_shapes(tnl, g).values()
    )
    figures = {
        "hf -> megatron": _convert_measured("hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "megatron")),
        "megatron -> hf": _convert_measured("megatron-to-hf", str(tmp_path / "megatron"), str(tmp_path / "back")),
    }
    print(f"\n{tnl.name} fp32: model {model_bytes / 1e9:.2f} GB, largest tensor (embedding) {largest / 1e9:.3f} GB")
    for direction, m in figures.items():
        used = m["peak"] - m["baseline"]
        print(
            f"{direction}: peak RSS {m['peak'] / 1e9:.2f} GB = {m['peak'] / model_bytes:.2f}x the model "
            f"(after imports {m['baseline'] / 1e9:.2f} GB; conversion itself {used / 1e9:.2f} GB = "
            f"{used / model_bytes:.2f}x)"
        )
        # Only the conversion's own memory is asserted: what the imports take varies with the environment
        # (0.76-1.00 GB seen for the same package versions), the conversion's share does not.
        assert used < 0.5 * model_bytes, direction
    for name in ("model.embed_tokens.weight", f"model.layers.{tnl.num_layers - 1}.channel_mixer.l3.weight"):
        assert torch.equal(_tensor(tmp_path / "back", name), _tensor(tmp_path / "hf", name)), name
