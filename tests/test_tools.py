"""FLOP counting and the memory planner, checked against parameter counts; the Megatron log reader."""

from types import SimpleNamespace

import pytest

from megatron_tnllm.configs import PRESETS, get_preset
from megatron_tnllm.flops import CHUNK, tnl_forward_flops_per_token, tnl_training_flops
from megatron_tnllm.megatron_log import compare, parse
from megatron_tnllm.planning.memory import Layout, activation_bytes_per_token_layer, main, plan


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dense_flops_are_twice_the_matrix_parameters(name):
    """Every weight matrix costs 2 FLOPs per token and parameter (the tied embedding once, as the
    output layer); the attention core adds H [C (dk + dv) + 4 dk dv] per layer."""
    p = get_preset(name)
    H, dh = p.num_heads, p.head_dim
    attention = (p.num_layers - 1) * H * (CHUNK * 2 * dh + 4 * dh * dh) + H * (CHUNK * 3 * dh + 8 * dh * dh)
    flops = tnl_forward_flops_per_token(p.num_layers, p.hidden_size, H, p.glu_size, p.vocab_size)
    assert flops - attention == 2 * (p.num_parameters() - p.hidden_size * len(p.lrpe_layers))


def test_training_flops_from_pretrain_gpt_args():
    p = get_preset("tnl-1b")
    args = SimpleNamespace(
        spec=["megatron_tnllm.specs", "tnl_1b"], num_layers=16, hidden_size=2048, num_attention_heads=16,
        ffn_hidden_size=5632, padded_vocab_size=64000,
    )  # fmt: skip
    per_token = tnl_forward_flops_per_token(16, 2048, 16, 5632, 64000)
    assert tnl_training_flops(args, 4096) == 3 * per_token * 4096
    assert per_token > 2 * p.num_parameters()


def test_planner_counts_every_parameter_once():
    p = get_preset("tnl-7b")
    one = plan(p, Layout())
    assert one["weights (bf16)"] == 2 * p.num_parameters()
    tp2 = plan(p, Layout(tp=2, sp=True))
    assert tp2["weights (bf16)"] == one["weights (bf16)"] / 2
    assert tp2["activations"] == pytest.approx(one["activations"] / 2)
    with pytest.raises(ValueError, match="do not split"):
        plan(p, Layout(pp=4))


def test_planner_context_parallelism_splits_tokens_and_optimizer():
    p = get_preset("tnl-1b")
    one = plan(p, Layout(dp=2, seq=65536))
    cp4 = plan(p, Layout(dp=2, cp=4, seq=65536))
    plain = p.replace(lrpe_layers=())
    assert plan(plain, Layout(dp=2, cp=4, seq=65536))["activations"] == pytest.approx(
        plan(plain, Layout(dp=2, seq=65536))["activations"] / 4
    )
    # under CP the LRPE layer runs the PyTorch LRPE (not fused into the qkvu split), which keeps more per token
    D, tokens = p.hidden_size, 65536 // 4
    lrpe_cp = activation_bytes_per_token_layer(p, lrpe=True, cp=4) - activation_bytes_per_token_layer(p, lrpe=True)
    assert cp4["activations"] == pytest.approx(one["activations"] / 4 + lrpe_cp * tokens)
    assert lrpe_cp == pytest.approx((14 + 22 - 5.5) * D)
    assert cp4["logits"] == pytest.approx(one["logits"] / 4)
    assert cp4["optimizer"] == pytest.approx(one["optimizer"] / 4)  # sharded over DP x CP = 8, not DP = 2
    assert cp4["weights (bf16)"] == one["weights (bf16)"]
    with pytest.raises(ValueError, match="heads do not split"):
        plan(p, Layout(tp=8, cp=4))
    with pytest.raises(ValueError, match="zig-zag"):
        plan(p, Layout(cp=4, seq=4100))


def test_planner_interleaving_holds_more_activations_on_the_first_stage():
    """Megatron's interleaved schedule: 2 (PP - 1) + (VPP - 1) PP + 1 chunks of L / (PP VPP) layers in flight on the
    first stage (tnl-65b, PP=4, VPP=2: 11 chunks of 10 layers) against 1F1B's PP micro-batches of L / PP layers
    (4 x 20); both capped by the chunks a step has."""
    p = get_preset("tnl-65b").replace(lrpe_layers=())  # every layer alike: activations = layers held x one layer
    base = dict(tp=8, sp=True, pp=4, dp=2, mbs=1, seq=4096)
    per_layer = plan_activation_bytes_per_layer(p, base["mbs"] * base["seq"]) / base["tp"]
    assert plan(p, Layout(**base, num_microbatches=8))["activations"] == pytest.approx(80 * per_layer)
    assert plan(p, Layout(**base, num_microbatches=8, vpp=2))["activations"] == pytest.approx(110 * per_layer)
    assert plan(p, Layout(**base, num_microbatches=8, vpp=5))["activations"] == pytest.approx(23 * 4 * per_layer)
    assert plan(p, Layout(**base, num_microbatches=4, vpp=2))["activations"] == pytest.approx(80 * per_layer)
    with pytest.raises(ValueError, match="not a multiple of pp 4"):
        plan(p, Layout(**base, num_microbatches=6, vpp=2))
    with pytest.raises(ValueError, match="do not split into 4 pipeline stages x 3 virtual stages"):
        plan(p, Layout(**base, num_microbatches=8, vpp=3))


def plan_activation_bytes_per_layer(cfg, tokens):
    return activation_bytes_per_token_layer(cfg) * tokens


@pytest.mark.parametrize(
    ("name", "mbs", "plain", "lrpe", "lrpe_pytorch"),
    [("tnl-1b", 8, 78_860, 91_149, 113_677), ("tnl-7b", 1, 158_220, 176_660, 307_732)],
)
def test_activation_model_against_bench_layer(name, mbs, plain, lrpe, lrpe_pytorch):
    """Bytes per token a plain and an LRPE layer keep for backward, measured by tools/bench/bench_layer.py (one H200,
    2026-12-01, launcher micro-batch: the fused qkvu split and SGLU product; ``lrpe`` with LRPE in the fused split,
    ``lrpe_pytorch`` with the PyTorch LRPE that CP > 1 runs), plus the layer's input (2 D, which the bench allocates
    before the forward and a stack keeps in the next layer's input norm): within 1.5 %. The PyTorch LRPE's angle
    tables are per position, so its bytes per token fall with the micro-batch."""
    cfg = get_preset(name)
    D = cfg.hidden_size
    assert activation_bytes_per_token_layer(cfg) == pytest.approx(plain + 2 * D, rel=0.015)
    assert activation_bytes_per_token_layer(cfg, lrpe=True, mbs=mbs) == pytest.approx(lrpe + 2 * D, rel=0.015)
    assert activation_bytes_per_token_layer(cfg, lrpe=True, mbs=mbs, cp=2) == pytest.approx(
        lrpe_pytorch + 2 * D, rel=0.015
    )
    assert activation_bytes_per_token_layer(cfg, lrpe=True, mbs=1, cp=2) - activation_bytes_per_token_layer(
        cfg, lrpe=True, mbs=8, cp=2
    ) == pytest.approx(22 * D * 7 / 8)
    at_mbs = plan(cfg, Layout(mbs=mbs, seq=2048))["activations"]
    per_token = (cfg.num_layers - 1) * activation_bytes_per_token_layer(cfg) + activation_bytes_per_token_layer(
        cfg, lrpe=True, mbs=mbs
    )
    assert at_mbs == pytest.approx(mbs * 2048 * per_token, rel=1e-12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tp", "-8"], "argument --tp: expected a positive integer, got -8"),
        (["--seq", "0"], "argument --seq: expected a positive integer, got 0"),
        (["--mbs", "0"], "argument --mbs: expected a positive integer, got 0"),
        (["--dp", "x"], "argument --dp: expected a positive integer, got 'x'"),
        (["--vpp", "2"], "vpp 2 needs pipeline parallelism (pp >= 2), got pp 1"),
        (["--pp", "4"], "tnl-7b: 30 layers do not split into 4 pipeline stages"),
        (["--gbs", "3", "--dp", "2"], "--gbs 3 is not a multiple of mbs x dp = 2"),
    ],
)
def test_planner_refuses_bad_values_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["--preset", "tnl-7b", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"plan_memory.py: error: {message}\n"
    with pytest.raises(ValueError, match="tp must be a positive integer, got -8"):
        Layout(tp=-8)


def test_megatron_log_undoes_the_first_interval_average(tmp_path):
    """Megatron averages a process's first iteration into its second log line; the parser recovers the
    second iteration's own loss and time (figures from a real resumed run: 3.420707 logged, 3.456290 true)."""

    def line(i, ms, loss):
        return (
            f" [2026-11-29] iteration {i:8d}/     200 | consumed samples: 8 | elapsed time per iteration (ms): "
            f"{ms} | throughput per GPU (TFLOP/s/GPU): 100.0 | learning rate: 1E-4 | global batch size:     8 | "
            f"lm loss: {loss:.6E} | loss scale: 1.0 |"
        )

    full = tmp_path / "full.log"
    full.write_text(
        "\n".join([line(1, 900.0, 17.0), line(2, 600.0, 16.5), line(101, 300.0, 3.385124), line(102, 300.0, 3.456290)])
    )
    resumed = tmp_path / "resumed.log"
    resumed.write_text("\n".join([line(101, 1200.0, 3.385124), line(102, 750.0, 3.420707), line(103, 300.0, 3.390187)]))
    its = parse(resumed)["iterations"]
    assert its[102]["loss"] == pytest.approx(3.456290, abs=2e-6)
    assert its[102]["ms"] == pytest.approx(300.0)
    assert its[102]["tflops"] == pytest.approx(250.0)
    assert its[103]["loss"] == 3.390187
    full_its = parse(full)["iterations"]
    assert full_its[2]["loss"] == pytest.approx(16.0) and full_its[2]["ms"] == pytest.approx(300.0)
    assert full_its[102]["loss"] == 3.456290
    assert compare(full, [resumed], 102, 102, tol=1e-6)
