"""Generate text from a Hugging Face export (python -m megatron_tnllm.convert megatron-to-hf ...).

    python tools/hf_generate.py HF_DIR --prompt "ROMEO:" [--new-tokens 60] [--dtype bf16]

Loads with AutoTokenizer / AutoModelForCausalLM (trust_remote_code), prints a greedy and a sampled
continuation and the decoding speed; the cache holds one fp32 state per layer, so memory stays
constant in the generated length.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=DTYPES[args.dtype])
    model.to(device).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    torch.manual_seed(args.seed)
    for name, kwargs in (("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "top_p": 0.9})):
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
        seconds = time.perf_counter() - start
        print(f"--- {name} ({args.new_tokens / seconds:.1f} tokens/s on {device}) ---")
        print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
