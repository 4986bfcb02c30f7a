"""The end-to-end benchmarks run small here: bench_end_to_end_cpu.py's "compiled" step on a device
must not spend a lease on a Python error, nor bench_generate.py's table."""
from __future__ import annotations

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compiled_llama_table_runs_small(monkeypatch, capsys):
    argv = ["bench_end_to_end_cpu.py", "--model", "llama-gqa", "--compiler", "aot_eager", "--only", "static",
            "--p", "0.5", "--reps", "1", "--batch", "2", "--seq", "8", "--layers", "1", "--device", "cpu", "--dtype", "float32"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "benchmarks", "bench_end_to_end_cpu.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "Llama (random init, 8 heads, 4 KV heads) float32, batch 2 x seq 8" in out, out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["variant", "dense", "dense, torch.compile aot_eager", "static/batch p=0.5"], out


@pytest.mark.parametrize("model", ["llama", "gpt-neox"])
def test_generate_table_runs_small(monkeypatch, capsys, model):
    """benchmarks/bench_generate.py: every row, and the query chains it is about ran at each step."""
    argv = ["bench_generate.py", "--model", model, "--batch", "2", "--prompt", "6", "--new", "3", "--layers", "1",
            "--reps", "1", "--p", "0.5", "--gathered-row"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "benchmarks", "bench_generate.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["variant", "dense", "dense, torch.compile eager", "static p=0.5", "static p=0.5 K/V not in place",
                    "static p=0.5 head ops"], out
    # the capture call, then for each of the two rows sharing the model a warm-up (3 tokens),
    # 1 token, 3 tokens: each token one call of the layer's chain
    assert "static p=0.5: 15 query-chain calls, 1 gathers" in out, out
    from dhp_fx.kernels import compact_heads
    assert compact_heads.IN_PLACE_DECODE and compact_heads.HEAD_BANDS


def test_head_bands_table_runs(monkeypatch, capsys):
    """benchmarks/bench_head_bands.py: every shape's row, its paths checked equal before timing."""
    monkeypatch.setattr(sys, "argv", ["bench_head_bands.py", "--reps", "1"])
    runpy.run_path(os.path.join(ROOT, "benchmarks", "bench_head_bands.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].split("|")[-2].strip() == "bands in place" and len(rows) == 1 + 8, out
