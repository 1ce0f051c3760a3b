"""The memory planner and the step-time model on hybrid presets (softmax attention on some layers): parameters
against real Megatron models, activations and the worst pipeline stage, the step time's s^2 term, the command
lines, and pure-TNL output pinned to what it was before hybrids were counted."""

import pytest
from megatron.core import parallel_state

from megatron_tnllm import models
from megatron_tnllm.configs import get_preset
from megatron_tnllm.planning import memory, step
from megatron_tnllm.planning.memory import Layout, plan, plan_stage, stage_parameters, worst_stage
from megatron_tnllm.planning.step import predict
from tests.distributed import run_distributed

# tnl-1b: D 2048, H 16, G 5632, V 64000. Bytes saved per token and layer (planning/memory.py's docstring):
TNL_LAYER = 24 * 2048 + 6 * 5632  # 82,944
LRPE_LAYER = TNL_LAYER + 5.5 * 2048  # 94,208: the fused split keeps the doubled q, k (CP = 1)
SOFTMAX_LAYER = 18 * 2048 + 4 * 16 + 6 * 5632  # 70,720: no D x D state, nothing in s^2 (flash)


def _parameters_worker(rank, world):
    """Each rank's parameters in Megatron models of tnl-tiny and tnl-tiny-hybrid (softmax layers 1 and 3) at
    DP=2, PP=2, PP=2 x VPP=2 and TP=2 against the planner's for that rank's stage."""
    for name in ("tnl-tiny", "tnl-tiny-hybrid"):
        cfg = get_preset(name)
        for tp, pp, vpp in ((1, 1, 1), (1, 2, 1), (1, 2, 2), (2, 1, 1)):
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            )
            chunks = [models.build_model(cfg, use_cpu_initialization=True, vp_stage=v if vpp > 1 else None)
                      for v in range(vpp)]  # fmt: skip
            built = sum(p.numel() for chunk in chunks for p in chunk.parameters())
            stage = parallel_state.get_pipeline_model_parallel_rank()
            planned = stage_parameters(cfg, Layout(tp=tp, pp=pp, vpp=vpp, num_microbatches=2), stage)
            assert planned == built, (name, tp, pp, vpp, stage, planned, built)
            parallel_state.destroy_model_parallel()


def test_planned_parameters_equal_megatron_models():
    run_distributed(_parameters_worker, 2)


def test_hybrid_parameters_by_hand():
    """tnl-tiny-hybrid: 4 layers of 5 D^2 + 3 D G, minus D^2 (no gate) on the 2 softmax layers, LRPE's D, V D."""
    cfg = get_preset("tnl-tiny-hybrid")
    D, G, V = 256, 704, 2048
    assert stage_parameters(cfg, Layout(), 0) == 4 * (5 * D * D + 3 * D * G) - 2 * D * D + D + V * D
    # PP=2: stage 1 (layers 2, 3; layer 3 softmax) holds the tied output layer's copy
    assert stage_parameters(cfg, Layout(pp=2), 1) == 2 * (5 * D * D + 3 * D * G) - D * D + V * D


def test_hybrid_activations_and_weights_against_tnl():
    """tnl-1b and tnl-1b-hybrid (softmax on layers 7, 15) at 64k tokens: the hybrid saves SOFTMAX_LAYER instead of
    TNL_LAYER bytes per token on two layers (flash attention keeps no s x s scores: the difference is linear in s)
    and holds 2 D^2 fewer parameters."""
    tnl, hybrid = get_preset("tnl-1b"), get_preset("tnl-1b-hybrid")
    for seq in (4096, 65536):
        lay = Layout(seq=seq)
        a, b = plan(tnl, lay), plan(hybrid, lay)
        assert a["activations"] == seq * (15 * TNL_LAYER + LRPE_LAYER)
        assert b["activations"] == seq * (13 * TNL_LAYER + LRPE_LAYER + 2 * SOFTMAX_LAYER)
        assert a["weights (bf16)"] - b["weights (bf16)"] == 2 * 2 * 2048**2
        assert a["logits"] == b["logits"] == 10 * seq * 64000
    full = plan(hybrid, Layout(seq=65536, recompute="full"))  # every layer's input, plus the LRPE layer's set
    assert full["activations"] == 65536 * (16 * 2 * 2048 + LRPE_LAYER)


def test_worst_stage_moves_with_the_softmax_layers():
    """PP=2, 2 micro-batches of 8192: with softmax attention on layers 1-7, stage 0 (2 micro-batches of LRPE + 7
    softmax layers) holds less than stage 1 (1 micro-batch of 8 TNL layers + logits); pure TNL's stage 0 wins."""
    lay = Layout(pp=2, seq=8192, num_microbatches=2)
    hybrid = get_preset("tnl-1b").replace(name="h", softmax_layers=(1, 2, 3, 4, 5, 6, 7))
    stage, parts = worst_stage(hybrid, lay)
    assert stage == 1
    assert parts["activations"] == 8192 * 8 * TNL_LAYER
    assert parts["logits"] == 10 * 8192 * 64000
    assert plan_stage(hybrid, lay, 0)["activations"] == 2 * 8192 * (LRPE_LAYER + 7 * SOFTMAX_LAYER)
    stage, parts = worst_stage(get_preset("tnl-1b"), lay)
    assert stage == 0 and parts["activations"] == 2 * 8192 * (LRPE_LAYER + 7 * TNL_LAYER)
    # a large vocabulary: the last stage's logits outweigh the first stage's extra micro-batch for pure TNL too
    stage, parts = worst_stage(get_preset("tnl-1b").replace(vocab_size=256000), Layout(pp=2, num_microbatches=2))
    assert stage == 1 and parts["logits"] == 10 * 2048 * 256000


def test_interleaved_stages_hold_their_own_chunks():
    """tnl-1b-hybrid, PP=2 x VPP=2, 4 micro-batches: stage 0 (layers 0-3, 8-11) runs 2 + 2 + 1 warm-up and first
    forwards: chunk 0 three times, chunk 1 twice; stage 1 (layers 4-7, 12-15: softmax 7 and 15) runs 3: twice
    chunk 0, once chunk 1."""
    cfg = get_preset("tnl-1b-hybrid")
    lay = Layout(pp=2, vpp=2, seq=2048, num_microbatches=4)
    assert lay.held(0) == (3, 2) and lay.held(1) == (2, 1)
    assert memory.stage_layers(16, 2, 2, 1) == (range(4, 8), range(12, 16))
    assert plan_stage(cfg, lay, 0)["activations"] == 2048 * (3 * (LRPE_LAYER + 3 * TNL_LAYER) + 2 * 4 * TNL_LAYER)
    assert plan_stage(cfg, lay, 1)["activations"] == 2048 * 3 * (3 * TNL_LAYER + SOFTMAX_LAYER)
    assert worst_stage(cfg, lay)[0] == 0


def test_step_time_grows_by_the_softmax_s2_term():
    """At 32,768 tokens per micro-batch (4 x 8192 or 1 x 32768), everything but softmax attention costs the same;
    the hybrid's extra time grows by 2 micro-batches x 2 layers x 3 x 2 s D FLOPs per token at
    SOFTMAX_ATTENTION_FLOPS between s = 8192 and 32768."""
    tnl, hybrid = get_preset("tnl-1b"), get_preset("tnl-1b-hybrid")

    def extra(mbs, seq):
        lay = Layout(mbs=mbs, seq=seq, num_microbatches=2)
        return predict(hybrid, lay)["step_s"] - predict(tnl, lay)["step_s"]

    growth = 2 * 2 * 3 * 2 * 2048 * 32768 * (32768 - 8192) / step.SOFTMAX_ATTENTION_FLOPS  # 0.136 s
    assert extra(1, 32768) - extra(4, 8192) == pytest.approx(growth, rel=1e-9)
    assert extra(1, 32768) > 0.1


def test_hybrid_model_flops():
    """Model FLOPs per token (megatron_tnllm.flops): each softmax layer adds 2 s D for its scores and values and
    drops the gate's 2 D^2 and the lightning attention's H (C 2 dh + 4 dh^2) against a TNL layer."""
    lay = Layout(seq=32768, num_microbatches=2)
    a, b = predict(get_preset("tnl-1b"), lay), predict(get_preset("tnl-1b-hybrid"), lay)
    tokens = 2 * 32768
    per_token = [r["tflops_per_gpu"] * 1e12 * r["step_s"] / (3 * tokens) for r in (a, b)]
    D = 2048
    assert per_token[1] - per_token[0] == pytest.approx(2 * (2 * 32768 * D - 2 * D * D - (2 * 64 * D + 4 * D * 128)))


def test_hybrid_command_lines(capsys):
    memory.main(["--preset", "tnl_1b_hybrid", "--pp", "4", "--gbs", "8"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tnl-1b-hybrid: TP=1 PP=4 ")
    assert (
        out[1]
        == "  softmax layers: 2 of 16 (7, 15); worst stage 0 of PP=4 (0-based, the largest total), 0 softmax layers"
    )
    assert step.main(["--preset", "tnl-1b-hybrid", "--seq", "8192"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  softmax layers: 2 of 16 (7, 15)"
    assert [line.split()[0] for line in out[2:]][-3:] == ["softmax_layer_s", "softmax_attn_s", "logits_s"]


# Outputs of pure-TNL command lines recorded before softmax layers were counted (the memory plan re-recorded when the
# activation model followed the fused qkvu split and SGLU product, and the fused LRPE; the step plan when the step
# model's elementwise and cross-entropy costs were measured again, and when the main-gradient addition became its own
# term): counting softmax layers must not change them.
BEFORE = {
    ("memory", "--preset tnl-7b --tp 2 --sp --dp 4 --mbs 1 --seq 4096"): """\
tnl-7b: TP=2 PP=1 DP=4 CP=1 SP mbs=1 seq=4096 recompute=none distributed-optimizer=True
  weights (bf16)          6.4 GiB
  gradients (fp32)       12.7 GiB
  optimizer               9.6 GiB
  activations             9.4 GiB
  logits                  1.2 GiB
  adam step               0.0 GiB
  overhead                4.0 GiB
  total                  43.3 GiB
  fits H100 80GB: yes
  fits H200 141GB: yes
""",
    ("step", "--preset tnl-175b --tp 8 --sp --pp 12 --vpp 2 --dp 2 --gbs 1536"): """\
tnl-175b: 192 GPUs, step 38.785 s, 422 tokens/s/GPU, 444 TFLOP/s/GPU, MFU 44.9% of 989 (56.2% of 790), \
142.7 days per 10^12 tokens
  pipeline_s         38618.05 ms
  bubble_s             263.42 ms
  p2p_s                  0.00 ms
  dp_exposed_s          93.33 ms
  optimizer_s           23.88 ms
  layer_s                5.96 ms
  layer_gemm_s           3.75 ms
  layer_tp_comm_s        1.14 ms
  logits_s               2.25 ms
""",
}


@pytest.mark.parametrize(("tool", "argv"), list(BEFORE), ids=[tool for tool, _ in BEFORE])
def test_pure_tnl_output_unchanged(capsys, tool, argv):
    (memory if tool == "memory" else step).main(argv.split())
    assert capsys.readouterr().out == BEFORE[tool, argv]


def test_pure_tnl_first_stage_of_an_interleaved_pipeline():
    """tnl-175b at TP=8 + SP, PP=12 x VPP=2: the first stage runs 2 x 11 + 12 + 1 = 35 chunk forwards before its first
    backward, 23 of chunk 0 (layers 0-3, LRPE on layer 0) and 12 of chunk 1 (layers 48-51)."""
    cfg = get_preset("tnl-175b")
    lay = Layout(tp=8, sp=True, pp=12, vpp=2, dp=2, num_microbatches=768)
    D, G = 12288, 28672
    layer, lrpe = (24 * D + 6 * G) * 2048 / 8, (29.5 * D + 6 * G) * 2048 / 8  # LRPE fused into the split
    assert lay.held(0) == (23, 12)
    assert worst_stage(cfg, lay)[0] == 0
    assert plan(cfg, lay)["activations"] == pytest.approx(23 * (lrpe + 3 * layer) + 12 * 4 * layer, rel=1e-12)
