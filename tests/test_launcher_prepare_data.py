"""examples/prepare_data.sh (against a stand-in tools/preprocess_data.py): writes the tokenizer and the indexed
dataset, refuses bad text or vocabulary sizes with one line, and a failure or SIGTERM leaves the output directory
as it was (its work happens in a temporary directory inside it)."""

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hf_helpers import SHAKESPEARE

ROOT = Path(__file__).resolve().parents[1]
# Megatron-LM's tools/preprocess_data.py as prepare_data.sh uses it: reads --input with --tokenizer-model, writes
# OUTPUT_PREFIX_text_document.{bin,idx}. STANDIN_FAIL makes it fail; STANDIN_STARTED makes it mark its start and
# wait to be stopped.
PREPROCESS = """import os, sys, time
a = sys.argv[1:]
value = lambda flag: a[a.index(flag) + 1]
assert open(value("--input")).readline().startswith('{"text": ')
assert os.path.getsize(value("--tokenizer-model")) > 0
if os.environ.get("STANDIN_FAIL"):
    sys.exit("preprocess_data: failed")
prefix = value("--output-prefix")
open(prefix + "_text_document.bin", "wb").write(b"tokens")
if os.environ.get("STANDIN_STARTED"):
    open(os.environ["STANDIN_STARTED"], "w").close()
    time.sleep(60)
open(prefix + "_text_document.idx", "wb").write(b"index")
"""


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare") / "Megatron-LM"
    (root / "tools").mkdir(parents=True)
    (root / "tools" / "preprocess_data.py").write_text(PREPROCESS)
    return root


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(gzip.open(SHAKESPEARE, "rt", encoding="utf-8").read()[:20_000], encoding="utf-8")
    return path


def _prepare(megatron, out, *args, **env):
    cmd = ["bash", str(ROOT / "examples" / "prepare_data.sh"), str(megatron), str(out), *map(str, args)]
    return subprocess.run(cmd, env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True)


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_prepare_data_writes_the_tokenizer_and_the_dataset(megatron, shakespeare, tmp_path):
    done = _prepare(megatron, tmp_path / "out", shakespeare, 400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _names(tmp_path / "out") == ["text_text_document.bin", "text_text_document.idx", "tokenizer.model",
                                        "tokenizer.vocab"]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "vocab", "line"),
    [
        (b"", 400, "holds no text (empty or blank)"),
        (b"\n \n\t\n\n", 400, "holds no text (empty or blank)"),
        (b"caf\xe9 au lait\n", 400, "is not UTF-8 text (invalid continuation byte at byte 3)"),
        (None, "8k", "VOCAB_SIZE=8k: expected a positive integer"),
        (None, 0, "VOCAB_SIZE=0: expected a positive integer"),
        (None, -3, "VOCAB_SIZE=-3: expected a positive integer"),
        (None, 8192, "cannot train a 8192-piece vocabulary on this text: Vocabulary size too high (8192)"),
    ],
)
def test_bad_text_or_vocabulary_stops_in_one_line_and_leaves_nothing(
    megatron, shakespeare, tmp_path, content, vocab, line
):
    text = shakespeare
    if content is not None:
        text = tmp_path / "text.txt"
        text.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    done = _prepare(megatron, out, text, vocab)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and line in done.stderr, done.stderr[-2000:]
    assert _names(out) == ["notes.txt"]


def test_an_existing_tokenizer_is_kept_and_checked(megatron, shakespeare, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.model").write_text("not a model")
    done = _prepare(megatron, out, shakespeare, 400)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "tokenizer.model is not a SentencePiece model (remove it to train one)" in done.stderr
    assert _names(out) == ["tokenizer.model"] and (out / "tokenizer.model").read_text() == "not a model"


def test_a_failed_preprocess_leaves_nothing(megatron, shakespeare, tmp_path):
    done = _prepare(megatron, tmp_path / "out", shakespeare, 400, STANDIN_FAIL="1")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith(f"nothing was written to {tmp_path / 'out'}")
    assert _names(tmp_path / "out") == []


def test_sigterm_leaves_nothing(megatron, shakespeare, tmp_path):
    started = tmp_path / "started"
    cmd = ["bash", str(ROOT / "examples" / "prepare_data.sh"), str(megatron), str(tmp_path / "out"), str(shakespeare)]
    env = {**os.environ, "PYTHON": sys.executable, "STANDIN_STARTED": str(started)}
    # its own process group, as a terminal or a batch system would signal it
    proc = subprocess.Popen(
        [*cmd, "400"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    assert any(p.name.startswith(".prepare_data.tmp-") for p in (tmp_path / "out").iterdir())
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    assert _names(tmp_path / "out") == []
