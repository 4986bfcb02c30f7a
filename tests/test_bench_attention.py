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


# Runs bench_attention.main on CPU tensors with the kernels interpreted and the CUDA-only calls
# stubbed, so the code that only a lent GPU would otherwise reach (the timed tables, --block,
# --decode, the config report) is exercised before a device run depends on it.
_SMOKE = r"""
import sys, time, importlib.util
import torch, triton.testing
sys.path.insert(0, {root!r})
import dhp_fx.kernels.triton_attention as ta
spec = importlib.util.spec_from_file_location("bench_attention", {script!r})
ba = importlib.util.module_from_spec(spec); sys.modules[spec.name] = ba; spec.loader.exec_module(ba)
torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda *a: "cpu (interpreted)"
torch.cuda.get_device_capability = lambda *a: (9, 0)
torch.cuda.synchronize = lambda *a: None
torch.cuda.empty_cache = lambda: None
ta.triton_available = lambda device: True
ba.DEVICE = "cpu"
ba.measure_ceilings = lambda *a: (1e12, 1e11)
def do_bench(fn, warmup=0, rep=0, return_mode="median"):
    t = time.perf_counter(); fn(); return 1e3 * (time.perf_counter() - t)
triton.testing.do_bench = do_bench
sys.exit(ba.main(sys.argv[1:]))
"""


def test_main_tables_run_on_cpu_under_the_interpreter(tmp_path):
    import subprocess

    driver = tmp_path / "smoke.py"
    driver.write_text(_SMOKE.format(root=ROOT, script=os.path.join(ROOT, "benchmarks", "bench_attention.py")))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(driver), "--shapes", "1,2,32,16", "1,2,24,16,causal", "--p", "1", "0.5",
                          "--block", "--graphs", "--decode", "1,4,2,40,16", "--no-flex", "--dtype", "fp16"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    rows = [line for line in out.splitlines() if line.startswith(("1x2x32x16", "1x2x24x16 causal"))]
    assert len(rows) == 4 and all(("met" in r or "MISS" in r) for r in rows), out
    assert out.count("triton config: BLOCK_M=") == 2, out
    # eager and graphed (without CUDA the graph replay is the call itself), each with its target
    ops_rows = [line for line in out.splitlines() if "block ops/" in line]
    assert len(ops_rows) == 16 and all("target" in line for line in ops_rows), out
    assert out.count("+graph") == 24, out
    compact_rows = [line for line in out.splitlines() if "block compact/shared" in line]
    assert len(compact_rows) == 8 and all("target" in line for line in compact_rows), out
    assert "decode B,Hq,Hkv,Lk,D" in out and "1,4,2,40,16" in out, out

    # HF's [B, L, H, D] views with the descriptor variant forced: the path a later run flips on.
    run = subprocess.run([sys.executable, str(driver), "--shapes", "1,2,32,16", "--p", "0.5", "--no-flex",
                          "--layout", "model", "--tma", "on"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "layout model  tma on" in run.stdout and "1x2x32x16" in run.stdout, run.stdout
