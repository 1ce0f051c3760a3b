"""Generate text from a Hugging Face export (python -m megatron_tnllm.convert megatron-to-hf ...).

    python tools/hf_generate.py HF_DIR --prompt "ROMEO:" [--new-tokens 60] [--dtype bf16] [--trust-remote-code]

Loads with AutoTokenizer / AutoModelForCausalLM, prints a greedy and a sampled continuation and the decoding
speed; the cache holds one fp32 state per layer, so memory stays constant in the generated length.

TransNormerLLM directories (``model_type: "transnormer"``: exports of this repository, OpenNLPLab's releases) load
with this repository's classes and run none of the Python files they carry. ``--trust-remote-code`` runs those
files instead (and is needed for other models that ship their own code): use it only for directories you trust.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_tnllm.hf import register_auto_classes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; expected a positive number of tokens")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--new-tokens", type=_positive, default=60)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python files of the model directory (off: TransNormerLLM loads with this repository's code)",
    )
    return p.parse_args(argv)


def load(model: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """(tokenizer, model) of a directory; without ``trust_remote_code`` no file of the directory is executed."""
    if not model.is_dir():
        raise ValueError(f"{model} is not a directory; expected a Hugging Face model directory")
    if not trust_remote_code:
        register_auto_classes()
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    network = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code, dtype=dtype)
    return tokenizer, network


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.prompt:
            raise ValueError("--prompt is empty; expected text to continue")
        tokenizer, model = load(args.model, DTYPES[args.dtype], args.trust_remote_code)
        inputs = tokenizer(args.prompt, return_tensors="pt")
        if inputs["input_ids"].shape[1] == 0:
            raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens; expected text to continue")
    except (OSError, ValueError) as e:  # what transformers raises for a directory it cannot load
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    model.to(args.device).eval()
    inputs = inputs.to(args.device)
    torch.manual_seed(args.seed)
    for name, kwargs in (("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "top_p": 0.9})):
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
        seconds = time.perf_counter() - start
        print(f"--- {name} ({args.new_tokens / seconds:.1f} tokens/s on {args.device}) ---")
        print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
