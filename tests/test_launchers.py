"""The examples/ launchers build the pretrain_gpt.py command of their layout (run through torchrun against a
stand-in pretrain_gpt.py that records its arguments), and refuse layouts that do not divide the GPUs; the GPU
check scripts (tools/check_training.sh, tools/check_scaling.sh) run end to end against a stand-in that prints
Megatron's log lines and checkpoint marker."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf_helpers import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
RECORDER = """import json, os, sys
out = os.environ["LAUNCH_RECORD"] + f".{os.environ['LOCAL_RANK']}.json"
json.dump({"argv": sys.argv[1:], "world": os.environ["WORLD_SIZE"]}, open(out, "w"))
"""
# Megatron-LM's log and checkpoint behaviour as the check scripts read them: one line per iteration (the second
# after a start averaged with the first, as core_v0.19.0 prints it), a peak-memory line, the iteration marker.
TRAINER = """import os, sys
a = sys.argv[1:]
last = lambda flag: [a[i + 1] for i, x in enumerate(a) if x == flag][-1]
end = int(last("--exit-interval")) if "--exit-interval" in a else int(last("--train-iters"))
marker = os.path.join(last("--load"), "latest_checkpointed_iteration.txt")
if "--finetune" in a or not os.path.exists(marker):
    start = 0
else:
    start = int(last("--ckpt-step")) if "--ckpt-step" in a else int(open(marker).read())
if os.environ["RANK"] == "0":
    loss = lambda i: 10.0 / i
    for i in range(start + 1, end + 1):
        shown = (loss(i) + loss(i - 1)) / 2 if i == start + 2 else loss(i)
        print(f" iteration {i:8d}/ 200 | elapsed time per iteration (ms): 100.0 | lm loss: {shown:.6E} |")
    print("[Rank 0] memory (MB) | allocated: 1 | max allocated: 1234.5 | reserved: 2")
    os.makedirs(last("--save"), exist_ok=True)
    open(os.path.join(last("--save"), "latest_checkpointed_iteration.txt"), "w").write(str(end))
"""


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    megatron = root / "Megatron-LM"
    megatron.mkdir()
    (megatron / "pretrain_gpt.py").write_text(RECORDER)
    for suffix in (".bin", ".idx"):
        (root / f"text_text_document{suffix}").write_bytes(b"")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MEGATRON_LM": str(megatron),
        "DATA_PREFIX": str(root / "text_text_document"),
        "TOKENIZER_MODEL": str(train_sentencepiece(root / "spm", vocab_size=1000)),
        "PYTHON": sys.executable,
        "MASTER_PORT": str(port),
        "LAUNCH_RECORD": str(root / "record"),
        "CKPT_DIR": str(root / "ckpt"),
    }
    return root, env


def _launch(env, script, **layout):
    run_env = {**env, **{k: str(v) for k, v in layout.items()}}
    return subprocess.run(["bash", str(ROOT / "examples" / script)], env=run_env, capture_output=True, text=True)


def test_7b_launcher_with_context_parallelism(launch_env):
    root, env = launch_env
    done = _launch(env, "pretrain_tnl_7b.sh", CP=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tnl-7b: TP=2 PP=1 DP=2 CP=2 SP mbs=1 seq=4096" in done.stdout  # the planner's view of the layout
    records = sorted(root.glob("record.*.json"))
    assert len(records) == 8  # GPUS_PER_NODE defaults to 8
    rec = json.loads(records[0].read_text())
    argv = rec["argv"]
    assert rec["world"] == "8"

    def value(flag):
        return argv[argv.index(flag) + 1]

    assert value("--spec") == "megatron_tnllm.specs" and argv[argv.index("--spec") + 2] == "tnl_7b"
    assert (value("--tensor-model-parallel-size"), value("--pipeline-model-parallel-size")) == ("2", "1")
    assert value("--context-parallel-size") == "2"
    assert (value("--micro-batch-size"), value("--global-batch-size"), value("--seq-length")) == ("1", "512", "4096")
    assert {"--sequence-parallel", "--use-distributed-optimizer", "--bf16"} <= set(argv)
    assert value("--tokenizer-model") == env["TOKENIZER_MODEL"]


def test_launcher_refuses_a_layout_that_does_not_divide_the_gpus(launch_env):
    root, env = launch_env
    for old in root.glob("record.*.json"):
        old.unlink()
    done = _launch(env, "pretrain_tnl_7b.sh", CP=3)
    assert done.returncode != 0
    assert "8 GPUs do not split into TP=2 x PP=1 x CP=3" in done.stderr
    assert not list(root.glob("record.*.json"))  # nothing was launched


def test_mock_data_needs_no_dataset(launch_env):
    root, env = launch_env
    for old in root.glob("record.*.json"):
        old.unlink()
    done = _launch({**env, "DATA_PREFIX": str(root / "missing")}, "pretrain_tnl_385m.sh", MOCK_DATA=1, GPUS_PER_NODE=1)
    assert done.returncode == 0, done.stderr[-2000:]
    argv = json.loads((root / "record.0.json").read_text())["argv"]
    assert "--mock-data" in argv and "--data-path" not in argv
    done = _launch({**env, "DATA_PREFIX": str(root / "missing")}, "pretrain_tnl_385m.sh", GPUS_PER_NODE=1)
    assert done.returncode != 0 and "no " + str(root / "missing") + ".bin/.idx" in done.stderr


@pytest.mark.parametrize(
    ("script", "step", "expect"),
    [
        ("check_training.sh", "convergence", "1gpu_resume100.log: max relative loss difference 0.00e+00"),
        ("check_scaling.sh", "7b", "tp2_pp2_dp2.log: max relative loss difference 0.00e+00"),
    ],
)
def test_check_scripts_run_end_to_end(launch_env, tmp_path, script, step, expect):
    root, env = launch_env
    megatron = tmp_path / "Megatron-LM"
    megatron.mkdir()
    (megatron / "pretrain_gpt.py").write_text(TRAINER)
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.model").write_bytes(Path(env["TOKENIZER_MODEL"]).read_bytes())
    for suffix in (".bin", ".idx"):
        (data / f"text_text_document{suffix}").write_bytes(b"")
    run_env = {**env, "MEGATRON_LM": str(megatron), "DATA_DIR": str(data), "WORK_DIR": str(tmp_path / "work")}
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / script), str(tmp_path / "out"), step], env=run_env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert expect in done.stdout
    assert "exit 0" in done.stdout and "exit 1" not in done.stdout
