"""Calibration, reports, static pruning and its safetensors + JSON round trip."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dhp_fx
from dhp_fx.calibrate import CalibrationStats, SiteStats
from dhp_fx.passes import AttentionSite, ProjectionRef
from dhp_fx.report import count_flops, model_report
from dhp_fx.static_prune import apply_pruning, prune_plan, removed_parameter_count
from dhp_fx.testing import assert_outputs_close, heads_zeroed


class HandAttention(nn.Module):
    """Written the way many research codebases are: head counts as attributes, SDPA with GQA."""

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q = nn.Linear(d, num_heads * head_dim)
        self.k = nn.Linear(d, num_kv_heads * head_dim)
        self.v = nn.Linear(d, num_kv_heads * head_dim)
        self.o = nn.Linear(num_heads * head_dim, d)

    def forward(self, x, mask=None):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, L, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, L, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_key_value_heads)
        return self.o(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


class HandModel(nn.Module):
    LAYERS = ((4, 4), (6, 6), (4, 2))  # (heads, kv heads): non-uniform from the start, one GQA layer

    def __init__(self, d: int = 24, head_dim: int = 6):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in self.LAYERS)
        self.layers = nn.ModuleList(HandAttention(d, h, kv, head_dim) for h, kv in self.LAYERS)

    def forward(self, x, mask=None):
        for norm, attn in zip(self.norms, self.layers):
            x = x + attn(norm(x), mask)
        return x


def hand_batch(seed: int, batch: int = 3, length: int = 10):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length] + [int(n) for n in torch.randint(2, length + 1, (batch - 1,), generator=g)])
    mask = (torch.arange(length)[None] < lengths[:, None])[:, None, None, :]
    return {"x": torch.randn(batch, length, 24, generator=g), "mask": mask}


@pytest.fixture(scope="module")
def hand():
    torch.manual_seed(0)
    model = HandModel().eval()
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5), example_inputs=hand_batch(0))
    stats = dhp_fx.calibrate(opt, [hand_batch(s) for s in range(1, 5)])
    return model, opt, stats


def _zeroed_reference(model, sites, plan, inputs):
    masks = {s.name: torch.tensor([h not in plan.get(s.name, []) for h in range(s.num_heads)]) for s in sites}
    with torch.no_grad(), heads_zeroed(model, sites, masks):
        return model(**inputs)


# ---------------------------------------------------------------------------- calibration + reports
def test_calibration_records_scores_and_keep_frequency(hand, tmp_path):
    model, opt, stats = hand
    assert [s.num_heads for s in opt.sites] == [4, 6, 4]
    assert stats.batches == 4 and stats.samples == 12
    for site in opt.sites:
        s = stats.sites[site.name]
        assert s.samples == 12 and len(s.keep_freq) == site.num_heads
        # per-sample budgets are exact, so the frequencies add up to the heads kept per call
        assert sum(s.keep_freq) == pytest.approx(opt.gate(site.name).n_keep)
        assert all(lo <= m <= hi for lo, m, hi in zip(s.score_min, s.score_mean, s.score_max))
        assert all(0.0 <= e <= 1.0 for e in s.entropy_mean)
    path = tmp_path / "stats.json"
    stats.save(str(path))
    assert CalibrationStats.load(str(path)) == stats


def test_report_has_keep_frequency_flops_and_params(hand, tmp_path):
    model, opt, stats = hand
    assert stats.flops_before > stats.flops_after > 0  # keep 0.5: pruned heads cost nothing
    text = model_report(opt)
    for site in opt.sites:
        assert site.name in text
    assert "keep frequency per head" in text and "FLOPs" in text and "params" in text
    assert f"{stats.flops_before:,} -> {stats.flops_after:,}" in text
    png = dhp_fx.heatmap(opt, str(tmp_path / "keep.png"))
    with open(png, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 1000


def test_gated_flops_count_only_kept_heads(hand):
    model, opt, _ = hand
    inputs = hand_batch(7)
    opt.set_keep_mask(None)
    opt.set_keep_ratio(1.0)
    try:
        full = count_flops(opt, inputs)
        opt.set_keep_mask({s.name: torch.zeros(s.num_heads, dtype=torch.bool).index_fill(0, torch.tensor([0]), True)
                           for s in opt.sites})
        one_head = count_flops(opt, inputs)
    finally:
        opt.set_keep_mask(None)
        opt.set_keep_ratio(0.5)
    B, L, hd = 3, 10, 6
    attention = sum(2 * L * L * 2 * hd * B * s.num_heads for s in opt.sites)
    # Output projections skip pruned heads too (DHPConfig.skip_projections): hd input features each.
    params = dict(model.named_parameters())
    out_proj = sum(2 * B * L * params[s.out_proj.weight].shape[0] * hd * (s.num_heads - 1) for s in opt.sites)
    assert full - one_head == attention - sum(2 * L * L * 2 * hd * B for _ in opt.sites) + out_proj
    assert count_flops(model, inputs) == full  # gates open: the original's cost (CPU SDPA counted too)


def test_static_gates_rank_by_calibration():
    torch.manual_seed(1)
    model = HandModel().eval()
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=hand_batch(0))
    gate = opt.gate(opt.sites[1].name)
    assert torch.equal(gate.static_scores, gate.w_hat)  # before calibration: weight norms alone
    stats = dhp_fx.calibrate(opt, [hand_batch(s) for s in range(3)], measure_flops=False)
    assert torch.allclose(gate.static_scores, torch.tensor(stats.sites[gate.site_name].score_mean))
    x = hand_batch(9)
    q = torch.zeros(3, 6, 10, 6)
    assert (gate(q, q, q, None) == gate(q + 1, q, q, None)).all()  # no per-input dependence


# ---------------------------------------------------------------------------- static pruning
def test_prune_plan_from_stats_respects_min_heads_and_kv_groups():
    sites = [AttentionSite(name=n, module_path=n, module_type="", pattern="sdpa", num_heads=4, num_kv_heads=kv,
                           head_dim=2, value_head_dim=2, scale=1.0, is_causal=False, mask_kind="none")
             for n, kv in (("mha", 4), ("gqa", 2), ("dead", 4))]
    stats = CalibrationStats(sites={
        "mha": SiteStats("mha", 4, 4, 10, keep_freq=[0.0, 1.0, 0.005, 0.5]),
        "gqa": SiteStats("gqa", 4, 2, 10, keep_freq=[0.0, 0.0, 0.0, 1.0]),
        "dead": SiteStats("dead", 4, 4, 10, keep_freq=[0.0, 0.0, 0.0, 0.0]),
    })
    plan = prune_plan(sites, stats, max_keep_freq=0.01)
    assert plan["mha"] == [0, 2]
    assert plan["gqa"] == [0, 1]  # group 1 has a head in use: it stays whole
    assert len(plan["dead"]) == 3  # never a site with no heads


def test_static_prune_hand_model_round_trip(hand, tmp_path):
    model, opt, stats = hand
    plan = {opt.sites[0].name: [1], opt.sites[1].name: [0, 2, 5], opt.sites[2].name: [2, 3]}
    inputs = hand_batch(11)
    expected = _zeroed_reference(model, opt.sites, plan, inputs)
    predicted = removed_parameter_count(model, opt.sites, plan)
    result = dhp_fx.static_prune(opt, plan=plan)
    pruned = result.model
    assert [m.num_heads for m in pruned.layers] == [3, 3, 2]
    assert [m.num_key_value_heads for m in pruned.layers] == [3, 3, 1]
    assert pruned.layers[1].q.out_features == 18 and pruned.layers[1].o.in_features == 18
    assert result.params_before - result.params_after == predicted > 0
    with torch.no_grad():
        assert_outputs_close(pruned(**inputs), expected)
    assert [m.num_heads for m in model.layers] == [4, 6, 4]  # the original is untouched

    dhp_fx.save_pruned(result, str(tmp_path))
    meta = json.loads((tmp_path / "pruning.json").read_text())
    assert meta["params_after"] == result.params_after
    loaded = dhp_fx.load_pruned(str(tmp_path), lambda: HandModel().eval())
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), pruned(**inputs))
    again = dhp_fx.optimize(loaded, example_inputs=inputs)
    assert [(s.num_heads, s.num_kv_heads) for s in again.sites] == [(3, 3), (3, 3), (2, 1)]


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        vocab_size=64, max_position_embeddings=32)
    return BertModel(config).eval()


def test_static_prune_hf_bert_non_uniform_round_trip(tmp_path):
    bert = _tiny_bert()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(2, 9, dtype=torch.long)
    attn[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": attn}
    opt = dhp_fx.optimize(bert, dhp_fx.DHPConfig(keep_ratio=0.5), example_inputs=inputs)
    plan = {opt.sites[0].name: [1], opt.sites[1].name: [0, 3]}
    expected = _zeroed_reference(bert, opt.sites, plan, inputs).last_hidden_state
    result = dhp_fx.static_prune(opt, plan=plan)
    layers = result.model.encoder.layer
    assert [l.attention.self.num_attention_heads for l in layers] == [3, 2]
    assert [l.attention.self.all_head_size for l in layers] == [24, 16]
    assert layers[1].attention.output.dense.in_features == 16
    assert result.params_after == result.params_before - 2 * (3 * (32 * 8 + 8) + 32 * 8) - (3 * (32 * 8 + 8) + 32 * 8)
    with torch.no_grad():
        got = result.model(**inputs).last_hidden_state
    assert_outputs_close(got, expected)
    dhp_fx.save_pruned(result, str(tmp_path))
    loaded = dhp_fx.load_pruned(str(tmp_path), _tiny_bert)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, got)


def test_static_prune_conv1d_fused_qkv():
    """HF Conv1D ([in, out]) with q, k and v fused in one weight, as in GPT-2: cut all three
    roles from the shared weight at once and fix split_size."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    gpt = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).eval()
    d, H = 32, 4
    sites = []
    for i in range(2):
        p = f"h.{i}.attn"
        ref = lambda role, lo: ProjectionRef(f"{p}.c_attn.weight", f"{p}.c_attn.bias", "in_out", (lo, lo + d))
        sites.append(AttentionSite(name=p, module_path=p, module_type="GPT2Attention", pattern="sdpa", num_heads=H,
                                   num_kv_heads=H, head_dim=8, value_head_dim=8, scale=8 ** -0.5, is_causal=True,
                                   mask_kind="none", q_proj=ref("q", 0), k_proj=ref("k", d), v_proj=ref("v", 2 * d),
                                   out_proj=ProjectionRef(f"{p}.c_proj.weight", f"{p}.c_proj.bias", "in_out")))
    plan = {"h.0.attn": [2], "h.1.attn": [0, 1]}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = _zeroed_reference(gpt, sites, plan, {"input_ids": ids}).last_hidden_state
    apply_pruning(gpt, [{"site": s.to_dict(), "remove": plan[s.name]} for s in sites])
    assert gpt.h[0].attn.c_attn.weight.shape == (32, 72) and gpt.h[0].attn.split_size == 24
    assert gpt.h[1].attn.c_proj.weight.shape == (16, 32) and gpt.h[1].attn.num_heads == 2
    with torch.no_grad():
        assert_outputs_close(gpt(input_ids=ids).last_hidden_state, expected)


def test_static_prune_refuses_partial_kv_groups(hand):
    model, opt, _ = hand
    with pytest.raises(ValueError, match="whole KV groups"):
        dhp_fx.static_prune(opt, plan={opt.sites[2].name: [0]})


def test_static_prune_gpt2_from_discovered_sites(tmp_path):
    """End to end on GPT-2: discovery's Conv1D / fused-QKV projection info drives the cut."""
    from transformers import GPT2Config, GPT2Model

    def build():
        torch.manual_seed(0)
        return GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).eval()

    gpt = build()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    opt = dhp_fx.optimize(gpt, example_inputs=(ids,))
    plan = {opt.sites[0].name: [3], opt.sites[1].name: [1, 2]}
    expected = _zeroed_reference(gpt, opt.sites, plan, {"input_ids": ids}).last_hidden_state
    result = dhp_fx.static_prune(opt, plan=plan)
    with torch.no_grad():
        got = result.model(input_ids=ids).last_hidden_state
    assert_outputs_close(got, expected)
    dhp_fx.save_pruned(result, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(dhp_fx.load_pruned(str(tmp_path), build)(input_ids=ids).last_hidden_state, got)


def test_static_prune_refuses_other_per_head_parameters():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    opt = dhp_fx.optimize(t5, example_inputs=(ids,))
    with pytest.raises(ValueError, match="relative_attention_bias"):
        dhp_fx.static_prune(opt, plan={opt.sites[0].name: [1]})


def test_gates_run_under_compiled_downstreams():
    """aot_eager / inductor trace the rewritten graph: gates become one opaque op that runs their
    Python logic at every call, so budgets, recording and pins work without recompiling."""
    torch.manual_seed(0)
    model = HandModel().eval()
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, compiler="aot_eager"), example_inputs=hand_batch(0))
    compiled = opt.graphs_compiled
    stats = dhp_fx.calibrate(opt, [hand_batch(1), hand_batch(2)])
    assert [sum(s.keep_freq) for s in stats.sites.values()] == pytest.approx([2, 3, 2])
    assert stats.flops_before > stats.flops_after
    assert opt.graphs_compiled == compiled
    inputs = hand_batch(3)
    plan = {s.name: [h for h in range(s.num_heads) if h % 2] for s in opt.sites}
    opt.set_keep_mask({s.name: torch.tensor([h % 2 == 0 for h in range(s.num_heads)]) for s in opt.sites})
    with torch.no_grad():
        got = opt(**inputs)
    opt.set_keep_mask(None)
    assert_outputs_close(got, _zeroed_reference(model, opt.sites, plan, inputs))


class HeadMinorAttention(nn.Module):
    """Projections viewed as [..., D, H]: head h owns features h, h+H, h+2H, ... — not a slice."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.h, self.d = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, _ = x.shape

        def split(t):
            return t.view(B, L, self.d, self.h).permute(0, 3, 1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


def test_static_prune_refuses_projections_not_proven_head_major():
    torch.manual_seed(0)
    model = HeadMinorAttention().eval()
    x = torch.randn(2, 5, 16)
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=1.0), example_inputs=(x,))
    (site,) = opt.sites
    assert site.head_major == ("out",)  # the output side is head-major again after the transpose
    with pytest.raises(ValueError, match="does not prove that the q projection"):
        dhp_fx.static_prune(opt, plan={site.name: [1]})
    # gating itself stays exact: the op addresses heads, not features
    keep = torch.tensor([True, False, True, True])
    opt.set_keep_mask(keep)
    with torch.no_grad():
        got = opt(x)
    opt.set_keep_mask(None)
    with torch.no_grad(), heads_zeroed(model, opt.sites, {site.name: keep}):
        expected = model(x)
    assert_outputs_close(got, expected)


def test_discovered_sites_prove_their_layouts():
    model = _tiny_bert()
    ids = torch.randint(0, 64, (2, 6))
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=1.0), example_inputs=(ids,))
    assert all(s.head_major == ("q", "k", "v", "out") for s in opt.sites)
    restored = type(opt.sites[0]).from_dict(opt.sites[0].to_dict())
    assert restored.head_major == ("q", "k", "v", "out")
