"""The compact block's one-launch Triton gather (kernels/triton_gather_heads.py) under the
interpreter, against the torch gather it replaces (``gather_heads_torch``), bit for bit: kept-head
index and filler flags, Q/K/V rows, biases, W_o columns, with filler entries zero, over
Hypothesis-drawn keep masks (none kept, all kept, per-row), caps, layouts (nn.Linear and HF
Conv1D storage, fused Q/K/V weights with role offsets), head dims and dtypes. NaN-poisoned
weights outside the kept heads prove nothing else is read into the result.

Runs itself in a child pytest process with TRITON_INTERPRET=1, as the other kernel suites do.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import test_triton_kernel as tk
from test_triton_kernel import _interpreter_on  # noqa: F401  (module-scoped autouse fixture)

from dhp_fx.kernels.compact_heads import gather_heads_torch

IN_PROCESS = tk.IN_PROCESS
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="run by test_gather_suite_in_interpreter_subprocess")

tg = tk.load_interpreted("dhp_fx.kernels.triton_gather_heads") if IN_PROCESS else None


@pytest.mark.skipif(IN_PROCESS, reason="the suite runs in this process")
def test_gather_suite_in_interpreter_subprocess():
    tk.run_interpreted_child(__file__, timeout=600)


@st.composite
def gather_cases(draw):
    B = draw(st.integers(1, 20))  # > 16 crosses the kernel's batch chunk
    H = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["random", "none", "all", "one_row"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        keep = torch.rand(B, H, generator=g) < 0.4
    elif kind == "none":
        keep = torch.zeros(B, H, dtype=torch.bool)
    elif kind == "all":
        keep = torch.ones(B, H, dtype=torch.bool)
    else:
        keep = torch.zeros(B, H, dtype=torch.bool)
        keep[B - 1, torch.randint(H, (1,), generator=g)] = True
    union = int(keep.any(0).sum())
    cap = draw(st.integers(max(union, 1), H))
    return dict(keep=keep, cap=cap, H=H, G=draw(st.sampled_from([1, 1, 2, 3])), D=draw(st.sampled_from([2, 4, 8])),
                Dv=draw(st.sampled_from([2, 4])),
                d_in=draw(st.integers(1, 140)), d_out=draw(st.integers(1, 40)), in_out=draw(st.booleans()),
                fused=draw(st.booleans()), bias=draw(st.booleans()), seed=seed,
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])))


def _poison_pruned(w: torch.Tensor, keep: torch.Tensor, start: int, dim: int, feature_dim: int) -> None:
    """NaN into the features of heads no row keeps: a gather that reads them shows it."""
    for h in (~keep.any(0)).nonzero().flatten().tolist():
        w.narrow(feature_dim, start + h * dim, dim).fill_(float("nan"))


@interpreted
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gather_cases())
def test_triton_gather_equals_torch_gather(case):
    # H slots (heads, or KV groups of G query heads): q and W_o hold G heads' features per slot
    keep, cap, H, D, Dv, G = case["keep"], case["cap"], case["H"], case["D"], case["Dv"], case["G"]
    dims = (G * D, D, Dv, G * Dv)
    g = torch.Generator().manual_seed(case["seed"])
    dt, io = case["dtype"], case["in_out"]

    def weight(rows):
        w = torch.randn(rows, case["d_in"], generator=g).to(dt)
        return w.t().contiguous() if io else w  # Conv1D stores [d_in, features]

    feature_dim = 1 if io else 0
    if case["fused"]:  # one [q | k | v] weight, roles at their offsets
        w_all = weight(H * (dims[0] + dims[1] + dims[2]))
        weights, starts = [w_all] * 3, [0, H * dims[0], H * (dims[0] + dims[1])]
    else:
        weights, starts = [weight(H * d) for d in dims[:3]], [0, 0, 0]
    for w, st_, dim in zip(weights, starts, dims[:3]):
        _poison_pruned(w, keep, st_, dim, feature_dim)
    biases = [torch.randn(w.shape[feature_dim], generator=g).to(dt) if case["bias"] else None for w in weights]
    out_w = torch.randn(case["d_out"], H * dims[3], generator=g).to(dt)
    _poison_pruned(out_w, keep, 0, dims[3], 1)
    if io:
        out_w = out_w.t().contiguous()

    args = (keep, cap, weights, biases, starts, [io] * 3, out_w, io, dims)
    _assert_same(tg.gather_heads_triton(*args), gather_heads_torch(*args))
    # per row (compact_rows): row b's slab is the gather of its own keep row
    rows = tg.gather_rows_triton(*args)
    for b in range(keep.shape[0]):
        want = gather_heads_torch(keep[b:b + 1], *args[1:])
        _assert_same([None if t is None else t[b] for t in rows], want)


def _assert_same(got, want) -> None:
    names = ("idx", "valid", "w_qkv", "b_qkv", "w_o")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.equal(a, b.contiguous()), (name, a, b)
