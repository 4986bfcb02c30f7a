"""A source checkout's root on sys.path must not let ``kernels``/``passes`` be imported twice.

transformers probes for the Hugging Face ``kernels`` package by importing ``kernels``; from the
repository root that found our kernels/ directory, re-registered the dhp ops from a throwaway
module copy and left torch.ops.dhp pointing at freed registrations (a segfault in CI).
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import sys
import torch
import dhp_fx
ops = {name: getattr(torch.ops.dhp, name).default for name in ("gated_attention", "head_linear_out", "head_linear_in")}
from transformers.utils import import_utils
import_utils.is_kernels_available()
import importlib
top_kernels = importlib.import_module("kernels")
top_passes = importlib.import_module("passes")
assert top_kernels is not dhp_fx.kernels and top_kernels.__all__ == [], top_kernels.__all__
assert top_passes.__all__ == [] and not hasattr(top_passes, "rewrite_attention")
for name, op in ops.items():
    assert getattr(torch.ops.dhp, name).default is op, name + " was re-registered"
x = torch.randn(2, 3, 8, dtype=torch.float64)
w = torch.randn(8, 8, dtype=torch.float64)
keep = torch.tensor([True, False])
torch.ops.dhp.head_linear_out(x, w, None, keep, 4, False)
print("ok")
"""


def test_top_level_kernels_import_from_the_checkout_root_registers_nothing():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
