"""``--verify``: the Hugging Face and the Megatron model on the same tokens, largest logit difference.

Both models are loaded whole, in fp32, on the CPU (an opt-in check). The Megatron side is the TNL ``GPTModel``
at TP = PP = 1 in a one-process gloo group, filled by Megatron's own torch_dist loader (which reshards any
saved layout), so the check does not go through the converter's reader.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_tnllm.configs import TNLConfig

BATCH, SEQ = 2, 64


@contextlib.contextmanager
def _single_process_megatron():
    """A one-process gloo group and Megatron's parallel state (reusing ones already set up)."""
    from megatron.core import parallel_state

    own_group = not dist.is_initialized()
    own_state = not parallel_state.model_parallel_is_initialized()
    with tempfile.TemporaryDirectory() as store:
        if own_group:
            dist.init_process_group("gloo", store=dist.FileStore(f"{store}/store", 1), rank=0, world_size=1)
        if own_state:
            parallel_state.initialize_model_parallel()
        try:
            yield
        finally:
            if own_state:
                parallel_state.destroy_model_parallel()
            if own_group:
                dist.destroy_process_group()


def megatron_logits(checkpoint: Path, tnl: TNLConfig, padded_vocab: int, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, n, V] (padding columns dropped) of the torch_dist checkpoint directory ``checkpoint``."""
    from megatron.core import dist_checkpointing

    from megatron_tnllm.models import build_model

    with _single_process_megatron():
        model = build_model(
            tnl, vocab_size=padded_vocab, use_cpu_initialization=True, perform_initialization=False,
            params_dtype=torch.float32,
        )  # fmt: skip
        # Nested under "model" as pretrain_gpt.py loads it; the rest of the result is the common state.
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
        model.load_state_dict(loaded["model"])
        model.eval()
        with torch.no_grad():
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits = model(tokens, positions, None)
    return logits[..., : tnl.vocab_size].float()


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, n, V] of the Hugging Face directory ``directory`` (loaded with this package's model class)."""
    from megatron_tnllm.hf import TransnormerForCausalLM

    model = TransnormerForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits.float()


def max_logit_difference(hf_directory: Path, megatron_checkpoint: Path, tnl: TNLConfig, padded_vocab: int) -> float:
    """max |logits_hf - logits_megatron| on fixed random tokens; both are printed with the logit scale."""
    tokens = torch.randint(0, tnl.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    reference = hf_logits(hf_directory, tokens)
    converted = megatron_logits(megatron_checkpoint, tnl, padded_vocab, tokens)
    difference = (reference - converted).abs().max().item()
    print(
        f"verify: {BATCH}x{SEQ} tokens, max |logit difference| {difference:.3e} "
        f"(max |logit| {reference.abs().max().item():.3e})"
    )
    return difference
