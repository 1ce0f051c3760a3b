"""Hybrid checkpoints (tnl-tiny with softmax attention on layers 1 and 3) through the converter, both ways.

One set of 4 gloo workers plays the training runs. At TP 2 x PP 2 it builds a hybrid of its own (Megatron's
init), runs it and saves it as torch_dist and legacy torch; it also loads the HF -> Megatron conversion through
Megatron-LM's ``load_checkpoint``, runs it and saves it again. Then, re-initialised at PP 2 x VPP 2 (DP 2), it
loads the virtual-pipeline conversion and saves it again. Converted back, the HF weights are bit for bit the
original ones, and the exports of Megatron's own model give its logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_tnllm.configs import get_preset
from megatron_tnllm.convert import VerificationError, hf_to_megatron, layout, megatron_to_hf
from megatron_tnllm.convert.cli import main as convert
from megatron_tnllm.convert.megatron_format import TRACKER, megatron_args
from megatron_tnllm.convert.safe_load import read_common_state, read_dcp_metadata
from megatron_tnllm.hf import TransnormerForCausalLM
from megatron_tnllm.models import build_model
from tests.distributed import run_distributed
from tests.hf_helpers import hf_tensors
from tests.test_convert_roundtrip import _load_like_pretrain_gpt, _pipeline_logits
from tests.testing import rel_err

HYBRID = get_preset("tnl-tiny-hybrid").replace(vocab_size=1000)
SOFTMAX = list(HYBRID.softmax_layers)  # [1, 3]: one softmax layer on each stage of a 2-stage pipeline
TP, PP, VPP, PADDED_VOCAB, ITERATION = 2, 2, 2, 1024, 5


def _hybrid_hf(seed: int) -> TransnormerForCausalLM:
    torch.manual_seed(seed)
    return TransnormerForCausalLM(layout.hf_config_from_tnl(HYBRID)).eval()


def _save(model_states: dict, args, root, legacy_dir: str | None) -> None:
    """torch_dist at ``root`` (every rank), and legacy torch files at ``legacy_dir`` (DP rank 0 only)."""
    common = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION}
    directory = root / f"iter_{ITERATION:07d}"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True)
        (root / TRACKER).write_text(str(ITERATION))
    dist.barrier()
    dist_checkpointing.save({name: m.sharded_state_dict() for name, m in model_states.items()} | common, str(directory))
    if legacy_dir is None or parallel_state.get_data_parallel_rank() != 0:
        return
    tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    rank_dir = root.parent / legacy_dir / f"iter_{ITERATION:07d}" / f"mp_rank_{tp:02d}_{pp:03d}"
    rank_dir.mkdir(parents=True)
    models = {name: m.state_dict_for_save_checkpoint() for name, m in model_states.items()}
    torch.save(models | common, rank_dir / "model_optim_rng.pt")
    (root.parent / legacy_dir / TRACKER).write_text(str(ITERATION))


def _worker(rank, world, root, tokens):
    # TP 2 x PP 2: Megatron's own hybrid (same seed everywhere: one global init, as a TP=1 run would draw it).
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    last_tp0 = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    args = megatron_args(
        HYBRID, tensor_parallel=TP, pipeline_parallel=PP, padded_vocab=PADDED_VOCAB, make_vocab_size_divisible_by=128,
        dtype=torch.float32, tokenizer_model=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(HYBRID, vocab_size=PADDED_VOCAB, use_cpu_initialization=True)
    logits = _pipeline_logits(model, tokens)
    if last_tp0:
        torch.save(logits, root / "trained_logits.pt")
    _save({"model": model}, args, root / "trained", "legacy")

    # The HF -> Megatron conversion, loaded as pretrain_gpt.py --load does (a different init everywhere first).
    torch.manual_seed(100 + rank)
    model = build_model(HYBRID, vocab_size=PADDED_VOCAB, use_cpu_initialization=True)
    assert _load_like_pretrain_gpt(model, root / "megatron", args) == 0
    logits = _pipeline_logits(model, tokens)
    if last_tp0:
        torch.save(logits, root / "converted_logits.pt")
    _save({"model": model}, args, root / "resaved", None)
    parallel_state.destroy_model_parallel()

    # PP 2 x VPP 2 (data parallel 2): chunk (stage p, v) holds layer 2v + p, so both softmax layers are on stage 1.
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=PP, virtual_pipeline_model_parallel_size=VPP)
    torch.manual_seed(200 + rank)
    chunks = [build_model(HYBRID, vp_stage=v, vocab_size=PADDED_VOCAB, use_cpu_initialization=True) for v in range(VPP)]
    chunk_names = {f"model{v}": chunk for v, chunk in enumerate(chunks)}
    loaded = dist_checkpointing.load(
        {name: chunk.sharded_state_dict() for name, chunk in chunk_names.items()}, str(root / "vpp" / "iter_0000000")
    )
    for name, chunk in chunk_names.items():
        chunk.load_state_dict(loaded[name])
    args = megatron_args(
        HYBRID, tensor_parallel=1, pipeline_parallel=PP, padded_vocab=PADDED_VOCAB, make_vocab_size_divisible_by=128,
        dtype=torch.float32, tokenizer_model=None, virtual_stages=VPP,
    )  # fmt: skip
    _save(chunk_names, args, root / "vpp_trained", "vpp_legacy")


def _hf_logits(directory, tokens) -> torch.Tensor:
    model = TransnormerForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert [i for i, layer in enumerate(model.model.layers) if layer.softmax] == SOFTMAX
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def test_hybrid_round_trips_bitwise_and_exports_megatron_logits(tmp_path, capsys):
    _hybrid_hf(seed=3).save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, HYBRID.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    expected = _hf_logits(tmp_path / "hf", tokens)

    argv = ["--tensor-model-parallel-size", str(TP), "--pipeline-model-parallel-size", str(PP), "--no-progress"]
    assert convert(["hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "megatron"), *argv, "--verify"]) == 0
    assert "max |logit difference| 0.000e+00" in capsys.readouterr().out
    iteration = tmp_path / "megatron" / "iter_0000000"
    args = read_common_state(iteration, read_dcp_metadata(iteration))["args"]
    assert args.spec == ["megatron_tnllm.specs", "tnl_tiny_hybrid"]  # pretrain_gpt.py builds the hybrid from it
    hf_to_megatron(tmp_path / "hf", tmp_path / "vpp", pipeline_parallel=PP, virtual_stages=VPP, progress=False)
    run_distributed(_worker, TP * PP, tmp_path, tokens)

    # HF -> Megatron: Megatron at TP 2 x PP 2 computes the HF model's logits.
    converted = torch.load(tmp_path / "converted_logits.pt")
    assert converted.shape == (2, 32, PADDED_VOCAB)
    assert rel_err(converted[..., : HYBRID.vocab_size], expected) <= 1e-5
    # ... and back, through Megatron's loads and saves at TP 2 x PP 2 and at PP 2 x VPP 2: bit for bit.
    original = hf_tensors(tmp_path / "hf")
    for source in ("resaved", "vpp_trained", "vpp_legacy"):
        megatron_to_hf(tmp_path / source, tmp_path / f"back_{source}", progress=False)
        back = hf_tensors(tmp_path / f"back_{source}")
        assert sorted(back) == sorted(k for k in original if k != "lm_head.weight")
        for name, tensor in back.items():
            assert torch.equal(tensor, original[name]), f"{source}: {name} differs after the round trip"
        config = json.loads((tmp_path / f"back_{source}" / "config.json").read_text())
        assert config["softmax_attention_layers"] == SOFTMAX

    # Megatron -> HF: the export of Megatron's own hybrid (torch_dist, --verify; legacy torch) gives its logits.
    trained = torch.load(tmp_path / "trained_logits.pt")[..., : HYBRID.vocab_size]
    assert (
        convert(["megatron-to-hf", str(tmp_path / "trained"), str(tmp_path / "out"), "--no-progress", "--verify"]) == 0
    )
    assert "max |logit difference| 0.000e+00" in capsys.readouterr().out
    megatron_to_hf(tmp_path / "legacy", tmp_path / "out_legacy", progress=False)
    exported, legacy = hf_tensors(tmp_path / "out"), hf_tensors(tmp_path / "out_legacy")
    assert sorted(exported) == sorted(legacy) and all(torch.equal(t, legacy[n]) for n, t in exported.items())
    err = rel_err(_hf_logits(tmp_path / "out", tokens), trained)
    print(f"\nHF export vs Megatron (TP 2 x PP 2) hybrid logits: relative error {err:.2e}")
    assert err <= 1e-5


def test_verify_catches_swapped_softmax_projections(tmp_path, monkeypatch):
    """q and k of the softmax layers written swapped (TNL layers untouched): --verify fails, nothing is left."""
    _hybrid_hf(seed=4).save_pretrained(tmp_path / "hf")
    monkeypatch.setitem(layout.FUSED_SECTIONS, "qkv_proj", ("key", "query", "value"))
    with pytest.raises(VerificationError, match="--verify failed"):
        hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", verify=True, progress=False)
    assert not (tmp_path / "megatron").exists()
