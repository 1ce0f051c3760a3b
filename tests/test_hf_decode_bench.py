"""tools/bench/bench_decode.py end to end on a CPU (its --smoke mode): every series measured, the table
written; so the GPU run cannot fail on the script itself."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench" / "bench_decode.py"


def test_bench_decode_smoke(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", TOOL)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--smoke", "--out", str(tmp_path)])
    skinny_rows = bench.modeling_transnormer.SKINNY_ROWS
    bench.main()
    results = json.loads((tmp_path / "bench_decode.json").read_text())
    points = {(r["series"], r["batch"], r["context"]) for r in results["rows"]}
    # --smoke: batches 1 and 4, contexts 32 and 128; the reference points at the first context only
    assert points == {
        *((s, b, c) for s in ("tnl", "llama") for b in (1, 4) for c in (32, 128)),
        *((s, b, 32) for s in ("tnl-cublas", "tnl-eager") for b in (1, 4)),
    }
    assert bench.modeling_transnormer.SKINNY_ROWS == skinny_rows > 0  # the tnl-cublas series' switch is put back
    tnl = [r for r in results["rows"] if r["series"] == "tnl"]
    # constant-size state: the same cache at every context, 4x at batch 4
    assert len({r["cache_gib"] for r in tnl if r["batch"] == 1}) == 1
    assert {r["batch"]: r["cache_gib"] for r in tnl}[4] == 4 * {r["batch"]: r["cache_gib"] for r in tnl}[1]
    assert all(r["median_ms"] > 0 and r["floor_ms"] > 0 for r in results["rows"])
    table = (tmp_path / "bench_decode.md").read_text()
    assert table.count("\n") == 2 + len(results["rows"])
