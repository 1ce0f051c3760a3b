"""Which changes of patches/ the importable Megatron-LM carries, checked before a launch.

The launchers and benchmarks turn on what the patches add (megatron_tnllm's cross-entropy, gradient-accumulation
fusion without apex) and rely on what they fix (resuming the distributed optimizer). Unpatched, Megatron fails
late and names something else: an argument-parser error, an apex install hint, an assertion at the first resume.
This module looks for each change in the files of the Megatron that would be imported (a line the patch adds,
found without importing Megatron or torch, so the check takes a fraction of a second), so that a launch stops
first and names the patch. tests/test_patches.py checks the lines against the patches and what each patch does.

    python -m megatron_tnllm.megatron_patches cross-entropy wgrad-accum-fusion   # exit 1 naming any missing patch

Run it from the Megatron-LM checkout that ``pretrain_gpt.py`` will run from (``python -m`` puts the current
folder first on ``sys.path``, as a script's folder is for the script), so that both import the same ``megatron``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path


def megatron_folders() -> list[Path]:
    """The folders of the ``megatron`` package that ``import megatron`` would use here (found, not imported: the
    check stays quick, without torch)."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("no module named 'megatron' (install megatron-core or run from a Megatron-LM checkout)")
    return [Path(folder) for folder in spec.submodule_search_locations]


def _source(relative: str) -> str:
    """The text of megatron's ``relative`` file (e.g. ``core/tensor_parallel/layers.py``)."""
    for folder in megatron_folders():
        if (folder / relative).is_file():
            return (folder / relative).read_text()
    raise ImportError(f"megatron/{relative} is in none of {[str(f) for f in megatron_folders()]}")


# name -> (patch file under patches/, what it gives, the file it changes, a line it adds there)
PATCHES: dict[str, tuple[str, str, str, str]] = {
    "cross-entropy": (
        "core_v0.19.0-tnl-cross-entropy.patch", "--cross-entropy-fusion-impl tnl",
        "core/model_parallel_config.py", "Literal['native', 'te', 'tnl']",
    ),
    "wgrad-accum-fusion": (
        "core_v0.19.0-wgrad-accum-fusion.patch", "--gradient-accumulation-fusion without apex",
        "core/tensor_parallel/layers.py",
        "from megatron_tnllm.ops import wgrad_accum as fused_weight_gradient_mlp_cuda",
    ),
    "distrib-optimizer-resume": (
        "core_v0.19.0-distrib-optimizer-resume.patch", "resuming the distributed optimizer without TE or apex",
        "core/optimizer/distrib_optimizer.py", "megatron-tnllm",
    ),
    "flops": (
        "core_v0.19.0-tnl-flops.patch", "TNL's FLOPs in the training log",
        "training/training.py", "megatron_tnllm.flops",
    ),
}  # fmt: skip


def has(name: str) -> bool:
    """Whether the importable Megatron carries patch ``name``'s change (for the gradient-accumulation fusion, apex's
    extension does as well)."""
    _, _, relative, line = PATCHES[name]
    if name == "wgrad-accum-fusion" and importlib.util.find_spec("fused_weight_gradient_mlp_cuda"):
        return True
    return line in _source(relative)


def missing(names: Iterable[str]) -> list[str]:
    """The names among ``names`` whose change the importable Megatron lacks (ValueError for an unknown name)."""
    names = list(names)
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown patch names {unknown}: expected any of {sorted(PATCHES)}")
    return [n for n in names if not has(n)]


def describe(names: Iterable[str]) -> str:
    """One line per name: the patch file and what it gives."""
    return "\n".join(f"  patches/{PATCHES[n][0]}: {PATCHES[n][1]}" for n in names)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the importable Megatron has every named change; else 1, with the report on stdout (so that a
    caller can keep it apart from the import's warnings on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m megatron_tnllm.megatron_patches", description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(PATCHES), metavar="NAME", help=", ".join(sorted(PATCHES)))
    args = parser.parse_args(argv)
    try:
        lacking = missing(args.names)
    except ImportError as e:
        print(f"cannot check Megatron-LM: {e}")
        return 1
    if lacking:
        print(
            f"the Megatron at {megatron_folders()[0]} lacks {len(lacking)} of megatron-tnllm's patches:\n"
            f"{describe(lacking)}\napply them (README: Training with Megatron-LM) or turn off what needs them"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
