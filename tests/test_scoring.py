"""Head scoring: entropy and weight norms against float64 NumPy, the probe, budgets, strategies."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dhp_fx
from dhp_fx.gates import decide_keep, keep_top
from dhp_fx.kernels.entropy import _take_rows, attention_entropy, attention_log_probs, probe_rows
from dhp_fx.passes import AttentionSite, ProjectionRef
from dhp_fx.scoring import head_weight_norms, normalize_per_site, query_padding
from dhp_fx.testing import AttentionSpec, build_attention

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- NumPy references
def np_entropy(q, k, mask, causal, scale, rows, query_valid):
    """Straight from the definition, float64, one (b, h, row) at a time."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if mask is not None:
        mask = np.broadcast_to(mask, (B, Hq, Lq, Lk))
    out = np.zeros((B, Hq))
    for b in range(B):
        rs = range(Lq) if rows is None else (rows if rows.ndim == 1 else rows[b])
        for h in range(Hq):
            vals = []
            for i in rs:
                if query_valid is not None and not query_valid[b, i]:
                    continue
                s = q[b, h, i] @ k[b, h // (Hq // Hkv)].T * scale
                ok = np.ones(Lk, bool)
                if mask is not None:
                    if mask.dtype == bool:
                        ok &= mask[b, h, i]
                    else:
                        s = s + mask[b, h, i]
                        ok &= mask[b, h, i] > -1e4
                if causal:
                    ok &= np.arange(Lk) <= i
                n = ok.sum()
                if n == 0:
                    continue
                s = s[ok] - s[ok].max()
                p = np.exp(s) / np.exp(s).sum()
                ent = -(p[p > 0] * np.log(p[p > 0])).sum()
                vals.append(ent / np.log(n) if n > 1 else 0.0)
            out[b, h] = np.mean(vals) if vals else 0.0
    return out


def np_weight_norms(weights, layouts, features, H, Hkv, hd, vhd):
    """sqrt of summed squares of each head's Q/K/V rows and O columns, then min-max per site."""
    sq = np.zeros(H)
    for role, w in weights.items():
        w = w.T if (layouts[role] == "in_out") == (role != "out") else w  # -> [features, other]
        start = features[role][0] if features[role] else 0
        dim = vhd if role in ("v", "out") else hd
        for h in range(H):
            g = h // (H // Hkv) if role in ("k", "v") else h
            sq[h] += (w[start + g * dim: start + (g + 1) * dim] ** 2).sum()
    norms = np.sqrt(sq)
    span = norms.max() - norms.min()
    return norms, (np.ones(H) if span <= 1e-6 * norms.max() else (norms - norms.min()) / span)


# ---------------------------------------------------------------------------- entropy kernel
@st.composite
def entropy_cases(draw):
    B, Hkv, G = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Lq, Lk, D = draw(st.integers(1, 7)), draw(st.integers(1, 9)), draw(st.sampled_from([2, 4, 8]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Lq, D, generator=g) * draw(st.sampled_from([0.1, 1.0, 3.0]))
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    kind = draw(st.sampled_from(["none", "bool", "additive", "padding"]))
    mask = None
    if kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
    elif kind == "additive":
        mask = torch.randn(1, Hkv * G, Lq, Lk, generator=g)
        mask = mask.masked_fill(torch.rand(mask.shape, generator=g) < 0.2, draw(st.sampled_from([float("-inf"), -3.4e38])))
    elif kind == "padding":
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        mask = (torch.arange(Lk)[None] < lengths[:, None])[:, None, None, :]
    causal = draw(st.booleans())
    rows = draw(st.sampled_from(["all", "shared", "per_sample"]))
    fraction = draw(st.sampled_from([1.0, 0.5, 1 / 16]))
    valid = (torch.rand(B, Lq, generator=g) > 0.3) if draw(st.booleans()) else None
    if rows == "all":
        idx = None
    elif rows == "shared":
        idx = probe_rows(Lq, fraction)
    else:
        idx = probe_rows(Lq, fraction, valid if valid is not None else torch.ones(B, Lq, dtype=torch.bool))
    scale = draw(st.one_of(st.none(), st.floats(0.1, 2.0)))
    return q, k, mask, causal, scale, idx, valid


@SETTINGS
@given(entropy_cases())
def test_entropy_matches_float64_reference(case):
    q, k, mask, causal, scale, rows, valid = case
    got = attention_entropy(q, k, mask, causal, scale, rows, valid)
    s = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    want = np_entropy(q.double().numpy(), k.double().numpy(), None if mask is None else mask.double().numpy()
                      if mask.dtype != torch.bool else mask.numpy(), causal, s,
                      None if rows is None else rows.numpy(), None if valid is None else valid.numpy())
    assert got.shape == (q.shape[0], q.shape[1]) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-5, rtol=1e-4)
    assert ((got >= -1e-6) & (got <= 1 + 1e-6)).all()


@SETTINGS
@given(entropy_cases())
def test_entropy_gradients_are_finite_and_match_the_plain_formula(case):
    """Masked and causal-future keys hold log p = -inf: the entropy's gradient must not meet
    0 * inf there. Against autograd through the plain formula (-sum p log p over allowed keys,
    normalised, averaged over valid rows) on the same log-probabilities."""
    q, k, mask, causal, scale, rows, valid = case
    q32, k32 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    attention_entropy(q32, k32, mask, causal, scale, rows, valid).sum().backward()
    assert torch.isfinite(q32.grad).all() and torch.isfinite(k32.grad).all()
    q_ref, k_ref = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    logp, allowed, n_keys = attention_log_probs(q_ref, k_ref, mask, causal, scale, rows)
    p = logp.exp() if allowed is None else logp.exp().masked_fill(~allowed, 0.0)
    h = -(p * (logp if allowed is None else logp.masked_fill(~allowed, 0.0))).sum(-1)
    row_h = torch.where(n_keys > 1, h / torch.log(n_keys.clamp_min(2.0)), torch.zeros(()))
    weight = (n_keys > 0).float().expand_as(row_h)
    if valid is not None:
        weight = weight * _take_rows(valid[:, None, :, None], rows, q.shape[0])[..., 0].float()
    ((row_h * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)).sum().backward()
    torch.testing.assert_close(q32.grad, q_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k32.grad, k_ref.grad, atol=1e-5, rtol=1e-4)


def test_entropy_extremes_and_low_precision():
    k = torch.randn(1, 1, 16, 8, generator=torch.Generator().manual_seed(0))
    uniform = attention_entropy(torch.zeros(1, 1, 3, 8), k)  # equal scores: maximal entropy
    basis = torch.eye(8)[None, None] * 10  # orthogonal keys: each query matches its own key alone
    peaked = attention_entropy(basis[:, :, :3], basis)
    assert torch.allclose(uniform, torch.ones(1, 1)) and peaked.item() < 0.05
    half = attention_entropy(k.half()[:, :, :3], k.half())
    assert half.dtype == torch.float32 and torch.allclose(half, attention_entropy(k.half().float()[:, :, :3], k.half().float()))


def test_probe_rows_are_strided_anchored_and_skip_padding():
    assert probe_rows(1, 1 / 16).tolist() == [0]
    assert probe_rows(64, 1 / 16).tolist() == [15, 31, 47, 63]
    assert probe_rows(5, 1.0).tolist() == [0, 1, 2, 3, 4]
    valid = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    rows = probe_rows(8, 0.25, valid)
    assert rows.shape == (2, 2) and valid[0, rows[0]].all() and rows[0, -1] == 2


PROBE_TOLERANCE = 0.06  # max |probe - full| of normalised entropy, 4 of 64 rows


@pytest.mark.parametrize("causal", [False, True])
def test_probe_within_tolerance_of_full_entropy_on_structured_inputs(causal):
    """Positional heads (score depends on i - j, sharpness set per head, from uniform to nearly
    one-hot) plus noise: rows behave alike, so the 1/16 probe stays within PROBE_TOLERANCE of
    the all-rows entropy and ranks the heads the same way; padding rows are left out of both."""
    L, D = 64, 16
    omega = 1.0 / (10000 ** (torch.arange(D // 2) / (D // 2)))
    angle = torch.arange(L)[:, None] * omega[None]
    pe = torch.cat([angle.cos(), angle.sin()], -1)
    sharpness = torch.tensor([0.0, 1.0, 2.0, 4.0, 8.0, 16.0])
    g = torch.Generator().manual_seed(0)
    q = sharpness[None, :, None, None] * pe + 0.05 * torch.randn(2, 6, L, D, generator=g)
    k = pe.expand(2, 6, L, D) + 0.05 * torch.randn(2, 6, L, D, generator=g)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, 50:] = False
    mask = valid[:, None, None, :]
    full = attention_entropy(q, k, mask, causal, query_valid=valid)
    probe = attention_entropy(q, k, mask, causal, rows=probe_rows(L, 1 / 16, valid), query_valid=valid)
    assert (probe - full).abs().max() < PROBE_TOLERANCE
    assert torch.equal(probe.argsort(-1), full.argsort(-1))
    assert full[:, 0].min() > 0.95 and full[:, -1].max() < 0.3  # the heads really span the range


def test_query_padding_from_key_padding_mask():
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    assert query_padding(mask, 2, 5, 5).tolist() == [[True] * 5, [True, True, True, False, False]]
    assert query_padding(mask, 2, 1, 5) is None  # a decoding step: nothing to tell
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(query_padding(additive, 2, 5, 5), query_padding(mask, 2, 5, 5))


# ---------------------------------------------------------------------------- weight norms
@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([2, 4]), st.sampled_from([2, 3]),
       st.sampled_from(["out_in", "in_out"]), st.booleans(), st.integers(0, 2**16))
def test_weight_norms_match_float64_reference(Hkv, G, hd, vhd, layout, fused, seed):
    H, d = Hkv * G, 5
    g = torch.Generator().manual_seed(seed)
    widths = {"q": H * hd, "k": Hkv * hd, "v": Hkv * vhd, "out": H * vhd}
    offsets = {"q": 0, "k": H * hd, "v": H * hd + Hkv * hd} if fused else {"q": 0, "k": 0, "v": 0}
    params, refs, feats = {}, {}, {}
    fused_w = torch.randn(sum(widths[r] for r in "qkv"), d, generator=g)
    for role in ("q", "k", "v", "out"):
        if fused and role != "out":
            w, name = fused_w, "qkv.weight"
            feats[role] = (offsets[role], offsets[role] + widths[role])
        else:
            w, name = torch.randn(widths[role], d, generator=g), f"{role}.weight"
            feats[role] = None
        if role == "out":
            w = w.T.contiguous()  # [d, H*vhd] in out_in
        params[name] = w.T.contiguous() if layout == "in_out" else w
        refs[role] = ProjectionRef(weight=name, layout=layout, features=feats[role])
    site = AttentionSite(name="s", module_path="", module_type="", pattern="sdpa", num_heads=H, num_kv_heads=Hkv,
                         head_dim=hd, value_head_dim=vhd, scale=1.0, is_causal=False, mask_kind="none",
                         q_proj=refs["q"], k_proj=refs["k"], v_proj=refs["v"], out_proj=refs["out"])
    np_w = {r: params[refs[r].weight].double().numpy() for r in refs}
    norms, normed = np_weight_norms(np_w, {r: layout for r in refs}, feats, H, Hkv, hd, vhd)
    np.testing.assert_allclose(head_weight_norms(site, params).numpy(), norms, rtol=1e-5)
    np.testing.assert_allclose(normalize_per_site(head_weight_norms(site, params)).numpy(), normed, atol=1e-5)


def test_normalisation_edge_cases():
    assert torch.equal(normalize_per_site(torch.full((4,), 3.0)), torch.ones(4))
    assert torch.equal(normalize_per_site(torch.zeros(3)), torch.ones(3))
    assert normalize_per_site(torch.tensor([1.0, 3.0, 2.0])).tolist() == [0.0, 1.0, 0.5]


# ---------------------------------------------------------------------------- budgets
@SETTINGS
@given(st.integers(1, 4), st.integers(1, 12), st.floats(0.01, 1.0), st.integers(1, 12), st.booleans(),
       st.one_of(st.none(), st.floats(0, 1)), st.integers(0, 2**16))
def test_budget_invariants(batch, heads, ratio, min_heads, shared, threshold, seed):
    scores = torch.rand(batch, heads, generator=torch.Generator().manual_seed(seed))
    n_keep = int(round(ratio * heads))
    want = min(heads, max(n_keep, min_heads))
    keep = decide_keep(scores, n_keep, min_heads, threshold, batch_shared=shared)
    counts = keep.sum(-1)
    assert (counts >= min(min_heads, heads)).all() and (counts >= 1).all()
    if shared:
        assert (keep == keep[:1]).all()
        per_row = decide_keep(scores, n_keep, min_heads, threshold)
        assert (keep | ~per_row).all()  # the union covers what every row needs
    elif threshold is None:
        assert (counts == want).all()  # exactly the requested number
    else:
        assert (counts <= want).all()
        extra = keep & (scores < threshold)  # below-threshold heads only to reach min_heads
        assert (extra.sum(-1) <= min(min_heads, heads)).all()
        if (counts > min(min_heads, heads)).all():
            assert not extra.any()


def test_union_cap_limits_batch_shared_masks():
    scores = torch.eye(4)  # every row wants a different head
    assert decide_keep(scores, 1, 1, batch_shared=True).sum() == 16  # union: all 4 heads, all rows
    capped = decide_keep(scores, 1, 1, batch_shared=True, union_cap=2)
    assert (capped.sum(-1) == 2).all()


def _gate_model(scoring="probe", keep=0.5, **cfg):
    spec = AttentionSpec(heads=8, kv_heads=4, seq_q=12, seq_k=12, batch=3, mask_kind="bool", head_dim=8)
    module, inputs = build_attention(spec)
    opt = dhp_fx.optimize(module, dhp_fx.DHPConfig(keep_ratio=keep, scoring=scoring, **cfg), example_inputs=inputs)
    return module, opt, inputs, opt.gate(opt.sites[0].name)


def _qk(module, x, mask=None):
    s = module.spec
    q = module._heads(module.q_proj(x), s.heads)
    k = module._heads(module.k_proj(x), s.kv_heads)
    return q, k, module._heads(module.v_proj(x), s.kv_heads)


@pytest.mark.parametrize("scoring", ["probe", "router", "lagged", "static"])
def test_every_strategy_keeps_exactly_the_budget(scoring):
    module, opt, inputs, gate = _gate_model(scoring, 0.5, min_heads=2)
    assert type(gate).__name__.lower().startswith(scoring)
    with torch.no_grad():
        q, k, v = _qk(module, inputs["x"])
        for ratio, want in ((0.5, 4), (0.1, 2), (1.0, 8)):
            gate.set_keep_ratio(ratio)
            keep = gate(q, k, v, inputs["mask"], hidden=inputs["x"])
            assert keep.dtype == torch.bool and keep.shape == (3, 8) and (keep.sum(-1) == want).all()
        gate.set_keep_ratio(0.5)
        assert torch.isfinite(opt(**inputs)).all()


def test_alpha_limits():
    module, opt, inputs, _ = _gate_model()
    site = opt.sites[0]
    params = dict(module.named_parameters())
    static = dhp_fx.gates.build_gate(site, dhp_fx.DHPConfig(keep_ratio=0.5, alpha=1.0), params)
    entropic = dhp_fx.gates.build_gate(site, dhp_fx.DHPConfig(keep_ratio=0.5, alpha=0.0, probe_fraction=1.0), params)
    masks = []
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
            q, k, v = _qk(module, x)
            masks.append(static(q, k, v, None))
            ent = attention_entropy(q, k, None, False, site.scale)
            assert torch.equal(entropic(q, k, v, None), keep_top(-ent, 4))
    # alpha = 1: one weight-norm ranking, whatever the input
    assert all(torch.equal(m, keep_top(static.w_hat[None].expand(3, -1), 4)) for m in masks)


@SETTINGS
@given(rows=st.lists(st.lists(st.sampled_from([0.0, 0.25, 1.0, float("inf")]), min_size=1, max_size=40),
                     min_size=1, max_size=4).filter(lambda r: len({len(x) for x in r}) == 1),
       n_keep=st.integers(-1, 41))
def test_keep_top_breaks_ties_by_lower_index(rows, n_keep):
    """Few distinct values, so most rows tie (saturated sigmoids tie at exactly 1.0): a unit is
    kept when fewer than n_keep units score above it or equal it at a lower index. The fused
    router kernel follows the same rule, and it must not depend on the device's topk."""
    scores = torch.tensor(rows, dtype=torch.float32)
    want = [[sum(s > x or (s == x and j < i) for j, s in enumerate(row)) < n_keep for i, x in enumerate(row)]
            for row in rows]
    assert keep_top(scores, n_keep).tolist() == want


def test_kv_group_pruning_keeps_whole_groups():
    module, opt, inputs, gate = _gate_model(keep=0.5, prune_kv_groups=True)
    with torch.no_grad():
        q, k, v = _qk(module, inputs["x"])
        keep = gate(q, k, v, inputs["mask"])
    groups = keep.view(3, 4, 2)
    assert (groups.all(-1) | ~groups.any(-1)).all() and (groups.all(-1).sum(-1) == 2).all()


def test_threshold_mode():
    module, opt, inputs, gate = _gate_model(keep=1.0, score_threshold=0.5, min_heads=1)
    with torch.no_grad():
        q, k, v = _qk(module, inputs["x"])
        scores = gate.score(q, k, v, inputs["mask"], None)
        keep = gate(q, k, v, inputs["mask"])
    above = scores >= 0.5
    assert torch.equal(keep, above | keep_top(scores, 1))
    gate.set_score_threshold(1.0)
    with torch.no_grad():
        assert (gate(q, k, v, inputs["mask"]).sum(-1) >= 1).all()


def test_per_site_keep_ratio_patterns():
    cfg = dhp_fx.DHPConfig(keep_ratio=0.5, keep_ratios={"<root>": 0.25, "enc*": 1.0})
    assert cfg.keep_ratio_for("<root>") == 0.25 and cfg.keep_ratio_for("encoder.x") == 1.0
    _, opt, _, gate = _gate_model(keep=0.5, keep_ratios={"<ro*": 0.25})
    assert gate.n_keep == 2
    for bad in ({"alpha": 1.5}, {"scoring": "oracle"}, {"probe_fraction": 0.0}, {"lag_refresh": 0},
                {"keep_ratios": {"a": 2.0}}, {"score_threshold": -1.0}, {"union_cap": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dhp_fx.DHPConfig(**bad)


def test_weight_norms_refresh_when_weights_change():
    module, opt, inputs, gate = _gate_model()
    before = gate.w_hat.clone()
    with torch.no_grad():
        module.q_proj.weight[:8] *= 50  # head 0 becomes the heaviest
    with torch.no_grad():
        q, k, v = _qk(module, inputs["x"])
        gate(q, k, v, inputs["mask"])
    assert gate.w_hat[0] == 1.0 and not torch.equal(before, gate.w_hat)


def test_lagged_refreshes_every_k_calls():
    module, opt, inputs, gate = _gate_model("lagged", lag_refresh=3)
    gate.reset_lag()
    seen = []
    with torch.no_grad():
        for seed in range(7):
            x = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(seed))
            q, k, v = _qk(module, x)
            gate(q, k, v, None)
            seen.append(gate.lag_entropy.clone())
    same = [torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert same == [True, True, False, True, True, False]


def test_router_learns_towards_measured_scores():
    module, opt, inputs, gate = _gate_model("router")
    x, mask = inputs["x"], inputs["mask"]
    with torch.no_grad():
        q, k, v = _qk(module, x)
    optim = torch.optim.Adam(gate.router.parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        loss = gate.router_loss(q, k, v, mask, x)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in module.parameters())  # targets are detached


def test_router_loss_captured_during_a_forward():
    module, opt, inputs, gate = _gate_model("router")
    gate.capture_loss = True
    try:
        opt(**inputs)
    finally:
        gate.capture_loss = False
    loss = gate.last_router_loss
    assert loss is not None and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in gate.router.parameters())
    assert all(p.grad is None for p in module.parameters())


# ------------------------------------------------------------------ attention sinks
def _first_mass_reference(q, k, mask, causal, scale, valid):
    """float64: per (b, h), mean over real query rows of p(first key the row may attend to)."""
    B, H, Lq, _ = q.shape
    s = (q.double() @ k.double().repeat_interleave(H // k.shape[1], 1).transpose(-1, -2)) * scale
    allowed = torch.ones(B, H, Lq, k.shape[2], dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask.expand(B, H, Lq, k.shape[2])
    if causal:
        allowed = allowed & torch.ones(Lq, k.shape[2], dtype=torch.bool).tril()
    out = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            vals = []
            for i in range(Lq):
                keys = allowed[b, h, i].nonzero().flatten()
                if len(keys) == 0 or (valid is not None and not valid[b, i]):
                    continue
                p = torch.softmax(s[b, h, i, keys], -1)
                vals.append(float(p[0]))
            out[b, h] = sum(vals) / len(vals) if vals else 0.0
    return out


@SETTINGS
@given(st.integers(1, 2), st.sampled_from([(2, 2), (4, 2)]), st.integers(1, 6), st.booleans(), st.booleans(),
       st.integers(0, 999))
def test_first_key_mass_matches_reference(batch, heads, length, causal, left_pad, seed):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q = torch.randn(batch, hq, length, 8, generator=g)
    k = torch.randn(batch, hkv, length, 8, generator=g)
    valid = None
    mask = None
    if left_pad and length > 1:  # decoder-style left padding: the first real key is not key 0
        valid = torch.ones(batch, length, dtype=torch.bool)
        valid[0, :1] = False
        mask = valid[:, None, None, :]
    ent, mass = attention_entropy(q, k, mask, causal, 0.4, None, valid, return_first_mass=True)
    torch.testing.assert_close(ent, attention_entropy(q, k, mask, causal, 0.4, None, valid))
    want = _first_mass_reference(q, k, mask, causal, 0.4, valid)
    torch.testing.assert_close(mass.double(), want, atol=1e-5, rtol=1e-4)


def test_sink_weight_ranks_heads_parked_on_the_first_token_last():
    """Head 0 puts (almost) all its attention on key 0 — low entropy, like a [CLS]/BOS sink; the
    paper's entropy rule keeps it first, sink_weight = 1 drops it first."""
    from dhp_fx.strategies import ProbeGate

    L, D = 16, 8
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 4, L, D, generator=g)
    q = torch.randn(1, 4, L, D, generator=g) * 0.3
    q[:, 0] = k[:, 0, :1] * 20  # every query of head 0 matches key 0 alone
    q[:, 1] = k[:, 1] * 20  # head 1: each query its own key — sharp but not a sink
    site = AttentionSite(name="s", module_path="", module_type="", pattern="sdpa", num_heads=4, num_kv_heads=4,
                         head_dim=D, value_head_dim=D, scale=1 / math.sqrt(D), is_causal=False, mask_kind="none",
                         dropout_p=0.0, cross_attention=False)
    paper = ProbeGate(site, dhp_fx.DHPConfig(alpha=0.0, probe_fraction=1.0), {})
    sink = ProbeGate(site, dhp_fx.DHPConfig(alpha=0.0, probe_fraction=1.0, sink_weight=1.0), {})
    s_paper = paper.probe_score(q, k, None)
    s_sink = sink.probe_score(q, k, None)
    assert s_paper[0].argmax() in (0, 1) and s_paper[0, 0] > s_paper[0, 2:].max()
    assert s_sink[0].argmin() == 0 and s_sink[0, 0] < 0.05 and s_sink[0, 1] > 0.9
    with pytest.raises(ValueError, match="sink_weight"):
        dhp_fx.DHPConfig(sink_weight=1.5)


def _uncached(gate, x):
    return dhp_fx.gates.HeadGate.decide_eager(gate, None, None, None, None, x)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.sampled_from(["ratio", "threshold", "scores", "scores_inplace", "weights", "granularity",
                                       "batch", "pin", "unpin"]), min_size=1, max_size=8),
       seed=st.integers(0, 2**16), calibrated=st.booleans())
def test_static_gate_reuses_its_decision_only_while_nothing_it_reads_changed(steps, seed, calibrated):
    """The static gate decides once and hands out views (no top-k or scatter per layer and
    call); every change to what the decision reads must be seen on the next call, in place or
    by replacement, and the result must equal deciding afresh."""
    module, opt, inputs, gate = _gate_model("static", 0.5, prune_kv_groups=False)
    g = torch.Generator().manual_seed(seed)
    if calibrated:
        gate.set_static_scores(torch.rand(8, generator=g))
    x = inputs["x"]
    with torch.no_grad():
        for step in steps:
            if step == "ratio":
                gate.set_keep_ratio(float(torch.randint(1, 9, (), generator=g)) / 8)
            elif step == "threshold":
                gate.set_score_threshold(None if torch.rand((), generator=g) < 0.3 else float(torch.rand((), generator=g)))
            elif step == "scores":
                gate.set_static_scores(torch.rand(8, generator=g))
            elif step == "scores_inplace":  # what load_state_dict does to a buffer
                gate.static_scores.copy_(torch.rand(8, generator=g))
            elif step == "weights":  # training updates weights in place: ŵ follows when uncalibrated
                module.q_proj.weight.mul_(torch.rand(module.q_proj.weight.shape[0], 1, generator=g) + 0.5)
            elif step == "granularity":
                gate.granularity = "sample" if gate.granularity == "batch" else "batch"
            elif step == "batch":
                x = torch.randn(int(torch.randint(1, 5, (), generator=g)), *inputs["x"].shape[1:], generator=g)
            elif step == "pin":
                gate.set_keep_mask(torch.rand(8, generator=g) < 0.5)
            else:
                gate.set_keep_mask(None)
            got = gate(None, None, None, None, hidden=x)
            assert got.shape == (x.shape[0], 8)
            assert torch.equal(got, _uncached(gate, x)), step


def test_static_gate_decides_once_per_configuration(monkeypatch):
    module, opt, inputs, gate = _gate_model("static", 0.5)
    calls = []
    real = dhp_fx.gates.decide_keep
    monkeypatch.setattr(dhp_fx.gates, "decide_keep", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        for ratio in (0.375, 0.25):  # each new budget: one decision, then reuse
            gate.set_keep_ratio(ratio)
            for _ in range(3):
                keep = gate(None, None, None, None, hidden=inputs["x"])
                opt(**inputs)
            assert int(keep[0].sum()) == round(ratio * 8)
    assert len(calls) == 2, "a static decision must be reused across calls"


@SETTINGS
@given(B=st.integers(1, 3), L=st.integers(2, 6), heads=st.sampled_from([1, 2]), additive=st.booleans(),
       seed=st.integers(0, 2**16))
def test_query_padding_is_the_same_with_one_reduction_or_two(B, L, heads, additive, seed):
    import dhp_fx.scoring as scoring

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, heads, L, L, generator=g) < 0.6
    if additive:
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    saved = scoring._ANY_OVER_DIMS
    try:
        scoring._ANY_OVER_DIMS = True
        one = query_padding(mask, B, L, L)
        scoring._ANY_OVER_DIMS = False  # torch without aten::any.dims
        two = query_padding(mask, B, L, L)
    finally:
        scoring._ANY_OVER_DIMS = saved
    assert torch.equal(one, two)
