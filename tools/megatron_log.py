"""Read Megatron-LM training logs: loss, time, TFLOP/s, peak memory (``megatron_tnllm.megatron_log``; ``--help``)."""

from megatron_tnllm.megatron_log import main

if __name__ == "__main__":
    main()
