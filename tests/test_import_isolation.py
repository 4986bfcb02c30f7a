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


def test_device_run_layout_imports_without_installing(tmp_path):
    """benchmarks/device_run.sh reproduces the package-dir mapping with symlinks on the offline
    device machine: a copy of the tree laid out that way must import as the real package."""
    import shutil

    for name in ("dhp_fx", "kernels", "passes"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink("../kernels", tmp_path / "dhp_fx" / "kernels")
    os.symlink("../passes", tmp_path / "dhp_fx" / "passes")
    script = ("import dhp_fx, dhp_fx.kernels, dhp_fx.passes, torch; "
              "print(dhp_fx.__file__); print(dhp_fx.kernels.__name__, dhp_fx.kernels.__all__[0]); "
              "print(hasattr(torch.ops.dhp, 'head_linear_out'))")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split()
    assert lines[0].startswith(str(tmp_path)) and lines[1:] == ["dhp_fx.kernels", "gated_attention", "True"], lines
    with open(os.path.join(ROOT, "benchmarks", "device_run.sh")) as f:
        text = f.read()
    assert "ln -sfn ../kernels dhp_fx/kernels" in text and "ln -sfn ../passes dhp_fx/passes" in text
