"""The Triton router (kernels/triton_router.py) under the interpreter: the two launches against
the torch router they replace (RouterGate.predict's own ops), over Hypothesis-drawn shapes,
padding, dtypes, widths and activations; the gate's dispatch to it; the refusals.

Interpreter mode is fixed when triton is imported, so like test_triton_forward_variants this
module runs itself in a child pytest process where this one cannot interpret.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

import test_triton_kernel as tk
from test_triton_kernel import _interpreter_on  # noqa: F401  (module-scoped autouse fixture)

IN_PROCESS = tk.IN_PROCESS
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="run by test_router_suite_in_interpreter_subprocess")


tr = tk.load_interpreted("dhp_fx.kernels.triton_router") if IN_PROCESS else None


@pytest.mark.skipif(IN_PROCESS, reason="the suite runs in this process")
def test_router_suite_in_interpreter_subprocess():
    tk.run_interpreted_child(__file__, timeout=600)


def make_router(d, width, heads, approximate, gen, affine=True, bias=True):
    layers = [nn.LayerNorm(d, elementwise_affine=affine, bias=bias)]
    layers += [nn.Linear(d, width, bias=bias), nn.GELU(approximate=approximate), nn.Linear(width, heads, bias=bias)] \
        if width else [nn.Linear(d, heads, bias=bias)]
    router = nn.Sequential(*layers)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return router


def torch_scores(router, x, valid):
    """RouterGate.predict's torch ops, in float64."""
    x = x.double()
    if valid is None:
        pooled = x.mean(1)
    else:
        w = valid.double()[..., None]
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
    return torch.sigmoid(router.double()(pooled))


def kernel_args(router):
    from dhp_fx.strategies import _fused_router_args

    return _fused_router_args(router)


@interpreted
@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), L=st.integers(1, 37), d=st.sampled_from([8, 24, 40]), width=st.sampled_from([0, 5, 32]),
       heads=st.integers(1, 20), approximate=st.sampled_from(["none", "tanh"]), padding=st.booleans(),
       affine=st.booleans(), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       model_layout=st.booleans(), seed=st.integers(0, 2**16))
def test_router_kernels_match_the_torch_router(B, L, d, width, heads, approximate, padding, affine, bias, dtype,
                                                model_layout, seed):
    gen = torch.Generator().manual_seed(seed)
    router = make_router(d, width, heads, approximate, gen, affine, bias)
    x = torch.randn(L, B, d, generator=gen).transpose(0, 1) if model_layout else torch.randn(B, L, d, generator=gen)
    x = x.to(dtype)
    valid = None
    if padding:
        valid = torch.rand(B, L, generator=gen) > 0.3
        valid[0] = False  # a sample of padding only: its mean is 0, as the torch path's clamp gives
    got = tr.router_scores_triton(x, valid, *kernel_args(router))
    assert got.dtype == torch.float32 and got.shape == (B, heads)
    torch.testing.assert_close(got.double(), torch_scores(router, x, valid), atol=2e-5, rtol=1e-4)


@interpreted
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), L=st.integers(0, 40), d=st.integers(1, 40), padding=st.sampled_from([None, "bool", "int"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), model_layout=st.booleans(),
       seed=st.integers(0, 2**16))
def test_masked_mean_matches_torch(B, L, d, padding, dtype, model_layout, seed):
    """The pooling alone (the LayerNorm after it would hide a wrong divisor: it is scale-invariant)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(L, B, d, generator=gen).transpose(0, 1) if model_layout else torch.randn(B, L, d, generator=gen)
    x = x.to(dtype)
    valid = None if padding is None else torch.rand(B, L, generator=gen) > 0.4
    got = tr.masked_mean_triton(x, valid if padding != "int" else valid.to(torch.int32))
    w = torch.ones(B, L, dtype=torch.float64) if valid is None else valid.double()
    want = (x.double() * w[..., None]).sum(1) / w.sum(1).clamp_min(1.0)[:, None]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("split_below", [0, 10**6], ids=["one_chunk", "split_tokens"])
def test_masked_mean_split_and_unsplit(split_below):
    """Both pooling paths, whatever the shapes the Hypothesis test happens to draw: one chunk per
    (sample, feature block), and the tokens split over programs with the ordered finish."""
    saved = tr.POOL_SPLIT_BELOW
    tr.POOL_SPLIT_BELOW = split_below
    try:
        gen = torch.Generator().manual_seed(7)
        shapes = ((1, 100, 40, True), (2, 17, 33, True), (3, 40, 8, False), (1, 1, 5, False), (2, 0, 4, True))
        for B, L, d, pad in shapes:
            assert (tr.pool_splits(B, -(-d // 16), L, 16) > 1) == (split_below > 0 and L > 32)
            x = torch.randn(B, L, d, generator=gen)
            valid = torch.rand(B, L, generator=gen) > 0.4 if pad else None
            if pad and B > 1:
                valid[-1] = False  # padding only: mean 0
            got = tr.masked_mean_triton(x, valid)
            w = torch.ones(B, L, dtype=torch.float64) if valid is None else valid.double()
            want = (x.double() * w[..., None]).sum(1) / w.sum(1).clamp_min(1.0)[:, None]
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    finally:
        tr.POOL_SPLIT_BELOW = saved


@interpreted
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), L=st.integers(1, 20), width=st.sampled_from([0, 8]), heads=st.integers(1, 20),
       data=st.data(), seed=st.integers(0, 2**16))
def test_fused_top_k_is_the_gates_decision(B, L, width, heads, data, seed):
    """The keep rows of router_keep_triton are decide_keep's top-k of the same scores (random
    weights: distinct scores, so any tie rule agrees)."""
    from dhp_fx.gates import decide_keep

    n_keep = data.draw(st.integers(0, heads))
    gen = torch.Generator().manual_seed(seed)
    router = make_router(16, width, heads, "none", gen)
    x = torch.randn(B, L, 16, generator=gen)
    keep, scores = tr.router_keep_triton(x, None, n_keep, *kernel_args(router))
    assert keep.dtype == torch.bool and keep.shape == (B, heads)
    assert torch.equal(keep, decide_keep(scores, n_keep, 0))
    torch.testing.assert_close(scores, tr.router_scores_triton(x, None, *kernel_args(router)), atol=0, rtol=0)


@interpreted
def test_fused_top_k_breaks_ties_by_head_index():
    gen = torch.Generator().manual_seed(1)
    router = make_router(16, 8, 6, "none", gen)
    with torch.no_grad():
        router[3].weight.copy_(router[3].weight[:1].expand(6, -1))  # every head scores the same
        router[3].bias.fill_(0.25)
    keep, scores = tr.router_keep_triton(torch.randn(2, 5, 16, generator=gen), None, 4, *kernel_args(router))
    assert (scores == scores[:, :1]).all()
    assert keep.tolist() == [[True] * 4 + [False] * 2] * 2
    with pytest.raises(ValueError, match="at most"):
        tr.router_keep_triton(torch.randn(2, 5, 16), None, 4, *kernel_args(make_router(16, 4, 200, "none", gen)))
    assert tr.fuses_top_k(32, 128) and not tr.fuses_top_k(256, 64) and not tr.fuses_top_k(0, 129)


@interpreted
@pytest.mark.parametrize("budget", ["top_k", "min_heads", "threshold", "batch", "batch_capped"])
def test_gate_decides_in_the_router_launch_only_for_a_plain_top_k(monkeypatch, budget):
    """RouterGate.decide_eager: a per-sample top-k budget comes from the router's own launch and
    equals the torch decision, and so does a batch-shared one with its vote in one more launch;
    thresholds take the general path."""
    import dhp_fx.strategies as strategies
    from dhp_fx import DHPConfig
    from dhp_fx.passes import AttentionSite

    gate = _router_gate(strategies, DHPConfig, AttentionSite)
    with torch.no_grad():
        for p in gate.router.parameters():
            p.normal_(0, 0.5)
    if budget == "min_heads":  # a quarter of 4 heads is 1; the floor makes it 3
        gate.set_keep_ratio(0.25, min_heads=3)
    if budget == "threshold":
        gate.set_score_threshold(0.5)
    if budget.startswith("batch"):
        gate.granularity = "batch"
        gate.union_cap = 0.5 if budget == "batch_capped" else None
    calls = []
    fake_module = type("M", (), {
        "router_keep_triton": staticmethod(lambda *a: calls.append("keep") or tr.router_keep_triton(*a)),
        "router_scores_triton": staticmethod(lambda *a: calls.append("scores") or tr.router_scores_triton(*a)),
        "batch_vote_triton": staticmethod(lambda *a: calls.append("vote") or tr.batch_vote_triton(*a)),
        "head_blocks": staticmethod(tr.head_blocks), "fuses_top_k": staticmethod(tr.fuses_top_k)})
    hidden = torch.randn(3, 11, 32)
    mask = torch.zeros(3, 1, 11, 11)
    mask[1, ..., 7:] = torch.finfo(torch.float32).min
    monkeypatch.setattr(strategies, "_router_kernels", lambda x: None)
    want = gate.decide_eager(None, None, None, mask, hidden)
    monkeypatch.setattr(strategies, "_router_kernels", lambda x: fake_module)
    got = gate.decide_eager(None, None, None, mask, hidden)
    assert calls == {"top_k": ["keep"], "min_heads": ["keep"], "threshold": ["scores"]}.get(budget, ["keep", "vote"])
    assert torch.equal(got, want)
    if budget.startswith("batch"):
        assert (got == got[:1]).all()
    if budget == "min_heads":
        assert (got.sum(-1) == 3).all()


@interpreted
@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 40), heads=st.integers(1, 20), data=st.data(), seed=st.integers(0, 2**16))
def test_batch_vote_is_decide_keeps_vote(B, heads, data, seed):
    """batch_vote_triton against decide_keep(batch_shared=True) on the same scores: scores in
    sixteenths (their mean is exact in any summation order, so equal ranks tie in both and the
    tie rule is tested too), per-row keeps of any size, any union cap and floor."""
    from dhp_fx.gates import decide_keep, keep_top

    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 17, (B, heads), generator=gen).float() / 16
    n_keep = data.draw(st.integers(0, heads))
    min_keep = data.draw(st.integers(0, n_keep))
    union_cap = data.draw(st.one_of(st.none(), st.integers(0, heads)))
    want = decide_keep(scores, n_keep, min_keep, batch_shared=True, union_cap=union_cap)[0]
    rows = keep_top(scores, max(n_keep, min_keep))
    cap = heads if union_cap is None else min(heads, max(union_cap, min_keep))
    got = tr.batch_vote_triton(rows, scores, cap, min(heads, min_keep))
    assert got.dtype == torch.bool and torch.equal(got, want), (got, want)


@interpreted
def test_padding_never_reaches_the_mean():
    """Padded tokens are selected out: even non-finite values there leave the score alone."""
    gen = torch.Generator().manual_seed(3)
    router = make_router(24, 8, 6, "none", gen)
    x = torch.randn(2, 9, 24, generator=gen)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[:, 6:] = False
    want = tr.router_scores_triton(x, valid, *kernel_args(router))
    x[:, 6:] = float("nan")
    torch.testing.assert_close(tr.router_scores_triton(x, valid, *kernel_args(router)), want, atol=0, rtol=0)
    torch.testing.assert_close(want.double(), torch_scores(router, x[:, :6], None), atol=2e-5, rtol=1e-4)


@interpreted
def test_gate_predict_dispatches_to_the_kernels_only_without_router_gradients(monkeypatch):
    """RouterGate.predict: the Triton router under no_grad (inference, decide_eager), the torch
    ops when gradients may reach the router (router_loss, straight-through training)."""
    import dhp_fx.strategies as strategies
    from dhp_fx import DHPConfig
    from dhp_fx.passes import AttentionSite

    calls = []

    def spy(*args):
        calls.append(args)
        return tr.router_scores_triton(*args)

    fake_module = type("M", (), {"router_scores_triton": staticmethod(spy), "head_blocks": staticmethod(tr.head_blocks)})
    monkeypatch.setattr(strategies, "_router_kernels", lambda x: fake_module)
    gate = _router_gate(strategies, DHPConfig, AttentionSite)
    hidden = torch.randn(3, 11, 32)
    mask = torch.zeros(3, 1, 11, 11)
    mask[1, ..., 7:] = torch.finfo(torch.float32).min
    monkeypatch.setattr(strategies, "_router_kernels", lambda x: None)
    with torch.no_grad():
        want = gate.predict(hidden, mask)
    monkeypatch.setattr(strategies, "_router_kernels", lambda x: fake_module)
    with torch.no_grad():
        got = gate.predict(hidden, mask)
    assert len(calls) == 1 and calls[0][1] is not None, "the padding rows must reach the kernel"
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    trained = gate.predict(hidden, mask)
    assert len(calls) == 1 and trained.requires_grad, "with router gradients the torch ops must run"
    gate.router.append(nn.Identity())  # a layout the kernels do not know: torch ops
    with torch.no_grad():
        gate.predict(hidden, mask)
    assert len(calls) == 1


def _router_gate(strategies, DHPConfig, AttentionSite):
    from dhp_fx.passes.site import ProjectionRef

    site = AttentionSite(name="layer0", module_path="layer0", module_type="", pattern="sdpa", num_heads=4,
                         num_kv_heads=4, head_dim=8, value_head_dim=8, scale=8 ** -0.5, is_causal=False,
                         mask_kind="additive", q_proj=ProjectionRef(weight="wq", layout="out_in"))
    params = {"wq": torch.randn(32, 32)}
    return strategies.RouterGate(site, DHPConfig(scoring="router", keep_ratio=0.5), params)


@interpreted
def test_router_kernels_refuse_mismatched_arguments():
    gen = torch.Generator().manual_seed(0)
    router = make_router(16, 8, 4, "none", gen)
    args = kernel_args(router)
    with pytest.raises(ValueError, match="x must be"):
        tr.router_scores_triton(torch.randn(4, 16), None, *args)
    with pytest.raises(ValueError, match="does not take 12 features"):
        tr.router_scores_triton(torch.randn(2, 3, 12), None, *args)
    with pytest.raises(ValueError, match="valid must be"):
        tr.router_scores_triton(torch.randn(2, 3, 16), torch.ones(2, 4, dtype=torch.bool), *args)
    wide = make_router(16, 2048, 4, "none", gen)
    with pytest.raises(ValueError, match="exceeds"):
        tr.router_scores_triton(torch.randn(2, 3, 16), None, *kernel_args(wide))
