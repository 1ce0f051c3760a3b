"""The examples/ launchers build the pretrain_gpt.py command of their layout (run through torchrun against a
stand-in pretrain_gpt.py that records its arguments, or under SLURM against stand-in scontrol and srun), take
every variable as a value (never code) and refuse bad values and layouts with one line before anything runs; the
GPU check scripts (tools/gpu_checks/check_training.sh, tools/gpu_checks/check_scaling.sh) run end to end against a
stand-in that prints Megatron's log lines and checkpoint marker."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf_helpers import train_sentencepiece
from tests.testing import pythonpath

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
def launch_env(tmp_path_factory, patched_megatron):
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
        "PYTHONPATH": pythonpath(patched_megatron),  # pretrain_gpt.py's Megatron, with patches/ applied
    }
    return root, env


def _launch(env, script, cwd=None, **layout):
    run_env = {**env, **{k: str(v) for k, v in layout.items()}}
    return subprocess.run(
        ["bash", str(ROOT / "examples" / script)], env=run_env, capture_output=True, text=True, cwd=cwd
    )


def _records(root):
    return sorted(root.glob("record.*.json"))


def _clear_records(root):
    for old in _records(root):
        old.unlink()


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
    assert value("--lr") == "3e-4" and value("--min-lr") == "2.9999999999999997e-05"
    assert "--num-virtual-stages-per-pipeline-rank" not in argv  # VPP defaults to 1: no interleaving
    assert value("--cross-entropy-fusion-impl") == "tnl" and "--cross-entropy-loss-fusion" in argv  # CROSS_ENTROPY
    assert "--no-gradient-accumulation-fusion" not in argv  # GRAD_ACCUM_FUSION=1: Megatron's default, fused


def test_launch_needs_the_patches_it_uses(launch_env):
    """Against the unpatched megatron-core the launch stops before anything runs, naming each patch that its settings
    need; turning those settings off (CROSS_ENTROPY=megatron GRAD_ACCUM_FUSION=0 DISTOPT=0) launches, without the
    fusion."""
    root, env = launch_env
    unpatched = {**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    _clear_records(root)
    done = _launch(unpatched, "pretrain_tnl_385m.sh", GPUS_PER_NODE=1, MOCK_DATA=1)
    assert done.returncode == 1 and not _records(root), done.stderr[-2000:]
    for patch in ("tnl-cross-entropy", "wgrad-accum-fusion", "distrib-optimizer-resume"):
        assert f"patches/core_v0.19.0-{patch}.patch" in done.stderr, done.stderr
    assert "CROSS_ENTROPY=megatron, GRAD_ACCUM_FUSION=0, DISTOPT=0" in done.stderr
    done = _launch(unpatched, "pretrain_tnl_385m.sh", GPUS_PER_NODE=1, MOCK_DATA=1, CROSS_ENTROPY="megatron",
                   GRAD_ACCUM_FUSION=0, DISTOPT=0)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--no-gradient-accumulation-fusion" in json.loads((root / "record.0.json").read_text())["argv"]


def test_megatron_cross_entropy_on_request(launch_env):
    """CROSS_ENTROPY=megatron: pretrain_gpt.py's own loss (no fusion flags), and the planner counts its fp32 logits."""
    root, env = launch_env
    _clear_records(root)
    plans = []
    for choice in ("tnl", "megatron"):
        done = _launch(env, "pretrain_tnl_385m.sh", GPUS_PER_NODE=1, MOCK_DATA=1, CROSS_ENTROPY=choice)
        assert done.returncode == 0, done.stderr[-2000:]
        plans.append(float(next(x for x in done.stdout.splitlines() if x.startswith("  logits")).split()[1]))
        argv = json.loads((root / "record.0.json").read_text())["argv"]
        assert ("--cross-entropy-fusion-impl" in argv) == (choice == "tnl")
    assert plans[0] < plans[1], plans  # GiB of logits planned: 4 B per logit against 10 B (tests/test_planning.py)


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
        ["bash", str(ROOT / "tools" / "gpu_checks" / script), str(tmp_path / "out"), step],
        env=run_env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert expect in done.stdout
    assert "exit 0" in done.stdout and "exit 1" not in done.stdout


def _refused(done, root, line):
    """The launch stopped with one line on stderr that contains ``line``, before the planner or torchrun ran."""
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and line in done.stderr, done.stderr[-2000:]
    assert done.stdout == ""  # the planner prints its estimate first
    assert not _records(root)


@pytest.mark.parametrize(
    ("layout", "line"),
    [
        ({"TP": -8}, "TP=-8: expected a positive integer"),
        ({"TP": "1.5"}, "TP=1.5: expected a positive integer"),
        ({"SEQ": 0}, "SEQ=0: expected a positive integer"),
        ({"GPUS_PER_NODE": 0}, "GPUS_PER_NODE=0: expected a positive integer"),
        ({"MBS": 0}, "MBS=0: expected a positive integer"),
        ({"GBS": "1e3"}, "GBS=1e3: expected a positive integer"),
        ({"GBS": 102}, "GBS=102 is not a multiple of MBS x DP = 1 x 4"),
        ({"SP": 2}, "SP=2: expected an integer from 0 to 1"),
        ({"DISTOPT": "yes"}, "DISTOPT=yes: expected an integer from 0 to 1"),
        ({"MOCK_DATA": "true"}, "MOCK_DATA=true: expected an integer from 0 to 1"),
        ({"RECOMPUTE": "selective"}, "RECOMPUTE=selective: expected none or full"),
        ({"CROSS_ENTROPY": "native"}, "CROSS_ENTROPY=native: expected tnl or megatron"),
        ({"LR": "3e-4/10"}, "LR=3e-4/10: expected a positive decimal number"),
        ({"LR": "0"}, "LR=0: expected a positive finite number"),
        ({"LR": "1e999"}, "LR=1e999: expected a positive finite number"),
        ({"MASTER_PORT": 70000}, "MASTER_PORT=70000: expected an integer from 1 to 65535"),
        ({"NNODES": 2}, "NNODES=2: more than one node needs SLURM"),
        ({"TRAIN_ITERS": -1}, "TRAIN_ITERS=-1: expected a positive integer"),
        ({"PRESET": "tnl-8b"}, "PRESET='tnl-8b': unknown preset"),
        ({"VPP": 2}, "VPP=2 needs pipeline parallelism (PP=1; want PP >= 2)"),
        ({"VPP": 4, "PP": 2}, "tnl-7b's 30 layers do not split into PP=2 x VPP=4 pipeline stages"),
        ({"VPP": 3, "PP": 2, "GBS": 6}, "VPP=3: 3 micro-batches a step (GBS / (MBS x DP)) are not a multiple of PP=2"),
        ({"PP": 4}, "tnl-7b's 30 layers do not split into PP=4 x VPP=1 pipeline stages"),
    ],
)
def test_launcher_refuses_a_bad_value_in_one_line_before_launching(launch_env, layout, line):
    root, env = launch_env
    _clear_records(root)
    _refused(_launch(env, "pretrain_tnl_7b.sh", **layout), root, line)


def test_deterministic_mode_needs_megatron_cross_entropy(launch_env):
    """Megatron-LM refuses --cross-entropy-loss-fusion with --deterministic-mode: the launcher says so first, and
    launches with CROSS_ENTROPY=megatron."""
    root, env = launch_env
    _clear_records(root)
    script = str(ROOT / "examples" / "pretrain_tnl_385m.sh")
    done = subprocess.run(
        ["bash", script, "--deterministic-mode"], env={**env, "GPUS_PER_NODE": "1"}, capture_output=True, text=True
    )
    _refused(done, root, "--deterministic-mode needs CROSS_ENTROPY=megatron")
    done = subprocess.run(
        ["bash", script, "--deterministic-mode"],
        env={**env, "GPUS_PER_NODE": "1", "CROSS_ENTROPY": "megatron"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    argv = json.loads((root / "record.0.json").read_text())["argv"]
    assert "--deterministic-mode" in argv and "--cross-entropy-loss-fusion" not in argv


def test_launcher_refuses_a_file_that_is_not_a_tokenizer(launch_env, tmp_path):
    root, env = launch_env
    _clear_records(root)
    (tmp_path / "tokenizer.model").write_text("not a model")
    done = _launch({**env, "TOKENIZER_MODEL": str(tmp_path / "tokenizer.model")}, "pretrain_tnl_7b.sh")
    _refused(done, root, f"TOKENIZER_MODEL='{tmp_path / 'tokenizer.model'}': not a SentencePiece model")


# Each variable the launchers read, with values that ran code: bash arithmetic evaluates `$(...)` and array
# subscripts (of a variable that is set, such as PATH) in a value, and LR / PRESET were pasted into Python source.
_VARIABLES = (
    "MOCK_DATA GPUS_PER_NODE NNODES MASTER_PORT TP PP VPP CP SP MBS GBS SEQ DISTOPT RECOMPUTE TRAIN_ITERS "
    "SAVE_INTERVAL LOG_INTERVAL LR PRESET CROSS_ENTROPY"
).split()


@pytest.mark.parametrize("name", _VARIABLES)
def test_no_launcher_variable_runs_code(launch_env, tmp_path, name):
    root, env = launch_env
    _clear_records(root)
    pwned = tmp_path / "PWNED"
    payloads = [f"$(touch {pwned})", f"PATH[$(touch {pwned})]", f"__import__('os').system('touch {pwned}')"]
    if name == "PRESET":
        payloads.append(f"tnl-7b'); __import__('os').system('touch {pwned}'); ('")
    for payload in payloads:
        done = _launch(env, "pretrain_tnl_7b.sh", cwd=tmp_path, **{name: payload})
        assert not pwned.exists(), f"{name}={payload} ran code"
        assert done.returncode != 0 and not _records(root), f"{name}={payload} launched"


def test_tokenizer_path_is_a_value_not_code(launch_env, tmp_path):
    """A tokenizer file whose name holds quotes and Python launches as that path (it was pasted into source)."""
    root, env = launch_env
    _clear_records(root)
    model = tmp_path / "tok'+__import__('os').system('touch PWNED')+'.model"
    model.write_bytes(Path(env["TOKENIZER_MODEL"]).read_bytes())
    done = _launch({**env, "TOKENIZER_MODEL": str(model)}, "pretrain_tnl_385m.sh", cwd=tmp_path, GPUS_PER_NODE=1)
    assert not (tmp_path / "PWNED").exists()
    assert done.returncode == 0, done.stderr[-2000:]
    argv = json.loads((root / "record.0.json").read_text())["argv"]
    assert argv[argv.index("--tokenizer-model") + 1] == str(model)


def test_virtual_pipeline_stages_reach_pretrain_gpt(launch_env):
    root, env = launch_env
    _clear_records(root)
    done = _launch(env, "pretrain_tnl_385m.sh", GPUS_PER_NODE=2, PP=2, VPP=2, GBS=16, MOCK_DATA=1)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tnl-385m: TP=1 PP=2 VPP=2 DP=1" in done.stdout  # the planner counts the interleaved schedule
    argv = json.loads((root / "record.0.json").read_text())["argv"]
    assert argv[argv.index("--pipeline-model-parallel-size") + 1] == "2"
    assert argv[argv.index("--num-virtual-stages-per-pipeline-rank") + 1] == "2"


SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf '%s\\n' ${STANDIN_HOSTS:-node1 node2}
"""
SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$LAUNCH_RECORD.srun"
"""


@pytest.fixture
def slurm_env(launch_env, tmp_path):
    root, env = launch_env
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = root / "record.srun"
    record.unlink(missing_ok=True)
    slurm = {
        "PATH": f"{bin_dir}:{env['PATH']}",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
    }
    return {**env, **slurm}, record


def test_sbatch_launcher_runs_torchrun_on_every_node_through_srun(slurm_env):
    env, record = slurm_env
    done = _launch(env, "pretrain_tnl_13b.sbatch")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tnl-13b: TP=8 PP=1 DP=2" in done.stdout
    argv = record.read_text().splitlines()
    assert argv[:4] == ["--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run"]
    launch = " ".join(argv[4 : argv.index(env["MEGATRON_LM"] + "/pretrain_gpt.py")])
    assert launch == (
        f"--nproc-per-node 8 --master-port {env['MASTER_PORT']} --nnodes 2 --rdzv-id 4242 --rdzv-backend c10d "
        f"--rdzv-endpoint node1:{env['MASTER_PORT']}"
    )


@pytest.mark.parametrize(
    ("slurm", "line"),
    [
        (
            {"SLURM_NNODES": "PATH[$(touch PWNED)]"},
            "SLURM_NNODES=PATH\\[\\$\\(touch\\ PWNED\\)\\]: expected a positive integer",
        ),
        ({"SLURM_NNODES": "0"}, "SLURM_NNODES=0: expected a positive integer"),
        ({"SLURM_JOB_ID": "$(touch PWNED)"}, "SLURM_JOB_ID=\\$\\(touch\\ PWNED\\): expected a job number"),
        ({"STANDIN_HOSTS": "$(touch${IFS}PWNED)"}, "not a host name (first of SLURM_JOB_NODELIST=node[1-2])"),
    ],
)
def test_sbatch_launcher_refuses_bad_slurm_values(slurm_env, tmp_path, slurm, line):
    env, record = slurm_env
    done = _launch({**env, **slurm}, "pretrain_tnl_13b.sbatch", cwd=tmp_path)
    assert done.returncode != 0 and line in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1
    assert not record.exists() and not (tmp_path / "PWNED").exists()


def test_launcher_repairs_an_emptied_checkpoint_tracker(launch_env, tmp_path):
    """A kill while Megatron rewrote latest_checkpointed_iteration.txt leaves it empty; the launcher points it at
    the newest complete checkpoint before starting (and refuses to start when there is none)."""
    root, env = launch_env
    _clear_records(root)
    ckpt = tmp_path / "ckpt"
    for it, complete in ((20, True), (40, False)):
        (ckpt / f"iter_{it:07d}").mkdir(parents=True)
        if complete:
            (ckpt / f"iter_{it:07d}" / "metadata.json").write_text("{}")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("")
    layout = {"CKPT_DIR": str(ckpt), "GPUS_PER_NODE": 1, "MOCK_DATA": 1}
    done = _launch(env, "pretrain_tnl_385m.sh", **layout)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "it now names iteration 20, the newest complete checkpoint" in done.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "20" and len(_records(root)) == 1

    _clear_records(root)
    (ckpt / "iter_0000020" / "metadata.json").unlink()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("")
    refused = _launch(env, "pretrain_tnl_385m.sh", **layout)
    assert refused.returncode != 0 and "has no complete torch_dist checkpoint" in refused.stderr
    assert not _records(root)  # nothing was launched
