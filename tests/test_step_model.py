"""The step-time model (megatron_tnllm.planning.step, tools/plan_step.py) against the H200 runs recorded in
docs/training.md, its pipeline arithmetic, the launcher table it reads from examples/, and
tools/bench/bench_layer.py's CPU path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tnllm.configs import get_preset
from megatron_tnllm.planning import step as plan_step
from megatron_tnllm.planning.memory import Layout
from megatron_tnllm.planning.step import Cluster, launcher_layout, launchers, predict

ROOT = Path(__file__).resolve().parents[1]

# (what, preset, padded vocabulary, layout, measured seconds per step), one H200 per model-parallel rank.
RECORDED = [
    # docs/training.md §3: tnl-385m, micro-batch 4, global batch 8 x 2048, each layout alone on its GPUs
    ("385m 1 GPU, distributed optimizer", "tnl-385m", 8192, Layout(mbs=4, num_microbatches=2), 0.223),
    ("385m TP=2", "tnl-385m", 8192, Layout(tp=2, mbs=4, num_microbatches=2, distributed_optimizer=False), 0.313),
    ("385m TP=2 + SP", "tnl-385m", 8192, Layout(tp=2, sp=True, mbs=4, num_microbatches=2), 0.370),
    ("385m PP=2", "tnl-385m", 8192, Layout(pp=2, mbs=4, num_microbatches=2, distributed_optimizer=False), 0.163),
    ("385m DP=2", "tnl-385m", 8192, Layout(dp=2, mbs=4, num_microbatches=1), 0.158),
    # docs/training.md §1/§4: the same 1-GPU layout without the distributed optimizer, iteration 150 of the
    # 200-iteration run (291.4 ms, logged 118.1 TFLOP/s); the two 1-GPU records differ by 31 %
    ("385m 1 GPU, iteration 150", "tnl-385m", 8192, Layout(mbs=4, num_microbatches=2, distributed_optimizer=False),
     0.2914),
    # docs/training.md §4: tnl-1b, 65,536 tokens per step, one H200 (tokens/s -> seconds per step)
    ("1b seq 2k", "tnl-1b", 64000, Layout(mbs=8, seq=2048, num_microbatches=4), 65536 / 74060),
    ("1b seq 8k", "tnl-1b", 64000, Layout(mbs=2, seq=8192, num_microbatches=4), 65536 / 73135),
    ("1b seq 32k", "tnl-1b", 64000, Layout(mbs=1, seq=32768, num_microbatches=2), 65536 / 74557),
    # docs/training.md §4 after the fused elementwise ops: tnl-1b and tnl-1b-hybrid, same layouts
    ("1b fused seq 2k", "tnl-1b", 64000, Layout(mbs=8, seq=2048, num_microbatches=4), 0.8517),
    ("1b fused seq 8k", "tnl-1b", 64000, Layout(mbs=2, seq=8192, num_microbatches=4), 0.8690),
    ("1b fused seq 32k", "tnl-1b", 64000, Layout(mbs=1, seq=32768, num_microbatches=2), 0.8534),
    ("1b hybrid seq 2k", "tnl-1b-hybrid", 64000, Layout(mbs=8, seq=2048, num_microbatches=4), 0.8574),
    ("1b hybrid seq 8k", "tnl-1b-hybrid", 64000, Layout(mbs=2, seq=8192, num_microbatches=4), 0.8884),
    ("1b hybrid seq 32k", "tnl-1b-hybrid", 64000, Layout(mbs=1, seq=32768, num_microbatches=2), 0.9640),
    # docs/training.md §4 with megatron_tnllm's cross-entropy (--cross-entropy-fusion-impl tnl)
    ("1b tnl loss seq 2k", "tnl-1b", 64000, Layout(mbs=8, seq=2048, num_microbatches=4, cross_entropy="tnl"), 0.7782),
    ("1b tnl loss seq 8k", "tnl-1b", 64000, Layout(mbs=2, seq=8192, num_microbatches=4, cross_entropy="tnl"), 0.7546),
    ("1b tnl loss seq 32k", "tnl-1b", 64000, Layout(mbs=1, seq=32768, num_microbatches=2, cross_entropy="tnl"),
     0.7457),
    ("1b hybrid tnl loss seq 8k", "tnl-1b-hybrid", 64000,
     Layout(mbs=2, seq=8192, num_microbatches=4, cross_entropy="tnl"), 0.7839),
    ("1b hybrid tnl loss seq 32k", "tnl-1b-hybrid", 64000,
     Layout(mbs=1, seq=32768, num_microbatches=2, cross_entropy="tnl"), 0.8515),
    ("1b Megatron loss seq 2k, same run", "tnl-1b", 64000, Layout(mbs=8, seq=2048, num_microbatches=4), 0.8385),
    # docs/profile.md §3: megatron_tnllm's loss with and without gradient-accumulation fusion, one invocation each
    ("1b tnl loss + fusion seq 2k", "tnl-1b", 64000,
     Layout(mbs=8, seq=2048, num_microbatches=4, cross_entropy="tnl", grad_accum_fusion=True), 0.7616),
    ("1b tnl loss seq 2k, unfused rerun", "tnl-1b", 64000,
     Layout(mbs=8, seq=2048, num_microbatches=4, cross_entropy="tnl"), 0.7658),
    # docs/profile.md §5: the same fused layout with lightning attention v4.3, then v4.2 (the model has one
    # attention cost for both: it is fitted to kernel times of v3 and v4.2)
    ("1b tnl loss + fusion seq 2k, attention v4.3", "tnl-1b", 64000,
     Layout(mbs=8, seq=2048, num_microbatches=4, cross_entropy="tnl", grad_accum_fusion=True), 0.7649),
    ("1b tnl loss + fusion seq 2k, attention v4.2", "tnl-1b", 64000,
     Layout(mbs=8, seq=2048, num_microbatches=4, cross_entropy="tnl", grad_accum_fusion=True), 0.7717),
]  # fmt: skip


@pytest.mark.parametrize("what, preset, vocab, layout, seconds", RECORDED, ids=[r[0] for r in RECORDED])
def test_step_time_matches_recorded_runs_within_15_percent(what, preset, vocab, layout, seconds):
    predicted = predict(get_preset(preset).replace(vocab_size=vocab), layout)["step_s"]
    assert predicted == pytest.approx(seconds, rel=0.15), f"{what}: predicted {predicted:.4f} s"


def test_recorded_throughput_figures():
    """The model's tokens/s and model TFLOP/s for the tnl-1b runs (74,060 / 73,135 / 74,557 tokens/s at
    458 / 453 / 461 TFLOP/s) and the tnl-385m log line (118.1 TFLOP/s at 291.4 ms) within 15 %."""
    cfg = get_preset("tnl-1b")
    for layout, tokens, tflops in (
        (Layout(mbs=8, seq=2048, num_microbatches=4), 74060, 458),
        (Layout(mbs=2, seq=8192, num_microbatches=4), 73135, 453),
        (Layout(mbs=1, seq=32768, num_microbatches=2), 74557, 461),
    ):
        r = predict(cfg, layout)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(tokens, rel=0.15)
        assert r["tflops_per_gpu"] == pytest.approx(tflops, rel=0.15)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] * 1e12 / 989e12)
    r = predict(get_preset("tnl-385m").replace(vocab_size=8192), Layout(mbs=4, num_microbatches=2))
    assert r["tflops_per_gpu"] == pytest.approx(118.1, rel=0.15)


def test_cross_entropy_choice_costs_its_logit_bytes():
    """megatron_tnllm's loss moves 6.3 B per logit (measured; 6 B: bf16 logits read twice, gradient written once)
    and holds 4 B, Megatron's 66.4 B and 10 B; the launchers use megatron_tnllm's (examples/common.sh's
    CROSS_ENTROPY)."""
    from megatron_tnllm.planning.memory import plan

    cfg, tokens = get_preset("tnl-1b"), 8 * 2048
    tnl, megatron = (Layout(mbs=8, seq=2048, num_microbatches=4, cross_entropy=c) for c in ("tnl", "megatron"))
    assert predict(cfg, megatron)["logits_s"] - predict(cfg, tnl)["logits_s"] == pytest.approx(
        (66.4 - 6.3) * tokens * 64000 / plan_step.HBM_BW
    )
    assert (plan(cfg, tnl)["logits"], plan(cfg, megatron)["logits"]) == (4 * tokens * 64000, 10 * tokens * 64000)
    with pytest.raises(ValueError, match="cross_entropy must be one of \\('megatron', 'tnl'\\), got 'native'"):
        Layout(cross_entropy="native")
    assert {launcher_layout(lay).cross_entropy for lay in launchers()} == {"tnl"}


def test_gradient_accumulation_fusion_costs_its_main_grad_bytes():
    """Per layer and micro-batch the main-gradient addition moves 14.4 B per parameter of the shard unfused and
    3.7 B fused (tools/bench/bench_wgrad.py); the launchers fuse (examples/common.sh's GRAD_ACCUM_FUSION)."""
    from megatron_tnllm.planning.memory import layer_parameters

    cfg = get_preset("tnl-175b")
    base = dict(tp=8, sp=True, pp=12, dp=2, mbs=1, num_microbatches=48, cross_entropy="tnl")
    fused, unfused = (plan_step.layer_seconds(cfg, Layout(**base, grad_accum_fusion=f), False) for f in (True, False))
    saved = unfused["main_grad"] - fused["main_grad"]
    assert saved == pytest.approx((14.4 - 3.7) * layer_parameters(cfg) / 8 / plan_step.HBM_BW)
    assert saved == pytest.approx(0.53e-3, rel=0.15)  # bench_wgrad's tnl-175b TP=8 weights: 0.532 ms saved
    assert {launcher_layout(lay).grad_accum_fusion for lay in launchers()} == {True}


def test_interleaving_divides_the_bubble_by_vpp():
    cfg = get_preset("tnl-175b")
    base = dict(tp=8, sp=True, pp=12, dp=2, mbs=1, num_microbatches=48)
    one = predict(cfg, Layout(**base))
    two = predict(cfg, Layout(**base, vpp=2))
    four = predict(cfg, Layout(**base, vpp=4))
    assert two["bubble_s"] == pytest.approx(one["bubble_s"] / 2)
    assert four["bubble_s"] == pytest.approx(one["bubble_s"] / 4)
    # 1F1B's bubble is (PP - 1) stage times next to m of them
    stage = one["pipeline_s"] - one["bubble_s"] - one["p2p_s"]
    assert one["bubble_s"] / stage == pytest.approx(11 / 48, rel=0.05)
    assert four["step_s"] < two["step_s"] < one["step_s"]


def test_tensor_parallel_traffic_is_eight_collectives_per_layer_unless_overlapped():
    """tnl-13b at TP=8 + SP, micro-batch 2 x 4096: 4 all-gathers / reduce-scatters forward and 4 backward, each
    moving 7/8 of tokens x D bf16 per GPU over NVLink; hidden behind compute with --overlap-tp."""
    cfg = get_preset("tnl-13b")
    lay = Layout(tp=8, sp=True, dp=2, mbs=2, seq=4096, num_microbatches=256)
    layer = plan_step.layer_seconds(cfg, lay, lrpe=False)
    per = 7 / 8 * 8192 * 5120 * 2 / plan_step.NVLINK_BW + plan_step.COLLECTIVE_LATENCY
    assert layer["tp_comm"] == pytest.approx(8 * per)
    compute = layer["gemm"] + layer["attention"] + layer["other"]
    assert layer["total"] == pytest.approx(max(compute, layer["host"]) + 8 * per)
    hidden = plan_step.layer_seconds(cfg, lay, lrpe=False, cluster=Cluster(overlap_tp=True))
    assert hidden["total"] == pytest.approx(max(compute, layer["host"], 8 * per))
    assert predict(cfg, lay, Cluster(overlap_tp=True))["step_s"] < predict(cfg, lay)["step_s"]


def test_data_parallel_traffic_crosses_nodes_only_when_the_group_does():
    """tnl-7b at TP=2: DP=4 stays inside one 8-GPU node (NVLink), DP=8 spans two (InfiniBand, 9x slower)."""
    cfg = get_preset("tnl-7b")
    lay = dict(tp=2, sp=True, mbs=1, seq=4096, num_microbatches=1)
    no_overlap = Cluster(overlap_dp=False)
    inside = predict(cfg, Layout(dp=4, **lay), no_overlap)["dp_exposed_s"]
    across = predict(cfg, Layout(dp=8, **lay), no_overlap)["dp_exposed_s"]
    params = (30 * (5 * 4096**2 + 3 * 4096 * 11008) + 64000 * 4096) / 2
    assert inside == pytest.approx(6 * params * 3 / 4 / plan_step.NVLINK_BW)
    assert across == pytest.approx(6 * params * 7 / 8 / plan_step.IB_BW)


def test_measured_layer_times_replace_the_flop_model(tmp_path):
    """A bench_layer.py JSON whose products take twice the FLOP model's time doubles the layer's GEMM part."""
    cfg = get_preset("tnl-7b")
    lay = Layout(tp=2, sp=True, dp=4, mbs=1, seq=4096, num_microbatches=128)
    modeled = plan_step.layer_seconds(cfg, lay, lrpe=False)
    shape = {
        "preset": "tnl-7b", "tp": 2, "tokens": 4096,
        "products": {"total": {"ms": 2e3 * modeled["gemm"]}},
        "attention_ms": 1e3 * modeled["attention"], "attention_lrpe_ms": 1e3 * modeled["attention"],
    }  # fmt: skip
    times = {"launcher_shapes": {"pretrain_tnl_7b.sh": shape}, "widths": {}}
    measured = plan_step.layer_seconds(cfg, lay, lrpe=False, layer_times=times)
    assert measured["gemm"] == pytest.approx(2 * modeled["gemm"])
    assert measured["attention"] == pytest.approx(modeled["attention"])
    path = tmp_path / "layers.json"
    path.write_text(json.dumps(times))
    assert plan_step.main(["--launchers", "--layer-times", str(path)]) == 0


def test_launchers_are_read_from_examples():
    found = {lay["preset"]: lay for lay in launchers()}
    assert list(found) == ["tnl-385m", "tnl-1b", "tnl-7b", "tnl-13b", "tnl-65b", "tnl-175b"]
    big = found["tnl-175b"]
    shape = (big["nodes"], big["tp"], big["pp"], big["sp"], big["mbs"], big["gbs"], big["seq"])
    assert shape == (24, 8, 12, True, 1, 1536, 2048)
    lay = launcher_layout(big)
    assert (lay.dp, lay.num_microbatches) == (2, 768)
    table = plan_step.launcher_table()
    assert table.count("\n| `pretrain_tnl_") == 6


def test_step_cli_refuses_bad_values_in_one_line():
    for argv in (["--tp", "-8"], ["--seq", "0"], ["--mbs", "0"], ["--vpp", "2"], ["--pp", "7"]):
        run = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "plan_step.py"), "--preset", "tnl-7b", *argv],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 2, argv
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr


def test_bench_layer_runs_on_cpu(tmp_path):
    """tools/bench/bench_layer.py's two modes on tnl-tiny at a few tokens, so the GPU run does not fail on a typo."""
    out = tmp_path / "layers.json"
    common = ["--device", "cpu", "--iters", "1", "--warmup", "0"]
    script = str(ROOT / "tools" / "bench" / "bench_layer.py")
    run = subprocess.run(
        [sys.executable, script, "layers", *common, "--presets", "tnl-tiny", "--launchers", "tnl-385m",
         "--tokens", "32", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    tiny = result["widths"]["tnl-tiny"]
    assert tiny["products"]["total"]["flops"] == 6 * 32 * (5 * 256**2 + 3 * 256 * 704)
    assert set(tiny["layer"]) == {"plain", "lrpe"}
    assert result["launcher_shapes"]["pretrain_tnl_385m.sh"]["products"]["qkvu"]["out"] == 4 * 1024
    run = subprocess.run(
        [sys.executable, script, "model", *common, "--preset", "tnl-tiny", "--layers", "2", "--seq", "32",
         "--steps", "2", "--json", str(tmp_path / "model.json")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    model = json.loads((tmp_path / "model.json").read_text())
    assert model["layers"] == 2 and len(model["losses"]) == 2
    assert model["losses"][1] < model["losses"][0]  # the optimizer stepped
