"""The Triton config lists fit an H100 at D = 64 and 128: compiled for sm_90 here (no GPU needed), no config
the autotuner would try (attention forward and backward, split-KV decode, head-skipping
projections and their weight gradient) spills registers or exceeds shared memory, and head-dim pruning keeps the
configs that only fit smaller heads away from D = 128. Here each config is compiled once
(`--each-config-once`): at the widest head dim that runs it, in the heaviest launch that may run
it, in one weight layout: 139 configs instead of 280. Compiling even those took 4 minutes of a
2-core CI machine, so the survey reads each config's usage from `benchmarks/sm90_ledger.json` when
Triton's compile cache key for it is recorded there (the key changes with the kernel's source, the
specialisation, the options, triton and ptxas). It compiles the configs it does not find and,
per kernel, the recorded config with the most registers, which must reproduce its record.
Register allocation is not quite monotonic in the head dim (one config once spilled at D = 64
only), so after changing a kernel or a config list run the full survey,
`python benchmarks/kernel_resources.py`, which compiles every launch at both head dims, and
refresh the ledger (see that script's docstring)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_resources.py")
LEDGER = os.path.join(ROOT, "benchmarks", "sm90_ledger.json")


def _has_nvidia_tools() -> bool:
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.exists(os.path.join(tools, "cuobjdump"))


# Every kernel the survey covers, split in two groups of about equal compile time (72 and 67
# configs).
_KERNEL_GROUPS = (
    ("fwd", "fwd_causal", "bwd_dkdv", "decode_packed", "proj_out_pair", "proj_in", "router_pool",
     "router_vote", "gather_rows"),
    ("fwd_plain", "bwd_dq", "decode_split", "proj_out", "proj_wgrad", "partition", "router_pool_finish",
     "router_head", "gather_heads"),
)


@pytest.mark.skipif(not _has_nvidia_tools(), reason="this triton ships no NVIDIA toolchain")
def test_kernel_configs_do_not_spill_at_head_dims_64_and_128_on_sm90():
    # A fresh process: this one may hold the interpreter's kernels, which have one config only.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DHP_FX_TRITON_AUTOTUNE"] = "1"
    # Two processes, one per core: what compiles is most of this test's time. No disassembly:
    # the serialised-wgmma column it feeds is reported, not asserted, and it took a third of
    # each cold compile.
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--arch", "90", "--head-dims", "64", "128", "--no-sass",
                               "--each-config-once", "--ledger", LEDGER, "--only", *group],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for group in _KERNEL_GROUPS]
    try:
        outs = [p.communicate(timeout=1200) for p in procs]
    finally:
        for p in procs:
            p.kill()
    stdout, stderr = "".join(o for o, _ in outs), "".join(e for _, e in outs)
    rows = [line for line in stdout.splitlines()
            if line.startswith("| ") and "|---" not in line and not line.startswith("| kernel |")]
    kernels = {line.split("|")[1].strip() for line in rows}
    assert kernels == {k for group in _KERNEL_GROUPS for k in group}, stdout + stderr
    assert all(p.returncode == 0 for p in procs), "configs that spill or overflow shared memory:\n" + "\n".join(
        line for line in rows if "SPILLS" in line or "SHARED" in line) + stderr[-2000:]
    counts = [tuple(map(int, m)) for m in re.findall(r"ledger: (\d+) configs read, (\d+) compiled \((\d+) of", stderr)]
    assert len(counts) == len(procs), stderr[-2000:]
    read, compiled, rechecked = map(sum, zip(*counts))
    assert read + compiled == len(rows)
    if compiled > rechecked:
        warnings.warn(f"{compiled - rechecked} of {len(rows)} sm_90 configs are not in {LEDGER} and were compiled "
                      "(a kernel, a config list or triton changed); refresh the ledger as "
                      "benchmarks/kernel_resources.py's docstring says")
    # Columns: kernel, D, config, registers, stack, shared, async copies, TMA copies, wgmma.
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in rows]
    fwd = [c for c in cells if c[0].startswith("fwd")]
    tma = [c for c in fwd if "TMA1" in c[2]]
    assert tma and len(tma) < len(fwd), "the forward must offer both pointer and TMA descriptor configs"
    # The descriptor variant must really compile to bulk tensor copies, and every 64+-row tile
    # must reach Hopper's asynchronous warpgroup MMA rather than the older mma.sync.
    assert all(int(c[7]) > 0 for c in tma), tma
    assert all(int(c[7]) == 0 for c in fwd if "TMA0" in c[2])
    assert all(int(c[8]) > 0 for c in fwd if int(c[2].split()[0][1:]) >= 64), fwd


@pytest.mark.skipif(not _has_nvidia_tools(), reason="this triton ships no NVIDIA toolchain")
def test_the_ledger_is_read_and_its_heaviest_record_must_reproduce(tmp_path):
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(ledger, *extra):
        return subprocess.run([sys.executable, SCRIPT, "--arch", "90", "--only", "partition", "--ledger", str(ledger),
                               *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    # No ledger yet: both partition configs compile, and --write-ledger records them.
    fresh = tmp_path / "fresh.json"
    done = run(fresh, "--write-ledger")
    assert done.returncode == 0 and "0 configs read, 2 compiled" in done.stderr, done.stderr[-2000:]
    entries = json.loads(fresh.read_text())["entries"]
    assert sorted(e["kernel"] for e in entries.values()) == ["partition", "partition"]
    # Recorded: the lighter config is read (the table reports its record, here a spill only the
    # record knows of); the heavier one is compiled again, and a record the compile contradicts
    # fails the survey.
    lighter = min(entries, key=lambda k: entries[k]["usage"][0])
    heavier = max(entries, key=lambda k: entries[k]["usage"][0])
    entries[lighter]["usage"][1] = 4096
    entries[heavier]["usage"][0] += 1
    doctored = tmp_path / "doctored.json"
    doctored.write_text(json.dumps({"entries": entries}))
    read = run(doctored)
    assert "1 configs read, 1 compiled (1 of them rechecks" in read.stderr, read.stderr[-2000:]
    assert "| 4096 |" in read.stdout and "1 of 2 configs spill" in read.stderr
    assert read.returncode == 2 and "do not reproduce their record" in read.stderr, read.stderr[-2000:]
    assert f"recorded {entries[heavier]['usage']}" in read.stderr


def test_head_dim_pruning_keeps_small_head_configs_off_large_heads():
    from dhp_fx.kernels.triton_attention import fits_head_dim, prune_by_head_dim, set_config_limits

    class Cfg:
        def __init__(self, cap):
            set_config_limits(self, max_block_d=cap)
            self.kwargs = {"BLOCK_M": 64, "BLOCK_N": 64}

    every, small = Cfg(None), Cfg(64)
    assert fits_head_dim(every, 128) and fits_head_dim(small, 64) and not fits_head_dim(small, 128)
    assert prune_by_head_dim([every, small], {}, BLOCK_D=128, BLOCK_DV=128) == [every]
    assert prune_by_head_dim([every, small], {}, BLOCK_D=64, BLOCK_DV=128) == [every]
    assert prune_by_head_dim([every, small], {}, BLOCK_D=32, BLOCK_DV=64) == [every, small]
    # nothing fits: the first config runs rather than none (the autotuner refuses an empty list)
    assert prune_by_head_dim([small], {}, BLOCK_D=128, BLOCK_DV=128) == [small]


def test_head_dims_above_the_checked_configs_take_the_pytorch_path(monkeypatch):
    import importlib

    import torch

    op_module = importlib.import_module("dhp_fx.kernels.gated_attention")  # the package re-exports the op
    triton_attention = importlib.import_module("dhp_fx.kernels.triton_attention")

    # Pretend to be a CUDA tensor on a capable card: only the head-dim rule is left to decide.
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(triton_attention, "triton_available", lambda device: True)
    small = torch.zeros(1, 1, 1, triton_attention.MAX_HEAD_DIM)
    large = torch.zeros(1, 1, 1, 2 * triton_attention.MAX_HEAD_DIM)
    assert op_module._triton_path(small, small, 0.0) is triton_attention
    assert op_module._triton_path(large, large, 0.0) is None
    assert op_module._triton_path(small, large, 0.0) is None  # value head dim counts too
    assert op_module._triton_path(small, small, 0.1) is None  # dropout stays on the PyTorch path


def test_projection_kernels_take_only_checked_head_dims_on_capable_cards(monkeypatch):
    import importlib

    import torch

    hl = importlib.import_module("dhp_fx.kernels.head_linear")
    triton_attention = importlib.import_module("dhp_fx.kernels.triton_attention")
    triton_head_linear = importlib.import_module("dhp_fx.kernels.triton_head_linear")

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    capable = {"ok": True}
    monkeypatch.setattr(triton_attention, "triton_available", lambda device: capable["ok"])
    x, w = torch.zeros(2, 8), torch.zeros(8, 8)
    limit = triton_attention.MAX_HEAD_DIM
    assert hl._triton_module(x, w, None, limit) is triton_head_linear
    assert hl._triton_module(x, w, None, limit + 1) is None
    assert hl._triton_module(x, w.double(), None, 64) is None  # mixed dtypes stay on the torch path
    capable["ok"] = False  # e.g. a V100: no bf16 dots
    assert hl._triton_module(x, w, None, 64) is None


@pytest.mark.skipif(not _has_nvidia_tools(), reason="this triton ships no NVIDIA toolchain")
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_pv_behind_loop_overlaps_the_softmax_with_a_wgmma_on_sm90(tma, head_dim):
    """The point of the P@V-behind loop: on sm_90 its exp2s issue while a wgmma is in flight;
    the plain loop waits for every wgmma before its softmax. The overlap hangs on how triton
    places wgmma waits (a loop-carried dot operand, a guarding `if`, or an early use of the
    accumulator each silently made the dot synchronous while writing it), so it is checked in the
    machine code rather than trusted."""
    # A fresh process, as above: this one may hold the interpreter's kernels.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "loop_schedule.py"), "--check",
           "--head-dim", str(head_dim)] + (["--tma"] if tma else [])
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 3:
        # triton 3.9's ptxas does this to the descriptor build at D = 64 (C7513: non-wgmma
        # instructions define wgmma input registers); triton 3.6, the device's, does not
        pytest.skip("ptxas serialised every wgmma of this build, plain loop too:\n" + run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
