"""Every patch in patches/ applies with `git apply --unidiff-zero` to the Megatron code we pin, and
the patched code does what the patch says."""

import importlib.util
import shutil
import subprocess
import typing
from pathlib import Path
from types import SimpleNamespace

import megatron.training
import pytest
import torch

from megatron_tnllm.flops import tnl_training_flops
from megatron_tnllm.ops.cross_entropy import cross_entropy_torch

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


def load_patched(root: Path, path: str, package: str):
    """The module at ``root / path`` (a patched copy of one of megatron's files), imported beside the installed
    ``package`` so that its relative imports resolve to the installed one."""
    spec = importlib.util.spec_from_file_location(f"{package}._patched_{Path(path).stem}", root / path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    spec.loader.exec_module(module)
    return module


def test_flops_patch_reports_tnl_flops(tmp_path):
    apply(Path(__file__).resolve().parents[1] / "patches" / "core_v0.19.0-tnl-flops.patch", tmp_path)
    module = load_patched(tmp_path, "megatron/training/training.py", "megatron.training")
    args = SimpleNamespace(
        spec=["megatron_tnllm.specs", "tnl_1b"], num_layers=16, hidden_size=2048, num_attention_heads=16,
        ffn_hidden_size=5632, padded_vocab_size=64000, seq_length=4096,
    )  # fmt: skip
    assert module.num_floating_point_operations(args, batch_size=8) == tnl_training_flops(args, 8 * 4096)


def test_cross_entropy_patch_offers_tnl_and_computes_its_loss(tmp_path):
    """--cross-entropy-fusion-impl takes "tnl" (the config's Literal is what Megatron's argument parser offers), and
    the language model's loss with it is megatron_tnllm's cross-entropy: the oracle's numbers."""
    apply(Path(__file__).resolve().parents[1] / "patches" / "core_v0.19.0-tnl-cross-entropy.patch", tmp_path)
    config = load_patched(tmp_path, "megatron/core/model_parallel_config.py", "megatron.core")
    impl = typing.get_type_hints(config.ModelParallelConfig)["cross_entropy_fusion_impl"]
    assert typing.get_args(impl) == ("native", "te", "tnl")
    module = load_patched(
        tmp_path, "megatron/core/models/common/language_module/language_module.py",
        "megatron.core.models.common.language_module",
    )  # fmt: skip
    model = SimpleNamespace(
        config=SimpleNamespace(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="tnl"),
        pg_collection=SimpleNamespace(tp=None),  # one rank holds the whole vocabulary
    )
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 40, generator=g, dtype=torch.float64)  # [s, b, V]
    labels = torch.randint(0, 40, (2, 6), generator=g)  # [b, s]
    loss = module.LanguageModule.compute_language_model_loss(model, labels, logits)
    assert loss.shape == (2, 6)
    expected = cross_entropy_torch(logits, labels.t()).t()
    assert torch.allclose(loss, expected, rtol=1e-14, atol=0)


def _check_patches(*names: str, path: str | None = None) -> subprocess.CompletedProcess:
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": path} if path else dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "megatron_tnllm.megatron_patches", *names],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_megatron_patches_finds_each_change(patched_megatron):
    """megatron_tnllm.megatron_patches (the launchers' check): each name's line is one its patch adds to the file it
    names; every change found in the patched copy; in the installed megatron-core, unpatched, each named with its
    patch file; an unknown name refused."""
    from megatron_tnllm.megatron_patches import PATCHES as NAMED

    assert sorted(f for f, *_ in NAMED.values()) == [p.name for p in PATCHES]
    for file, _, relative, line in NAMED.values():
        text = (PATCHES[0].parent / file).read_text()
        added = text.split(f"+++ b/megatron/{relative}\n", 1)[1].split("diff --git", 1)[0]
        assert any(line in x for x in added.splitlines() if x.startswith("+")), (file, line)
    done = _check_patches(*NAMED, path=str(patched_megatron))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not any("megatron-tnllm" in (MEGATRON.parent / f).read_text() for f in patched_files())  # unpatched
    done = _check_patches(*NAMED)
    assert done.returncode == 1
    for file, *_ in NAMED.values():
        assert f"patches/{file}" in done.stdout, done.stdout
    assert _check_patches("apex").returncode == 2


def patched_files() -> set[str]:
    """The files of megatron that patches/ change, relative to the site folder."""
    return {line[len("+++ b/") :] for p in PATCHES for line in p.read_text().splitlines() if line.startswith("+++ b/")}
