"""Predict the step time, tokens/s/GPU and MFU of a TNL pretraining layout (``megatron_tnllm.planning.step``)."""

import sys

from megatron_tnllm.planning.step import main

if __name__ == "__main__":
    sys.exit(main())
