"""tools/hf_generate.py runs no code from the model directory unless asked, and refuses bad input in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megatron_tnllm.hf.export import write_export_files
from tests.hf_helpers import tiny_model, train_sentencepiece

TOOL = Path(__file__).resolve().parents[1] / "tools" / "hf_generate.py"


def _tool():
    spec = importlib.util.spec_from_file_location("hf_generate", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An export whose Python files would stop the process if anything imported them."""
    root = tmp_path_factory.mktemp("generate")
    model = tiny_model(seed=8, num_layers=2, lrpe_layers=(0,))
    model.save_pretrained(root / "export")
    write_export_files(root / "export", model.config, "float32", train_sentencepiece(root / "sp"))
    for name in ("configuration_transnormer.py", "modeling_transnormer.py", "tokenization_transnormer.py"):
        with open(root / "export" / name, "a") as f:
            f.write('\nraise SystemExit("code from the model directory ran")\n')
    return root / "export"


def _run(argv: list[str]) -> int:
    return _tool().main([*argv, "--new-tokens", "2", "--dtype", "fp32", "--device", "cpu"])


def test_generation_runs_no_code_from_the_directory_by_default(export, capsys):
    assert _run([str(export), "--prompt", "ROMEO:"]) == 0
    out = capsys.readouterr().out
    assert "--- greedy" in out and "--- sampled" in out and out.count("ROMEO:") == 2


def test_empty_prompt_is_a_one_line_error(export, capsys):
    assert _run([str(export), "--prompt", ""]) == 2
    assert capsys.readouterr().err == "error: --prompt is empty; expected text to continue\n"


def test_directory_without_tokenizer_model_fails_at_load(export, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in export.iterdir():
        if path.name != "tokenizer.model":
            (broken / path.name).write_bytes(path.read_bytes())
    assert _run([str(broken), "--prompt", "ROMEO:"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tokenizer.model not found; expected tokenizer.model in {broken}" in err
