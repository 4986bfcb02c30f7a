"""The GPU benchmark's host-side parts that run without a GPU: its plan and its roofline floors."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(ROOT, "benchmarks", "bench_attention.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_floors_of_a_causal_prefill_and_a_gqa_decode():
    ba = _bench()
    # 8 x 32 heads, 2048 tokens, D 128, causal, bf16, every head kept; 1 PFLOP/s, 3 TB/s
    arith, mem = ba.attention_floor_ms(8, 32, 32, 2048, 2048, 128, 256, 256, True, 2, 1e15, 3e12)
    assert arith == pytest.approx(1e3 * 4 * 256 * 2048 * 2048 * 128 * 0.5 / 1e15)   # 0.275 ms
    assert mem == pytest.approx(1e3 * 2 * 4 * 256 * 2048 * 128 / 3e12)             # q, k, v, out
    # decode: one query row, 32 query heads on 8 KV heads, half the heads kept in 3 of 4 groups
    arith, mem = ba.attention_floor_ms(1, 32, 8, 1, 8192, 128, 16, 6, False, 2, 1e15, 3e12)
    assert arith == pytest.approx(1e3 * 4 * 16 * 8192 * 128 / 1e15)
    assert mem == pytest.approx(1e3 * 2 * (16 * 128 + 2 * 6 * 8192 * 128 + 32 * 128) / 3e12)
    assert mem > 100 * arith  # decode is memory-bound: pruning saves only whole KV groups' reads


def test_dry_run_plans_prefill_and_decode(capsys):
    ba = _bench()
    assert ba.main(["--dry-run", "--decode", "1,32,8,8192,128", "--p", "1", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "8x32x2048x128 causal" in out and "p=0.50 kept heads per row=16" in out
    assert "decode 1,32,8,8192,128" in out
    with pytest.raises(SystemExit):
        ba.parse_args(["--decode", "1,3,2,5,6"])  # 3 query heads on 2 KV heads


def test_targets_and_verdicts_follow_the_issue():
    ba = _bench()
    assert ba.core_target_ms(1.0, 0.5) == pytest.approx(0.575)           # T(1) <= 1.15 T_SDPA
    assert ba.core_target_ms(0.5, 0.5) == pytest.approx(0.285)           # 1.1 p T + 0.01 ms
    assert ba.block_target_ms(0.5, 2.0) == pytest.approx(1.2)            # (p + 0.1) x dense block
    assert ba.block_target_ms(0.95, 2.0) == pytest.approx(2.0)           # never above dense itself
    assert ba.verdict(0.28, 0.285) == "met"
    assert ba.verdict(0.342, 0.285) == "MISS +20%"
