"""The associative-recall benchmark: its sequences are what they claim, and its smoke mode runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from recall_task import mqar_batch  # noqa: E402


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


def test_smoke_run_writes_results(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "recall_task.py"
    subprocess.run([sys.executable, str(tool), "--smoke", "--out", str(tmp_path), "--device", "cpu"], check=True)
    accuracy = json.loads((tmp_path / "recall.json").read_text())["accuracy"]
    assert set(accuracy) == {"tnl", "hybrid", "softmax"}
    assert all(set(acc) == {"16", "32"} and all(0 <= a <= 1 for a in acc.values()) for acc in accuracy.values())
    assert (tmp_path / "recall.md").read_text().startswith("| model | L=16 (N=4) | L=32 (N=8) |")
