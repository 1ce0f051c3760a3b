"""``--verify``: the Hugging Face and the Megatron model on the same tokens; fails above a tolerance per dtype.

Both models are loaded whole, in fp32, on the CPU (an opt-in check). The Megatron side is the TNL ``GPTModel``
(a hybrid with softmax attention on the same layers when the checkpoint is one) at TP = PP = 1 in a one-process
gloo group, filled by Megatron's own torch_dist loader (which reshards any saved layout), so the check does not
go through the converter's reader.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_tnllm.configs import TNLConfig
from megatron_tnllm.convert.errors import VerificationError

BATCH, SEQ = 2, 64
# Accepted max |logit difference| relative to max |logit|, by the dtype the weights were rounded to. Both models
# run in fp32, so an unchanged dtype (or a widening to fp32) leaves only the two implementations' fp32 rounding
# (they agree exactly on tnl-tiny; 1e-4 leaves room for deeper models). Rounding fp32 weights to bf16 (8
# significant bits) moved the logits of a 2-layer tnl-tiny by 1.0e-3 of max |logit|, to fp16 (11 bits) by 1.1e-4
# (tests/test_convert_verify.py): the tolerances are 10x and 18x those. One layer's out_proj scaled by 1.5 moves
# them by 5.8e-2, so that fails in every dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


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


def tolerance(source_dtype: torch.dtype, output_dtype: torch.dtype) -> float:
    """Largest accepted max |logit difference| / max |logit| (both models run in fp32, see :data:`TOLERANCE`)."""
    if output_dtype in (source_dtype, torch.float32):  # same weights, or exactly widened: only fp32 arithmetic
        return TOLERANCE[torch.float32]
    return TOLERANCE[output_dtype]


def verify(
    hf_directory: Path,
    megatron_checkpoint: Path,
    megatron_tnl: TNLConfig,
    padded_vocab: int,
    token_limit: int,
    limit: float,
) -> float:
    """Runs both models on fixed random tokens below ``token_limit``; returns max |logit difference| / max |logit|
    over the vocabulary (padding columns dropped), and raises VerificationError above ``limit``.

    ``megatron_tnl`` is the Megatron model as its args describe it (its embedding scale, its vocabulary); the HF
    side is loaded with its own config.json. A vocabulary that differs between them fails outright.
    """
    from megatron_tnllm.hf import TransnormerConfig

    hf_vocab = TransnormerConfig.from_pretrained(hf_directory).vocab_size
    if hf_vocab != megatron_tnl.vocab_size:
        raise VerificationError(
            f"--verify failed: the Hugging Face model has a vocabulary of {hf_vocab}, the Megatron model's args "
            f"{megatron_tnl.vocab_size}"
        )
    tokens = torch.randint(0, token_limit, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    hf = hf_logits(hf_directory, tokens)
    megatron = megatron_logits(megatron_checkpoint, megatron_tnl, padded_vocab, tokens)
    scale = max(hf.abs().max().item(), megatron.abs().max().item())
    difference = (hf - megatron).abs().max().item()
    relative = difference / scale if scale > 0 else float(difference > 0)
    print(
        f"verify: {BATCH}x{SEQ} tokens, max |logit difference| {difference:.3e} (max |logit| {scale:.3e}; "
        f"relative {relative:.2e}, tolerance {limit:.0e})"
    )
    if not relative <= limit:  # also catches NaN
        raise VerificationError(
            f"--verify failed: max |logit difference| {difference:.3e} is {relative:.2e} of max |logit| {scale:.3e}, "
            f"above the tolerance {limit:.0e}; nothing was written"
        )
    return relative
