"""dhp::gated_attention on CPU: values, gradients, dispatch and argument checks.

Everything is compared with ``gated_attention_reference`` run on float64 copies of the inputs.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dhp_fx.kernels  # noqa: F401  (registers the op)
from dhp_fx.kernels import cpu as cpu_impl
from dhp_fx.kernels import gated_attention_reference
from dhp_fx.kernels.layout import attention_output, token_major

op = torch.ops.dhp.gated_attention
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
MASK_SHAPES = ["b11k", "11qk", "bhqk", "qk", "k", "b1qk", "1h1k"]


def mask_shape(kind, B, H, Lq, Lk):
    return {
        "b11k": (B, 1, 1, Lk), "11qk": (1, 1, Lq, Lk), "bhqk": (B, H, Lq, Lk), "qk": (Lq, Lk),
        "k": (Lk,), "b1qk": (B, 1, Lq, Lk), "1h1k": (1, H, 1, Lk),
    }[kind]


def make_tensor(shape, dtype, layout, gen):
    """[B, H, L, E] with the requested memory layout (values identical whatever the layout)."""
    B, H, L, E = shape
    if layout == "bshd":  # what a model's view(B, L, H, E).transpose(1, 2) gives
        return torch.randn(B, L, H, E, generator=gen).to(dtype).transpose(1, 2)
    if layout == "narrow":  # a slice out of a wider fused projection
        return torch.randn(B, H, L, E + 3, generator=gen).to(dtype)[..., 1:E + 1]
    return torch.randn(B, H, L, E, generator=gen).to(dtype)


def make_keep(kind, B, H, gen):
    if kind == "all":
        return torch.ones(B, H, dtype=torch.bool)
    if kind == "one":
        keep = torch.zeros(B, H, dtype=torch.bool)
        keep[torch.randint(B, (), generator=gen), torch.randint(H, (), generator=gen)] = True
        return keep
    keep = torch.rand(B, H, generator=gen) < 0.5
    if kind == "shared":
        keep[:] = keep[0].clone()
    if kind == "empty_row":
        keep[torch.randint(B, (), generator=gen)] = False
    return keep


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3]))
    Lq = draw(st.sampled_from([1, 2, 5, 7, 16]))
    Lk = draw(st.sampled_from([1, 3, 8, 13]))
    D = draw(st.sampled_from([4, 8, 16]))
    Dv = draw(st.sampled_from([D, D, 8]))
    mask_kind = draw(st.sampled_from(["none", "bool", "additive"]))
    return dict(
        B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv,
        causal=draw(st.booleans()),
        mask_kind=mask_kind,
        mask_shape=draw(st.sampled_from(MASK_SHAPES)),
        mask_transposed=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        scale=draw(st.sampled_from([None, 0.3, 1.0])),
        layout=draw(st.sampled_from(["bhsd", "bshd", "narrow"])),
        keep=draw(st.sampled_from(["random", "all", "one", "empty_row", "shared"])),
        seed=draw(st.integers(0, 2**16)),
    )


def build(c, requires_grad=False):
    gen = torch.Generator().manual_seed(c["seed"])
    B, Hq, Hkv, Lq, Lk, D, Dv, dt = (c[x] for x in ("B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv", "dtype"))
    q = make_tensor((B, Hq, Lq, D), dt, c["layout"], gen)
    k = make_tensor((B, Hkv, Lk, D), dt, c["layout"], gen)
    v = make_tensor((B, Hkv, Lk, Dv), dt, c["layout"], gen)
    keep = make_keep(c["keep"], B, Hq, gen)
    mask = None
    if c["mask_kind"] != "none":
        shape = mask_shape(c["mask_shape"], B, Hq, Lq, Lk)
        if c["mask_transposed"] and len(shape) >= 2:
            shape = shape[:-2] + shape[:-3:-1]
        allowed = torch.rand(shape, generator=gen) < 0.8
        if c["mask_kind"] == "bool":
            mask = allowed
        else:  # a bias with some -inf, like a padding mask folded into a position bias
            mask = torch.randn(shape, generator=gen).masked_fill(~allowed, -math.inf).to(dt)
        if c["mask_transposed"] and len(shape) >= 2:
            mask = mask.transpose(-1, -2)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
        if mask is not None and mask.is_floating_point():
            mask = mask.masked_fill(mask == -math.inf, -1e4).detach().requires_grad_()
    return q, k, v, keep, mask


def reference_folded(q, k, v, keep, mask, causal, scale):
    """Causality folded into the mask: SDPA's math backend refuses a mask together with is_causal."""
    if mask is not None:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))  # SDPA rejects 1-D masks
    if mask is not None and causal:
        above = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
        mask = mask & ~above if mask.dtype == torch.bool else mask.masked_fill(above, -math.inf)
        causal = False
    return gated_attention_reference(q, k, v, keep, mask, 0.0, causal, scale)


def reference64(q, k, v, keep, mask, causal, scale):
    q, k, v = (t.detach().double() for t in (q, k, v))
    if mask is not None:
        mask = mask.detach()
        mask = mask if mask.dtype == torch.bool else mask.double()
    return reference_folded(q, k, v, keep, mask, causal, scale)


def check_output(out, q, v, keep, ref, dtype):
    B, Hq, Lq, _ = q.shape
    assert out.shape == (B, Hq, Lq, v.shape[-1]) and out.dtype == dtype
    # laid out as q is, as the fake impl promises compiled graphs: token-major q (a model's
    # [B, L, H, D] storage) gets a token-major output, so the reshape after attention is a view
    assert out.stride() == attention_output(q, v.shape[-1]).stride()
    if token_major(q):
        assert out.transpose(1, 2).is_contiguous()
    else:
        assert out.is_contiguous()
    assert not out.isnan().any()
    assert (out[~keep] == 0).all(), "pruned heads must be exact zeros"
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_forward_matches_reference(c):
    q, k, v, keep, mask = build(c)
    out = op(q, k, v, keep, mask, 0.0, c["causal"], c["scale"])
    check_output(out, q, v, keep, reference64(q, k, v, keep, mask, c["causal"], c["scale"]), c["dtype"])


@pytest.mark.parametrize("strategy", ["gather", "views"])
@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(dtypes=(torch.float32,)))
def test_each_strategy_matches_reference(strategy, c):
    """Force one strategy for every partial keep pattern (normally chosen by cost)."""
    saved = cpu_impl._max_view_calls, cpu_impl.VIEW_PAIRS_PER_THREAD
    cpu_impl._max_view_calls = lambda gather_bytes: 10**9 if strategy == "views" else 0
    cpu_impl.VIEW_PAIRS_PER_THREAD = 0
    try:
        q, k, v, keep, mask = build(c)
        out = op(q, k, v, keep, mask, 0.0, c["causal"], c["scale"])
    finally:
        cpu_impl._max_view_calls, cpu_impl.VIEW_PAIRS_PER_THREAD = saved
    check_output(out, q, v, keep, reference64(q, k, v, keep, mask, c["causal"], c["scale"]), c["dtype"])


GRAD_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(cases(dtypes=(torch.float64, torch.float64, torch.float32, torch.float16, torch.bfloat16)))
def test_grads_match_reference(c):
    q, k, v, keep, mask = build(c, requires_grad=True)
    w = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=torch.float64)
    ins = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    out = op(q, k, v, keep, mask, 0.0, c["causal"], c["scale"])
    got = torch.autograd.grad((out.double() * w).sum(), ins)
    leaves = [t.detach().double().requires_grad_() for t in ins]
    lm = leaves[3] if len(leaves) == 4 else mask
    ref_out = reference_folded(*leaves[:3], keep, lm, c["causal"], c["scale"])
    want = torch.autograd.grad((ref_out * w).sum(), leaves)
    tol = GRAD_TOL[c["dtype"]]
    for g, r, x in zip(got, want, ins):
        assert g.dtype == x.dtype and g.shape == x.shape and not g.isnan().any()
        torch.testing.assert_close(g.double(), r, atol=tol * (1 + r.abs().max().item()), rtol=tol)
    assert (got[0][~keep] == 0).all(), "pruned heads must get zero gradient"
    kv_used = keep.view(keep.shape[0], k.shape[1], -1).any(-1)
    assert (got[1][~kv_used] == 0).all() and (got[2][~kv_used] == 0).all()


def test_fully_masked_rows_match_sdpa():
    """A kept head whose row sees no key gives what SDPA gives (zeros), and finite grads."""
    q, k, v, keep, _ = small(Hkv=4)
    mask = torch.ones(2, 4, 3, 4, dtype=torch.bool)
    mask[:, :, 1] = False  # query 1 attends nothing, in every head
    out = op(q, k, v, keep, mask, 0.0, False, None)
    want = reference_folded(q.detach(), k.detach(), v.detach(), keep, mask, False, None)
    torch.testing.assert_close(out, want)
    assert (out[:, :, 1] == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_output_does_not_alias_workspace():
    """The gather strategy reuses a per-thread buffer; results must not live in it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 6, 8, 8, generator=gen) for _ in range(3))
    keep = torch.rand(4, 6, generator=gen) < 0.5
    keep[:, 0], keep[:, 1] = True, False  # several runs per row, rows differ: gather
    first = op(q, k, v, keep, None, 0.0, False, None)
    saved = first.clone()
    op(q * 2, k, v, keep, None, 0.0, False, None)
    assert torch.equal(first, saved)


def test_inference_mode_then_training():
    """The reused buffer must stay writable whichever grad mode created it."""
    cpu_impl._local.__dict__.pop("bufs", None)  # let inference mode create the buffer
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 6, 8, 16, generator=gen) for _ in range(3))
    keep = torch.rand(4, 6, generator=gen) < 0.5
    keep[:, 0], keep[:, 1] = True, False
    with torch.inference_mode():
        a = op(q, k, v, keep, None, 0.0, False, None)
    q.requires_grad_()
    b = op(q, k, v, keep, None, 0.0, False, None)
    b.sum().backward()
    with torch.inference_mode():
        c = op(q, k, v, keep, None, 0.0, False, None)
    assert torch.equal(a, b.detach()) and torch.equal(a, c)


def small(B=2, Hq=4, Hkv=2, Lq=3, Lk=4, D=4, Dv=4, mask=None, grad_mask=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, dtype=torch.float64, generator=gen).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, dtype=torch.float64, generator=gen).requires_grad_()
    v = torch.randn(B, Hkv, Lk, Dv, dtype=torch.float64, generator=gen).requires_grad_()
    m = None
    if mask is not None:
        m = torch.randn(mask_shape(mask, B, Hq, Lq, Lk), dtype=torch.float64, generator=gen)
        m.requires_grad_(grad_mask)
    keep = torch.tensor([[True, False, True, True], [False, False, True, False]])[:B, :Hq]
    return q, k, v, keep, m


@pytest.mark.parametrize(
    "kw, causal",
    [
        (dict(), True),  # GQA, pruned heads, one kv group fully pruned in row 1
        (dict(Hkv=4, mask="b1qk"), False),  # T5-style learned bias per batch row
        (dict(mask="1h1k", Dv=3), True),  # per-head bias + causal folded into the mask
        (dict(Lq=1, mask="qk"), False),  # decode step with a shared bias
    ],
)
def test_gradcheck(kw, causal):
    q, k, v, keep, m = small(**kw)
    ins = (q, k, v) + ((m,) if m is not None else ())
    fn = lambda q, k, v, *m: op(q, k, v, keep, m[0] if m else None, 0.0, causal, 0.4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ins, fast_mode=True)


def test_gradcheck_dropout_replays_mask():
    """Reseeding makes the function deterministic; the backward must then use the same mask."""
    q, k, v, keep, m = small(mask="b11k")

    def fn(q, k, v, m):
        torch.manual_seed(123)
        return op(q, k, v, keep, m, 0.3, False, None)

    assert torch.autograd.gradcheck(fn, (q, k, v, m), fast_mode=True)


def test_dropout_semantics():
    gen = torch.Generator().manual_seed(0)
    B, H, L = 2, 8, 64
    q = torch.randn(B, H, L, 16, generator=gen)
    k = torch.randn(B, H, L, 16, generator=gen)
    v = torch.ones(B, H, L, 16)
    keep = torch.rand(B, H, generator=gen) < 0.5
    keep[0] = False
    a = op(q, k, v, keep, None, 0.4, False, None)
    b = op(q, k, v, keep, None, 0.4, False, None)
    assert not torch.equal(a, b), "consecutive calls must draw different masks"
    assert (a[~keep] == 0).all() and not a.isnan().any()
    # Rows of softmax weights sum to 1, so with v == 1 the output is an unbiased estimate of 1.
    assert abs(a[keep].mean().item() - 1.0) < 0.05
    torch.manual_seed(7)
    c = op(q, k, v, keep, None, 0.4, False, None)
    torch.manual_seed(7)
    assert torch.equal(c, op(q, k, v, keep, None, 0.4, False, None))


OPCHECK_CASES = [
    dict(kw=dict(mask="b1qk"), causal=False),
    dict(kw=dict(), causal=True),
    dict(kw=dict(Hkv=4, mask="qk", grad_mask=False), causal=False),
]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    as_f32 = lambda t: t.detach().float().requires_grad_(t.requires_grad)  # noqa: E731
    q, k, v, keep, m = (
        as_f32(t) if t is not None and t.is_floating_point() else t for t in small(**case["kw"])
    )
    torch.library.opcheck(op, (q, k, v, keep, m, 0.0, case["causal"], None))
    all_kept = torch.ones_like(keep)
    torch.library.opcheck(op, (q, k, v, all_kept, m, 0.0, case["causal"], None))


def test_opcheck_backward_op():
    q, k, v, keep, m = (t.detach() if t is not None else t for t in small(mask="b11k"))
    g = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    bwd = torch.ops.dhp.gated_attention_backward
    torch.library.opcheck(bwd, (g, q, k, v, keep, m, 0.0, True, None, None, True))
    torch.library.opcheck(bwd, (g, q, k, v, keep, m, 0.5, False, 0.3, torch.tensor(11), False))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_torch_compile(backend, dropout_p):
    torch._dynamo.reset()
    q, k, v, keep, m = small(mask="b1qk")
    w = torch.arange(4, dtype=torch.float64)

    def loss(q, k, v, m, keep):
        return (op(q, k, v, keep, m, dropout_p, False, None) * w).sum()

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    torch.manual_seed(3)
    got = compiled(q, k, v, m, keep)
    got_g = torch.autograd.grad(got, (q, k, v, m))
    torch.manual_seed(3)
    want = loss(q, k, v, m, keep)
    want_g = torch.autograd.grad(want, (q, k, v, m))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def _bad(**over):
    args = dict(
        q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 8),
        keep=torch.ones(2, 4, dtype=torch.bool), attn_mask=None, dropout_p=0.0,
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "args, match",
    [
        (_bad(keep=torch.ones(2, 3, dtype=torch.bool)), "keep"),
        (_bad(keep=torch.ones(2, 4, dtype=torch.int64)), "keep"),
        (_bad(keep=torch.ones(4, dtype=torch.bool)), "keep"),
        (_bad(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), "kv heads"),
        (_bad(v=torch.randn(2, 2, 7, 8)), "disagree"),
        (_bad(k=torch.randn(2, 2, 6, 4)), "head dim"),
        (_bad(k=torch.randn(1, 2, 6, 8), v=torch.randn(1, 2, 6, 8)), "batch"),
        (_bad(q=torch.randn(4, 5, 8)), "4-D"),
        (_bad(attn_mask=torch.zeros(3, 6)), "attn_mask"),
        (_bad(attn_mask=torch.zeros(1, 1, 1, 1, 6)), "attn_mask"),
        (_bad(attn_mask=torch.zeros(5, 6, dtype=torch.int32)), "attn_mask"),
        (_bad(dropout_p=1.0), "dropout_p"),
        (_bad(v=torch.randn(2, 2, 6, 8, dtype=torch.float64)), "dtype"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        op(args["q"], args["k"], args["v"], args["keep"], args["attn_mask"], args["dropout_p"], False, None)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("keep_all", [True, False])
def test_fake_impl_promises_the_real_output_strides(layout, keep_all):
    # Compiled graphs trust the fake impl's strides: a mismatch would make the ops after attention
    # read the output through the wrong strides.
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, H, L, D = 2, 3, 5, 4
    shape = (B, H, L, D) if layout == "bhsd" else (B, L, H, D)
    q, k, v = (torch.randn(shape) for _ in range(3))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    keep = torch.ones(B, H, dtype=torch.bool) if keep_all else torch.tensor([[True, False, True], [False, False, True]])
    real = torch.ops.dhp.gated_attention(q, k, v, keep)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fkeep = (mode.from_tensor(t) for t in (q, k, v, keep))
        fake = torch.ops.dhp.gated_attention(fq, fk, fv, fkeep)
    assert fake.stride() == real.stride()
    assert real.transpose(1, 2).is_contiguous() == (layout == "bshd")
