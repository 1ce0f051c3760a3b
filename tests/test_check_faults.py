"""tools/gpu_checks/check_faults.sh end to end on a CPU, through the launcher and torchrun, against a stand-in
pretrain_gpt.py that logs, checkpoints and resumes as Megatron-LM does (tracker file written after the checkpoint's
data): the three kill -9 scenarios pass (between checkpoints, while writing one, and with the tracker emptied as a
kill inside Megatron's rewrite of it leaves it). (With STANDIN_TRACKER_FIRST=1 the stand-in names a checkpoint in
the tracker before writing it, and the script reports the half-written checkpoint as loaded and exits 1.)"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf_helpers import train_sentencepiece
from tests.testing import pythonpath

ROOT = Path(__file__).resolve().parents[1]
# Megatron-LM's behaviour as check_faults.sh reads it: one log line per iteration (the second after a start
# averaged with the first), "successfully loaded checkpoint ... at iteration N" on resume from the iteration the
# tracker names, checkpoints every --save-interval and at the end, each a directory whose data takes a while to
# write (rank data, then DCP's .metadata, then dist_checkpointing's metadata.json, as Megatron orders them), then
# the tracker.
TRAINER = """import os, sys, time
a = sys.argv[1:]
last = lambda flag: a[len(a) - 1 - a[::-1].index(flag) + 1]
end, every, save = int(last("--train-iters")), int(last("--save-interval")), last("--save")
tracker = os.path.join(last("--load"), "latest_checkpointed_iteration.txt")
start = int(open(tracker).read()) if os.path.exists(tracker) else 0
if start:
    print(f"  successfully loaded checkpoint from {last('--load')} [ t 1/1, p 1/1 ] at iteration {start}")
loss = lambda i: 10.0 / i
for i in range(start + 1, end + 1):
    time.sleep(0.05)
    shown = (loss(i) + loss(i - 1)) / 2 if i == start + 2 else loss(i)
    print(f" iteration {i:8d}/{end:8d} | elapsed time per iteration (ms): 100.0 | lm loss: {shown:.6E} |", flush=True)
    if i % every == 0 or i == end:
        ckpt = os.path.join(save, f"iter_{i:07d}")
        os.makedirs(save, exist_ok=True)
        if os.environ.get("STANDIN_TRACKER_FIRST"):
            open(tracker, "w").write(str(i))
        os.makedirs(ckpt, exist_ok=True)
        open(os.path.join(ckpt, "__0_0.distcp"), "w").write("x")
        time.sleep(0.5)
        open(os.path.join(ckpt, ".metadata"), "w").write("x")
        open(os.path.join(ckpt, "metadata.json"), "w").write("{}")
        open(tracker, "w").write(str(i))
"""


@pytest.fixture(scope="module")
def standin(tmp_path_factory, patched_megatron) -> dict:
    root = tmp_path_factory.mktemp("faults")
    (root / "Megatron-LM").mkdir()
    (root / "Megatron-LM" / "pretrain_gpt.py").write_text(TRAINER)
    data = root / "data"
    data.mkdir()
    train_sentencepiece(data / "spm", vocab_size=1000).rename(data / "tokenizer.model")
    for suffix in (".bin", ".idx"):
        (data / f"text_text_document{suffix}").write_bytes(b"")
    return {
        **os.environ, "MEGATRON_LM": str(root / "Megatron-LM"), "DATA_DIR": str(data), "PYTHON": sys.executable,
        "PYTHONPATH": pythonpath(patched_megatron),  # pretrain_gpt.py's Megatron, with patches/ applied
    }  # fmt: skip


def _check_faults(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    run_env = {**env, "GPUS": "1", "TRAIN_ITERS": "10", "SAVE_INTERVAL": "4", "KILL_AT": "6"}
    run_env["WORK_DIR"] = str(tmp_path / "work")
    with socket.socket() as sock:  # the script uses this port and the next six
        sock.bind(("127.0.0.1", 0))
        run_env["MASTER_PORT"] = str(sock.getsockname()[1])
    return subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_checks" / "check_faults.sh"), str(tmp_path / "out")],
        env=run_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_killed_runs_resume_from_the_last_complete_checkpoint(standin, tmp_path):
    done = _check_faults(standin, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "killed at iteration 6 (tracker: 4)" in done.stdout
    assert "tracker 4 at the kill, 4 after; 1 files in the half-written directory" in done.stdout
    for name in ("between", "writing"):  # the killed runs' losses; restarts are compared to 1e-6 (averaged lines)
        assert f"{name}.log: max relative loss difference 0.00e+00 over iterations 1-" in done.stdout, done.stdout
    assert "killed at iteration 6; tracker emptied (checkpoint 4 complete on disk)" in done.stdout
    for name in ("between_restart", "writing_restart", "tracker_restart"):
        assert f"{name}.log: max relative loss difference" in done.stdout and f"FAIL: {name}" not in done.stdout
    assert "fault checks passed: 1 GPU(s), all three restarts loaded iteration 4" in done.stdout
