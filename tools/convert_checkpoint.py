#!/usr/bin/env python
"""Convert TransNormerLLM checkpoints between Hugging Face and Megatron-LM (= python -m megatron_tnllm.convert)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tnllm.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
