import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Megatron's weightless norms and fused helpers go through torch.compile, which takes ~50 s per
# shape on two cores; the tests check numbers, not compilation. Set before torch is imported, so
# spawned workers inherit it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

PATCHES = Path(__file__).resolve().parents[1] / "patches"


@pytest.fixture(scope="session")
def patched_megatron(tmp_path_factory) -> Path:
    """A folder holding a copy of the installed megatron package with every patch of patches/ applied, as the README
    has users apply them: put it first on sys.path (spawned workers inherit it) or PYTHONPATH (subprocesses)."""
    import megatron

    root = tmp_path_factory.mktemp("patched_site")
    shutil.copytree(Path(megatron.__path__[0]), root / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    for patch in sorted(PATCHES.glob("*.patch")):
        subprocess.run(["git", "apply", "--unidiff-zero", str(patch)], cwd=root, check=True)
    return root
