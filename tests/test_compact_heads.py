"""The compact attention block: kept heads only, gathered weights (kernels/compact_heads.py,
passes/compact_heads.py, dhp_fx/compact_block.py).

- kernel: against a float64 reference of the full block with pruned heads zeroed, over
  Hypothesis shapes, masks, layouts, caps and keep sets (filler heads included);
- gate bounds: no decision ever keeps more heads than ``compact_plan`` promised the block;
- models: every zoo model the pass compacts matches the zeroed-head reference, with pinned masks
  (shared and per-row), static and router gates, gates open, and gradients.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dhp_fx
from dhp_fx.config import DHPConfig
from dhp_fx.gates import HeadGate
from dhp_fx.kernels.compact_heads import HeadProjection, compact_attention_block, kept_first, slot_view
from dhp_fx.passes import AttentionSite
from dhp_fx.strategies import StaticGate
from dhp_fx.testing import assert_outputs_close, attention_specs, build_attention, check_keep_mask

from zoo import all_entries


def _reference(x_q, x_kv, w, b, w_o, b_o, keep, heads, kv_heads, d, dv, mask, causal, scale):
    """The dense block in float64 with pruned (row, head) outputs zeroed: what the rewrite replaces."""
    wq, wk, wv = w
    bq, bk, bv = b
    B, Lq, Lk = x_q.shape[0], x_q.shape[1], x_kv.shape[1]
    group = heads // kv_heads
    q = F.linear(x_q, wq, bq).view(B, Lq, heads, d).transpose(1, 2)
    k = F.linear(x_kv, wk, bk).view(B, Lk, kv_heads, d).transpose(1, 2).repeat_interleave(group, dim=1)
    v = F.linear(x_kv, wv, bv).view(B, Lk, kv_heads, dv).transpose(1, 2).repeat_interleave(group, dim=1)
    if mask is not None and causal:  # the gated op's meaning of both (SDPA refuses the pair)
        above = torch.ones(Lq, Lk, dtype=torch.bool).triu(1)
        mask, causal = (mask & ~above if mask.dtype == torch.bool else mask.masked_fill(above, float("-inf"))), False
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    o = o * keep[:, :, None, None].to(o.dtype)
    return F.linear(o.transpose(1, 2).reshape(B, Lq, heads * dv), w_o, b_o)


def draw_geometry(draw, max_batch: int) -> dict:
    """A block's sizes: batch, query heads per KV head (G), KV heads, heads, head dims, lengths."""
    G = draw(st.sampled_from([1, 1, 2]))
    KV = draw(st.integers(1 if G > 1 else 2, 4))
    d = draw(st.sampled_from([4, 8]))
    Lq = draw(st.integers(1, 6))
    cross = draw(st.booleans())
    return dict(B=draw(st.integers(1, max_batch)), G=G, KV=KV, H=KV * G, d=d, dv=draw(st.sampled_from([d, 4])),
                Lq=Lq, Lk=draw(st.integers(1, 6)) if cross else Lq, cross=cross)


def zeroed_reference(case, ref) -> torch.Tensor:
    """The float64 reference of a drawn case (``block_inputs``' ref), with its keep pattern."""
    x_q, x_kv, w, b, w_o, b_o, mask = ref
    keep = torch.tensor(case["keep"], dtype=torch.bool)
    return _reference(x_q, x_kv, w, b, w_o, b_o, keep, case["H"], case["KV"], case["d"], case["dv"], mask,
                      case["causal"], case["scale"])


@st.composite
def compact_cases(draw):
    geo = draw_geometry(draw, max_batch=3)
    B, G, KV, H = geo["B"], geo["G"], geo["KV"], geo["H"]
    shared = draw(st.booleans())
    groups = draw(st.lists(st.booleans(), min_size=KV, max_size=KV))
    if shared:  # every row the same whole groups: the dense-attention route
        keep = [[groups[h // G] for h in range(H)]] * B
    else:
        # per-row heads inside one union of groups, so the union stays below the group count sometimes
        keep = [[groups[h // G] and draw(st.booleans()) for h in range(H)] for _ in range(B)]
    union = sum(any(r[h] for r in keep for h in range(g * G, (g + 1) * G)) for g in range(KV))
    cap = draw(st.integers(max(union, 1), KV))
    mask_kind = draw(st.sampled_from(["none", "padding", "head_bias"]))
    causal = draw(st.booleans())
    return dict(**geo, shared=shared, keep=keep, cap=cap,
                mask_kind=mask_kind, causal=causal, in_out=draw(st.booleans()), fused=draw(st.booleans()),
                bias=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.3])))


def block_inputs(case, dtype, requires_grad=False):
    """A drawn case's block in float64 for the reference, ``ref`` = (x_q, x_kv, [wq, wk, wv],
    [bq, bk, bv], w_o, b_o, mask), and in ``dtype`` for the block under test: (ref, (q, k, v)
    HeadProjections, w_o as stored (``out_in_out``: [in, out]), b_o, mask, leaf parameters)."""
    g = torch.Generator().manual_seed(case["B"] * 100 + case["H"] * 10 + case["Lq"])
    B, H, KV, d, dv, Lq, Lk = (case[k] for k in ("B", "H", "KV", "d", "dv", "Lq", "Lk"))
    E, E_out = 12, 10
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x_q = rnd(B, Lq, E)
    x_kv = rnd(B, Lk, E) if case["cross"] else x_q
    # weights scaled as initialisers scale them: unscaled, fp32 rounding of peaked softmaxes
    # reached 5.6e-5 against the float64 reference (a Hypothesis case, session 11)
    w = [rnd(H * d, E) * E ** -0.5, rnd(KV * d, E) * E ** -0.5, rnd(KV * dv, E) * E ** -0.5]
    b = [rnd(H * d), rnd(KV * d), rnd(KV * dv)] if case["bias"] else [None] * 3
    w_o, b_o = rnd(E_out, H * dv) * (H * dv) ** -0.5, rnd(E_out)
    mask = None
    if case["mask_kind"] == "padding":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[-1, ..., Lk // 2:] = False
        mask[..., 0] = True  # no fully masked row: SDPA's NaN there is the reference's too, but noisy
    elif case["mask_kind"] == "head_bias":
        mask = rnd(1, H, Lq, Lk)
    elif case["mask_kind"] == "row_head_bias":
        mask = rnd(B, H, Lq, Lk)
    ref = (x_q, x_kv, w, b, w_o, b_o, mask)
    params = []

    def leaf(t):
        t = t.to(dtype).detach().requires_grad_(requires_grad)
        params.append(t)
        return t

    def proj(x, i):
        weight, bias, start = w[i], b[i], 0
        if case["fused"] and not case["cross"]:
            starts = [0, H * d, H * d + KV * d]
            weight, bias, start = torch.cat(w), (None if b[0] is None else torch.cat(b)), starts[i]
        weight = weight.t().contiguous() if case["in_out"] else weight
        return HeadProjection(x, leaf(weight), None if bias is None else leaf(bias), case["in_out"], start)

    x_q_ = x_q.to(dtype)
    x_kv_ = x_kv.to(dtype) if case["cross"] else x_q_
    projs = (proj(x_q_, 0), proj(x_kv_, 1), proj(x_kv_, 2))
    w_o_ = leaf(w_o.t().contiguous() if case.get("out_in_out") else w_o)
    m = None if mask is None else mask.to(dtype) if mask.is_floating_point() else mask
    return ref, projs, w_o_, b_o.to(dtype), m, params


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compact_cases(), st.sampled_from([torch.float32, torch.float64]))
def test_compact_block_matches_zeroed_dense_block(case, dtype):
    ref, projs, w_o, b_o, mask, _ = block_inputs(case, dtype)
    want = zeroed_reference(case, ref)
    keep = torch.tensor(case["keep"], dtype=torch.bool)
    got = compact_attention_block(*projs, w_o, b_o, False, keep, case["cap"], case["d"], case["dv"], mask, 0.0,
                                  case["causal"], case["scale"], case["shared"], kv_heads=case["KV"])
    assert got.shape == want.shape
    assert_outputs_close(got, want.to(dtype), what="compact block")


def test_kept_first_lists_kept_heads_then_filler():
    union = torch.tensor([False, True, False, True, True, False])
    idx, valid = kept_first(union, 5)
    assert idx.tolist() == [1, 3, 4, 0, 2] and valid.tolist() == [True, True, True, False, False]


def test_cap_out_of_range_is_refused():
    x = torch.randn(1, 2, 4)
    p = HeadProjection(x, torch.randn(4, 4), None, False, 0)
    keep = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="cap must be in"):
        compact_attention_block(p, p, p, torch.randn(3, 4), None, False, keep, 3, 2, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        compact_attention_block(p, p, p, torch.randn(3, 4), None, False, keep, 1, 2, 2, kv_heads=3)


# ---------------------------------------------------------------------------- gate bounds
def _site(heads: int, kv_heads: Optional[int] = None) -> AttentionSite:
    return AttentionSite(name="s", module_path="s", module_type="X", pattern="sdpa", num_heads=heads,
                         num_kv_heads=kv_heads or heads, head_dim=4, value_head_dim=4, scale=0.5, is_causal=False,
                         mask_kind="none")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.floats(0.05, 1.0), st.booleans(),
       st.sampled_from(["sample", "batch"]), st.sampled_from([None, 0.5]), st.integers(0, 2**31 - 1))
def test_decisions_never_exceed_the_query_head_plan(batch, kv_heads, group, ratio, whole_groups, granularity,
                                                    union_cap, seed):
    """The bound a query chain gathers for (compact_head_plan), also where the budget counts
    whole KV groups, whose kept heads can outnumber keep_ratio x heads."""
    heads = kv_heads * group
    config = DHPConfig(keep_ratio=ratio, granularity=granularity, union_cap=union_cap, prune_kv_groups=whole_groups)
    gate = HeadGate(_site(heads, kv_heads), config)
    keep = gate.decide(torch.rand(batch, heads, generator=torch.Generator().manual_seed(seed)))
    plan = gate.compact_head_plan(batch)
    if plan is None:  # always safe: every head computed
        return
    cap, rows_same = plan
    assert 1 <= cap < heads
    assert int(keep.any(0).sum()) <= cap
    if rows_same:
        assert bool((keep == keep[:1]).all())


def test_query_head_plan_counts_whole_groups():
    """8 heads in 4 groups of 2, 40 % kept as whole groups: round(1.6) = 2 groups, 4 heads, more
    than round(0.4 x 8) = 3; the plan bounds them by 4."""
    gate = HeadGate(_site(8, 4), DHPConfig(keep_ratio=0.4, granularity="batch", prune_kv_groups=True))
    keep = gate.decide(torch.rand(1, 8, generator=torch.Generator().manual_seed(0)))
    assert int(keep.sum()) == 4
    assert gate.compact_head_plan(1) == (4, True)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(2, 12), st.floats(0.05, 1.0), st.integers(1, 4),
       st.sampled_from([None, 0.3, 0.6]), st.sampled_from(["sample", "batch"]), st.sampled_from([None, 0.25, 0.5, 1.0]),
       st.integers(0, 2**31 - 1))
def test_decisions_never_exceed_the_compact_plan(batch, heads, ratio, min_heads, threshold, granularity, union_cap,
                                                 seed):
    config = DHPConfig(keep_ratio=ratio, min_heads=min_heads, score_threshold=threshold, granularity=granularity,
                       union_cap=union_cap)
    gate = HeadGate(_site(heads), config)
    scores = torch.rand(batch, heads, generator=torch.Generator().manual_seed(seed))
    if seed % 3 == 0:
        scores = scores.round(decimals=1)  # ties
    keep = gate.decide(scores)
    plan = gate.compact_plan(batch)
    if plan is None:  # only a budget that keeps every head may decline
        assert threshold is None and gate.n_keep >= heads
        return
    cap, shared = plan
    assert 1 <= cap <= heads
    assert int(keep.any(0).sum()) <= cap
    if shared:
        assert bool((keep == keep[:1]).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 8), st.floats(0.05, 0.95), st.sampled_from(["sample", "batch"]))
def test_static_gate_plan_covers_its_decision(batch, heads, ratio, granularity):
    gate = StaticGate(_site(heads), DHPConfig(keep_ratio=ratio, scoring="static", granularity=granularity), {})
    gate.set_static_scores(torch.rand(heads))
    keep = gate(None, None, None, None, hidden=torch.randn(batch, 3, 6))
    plan = gate.compact_plan(batch)
    if gate.n_keep >= heads:
        assert plan is None and bool(keep.all())
        return
    cap, shared = plan
    assert shared and int(keep.any(0).sum()) <= cap <= gate.per_row_bound()


def test_pinned_mask_plan_and_pending_tap_work():
    gate = HeadGate(_site(6), DHPConfig(keep_ratio=0.5))
    gate.set_keep_mask(torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool))
    assert gate.compact_plan(2) == (2, False)
    gate.set_keep_mask(torch.zeros(6, dtype=torch.bool))
    assert gate.compact_plan(4) == (1, True)  # nothing kept: one filler head, zeroed
    gate.set_keep_mask(None)
    gate._want(record=True)
    assert gate.compact_plan(1) is None  # the tap needs every head's q, k, v


# ---------------------------------------------------------------------------- models
ENTRIES = {e.name: e for e in all_entries()}
# MHA models whose blocks the pass must take whole (GQA, torch's fused layers and the
# hand-written modules below are declined or have no head-major module projection)
COMPACTED = ["bert-sdpa", "bert-eager", "gpt2-sdpa", "gpt2-eager", "t5-sdpa", "bart-sdpa", "vit-sdpa",
             "distilbert-sdpa", "roberta-sdpa", "opt-sdpa", "opt-eager", "albert-sdpa"]


# a returned KV cache reads every head's k and v, so such blocks are declined (rightly)
_NO_CACHE = {name: {"use_cache": False} for name in ("gpt2", "t5", "bart", "llama", "opt", "qwen3")}


def _union_below_heads(entry, shared: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    H = entry.heads
    union = torch.zeros(H, dtype=torch.bool)
    union[torch.randperm(H, generator=g)[: H // 2]] = True
    if shared:
        return union
    rows = union[None].repeat(entry.batch, 1) & (torch.rand(entry.batch, H, generator=g) < 0.7)
    rows[0] = union
    return rows


@pytest.mark.parametrize("name", [n for n in COMPACTED if n in ENTRIES])
def test_zoo_blocks_compacted_and_exact(name):
    entry = ENTRIES[name]
    model, inputs = entry.build(), entry.inputs()
    inputs.update(_NO_CACHE.get(name.split("-")[0], {}))
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    assert opt.sites and all(s.compact_block for s in opt.sites), opt.report()
    assert opt.report().count("kept heads only (compact)") == len(opt.sites)
    blocks = [opt.gate(s).block_module for s in opt.sites]
    for shared in (True, False):
        before = sum(b.calls_compact for b in blocks)
        check_keep_mask(model, opt, inputs, _union_below_heads(entry, shared))
        assert sum(b.calls_compact for b in blocks) - before == len(blocks)
    # gates open: every head computed through the head ops, exact against the original
    opt.set_keep_ratio(1.0)
    with torch.no_grad():
        assert_outputs_close(opt(**inputs), model(**inputs), what="gates open")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(attention_specs(styles=("sdpa", "sdpa_gqa", "eager", "bmm", "fused_rope")),  # float32: eager softmaxes in
       st.integers(0, 2**16))                                                         # float32 anyway
def test_every_attention_style_compacts_exactly(spec, seed):
    """The dhp_fx.testing specs (SDPA, SDPA with enable_gqa, eager, bmm, a Phi-3-like fused
    projection cut by slices with RoPE; GQA groups, cross-attention, masks, causal, any scale):
    every block is compacted (fused_rope, and any style with one KV head, as a chain: views that
    name the head count infer it; GQA bmm blocks, whose K/V stay whole, as a query chain), and
    with pinned keep masks whose heads lie in part of the KV groups (one KV head or a query
    chain: one query head, the same in every row) the output equals the zeroed-head reference."""
    module, inputs = build_attention(spec)
    opt = dhp_fx.optimize(module, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    assert len(opt.sites) == 1
    site = opt.sites[0]
    mqa = spec.kv_heads == 1  # no group to leave out: only a chain (the kept query heads) compacts
    if site.num_heads < 2:  # nothing to leave out
        assert not site.compact_block
        return
    # a GQA bmm block repeats K/V before the matcher's view of it, so its K/V projections stay
    # whole and the block runs as a query chain (the matcher's unflatten(0, (-1, H)) inferring H)
    query = set(site.skipped_projections) == {"q", "out"}
    assert query == (spec.style == "bmm" and spec.kv_heads < spec.heads), opt.report()
    assert site.compact_block and (query or set(site.skipped_projections) == {"q", "k", "v", "out"}), opt.report()
    g = torch.Generator().manual_seed(seed)
    group = spec.heads // spec.kv_heads
    if mqa or query:
        keep = torch.zeros(spec.batch, spec.heads, dtype=torch.bool)
        keep[:, int(torch.randint(spec.heads, (), generator=g))] = True
    else:
        groups = torch.zeros(spec.kv_heads, dtype=torch.bool)
        groups[torch.randperm(spec.kv_heads, generator=g)[: max(1, spec.kv_heads // 2)]] = True
        keep = spec.keep_tensor() & groups.repeat_interleave(group)[None]
    chain = spec.style == "fused_rope" or mqa or query
    counter = "compact_query_chain" if query else "compact_chain" if chain else "compact_block"
    assert opt._compiler.counters.get(counter) == 1, opt._compiler.counters
    block = opt.gate(site).chain_module if chain else opt.gate(site).block_module
    before = block.calls_compact
    check_keep_mask(module, opt, inputs, keep)
    assert block.calls_compact == before + 1


@pytest.mark.parametrize("style", ["sdpa_gqa", "sdpa", "eager"])
def test_gqa_blocks_compact_by_kv_group(style):
    """Four query heads per KV head: the kept heads of a batch of one lie in one of the two
    groups, so one group's weights are gathered and the output equals the zeroed reference."""
    from dhp_fx.testing import AttentionSpec

    spec = AttentionSpec(style=style, batch=1, heads=8, kv_heads=2, seq_q=5, seq_k=5, head_dim=4, mask_kind="bool")
    module, inputs = build_attention(spec)
    opt = dhp_fx.optimize(module, DHPConfig(keep_ratio=0.5, scoring="static", prune_kv_groups=True),
                          example_inputs=inputs)
    (site,) = opt.sites
    assert site.compact_block and site.num_kv_heads == 2, opt.report()
    assert opt.gate(site).compact_plan(1) == (1, True)
    check_keep_mask(module, opt, inputs, torch.tensor([[False] * 4 + [True, False, True, True]]))
    assert opt.gate(site).block_module.calls_compact >= 1


@pytest.mark.parametrize("name", ["llama-sdpa", "llama-eager", "qwen3-sdpa", "qwen3-eager"])
def test_rope_blocks_compact_as_a_chain(name):
    """Llama applies RoPE between the projections and the op: the block keeps the graph's own
    ops (views with -1 heads, cos/sin broadcast over heads) and only the head ops become chain
    calls, fed the kept KV groups. Exact against the zeroed reference, shared and per-row.
    Qwen3 also normalises each head's q and k (a mean over the head dim) before RoPE."""
    entry = ENTRIES[name]
    model, inputs = entry.build(), {**entry.inputs(), "use_cache": False}
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    assert all(s.compact_block for s in opt.sites), opt.report()
    assert opt._compiler.counters.get("compact_chain") == len(opt.sites)
    chains = [opt.gate(s).chain_module for s in opt.sites]
    group = entry.heads // entry.kv_heads
    for shared in (True, False):
        keep = torch.zeros(entry.batch, entry.heads, dtype=torch.bool)
        keep[:, group:2 * group] = True  # the second KV group only
        if not shared:
            keep[0, group] = False
        before = sum(c.calls_compact for c in chains)
        check_keep_mask(model, opt, inputs, keep)
        assert sum(c.calls_compact for c in chains) - before == len(chains)
    opt.set_keep_ratio(1.0)
    with torch.no_grad():
        assert_outputs_close(opt(**inputs), model(**inputs), what="gates open")


class _RotaryAttention(torch.nn.Module):
    """A RoPE-like block: ``variant`` "ok" (views with -1 heads, cos broadcast over heads),
    "per_head" (a per-head scale on q), "fixed_view" (views naming the head count, which the
    chain has infer it), "fixed_view_any_length" (the same, the length inferred), or one
    fused projection cut into q, k and v by slices: "role_slices" (each takes one role's
    features, as Phi-3's do) or "sliced_heads" (viewed per head, then cut at fixed head counts)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))
        self.qkv = torch.nn.Linear(16, 48)
        self.register_buffer("cos", torch.rand(5, 4))
        self.register_buffer("head_scale", torch.rand(1, 4, 1, 1) + 0.5)

    def _qkv(self, x):
        if self.variant == "role_slices":  # Phi-3: one projection, cut at each role's fixed width
            qkv = self.qkv(x)
            return qkv[..., :16], qkv[..., 16:32], qkv[..., 32:]
        if self.variant == "sliced_heads":  # viewed [B, L, -1, 4], cut at fixed head counts
            qkv = self.qkv(x).view(*x.shape[:2], -1, 4)
            return qkv[:, :, :4], qkv[:, :, 4:8], qkv[:, :, 8:]
        return self.q(x), self.k(x), self.v(x)

    def forward(self, x):
        B, L, _ = x.shape
        if self.variant == "fixed_view_any_length":  # OPT's view(B, -1, H, D)
            q, k, v = (t.view(B, -1, 4, 4).transpose(1, 2) for t in self._qkv(x))
        else:
            heads = 4 if self.variant == "fixed_view" else -1
            q, k, v = (t.view(B, L, heads, 4).transpose(1, 2) for t in self._qkv(x))
        q = q * self.cos[:L]
        k = k * self.cos[:L]
        if self.variant == "per_head":
            q = q * self.head_scale
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1)
        return self.o(o)


@pytest.mark.parametrize("variant,why", [("ok", None), ("per_head", "per_head_operand"),
                                         ("fixed_view", None), ("fixed_view_any_length", None), ("role_slices", None),
                                         ("sliced_heads", "selection")])
def test_chain_needs_head_count_free_ops(variant, why):
    module, x = _RotaryAttention(variant).eval(), torch.randn(2, 5, 16)
    opt = dhp_fx.optimize(module, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=(x,))
    (site,) = opt.sites
    assert site.compact_block == (why is None), opt._compiler.counters
    if why is not None:
        assert opt._compiler.counters.get(f"no_compact_chain:{why}") == 1, opt._compiler.counters
        # the site says why (its block declined too: RoPE computes between projection and op)
        assert site.declined == ("no_compact_block:layout", f"no_compact_chain:{why}"), site.declined
        assert f"no_compact_chain:{why}" in opt.report()
    else:
        assert site.declined == () and "declined" not in opt.report()
    if variant in ("role_slices", "sliced_heads"):
        assert set(site.skipped_projections) == {"q", "k", "v", "out"}, opt._compiler.counters
        chain = opt.gate(site).chain_module if why is None else None
        compact = None if chain is None else chain.calls_compact
        check_keep_mask(module, opt, (x,), torch.tensor([[True, False, False, True]] * 2))
        assert chain is None or chain.calls_compact == compact + 1
    chain = opt.gate(site).chain_module
    before = chain.calls_compact
    check_keep_mask(module, opt, (x,), torch.tensor([[False, True, True, False], [False, True, False, False]]))
    assert chain.calls_compact - before == (1 if why is None else 0)


@pytest.mark.parametrize("scoring", ["static", "router"])
def test_batch_of_one_runs_compact_and_matches_the_head_ops(scoring):
    """A per-sample gate on one input: the paper's setting. Same output and the same weight
    gradients as the head ops (compact_heads=False), which keep every tensor H heads wide."""
    entry = ENTRIES["bert-sdpa"]
    model = entry.build()
    ids = entry.inputs()["input_ids"][:1]
    results = []
    for compact in (True, False):
        opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring=scoring, compact_heads=compact),
                              example_inputs={"input_ids": ids})
        model.zero_grad()
        before = sum(opt.gate(s).block_module.calls_compact for s in opt.sites)
        out = opt(input_ids=ids).last_hidden_state
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "attention" in n}
        calls = sum(opt.gate(s).block_module.calls_compact for s in opt.sites) - before
        results.append((out.detach(), grads, calls))
    (out_c, grads_c, calls_c), (out_h, grads_h, calls_h) = results
    assert calls_c == len(opt.sites) and calls_h == 0
    assert_outputs_close(out_c, out_h, what="compact vs head ops")
    assert grads_c.keys() == grads_h.keys() and grads_c
    for n in grads_c:
        assert_outputs_close(grads_c[n], grads_h[n], what=f"grad {n}")


def test_compact_graph_computes_no_fallback_flags(monkeypatch):
    """The head ops' flags (the keep mask's union) are computed by the block only when it falls
    back to them: a compact call launches the gather, two GEMMs and attention per layer, no
    reduction (on an H200 two unions per layer cost 13 µs at batch 1, session 10)."""
    from test_launch_count import kernel_ops

    entry = ENTRIES["bert-sdpa"]
    model = entry.build()
    inputs = {"input_ids": entry.inputs()["input_ids"][:1]}
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="router"), example_inputs=inputs)
    blocks = [opt.gate(s).block_module for s in opt.sites]
    before = sum(b.calls_every_head for b in blocks)

    def call_gathering():  # the same input gives the same decision, whose gather the block would reuse
        for b in blocks:
            b._last = None
        return opt(**inputs)

    ops = kernel_ops(call_gathering)
    # compact, gathering (on CPU as plain index_selects, not the custom op), and no flag union
    assert sum(b.calls_every_head for b in blocks) == before and ops["aten::scaled_dot_product_attention"], ops
    assert ops["aten::index_select"] >= 4 * len(opt.sites) and "aten::any" not in ops, ops
    # a batch of 3 keeps up to every head in union: on CPU each row runs its own (compact_rows;
    # forced: these rows are too short for it to pay, see test_compact_rows)
    monkeypatch.setattr("dhp_fx.kernels.row_cost.ROWS_MIN_SAVED_FLOPS_PER_WEIGHT", 0.0)
    batch = {"input_ids": entry.inputs()["input_ids"][:1].repeat(3, 1)}
    ops = kernel_ops(lambda: opt(**batch))
    batched = ops["aten::bmm"] + ops["aten::baddbmm"]  # per-row projections: four batched GEMMs a block
    assert "dhp::head_linear_in" not in ops and "aten::any" not in ops and batched == 4 * len(opt.sites), ops
    # where rows are not compacted nor masked (GPUs), the fallback still finds its flags
    monkeypatch.setattr("dhp_fx.compact_block.ROWS_DEVICES", ())
    monkeypatch.setattr("dhp_fx.compact_block.MASKED_DENSE_DEVICES", ())
    ops = kernel_ops(lambda: opt(**batch))
    assert "dhp::gather_heads" not in ops and ops["dhp::head_linear_in"] == len(opt.sites), ops


def test_static_decisions_reuse_the_gather_until_weights_or_decision_change():
    """A static decision is one tensor for every call: eager calls reuse the gathered weights.
    An in-place weight update, a new decision or a new budget gathers again; a per-input router
    gathers when its decision changes. Outputs always equal the head ops' (compact_heads=False)."""
    entry = ENTRIES["bert-sdpa"]
    model = entry.build()
    inputs = entry.inputs()
    compact = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    heads = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static", compact_heads=False),
                            example_inputs=inputs)
    blocks = [compact.gate(s).block_module for s in compact.sites]

    def check(*gathered_now: bool):
        before = [(b.gathers, b.calls_compact) for b in blocks]
        with torch.no_grad():
            assert_outputs_close(compact(**inputs), heads(**inputs), what="compact vs head ops")
        for b, (g, c), now in zip(blocks, before, gathered_now):
            assert b.calls_compact == c + 1 and b.gathers == g + int(now)

    assert len(blocks) == 2
    check(False, False)  # optimize's own call gathered already
    check(False, False)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.value.weight.mul_(1.5)  # in place: a new version
    check(True, False)
    check(False, False)
    for opt in (compact, heads):
        opt.set_keep_ratio(0.25)
    check(True, True)

    # A per-input router hands every call a new tensor: it gathers again when the decision's
    # values changed (on a CPU they are compared; a traced graph's static decision needs that).
    rows = [inputs["input_ids"][i:i + 1] for i in range(inputs["input_ids"].shape[0])]
    router = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="router"), example_inputs={"input_ids": rows[0]})
    gate = router.gate(router.sites[0])
    block = gate.block_module
    keeps = []
    gate.register_forward_hook(lambda module, args, out: keeps.append(out.clone()))
    with torch.no_grad():
        router(input_ids=rows[0])  # the decision optimize's call gathered for
        for ids in (rows[0], *rows[1:], rows[-1], rows[0]):
            before = block.gathers
            router(input_ids=ids)
            changed = not torch.equal(keeps[-1], keeps[-2])
            assert block.gathers == before + int(changed)


class _CastBeforeOutput(torch.nn.Module):
    """Attention whose output is upcast before a float64 output projection: a block that fed its
    output GEMM the op's dtype would compute something else, so no block may be compacted."""

    def __init__(self, cast: bool):
        super().__init__()
        self.cast = cast
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.o_proj = torch.nn.Linear(16, 16).double() if cast else torch.nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = (p(x).view(x.shape[0], x.shape[1], 4, 4).transpose(1, 2) for p in self.qkv)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)
        return self.o_proj(o.double() if self.cast else o)


@pytest.mark.parametrize("cast", [False, True])
def test_a_cast_before_the_output_projection_is_not_compacted(cast):
    module, x = _CastBeforeOutput(cast).eval(), torch.randn(1, 5, 16)
    opt = dhp_fx.optimize(module, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=(x,))
    (site,) = opt.sites
    assert site.compact_block == (not cast), opt.report()
    if cast:
        opt.set_keep_ratio(1.0)
        with torch.no_grad():
            assert_outputs_close(opt(x), module(x), what="gates open")
    else:
        check_keep_mask(module, opt, (x,), torch.tensor([True, False, False, True]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.sampled_from([1, 2]), st.sampled_from([2, 4]), st.booleans(),
       st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_inference_gather_equals_the_torch_gather_on_what_it_promises(B, S, G, D, in_out, out_in_out, bias, fused,
                                                                      seed):
    """gather_heads_inference (CPU, no autograd) against gather_heads_torch: the same slots, the
    kept slots' rows, biases and W_o columns, and zero V rows and bias for the filler."""
    from dhp_fx.kernels.compact_heads import gather_heads_inference, gather_heads_torch

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, S, generator=g) < 0.5
    cap = int(torch.randint(max(int(keep.any(0).sum()), 1), S + 1, (1,), generator=g))
    dims = [G * D, D, D, G * D]
    d_in, d_out = 6, 5

    def weight(rows):
        w = torch.randn(rows, d_in, generator=g)
        return w.t().contiguous() if in_out else w

    if fused:
        w_all = weight(S * sum(dims[:3]))
        weights, starts = [w_all] * 3, [0, S * dims[0], S * (dims[0] + dims[1])]
    else:
        weights, starts = [weight(S * d) for d in dims[:3]], [0, 0, 0]
    feature_dim = 1 if in_out else 0
    biases = [torch.randn(w.shape[feature_dim], generator=g) if bias else None for w in weights]
    out_w = torch.randn(d_out, S * dims[3], generator=g)
    out_w = out_w.t().contiguous() if out_in_out else out_w
    args = (keep, cap, weights, biases, starts, [in_out] * 3, out_w, out_in_out, dims)
    idx, valid, w_qkv, b_qkv, w_o = gather_heads_inference(*args)
    idx_t, valid_t, w_qkv_t, b_qkv_t, w_o_t = gather_heads_torch(*args)
    assert torch.equal(idx, idx_t) and torch.equal(valid, valid_t)
    lo = 0
    for role, dim in enumerate(dims[:3]):
        got, want = w_qkv[lo:lo + cap * dim].view(cap, dim, d_in), w_qkv_t[lo:lo + cap * dim].view(cap, dim, d_in)
        assert torch.equal(got[valid], want[valid]), role
        if role == 2:
            assert not got[~valid].any()
        if bias:
            got_b, want_b = b_qkv[lo:lo + cap * dim].view(cap, dim), b_qkv_t[lo:lo + cap * dim].view(cap, dim)
            assert torch.equal(got_b[valid], want_b[valid]) and (role != 2 or not got_b[~valid].any())
        lo += cap * dim
    assert (b_qkv is None) == (not bias)
    cols = valid.repeat_interleave(dims[3])
    assert torch.equal(w_o[:, cols], w_o_t[:, cols])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 3), st.integers(0, 2), st.integers(0, 1), st.integers(1, 3))
def test_slot_view_reads_each_slots_features(slots, dim, spare, before, axis, other):
    """slot_view(t, axis, start, slots, dim, period)[s, j] is feature start + s * period + j, as a
    view (gathers index_select out of it): contiguous slots (period None) and interleaved ones
    (GPT-NeoX's per-head q, k, v), with features before the first slot, along either axis."""
    period = dim + spare
    base = before * period
    for offset in range(period - dim + 1):
        start = base + offset
        features = base + slots * period
        t = torch.arange(features * other, dtype=torch.float64).reshape(features, other)
        t = t if axis == 0 else t.t().contiguous()
        got = slot_view(t, axis, start, slots, dim, period if spare else None)
        want = torch.tensor([[start + s * period + j for j in range(dim)] for s in range(slots)])
        picked = t.index_select(axis, want.flatten()).unflatten(axis, (slots, dim))
        assert torch.equal(got, picked) and got.data_ptr() >= t.data_ptr()
        assert got.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # a view, no copy
    with pytest.raises(ValueError, match="overrun its period"):
        slot_view(torch.zeros(12, 2), 0, 2, 2, 3, 4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), kv=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 4]), Lq=st.sampled_from([1, 3, 17]),
       Lk=st.integers(1, 20), mask=st.sampled_from(["none", "pad", "bias", "bool"]), causal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_query_heads_core_every_head_or_gathered_kv_give_the_kept_heads_alone(B, kv, group, Lq, Lk, mask, causal, seed):
    """A query chain's core on the kept query heads (plus filler heads) over every head's K/V:
    on a CPU by bands of adjacent heads, K/V sliced in place (kernels/head_runs.py: whole
    groups, or a group's kept heads folded into query rows); elsewhere a few query rows attend
    over every head with the others' q zero (SCATTER_MAX_LQ), more rows over their own K/V
    gathered. Each equals attention of each kept head alone, in float64; the bands write zeros
    for filler slots (their W_o columns are zero), the other paths finite values."""
    from unittest import mock

    from dhp_fx.kernels import compact_heads
    from dhp_fx.kernels.compact_heads import GatheredHeads, query_heads_core

    g = torch.Generator().manual_seed(seed)
    H, D = kv * group, 4
    union = torch.rand(H, generator=g) < 0.5
    union[int(torch.randint(H, (), generator=g))] = True
    cap = min(H, int(union.sum()) + 1)
    idx, valid = kept_first(union, cap)
    gathered = GatheredHeads(idx, valid, torch.empty(0), None, torch.empty(0))
    q = torch.randn(B, cap, Lq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, kv, Lk, D, generator=g, dtype=torch.float64) for _ in range(2))
    attn_mask = {"none": None, "pad": torch.rand(B, 1, 1, Lk, generator=g) < 0.8,
                 "bias": torch.randn(1, H, Lq, Lk, generator=g, dtype=torch.float64),
                 "bool": torch.rand(B, H, Lq, Lk, generator=g) < 0.8}[mask]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[..., 0] = True  # every row sees a key
    causal = causal and attn_mask is None
    keep = union[None].expand(B, H)
    groups = torch.div(idx, group, rounding_mode="floor")
    heads_mask = None if attn_mask is None or attn_mask.shape[1] == 1 else attn_mask.index_select(1, idx)
    want = F.scaled_dot_product_attention(q, k.index_select(1, groups), v.index_select(1, groups),
                                          attn_mask=heads_mask if heads_mask is not None else attn_mask,
                                          is_causal=causal)
    for bands, most in ((True, 0), (False, 0), (False, 16)):  # every head up to `most` rows, gathered K/V beyond
        with mock.patch.object(compact_heads, "SCATTER_MAX_LQ", most), \
                mock.patch.object(compact_heads, "HEAD_BANDS", bands):
            got = query_heads_core(q, k, v, keep, gathered, group, attn_mask, 0.0, causal, None, True)
        torch.testing.assert_close(got[:, valid], want[:, valid], atol=1e-10, rtol=1e-10)
        assert torch.isfinite(got).all()
