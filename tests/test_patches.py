"""Every patch in patches/ applies with `git apply --unidiff-zero` to the Megatron code we pin, and
the patched code does what the patch says."""

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import megatron.training
import pytest

from megatron_tnllm.flops import tnl_training_flops

PATCHES = sorted((Path(__file__).resolve().parents[1] / "patches").glob("*.patch"))
MEGATRON = Path(megatron.training.__file__).resolve().parents[1]  # the wheel's megatron/ (same files as the tag)


def apply(patch: Path, root: Path) -> None:
    for line in patch.read_text().splitlines():
        if line.startswith("+++ b/"):
            target = root / line[len("+++ b/") :]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(MEGATRON.parent / line[len("+++ b/") :], target)
    subprocess.run(["git", "apply", "--unidiff-zero", str(patch)], cwd=root, check=True)


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_applies(patch, tmp_path):
    assert patch.name.startswith("core_v0.19.0-"), "each patch names the Megatron-LM tag it is for"
    apply(patch, tmp_path)


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_patched_files_of_the_wheel_are_the_tags(patch):
    """Each file a patch changes is, in the installed megatron-core, the git blob the patch was made from (its
    `index` line; made against the core_v0.19.0 checkout), so the patch means the same in both."""
    lines = patch.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("diff --git a/"):
            path = line.split()[2][len("a/") :]
            blob = next(x for x in lines[i + 1 :] if x.startswith("index ")).split()[1].split("..")[0]
            wheel = subprocess.run(
                ["git", "hash-object", str(MEGATRON.parent / path)], capture_output=True, text=True, check=True
            ).stdout.strip()
            assert wheel.startswith(blob), f"{path}: the wheel's file is blob {wheel}, the patch was made from {blob}"


def test_flops_patch_reports_tnl_flops(tmp_path):
    apply(Path(__file__).resolve().parents[1] / "patches" / "core_v0.19.0-tnl-flops.patch", tmp_path)
    path = tmp_path / "megatron/training/training.py"
    spec = importlib.util.spec_from_file_location("megatron.training._patched_training", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "megatron.training"  # its relative imports resolve to the installed package
    spec.loader.exec_module(module)
    args = SimpleNamespace(
        spec=["megatron_tnllm.specs", "tnl_1b"], num_layers=16, hidden_size=2048, num_attention_heads=16,
        ffn_hidden_size=5632, padded_vocab_size=64000, seq_length=4096,
    )  # fmt: skip
    assert module.num_floating_point_operations(args, batch_size=8) == tnl_training_flops(args, 8 * 4096)
