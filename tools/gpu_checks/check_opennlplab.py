#!/usr/bin/env python
"""Cross-check megatron_tnllm.hf against OpenNLPLab's released TransNormerLLM modeling code, in both directions.

    python tools/gpu_checks/check_opennlplab.py PATH/TO/OPENNLPLAB_CODE [--layers 4] [--seq 300]

PATH holds the hub files (configuration_transnormer.py, modeling_transnormer.py, norm.py, utils.py,
srmsnorm_triton.py, lightning_attention2.py), e.g. fetched from GitHub weigao266/TNL-MoE smoe/models/tnl/ (a
byte-identical copy of the hub code). It runs on the CPU with ``use_triton=False`` (their PyTorch paths; triton
and einops must be importable). Checks, on a small random model in fp32:

1. their checkpoint (pytorch_model.bin with lm_head, their config.json) loads into our class, and our logits
   equal theirs in training mode (masked quadratic attention) and eval mode (their chunked inference);
2. our export (the converter's output directory) loads into their classes with the same logits, and their
   step-by-step decoding with their cache produces our greedy continuation.

Their code on transformers 5 does not tie lm_head to the embedding (its class has no ``_tied_weights_keys``), so
the checker ties it by hand, as transformers 4 did. Exits 1 if a relative logit difference exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

TOLERANCE = 1e-4


def load_opennlplab(path: Path):
    """Their modeling module, imported as a package (their files use relative imports)."""
    os.environ["use_triton"] = "False"  # read by their modules at import
    spec = importlib.util.spec_from_file_location(
        "opennlplab_tnl", path / "__init__.py" if (path / "__init__.py").exists() else path / "modeling_transnormer.py",
        submodule_search_locations=[str(path)],
    )  # fmt: skip
    package = importlib.util.module_from_spec(spec)
    sys.modules["opennlplab_tnl"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("opennlplab_tnl.modeling_transnormer")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def their_logits(model, tokens: torch.Tensor, training: bool) -> torch.Tensor:
    model.train(training)
    for layer in model.model.layers:  # their per-module LRPE offset survives between calls
        layer.token_mixer.offset = 0
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def their_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Step-by-step decoding with their state cache (their generate() needs transformers 4)."""
    model.eval()
    for layer in model.model.layers:
        layer.token_mixer.offset = 0
    tokens = prompt
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        for _ in range(steps):
            cache = out.get("cache", out.get("past_key_values"))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            out = model(nxt, past_key_values=cache, use_cache=True)
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("code", type=Path, help="directory with OpenNLPLab's modeling files")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=300, help="tokens (above 256 their inference uses two chunks)")
    args = parser.parse_args()

    theirs = load_opennlplab(args.code.resolve())
    from megatron_tnllm.convert import hf_to_megatron, megatron_to_hf
    from megatron_tnllm.hf import TransnormerForCausalLM

    config = dict(
        vocab_size=1000, decoder_embed_dim=256, hidden_dim=256, decoder_layers=args.layers, decoder_attention_heads=4,
        glu_dim=704, no_scale_embedding=False, linear_use_lrpe_list=[1] + [0] * (args.layers - 1),
        linear_act_fun="swish", norm_type="simplermsnorm", bias=False,
    )  # fmt: skip
    tokens = torch.randint(1, 1000, (2, args.seq), generator=torch.Generator().manual_seed(0))
    failures = []

    def report(what: str, error: float) -> None:
        print(f"{what}: relative difference {error:.2e}")
        if error > TOLERANCE:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. Their checkpoint layout -> our class.
        torch.manual_seed(0)
        released = theirs.TransnormerForCausalLM(theirs.TransnormerConfig(**config))
        with torch.no_grad():
            released.model.layers[0].token_mixer.lrpe.theta.mul_(1 + 0.1 * torch.rand_like(
                released.model.layers[0].token_mixer.lrpe.theta))  # fmt: skip  # a trained-looking theta
        released.lm_head.weight = released.model.embed_tokens.weight
        (tmp / "released").mkdir()
        torch.save(released.state_dict(), tmp / "released" / "pytorch_model.bin")
        (tmp / "released" / "config.json").write_text(json.dumps({**config, "model_type": "transnormer"}))
        ours = TransnormerForCausalLM.from_pretrained(tmp / "released").eval()
        with torch.no_grad():
            our_logits = ours(tokens).logits
        report(
            "their checkpoint in our class vs their training path",
            relative(our_logits, their_logits(released, tokens, True)),
        )
        report(
            "their checkpoint in our class vs their inference path",
            relative(our_logits, their_logits(released, tokens, False)),
        )

        # 2. Our export (through the converter) -> their classes.
        hf_to_megatron(tmp / "released", tmp / "megatron", progress=False)
        megatron_to_hf(tmp / "megatron", tmp / "export", progress=False)
        exported = json.loads((tmp / "export" / "config.json").read_text())
        exported.pop("auto_map"), exported.pop("architectures")
        model = theirs.TransnormerForCausalLM(theirs.TransnormerConfig(**exported))
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(tmp / "export" / "model.safetensors"), strict=False)
        assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
        model.lm_head.weight = model.model.embed_tokens.weight
        report("our export in their class, training path", relative(their_logits(model, tokens, True), our_logits))
        report("our export in their class, inference path", relative(their_logits(model, tokens, False), our_logits))
        prompt = tokens[:, :20]
        mine = ours.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        same = torch.equal(their_greedy(model, prompt, 16), mine)
        print(f"greedy decoding, 16 tokens with their cache vs our generate(): {'equal' if same else 'DIFFERENT'}")
        if not same:
            failures.append("greedy decoding")
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
