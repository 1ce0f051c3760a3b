"""Predict the peak GPU memory of a TNL pretraining layout (``megatron_tnllm.planning.memory``; ``--help``)."""

from megatron_tnllm.planning.memory import main

if __name__ == "__main__":
    main()
