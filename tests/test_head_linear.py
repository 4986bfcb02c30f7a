"""Head-skipping projections: exact against the masked dense reference, grads, opcheck; the
Triton backward under the interpreter."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from all_pairs import all_pairs
from hypothesis import given, settings

from dhp_fx.kernels import row_cost
from hypothesis import strategies as st

from dhp_fx.kernels.head_linear import (
    head_linear_in, head_linear_in_reference, head_linear_out, head_linear_out_reference,
)


@st.composite
def cases(draw):
    heads = draw(st.integers(1, 5))
    head_dim = draw(st.sampled_from([1, 3, 8]))
    d_in = draw(st.integers(1, 12))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    keep = torch.tensor(draw(st.lists(st.booleans(), min_size=heads, max_size=heads)))
    return heads, head_dim, d_in, tuple(lead), keep, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 999))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_head_linear_out_and_in_match_masked_reference(case):
    heads, hd, d_in, lead, keep, in_out, with_bias = case[:7]
    g = torch.Generator().manual_seed(case[7])
    x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(heads * hd, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(heads * hd, generator=g, dtype=torch.float64) if with_bias else None
    w_arg = w.t().contiguous() if in_out else w
    y = head_linear_out(x, w_arg, b, keep, hd, in_out)
    torch.testing.assert_close(y, head_linear_out_reference(x, w_arg, b, keep, hd, in_out))
    assert (y[..., ~keep.repeat_interleave(hd)] == 0).all()

    o = torch.randn(*lead, heads * hd, generator=g, dtype=torch.float64) * keep.repeat_interleave(hd)
    w2 = torch.randn(d_in, heads * hd, generator=g, dtype=torch.float64)
    b2 = torch.randn(d_in, generator=g, dtype=torch.float64) if with_bias else None
    w2_arg = w2.t().contiguous() if in_out else w2
    torch.testing.assert_close(
        head_linear_in(o, w2_arg, b2, keep, hd, in_out), head_linear_in_reference(o, w2_arg, b2, keep, hd, in_out)
    )


@pytest.mark.parametrize("op", [head_linear_out, head_linear_in])
def test_gradcheck_and_opcheck(op):
    g = torch.Generator().manual_seed(0)
    keep = torch.tensor([True, False, True])
    x_dim, w_shape = (5, (6, 5)) if op is head_linear_out else (6, (5, 6))
    x = torch.randn(2, 3, x_dim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: op(x, w, b, keep, 2, False), (x, w, b))
    torch.library.opcheck(op, (x, w, b, keep, 2, False))


def test_pruned_rows_get_zero_weight_grad():
    keep = torch.tensor([True, False])
    x = torch.randn(4, 3)
    w = torch.randn(4, 3, requires_grad=True)
    head_linear_out(x, w, None, keep, 2).sum().backward()
    assert (w.grad[2:] == 0).all() and (w.grad[:2] != 0).any()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="heads_keep"):
        head_linear_out(torch.randn(2, 3), torch.randn(4, 3), None, torch.ones(2), 2)
    with pytest.raises(ValueError, match="head features"):
        head_linear_out(torch.randn(2, 3), torch.randn(5, 3), None, torch.ones(2, dtype=torch.bool), 2)


@st.composite
def per_sample_cases(draw):
    batch, heads = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    equal = draw(st.booleans())  # equal counts take the batched-GEMM path, others the union
    if equal:
        n = draw(st.integers(0, heads))
        rows = [sorted(draw(st.permutations(range(heads)))[:n]) for _ in range(batch)]
        keep = torch.zeros(batch, heads, dtype=torch.bool)
        for b, r in enumerate(rows):
            keep[b, r] = True
    else:
        keep = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=heads, max_size=heads),
                                          min_size=batch, max_size=batch)))
    return keep, draw(st.sampled_from([1, 3])), draw(st.integers(1, 6)), draw(st.integers(1, 3)), \
        draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 999))


@settings(max_examples=60, deadline=None)
@given(per_sample_cases(), st.sampled_from([0.0, None]))
def test_per_sample_masks_match_the_masked_reference_with_grads(case, bound):
    """Per-sample masks give the masked reference and its gradients, by either path: each row's
    own heads (bound 0: rows always pay) or the union (the default bound: rows this short never
    pay)."""
    saved = row_cost.ROWS_MIN_SAVED_FLOPS_PER_WEIGHT
    row_cost.ROWS_MIN_SAVED_FLOPS_PER_WEIGHT = saved if bound is None else bound
    try:
        _check_per_sample_case(case)
    finally:
        row_cost.ROWS_MIN_SAVED_FLOPS_PER_WEIGHT = saved


def _check_per_sample_case(case):
    keep, hd, d_in, seq, in_out, with_bias, seed = case
    batch, heads = keep.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(heads * hd, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(heads * hd, generator=g, dtype=torch.float64) if with_bias else None
    w_arg = w.t().contiguous() if in_out else w
    for op, ref, inp, weight, bias in (
        (head_linear_out, head_linear_out_reference, x, w_arg, b),
        (head_linear_in, head_linear_in_reference,
         torch.randn(batch, seq, heads * hd, generator=g, dtype=torch.float64) * keep.repeat_interleave(hd, -1)[:, None],
         w.t().contiguous().t() if not in_out else w.contiguous(), None if b is None else b[:1].expand(1).clone()),
    ):
        if op is head_linear_in:
            weight = torch.randn(1, heads * hd, generator=g, dtype=torch.float64)
            weight = weight.t().contiguous() if in_out else weight
        args = [t.clone().requires_grad_() if t is not None else None for t in (inp, weight, bias)]
        refs = [t.clone().requires_grad_() if t is not None else None for t in (inp, weight, bias)]
        got = op(args[0], args[1], args[2], keep, hd, in_out)
        want = ref(refs[0], refs[1], refs[2], keep, hd, in_out)
        torch.testing.assert_close(got, want)
        if op is head_linear_out:
            assert (got.detach()[~keep.repeat_interleave(hd, -1)[:, None].expand_as(got)] == 0).all()
        cot = torch.randn(got.shape, generator=g, dtype=torch.float64)
        (got * cot).sum().backward()
        (want * cot).sum().backward()
        for a, r in zip(args, refs):
            if a is not None:
                torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("tokens, per_row", [(8, False), (64, True)])
def test_per_sample_gemm_runs_only_where_the_rows_tokens_pay(tokens, per_row):
    """Each of 4 rows keeps its own one of 4 heads: 2 · tokens · 3 saved multiply-adds per
    gathered weight, 48 at 8 tokens (the union: dense GEMMs), 384 at 64 (batched GEMMs on each
    row's own weights). Both equal the reference."""
    from torch.profiler import ProfilerActivity, profile

    keep = torch.eye(4, dtype=torch.bool)
    x = torch.randn(4, tokens, 6, dtype=torch.float64)
    w = torch.randn(8, 6, dtype=torch.float64)
    o = torch.randn(4, tokens, 8, dtype=torch.float64) * keep.repeat_interleave(2, -1)[:, None]
    w_o = torch.randn(5, 8, dtype=torch.float64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        head_linear_out(x, w, None, keep, 2), head_linear_in(o, w_o, None, keep, 2)
    bmm = sum(e.name == "aten::bmm" for e in prof.events())  # inside the ops, at any depth
    assert bmm == (2 if per_row else 0), bmm
    torch.testing.assert_close(head_linear_out(x, w, None, keep, 2), head_linear_out_reference(x, w, None, keep, 2))
    torch.testing.assert_close(head_linear_in(o, w_o, None, keep, 2), head_linear_in_reference(o, w_o, None, keep, 2))


def test_per_sample_opcheck_and_bad_batch():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(head_linear_out, (x, w, None, keep, 2, False))
    o = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(head_linear_in, (o, torch.randn(5, 6, dtype=torch.float64, requires_grad=True), None, keep, 2, False))
    with pytest.raises(ValueError, match="batch"):
        head_linear_out(torch.randn(3, 3, 5), torch.randn(6, 5), None, keep, 2)


# ------------------------------------------------------------------ Triton backward, interpreted
# Triton picks interpreter mode when it is imported, and importing dhp_fx above already imported
# it (compiled), so these tests run in a child pytest process started with TRITON_INTERPRET=1;
# in this process they are skipped unless it was started interpreted itself.
_CHILD = "_DHP_FX_HEAD_LINEAR_INTERPRETER_CHILD"
_INTERPRETED = os.environ.get(_CHILD) == "1" or os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not _INTERPRETED, reason="run by test_triton_backward_in_interpreter_subprocess")


@pytest.mark.skipif(_INTERPRETED, reason="the interpreter tests run in this process")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backward_in_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreted",
                           __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, f"interpreter tests failed in the child:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.fixture(scope="module")
def thl():
    from dhp_fx.kernels import triton_head_linear

    assert triton_head_linear._INTERPRET, "triton_head_linear was imported compiled"
    return triton_head_linear


_T, _F = True, False
KEEPS = {  # [B=3, H=3] masks are per sample; the third sample keeps nothing in most
    "all": [_T, _T, _T], "none": [_F, _F, _F], "one": [_F, _T, _F], "two": [_T, _F, _T],
    "rows": [[_T, _F, _T], [_F, _T, _F], [_F, _F, _F]], "rows_one": [[_F, _T, _F], [_F, _T, _F], [_F, _F, _F]],
    "rows_all": [[_T] * 3] * 3, "rows_equal": [[_T, _T, _F], [_F, _T, _T], [_F, _F, _F]],
}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-2, rtol=1e-2)}


def _reference_grads(ref_fn, cot, inputs, keep, head_dim, in_out):
    ref = [t.double().requires_grad_() if t is not None else None for t in inputs]
    (ref_fn(*ref, keep, head_dim, in_out) * cot.double()).sum().backward()
    return [t.grad if t is not None else None for t in ref]


def _check_grads(got, want, dtype):
    for name, a, r in zip(("dx", "dweight", "dbias"), got, want):
        if r is None:
            assert a.numel() == 0, name
            continue
        assert a.dtype == dtype and a.shape == r.shape, name
        torch.testing.assert_close(a.double(), r, **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")


@interpreted
@pytest.mark.parametrize("mask,dtype,in_out,with_bias", all_pairs(  # 16 cases of the 64 combinations
    sorted(KEEPS), [torch.float32, torch.float16], [False, True], [False, True]))
def test_interpreted_triton_backward_matches_float64_autograd(thl, mask, dtype, in_out, with_bias):
    # 21 rows span two 16-row blocks (the second holds only the third sample); 20 input features
    # span two 16-column blocks of the weight-grad kernel; head_dim 24 is not a power of two
    keep = torch.tensor(KEEPS[mask])
    B, L, K, H, D = 3, 7, 20, 3, 24
    g = torch.Generator().manual_seed(sorted(KEEPS).index(mask) + 10 * in_out + 100 * with_bias)
    kept_by_any = (keep if keep.dim() == 1 else keep.any(0)).repeat_interleave(D)
    row_flags = keep.repeat_interleave(D, -1)
    row_flags = row_flags[:, None, :] if keep.dim() == 2 else row_flags

    x = torch.randn(B, L, K, generator=g).to(dtype)
    w = torch.randn(H * D, K, generator=g).to(dtype)
    w_arg = w.t().contiguous() if in_out else w
    b = torch.randn(H * D, generator=g).to(dtype) if with_bias else None
    cot = torch.randn(B, L, H * D, generator=g).to(dtype)  # nonzero on pruned features too
    got = thl.head_linear_out_backward_triton(cot, x, w_arg, b, keep, D, in_out)
    _check_grads(got, _reference_grads(head_linear_out_reference, cot, (x, w_arg, b), keep, D, in_out), dtype)
    gw = got[1].t() if in_out else got[1]
    assert (gw[~kept_by_any] == 0).all()
    if b is not None:
        assert (got[2][~kept_by_any] == 0).all()

    o = torch.randn(B, L, H * D, generator=g).to(dtype)  # nonzero on pruned features: they must be ignored
    w2 = torch.randn(K, H * D, generator=g).to(dtype)
    w2_arg = w2.t().contiguous() if in_out else w2
    b2 = torch.randn(K, generator=g).to(dtype) if with_bias else None
    cot2 = torch.randn(B, L, K, generator=g).to(dtype)
    got = thl.head_linear_in_backward_triton(cot2, o, w2_arg, b2, keep, D, in_out)
    _check_grads(got, _reference_grads(head_linear_in_reference, cot2, (o, w2_arg, b2), keep, D, in_out), dtype)
    gw = got[1].t() if in_out else got[1]
    assert (gw[:, ~kept_by_any] == 0).all()
    assert (got[0][~row_flags.expand_as(got[0])] == 0).all()


@interpreted
@pytest.mark.parametrize("pairs,mask,H,L", all_pairs(  # 7 cases of the 24 combinations; two pair up
    [True, False], ["shared", "rows"], [3, 4], [16, 10, 24]))  # heads over per-row masks on straddling blocks
def test_interpreted_head_linear_out_one_or_two_heads_per_program(thl, monkeypatch, pairs, mask, H, L):
    # Two heads per program pair up kept-head list slots (a [H] mask's list, or the sample's when
    # a 16-row block lies in one sample: L = 16); L = 10 and 24 make blocks straddle samples,
    # which pair heads 2j, 2j+1 with per-row masks. Odd H leaves the last program half a pair.
    # Pruned heads' features must be exact zeros; every feature must be written (the output is
    # compared whole, against a float64 reference).
    monkeypatch.setenv("DHP_FX_HEAD_PAIRS", "1" if pairs else "0")
    assert thl._pairs_heads(24, H) == pairs
    B, K, D = 4, 20, 24
    g = torch.Generator().manual_seed(100 * pairs + 10 * H + L)
    if mask == "shared":
        keep = torch.tensor([_F, _T, _T, _F][:H])
    else:  # out of order, one sample none, one all
        keep = torch.tensor([[_F, _T, _F, _T], [_F, _F, _F, _F], [_T, _T, _T, _T], [_T, _F, _T, _F]])[:, :H]
    for in_out in (False, True):
        x = torch.randn(B, L, K, generator=g)
        w = torch.randn(H * D, K, generator=g)
        w_arg = w.t().contiguous() if in_out else w
        b = torch.randn(H * D, generator=g)
        want = head_linear_out_reference(x.double(), w_arg.double(), b.double(), keep, D, in_out)
        got = thl.head_linear_out_triton(x, w_arg, b, keep, D, in_out)
        torch.testing.assert_close(got.double(), want, **GRAD_TOL[torch.float32])
        pruned = ~(keep if keep.dim() == 1 else keep[:, None, :]).repeat_interleave(D, -1).expand_as(got)
        assert (got[pruned] == 0).all()


@interpreted
@pytest.mark.parametrize("pairs,mask,L,D", all_pairs(  # 6 cases of the 16 combinations
    [True, False], ["shared", "rows"], [16, 10], [16, 32]))
def test_interpreted_projections_through_descriptors(thl, monkeypatch, pairs, mask, L, D):
    # tma=True: x and weight tiles through TMA descriptors (zero-filled past the rows and the
    # reduction's end instead of masked), head_linear_out one or two heads per program. L = 10
    # makes 16-row blocks straddle samples, which head_linear_in reads through pointers, zeroing
    # the rows of a head they prune (its descriptor version went wrong on an H200, not here);
    # D = 32 takes two reduction steps per head there. H = 3 leaves the last pair program
    # one head. fp16: the copy engine moves 16-bit tiles.
    monkeypatch.setenv("DHP_FX_HEAD_PAIRS", "1" if pairs else "0")
    keep = (torch.tensor([_F, _T, _T]) if mask == "shared" else
            torch.tensor([[_F, _T, _F], [_F, _F, _F], [_T, _T, _T], [_T, _F, _T]]))
    (H,), B, K, N = keep.shape[-1:], 4, 48, 40
    g = torch.Generator().manual_seed(L + D)
    tol = dict(atol=2e-2, rtol=1e-2)
    for in_out in (False, True):
        x = torch.randn(B, L, K, generator=g).half()
        w = torch.randn(H * D, K, generator=g).half() / 4
        w_arg = w.t().contiguous() if in_out else w
        b = torch.randn(H * D, generator=g).half()
        want = head_linear_out_reference(x.double(), w_arg.double(), b.double(), keep, D, in_out)
        got = thl.head_linear_out_triton(x, w_arg, b, keep, D, in_out, tma=True)
        torch.testing.assert_close(got.double(), want, **tol)
        pruned = ~(keep if keep.dim() == 1 else keep[:, None, :]).repeat_interleave(D, -1).expand_as(got)
        assert (got[pruned] == 0).all()

        o = torch.randn(B, L, H * D, generator=g).half()  # nonzero on pruned features: ignored
        w2 = torch.randn(N, H * D, generator=g).half() / 4
        w2_arg = w2.t().contiguous() if in_out else w2
        want = head_linear_in_reference(o.double(), w2_arg.double(), None, keep, D, in_out)
        got = thl.head_linear_in_triton(o, w2_arg, None, keep, D, in_out, tma=True)
        torch.testing.assert_close(got.double(), want, **tol)


@interpreted
def test_interpreted_descriptor_loading_refuses_what_it_cannot_copy(thl):
    keep = torch.tensor([True, False])
    x = torch.randn(2, 3, 32).half()
    with pytest.raises(ValueError, match="tma=True"):
        thl.head_linear_out_triton(x.float(), torch.randn(48, 32), None, keep, 24, tma=True)  # fp32, D = 24
    with pytest.raises(ValueError, match="tma=True"):
        thl.head_linear_in_triton(torch.randn(2, 3, 64).half()[..., :60], torch.randn(8, 60).half(), None,
                                  keep, 30, tma=True)
    with pytest.raises(ValueError, match="one float16/bfloat16 dtype"):  # a float32 weight beside fp16 x
        thl.head_linear_out_triton(x, torch.randn(32, 32), None, keep, 16, tma=True)


@interpreted
@pytest.mark.parametrize("L", [16, 32, 10, 24])
@pytest.mark.parametrize("in_out", [False, True])
def test_interpreted_per_sample_kept_head_lists_and_straddling_blocks(thl, L, in_out):
    # With 16-row blocks, 16 and 32 rows per sample put every block inside one sample, so
    # head_linear_in walks the sample's kept-head list; 10 and 24 also make blocks straddle
    # samples (the per-head walk), and leave a last block partly past the rows. Heads are kept
    # out of order; one sample keeps none, one all.
    keep = torch.tensor([[_F, _T, _F, _T], [_F, _F, _F, _F], [_T, _T, _T, _T], [_T, _F, _F, _T], [_F, _F, _T, _F]])
    (B, H), K, D = keep.shape, 20, 24
    g = torch.Generator().manual_seed(L + in_out)
    o = torch.randn(B, L, H * D, generator=g)  # nonzero on pruned features: they must be ignored
    w = torch.randn(K, H * D, generator=g)
    w_arg = w.t().contiguous() if in_out else w
    b = torch.randn(K, generator=g)
    want = head_linear_in_reference(o.double(), w_arg.double(), b.double(), keep, D, in_out)
    torch.testing.assert_close(thl.head_linear_in_triton(o, w_arg, b, keep, D, in_out).double(), want,
                               **GRAD_TOL[torch.float32])
    cot = torch.randn(B, L, K, generator=g)
    _check_grads(thl.head_linear_in_backward_triton(cot, o, w_arg, b, keep, D, in_out),
                 _reference_grads(head_linear_in_reference, cot, (o, w_arg, b), keep, D, in_out), torch.float32)
    # head_linear_out's dx is the head_linear_in reduction, on gradients nonzero at pruned heads
    x = torch.randn(B, L, K, generator=g)
    w2 = torch.randn(H * D, K, generator=g)
    w2_arg = w2.t().contiguous() if in_out else w2
    b2 = torch.randn(H * D, generator=g)
    cot2 = torch.randn(B, L, H * D, generator=g)
    _check_grads(thl.head_linear_out_backward_triton(cot2, x, w2_arg, b2, keep, D, in_out),
                 _reference_grads(head_linear_out_reference, cot2, (x, w2_arg, b2), keep, D, in_out), torch.float32)


@interpreted
@pytest.mark.parametrize("D", [8, 16])
def test_interpreted_triton_backward_small_head_dims(thl, D):
    # head_dim below the 16-wide dot tile, and one that fills it; a single row block
    keep = torch.tensor([[True, False, True, False], [False, False, True, True]])
    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, 3, 5, generator=g)
    w = torch.randn(4 * D, 5, generator=g)
    b = torch.randn(4 * D, generator=g)
    cot = torch.randn(2, 3, 4 * D, generator=g)
    got = thl.head_linear_out_backward_triton(cot, x, w, b, keep, D, False)
    _check_grads(got, _reference_grads(head_linear_out_reference, cot, (x, w, b), keep, D, False), torch.float32)
    o = torch.randn(2, 3, 4 * D, generator=g)
    w2 = torch.randn(4 * D, 5, generator=g)  # in_out layout [H*D, N]
    cot2 = torch.randn(2, 3, 5, generator=g)
    got = thl.head_linear_in_backward_triton(cot2, o, w2, None, keep, D, True)
    _check_grads(got, _reference_grads(head_linear_in_reference, cot2, (o, w2, None), keep, D, True), torch.float32)


@interpreted
def test_interpreted_ops_dispatch_backward_to_triton(thl, monkeypatch):
    # the ops pick Triton for CUDA tensors only; here CPU tensors are let through to check the
    # autograd wiring end to end (forward and backward both on the kernels)
    from dhp_fx.kernels import head_linear as hl

    calls = []

    def spy(name):
        real = getattr(thl, name)
        return lambda *a: calls.append(name) or real(*a)

    monkeypatch.setattr(hl, "_triton_module", lambda x, weight, bias, head_dim: thl)
    for name in ("head_linear_out_backward_triton", "head_linear_in_backward_triton"):
        monkeypatch.setattr(thl, name, spy(name))
    keep = torch.tensor([[True, False, True], [False, False, False]])
    g = torch.Generator().manual_seed(0)
    for op, ref, shapes in ((head_linear_out, head_linear_out_reference, ((2, 4, 6), (72, 6), (72,))),
                            (head_linear_in, head_linear_in_reference, ((2, 4, 72), (6, 72), (6,)))):
        inputs = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
        y = op(*inputs, keep, 24, False)
        cot = torch.randn(y.shape, generator=g)
        (y * cot).sum().backward()
        want = _reference_grads(ref, cot, [t.detach() for t in inputs], keep, 24, False)
        _check_grads([t.grad for t in inputs], want, torch.float32)
    assert calls == ["head_linear_out_backward_triton", "head_linear_in_backward_triton"]


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("op,ref", [(head_linear_out, head_linear_out_reference),
                                    (head_linear_in, head_linear_in_reference)])
def test_autocast_style_mixed_dtypes_compute_like_nn_linear(op, ref, per_sample):
    """bf16 activations with fp32 parameters (what an autocast graph hands these ops): computed in
    bf16 as nn.Linear under autocast would, grads back in each input's own dtype."""
    torch.manual_seed(0)
    B, T, H, D = 2, 3, 4, 8
    keep = torch.tensor([[True, False, True, True], [False, True, True, False]])
    keep = keep if per_sample else keep[0]
    x = torch.randn(B, T, H * D).bfloat16()
    if op is head_linear_in:  # its input is attention output: pruned heads' features are zeros
        x = x * keep.reshape(-1 if per_sample else 1, 1, H).repeat_interleave(D, -1)
    x.requires_grad_()
    w = torch.randn(H * D, H * D, requires_grad=True)
    b = torch.randn(H * D, requires_grad=True)
    y = op(x, w, b, keep, D)
    assert y.dtype == torch.bfloat16
    cot = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), cot)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y2 = ref(x2, w2.bfloat16(), b2.bfloat16(), keep, D)
    want = torch.autograd.grad(y2, (x2, w2, b2), cot)
    torch.testing.assert_close(y, y2, atol=2e-2, rtol=2e-2)
    for got, exp in zip((gx, gw, gb), want):
        assert got.dtype == exp.dtype
        torch.testing.assert_close(got, exp, atol=5e-2, rtol=2e-2)


@interpreted
@pytest.mark.parametrize("n_a,n_b,group", [(5, 3, 2), (4, 4, 2), (1, 6, 8), (7, 1, 3), (9, 2, 4)])
def test_interpreted_grouped_tile_order_visits_every_tile_once(thl, monkeypatch, n_a, n_b, group):
    # The projections' grid is 1-D and reordered so programs in flight share tiles; a ragged last
    # group (n_a not a multiple of the group) must neither skip nor repeat a tile.
    import triton
    import triton.language as tl

    # the interpreter resolves a kernel's names in its module's globals, not in closures
    monkeypatch.setitem(globals(), "_grouped_tile", thl._grouped_tile)

    @triton.jit
    def tiles(A, Bt, n_a, n_b, GROUP: tl.constexpr):
        pid = tl.program_id(0)
        a, b = _grouped_tile(pid, n_a, n_b, GROUP)  # noqa: F821
        tl.store(A + pid, a)
        tl.store(Bt + pid, b)

    a = torch.full((n_a * n_b,), -1, dtype=torch.int32)
    b = torch.full((n_a * n_b,), -1, dtype=torch.int32)
    tiles[(n_a * n_b,)](a, b, n_a, n_b, GROUP=group)
    assert sorted(zip(a.tolist(), b.tolist())) == [(i, j) for i in range(n_a) for j in range(n_b)]
    # within a full group, consecutive programs walk the group's a-tiles before the next b
    if n_a >= group and n_b > 1:
        assert a[:group].tolist() == list(range(group)) and b[:group].tolist() == [0] * group


@interpreted
@pytest.mark.parametrize("layout", ["expanded", "strided"])
def test_interpreted_masks_are_read_through_their_strides(thl, layout):
    # A batch-shared gate hands over a stride-0 [B, H] expand, and a bool mask is read as its own
    # bytes (no conversion copy): every layout must give what the contiguous mask gives.
    B, L, H, D, K = 3, 10, 4, 8, 24
    g = torch.Generator().manual_seed(7)
    row = torch.tensor([True, False, True, True])
    keep = row[None].expand(B, H) if layout == "expanded" else \
        torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0]] * B, dtype=torch.bool)[:, ::2]
    assert keep.stride() == ((0, 1) if layout == "expanded" else (8, 2))
    x = torch.randn(B, L, K, generator=g)
    w = torch.randn(H * D, K, generator=g)
    o = torch.randn(B, L, H * D, generator=g)
    w2 = torch.randn(K, H * D, generator=g)
    for fn, inp, weight in ((thl.head_linear_out_triton, x, w), (thl.head_linear_in_triton, o, w2)):
        got = fn(inp, weight, None, keep, D)
        want = fn(inp, weight, None, keep.contiguous(), D)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
