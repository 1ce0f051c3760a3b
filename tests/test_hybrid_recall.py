"""The associative-recall benchmark: its sequences are what they claim, its RoPE baseline is a rotation by
position, and its smoke mode runs end to end."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from recall_task import build, length_at, mqar_batch, rotate  # noqa: E402


def test_every_query_asks_a_context_key_and_the_answer_is_its_value():
    ids, answer_mask = mqar_batch(3, 32, 16, torch.Generator().manual_seed(0))
    assert ids.shape == answer_mask.shape == (3, 32)
    for row, mask in zip(ids.tolist(), answer_mask.tolist(), strict=True):
        pairs = dict(zip(row[0:16:2], row[1:16:2], strict=True))
        assert len(pairs) == 8 and all(1 <= k <= 16 < v <= 32 for k, v in pairs.items())  # distinct keys
        asked = [t for t, m in enumerate(mask) if m]
        assert asked == list(range(16, 32, 2))
        assert sorted(row[t] for t in asked) == sorted(pairs)  # each key asked once
        assert all(row[t + 1] == pairs[row[t]] for t in asked)


def test_short_first_trains_on_the_shortest_length_then_on_all_in_turn():
    lengths = [32, 16, 64]
    assert [length_at(s, lengths, 0) for s in range(6)] == [32, 16, 64, 32, 16, 64]
    assert [length_at(s, lengths, 4) for s in range(8)] == [16, 16, 16, 16, 16, 64, 32, 16]


def test_rope_scores_depend_on_relative_position_only():
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, 2, 1, 8, generator=g, dtype=torch.float64),
        torch.randn(1, 2, 1, 8, generator=g, dtype=torch.float64),
    )
    n = 12
    rq, rk = rotate(q.expand(1, 2, n, 8)), rotate(k.expand(1, 2, n, 8))
    scores = rq @ rk.transpose(-1, -2)  # [1, 2, n, n]: the same q and k placed at every position
    for shift in (1, 5):
        diag = torch.diagonal(scores, offset=-shift, dim1=-2, dim2=-1)  # query at t, key at t - shift
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag), rtol=0, atol=1e-12)
    assert not torch.allclose(torch.diagonal(scores, -1, -2, -1)[..., 0], torch.diagonal(scores, -5, -2, -1)[..., 0])
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 2, n), rtol=1e-12, atol=0)
    torch.testing.assert_close(rq[..., 0, :], q[..., 0, :], rtol=0, atol=0)  # position 0 is not rotated


def test_rope_baseline_differs_from_the_position_free_one_only_in_positions():
    from megatron_tnllm.configs import TNLConfig

    shape = TNLConfig(name="t", num_layers=2, hidden_size=32, num_heads=2, glu_size=64, vocab_size=33, seq_length=16)
    torch.manual_seed(0)
    plain = build("softmax", shape, torch.device("cpu"))
    torch.manual_seed(0)
    rope = build("softmax_rope", shape, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), rope.state_dict().values(), strict=True))
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        a, b = plain(ids, use_cache=False).logits, rope(ids, use_cache=False).logits
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=1e-6, atol=1e-6)  # the first token sees only itself
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-3


def test_smoke_run_writes_results(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "recall_task.py"
    subprocess.run([sys.executable, str(tool), "--smoke", "--out", str(tmp_path), "--device", "cpu"], check=True)
    accuracy = json.loads((tmp_path / "recall.json").read_text())["accuracy"]
    assert set(accuracy) == {"tnl", "hybrid", "softmax", "softmax_rope"}
    assert all(set(acc) == {"16", "32"} and all(0 <= a <= 1 for a in acc.values()) for acc in accuracy.values())
    table = (tmp_path / "recall.md").read_text().splitlines()
    assert table[0] == "| model | steps | L=16 (N=4) | L=32 (N=8) |"
    assert table[2].startswith("| tnl | 4 | ")


def test_combine_lists_every_run_by_heads_model_and_seed(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "recall_task.py"
    base = [sys.executable, str(tool), "--smoke", "--device", "cpu"]
    for heads, seed, models in ((4, 1, ["tnl"]), (2, 3, ["hybrid", "tnl"])):
        run = ["--out", str(tmp_path / f"h{heads}"), "--heads", str(heads), "--seed", str(seed), "--models", *models]
        subprocess.run([*base, *run], check=True, capture_output=True)
    dirs = [str(tmp_path / "h4"), str(tmp_path / "h2")]
    subprocess.run([sys.executable, str(tool), "--combine", *dirs, "--out", str(tmp_path / "all")], check=True)
    table = (tmp_path / "all" / "recall_runs.md").read_text().splitlines()
    assert table[0] == "| heads | model | seed | lr | steps | L=16 (N=4) | L=32 (N=8) |"
    h2 = json.loads((tmp_path / "h2" / "recall.json").read_text())["accuracy"]
    assert [row.split(" | ")[:5] for row in table[2:]] == [
        ["| 2", "tnl", "3", "0.003", "4"],
        ["| 2", "hybrid", "3", "0.003", "4"],
        ["| 4", "tnl", "1", "0.003", "4"],
    ]
    assert table[2].endswith(f"| {h2['tnl']['16']:.3f} | {h2['tnl']['32']:.3f} |")


def test_short_first_option_reaches_the_training_loop(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "recall_task.py"
    base = [sys.executable, str(tool), "--smoke", "--models", "tnl", "--device", "cpu", "--out", str(tmp_path)]
    plain = subprocess.run(base, check=True, capture_output=True, text=True).stdout  # smoke: lengths 16 32
    short = subprocess.run([*base, "--short-first", "4"], check=True, capture_output=True, text=True).stdout
    assert "step     3 length   32" in plain and "step     3 length   16" in short
    assert json.loads((tmp_path / "recall.json").read_text())["settings"]["short_first"] == 4


def test_interrupt_scores_the_model_trained_so_far(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "recall_task.py"
    args = "--lengths 16 --steps 100000 --batch 4 --hidden-size 16 --heads 2 --num-keys 8 --log-every 1"
    cmd = [sys.executable, "-u", str(tool), *args.split(), "--models", "tnl", "--eval-batches", "1"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path), "--device", "cpu"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "step     3 " in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "interrupted after" in rest
    result = json.loads((tmp_path / "recall.json").read_text())
    assert 4 <= result["settings"]["steps_done"]["tnl"] < 100000
    assert 0 <= result["accuracy"]["tnl"]["16"] <= 1


def test_eval_lengths_score_beyond_the_training_lengths_and_bad_ones_fail_first(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "recall_task.py"
    base = [sys.executable, str(tool), "--smoke", "--models", "tnl", "--device", "cpu", "--out", str(tmp_path)]
    subprocess.run([*base, "--eval-lengths", "16", "64"], check=True)
    result = json.loads((tmp_path / "recall.json").read_text())
    assert set(result["accuracy"]["tnl"]) == {"16", "64"} and result["settings"]["lengths"] == [16, 32]
    assert (tmp_path / "recall.md").read_text().splitlines()[0] == "| model | steps | L=16 (N=4) | L=64 (N=16) |"
    bad = subprocess.run([*base, "--eval-lengths", "18"], capture_output=True, text=True)
    assert bad.returncode != 0 and "sequence length 18 is not a multiple of 4" in bad.stderr
    assert "step" not in bad.stdout  # refused before any training
