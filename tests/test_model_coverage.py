"""Patterns found by surveying HF architectures beyond the zoo: each was a crash, a silent miss,
a wrong name or a reference that could not fail. The zoo (tests/zoo.py) holds OPT, ALBERT, BLOOM
and Falcon multi-query end to end; these tests pin the specific behaviour."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dhp_fx
from dhp_fx import DHPConfig
from dhp_fx.passes.graph_utils import normalize_source_path
from dhp_fx.testing import assert_outputs_close, check_gates_open, check_keep_mask, heads_zeroed

from zoo import _ids


class SoftcappedAttention(nn.Module):
    """Gemma 2's logit softcapping: tanh(scores / c) * c before the softmax."""

    def __init__(self, d=32, heads=4, cap=50.0):
        super().__init__()
        self.heads, self.hd, self.cap = heads, d // heads, cap
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        s = q @ k.transpose(-1, -2) * self.hd ** -0.5
        s = torch.tanh(s / self.cap) * self.cap
        return self.o((torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, L, -1))


class TanhClassifier(nn.Module):
    """A softmax over a tanh of a plain (2-D weight) product: not attention, ignored silently."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return torch.softmax(torch.tanh(x @ self.w), dim=-1)


class _Warnings(logging.Handler):
    """dhp_fx's warnings (the suite runs with pytest's logging plugin off)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"

    def __enter__(self):
        logging.getLogger("dhp_fx").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("dhp_fx").removeHandler(self)


def test_softcapped_scores_are_reported_not_passed_over():
    torch.manual_seed(0)
    module, x = SoftcappedAttention().eval(), torch.randn(2, 5, 32)
    with _Warnings() as warned:
        opt = dhp_fx.optimize(module, example_inputs=(x,))
    assert not opt.sites
    assert len(opt.skipped) == 1 and "tanh" in opt.skipped[0].reason and "softcapping" in opt.skipped[0].reason
    assert "rewrote none of the 1 attention core(s)" in warned.text
    with torch.no_grad():
        assert torch.equal(opt(x), module(x))  # runs unchanged


def test_softmax_over_a_plain_product_stays_silent():
    torch.manual_seed(0)
    with _Warnings() as warned:
        opt = dhp_fx.optimize(TanhClassifier().eval(), example_inputs=(torch.randn(3, 8),))
    assert not opt.sites and not opt.skipped
    assert "found no attention" in warned.text


def test_gemma2_softcapping_reported_per_layer():
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                          attn_logit_softcapping=50.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Gemma2Model(config).eval()
    ids, mask = _ids()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    opt = check_gates_open(model, inputs)
    assert not opt.sites
    assert len(opt.skipped) == 2 and all("softcapping" in s.reason for s in opt.skipped), opt.report()


def test_shared_output_projection_gets_each_sites_mask_in_call_order():
    """ALBERT calls one attention module per layer: heads_zeroed must tell its calls apart, or
    a per-site mask comparison fails (or, worse, passes) for the wrong reason."""
    from zoo import hf_entries

    entry = next(e for e in hf_entries("sdpa") if e.name == "albert-sdpa")
    model, inputs = entry.build(), entry.inputs()
    opt = check_gates_open(model, inputs)
    names = [s.name for s in opt.sites]
    assert len(names) == 2 and len({s.out_proj.weight for s in opt.sites}) == 1
    first = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    second = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    check_keep_mask(model, opt, inputs, {names[0]: first, names[1]: second})
    # the masks differ, so swapping them must change the reference: the check can fail
    opt.set_keep_mask({names[0]: first, names[1]: second})
    try:
        with torch.no_grad():
            got = opt(**inputs).last_hidden_state
    finally:
        opt.set_keep_mask(None)
    with torch.no_grad(), heads_zeroed(model, opt.sites, {names[0]: second, names[1]: first}):
        swapped = model(**inputs).last_hidden_state
    assert not torch.allclose(got, swapped, atol=1e-4)


class FusedMHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_reference_refuses_an_output_projection_never_called_as_a_module():
    torch.manual_seed(0)
    module, x = FusedMHABlock().eval(), torch.randn(2, 5, 32)
    opt = dhp_fx.optimize(module, example_inputs=(x,))
    assert len(opt.sites) == 1
    keep = {opt.sites[0].name: torch.tensor([True, False, True, False])}
    with pytest.raises(ValueError, match="never called as a module"):
        with torch.no_grad(), heads_zeroed(module, opt.sites, keep):
            module(x)


@pytest.mark.parametrize("source,name", [
    ("L['self'].encoder.layers[1].blocks[0].__dict__['_modules']['attention']._modules['o_proj']._parameters['weight']",
     "encoder.layers.1.blocks.0.attention.o_proj.weight"),
    ("L['self'].__dict__['_modules']['encoder'].layer.0.__dict__['_parameters']['w']", "encoder.layer.0.w"),
    ("L['self']._modules['encoder']._modules['layer'][3]", "encoder.layer.3"),
])
def test_source_paths_through_instance_dicts_normalise_to_parameter_names(source, name):
    assert normalize_source_path(source) == name


def test_swin_sites_name_real_parameters():
    """Dynamo reaches Swin's later stages through ``__dict__['_modules']``; the sites' weights
    must still be named as the model names them (static_prune and the reference look them up)."""
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[2, 1], num_heads=[4, 8], window_size=4)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = SwinModel(config).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    opt = check_gates_open(model, inputs)
    params = dict(model.named_parameters())
    refs = [getattr(s, f"{r}_proj") for s in opt.sites for r in ("q", "k", "v", "out")]
    assert len(opt.sites) == 3 and all(ref is not None and ref.weight in params for ref in refs), opt.report()
    # per-head masks apply to every window of every image
    keep = {s.name: torch.arange(s.num_heads) % 2 == 0 for s in opt.sites}
    check_keep_mask(model, opt, inputs, keep)


def test_constant_scaled_q_folds_into_the_compact_blocks_scale():
    """OPT scales q by a constant before the head split: every projection is skipped and the
    block runs the kept heads alone, with the factor in the attention scale."""
    from zoo import hf_entries

    entry = next(e for e in hf_entries("sdpa") if e.name == "opt-sdpa")
    model, inputs = entry.build(), {**entry.inputs(), "use_cache": False}
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    assert all(s.compact_block for s in opt.sites), opt.report()
    keep = torch.tensor([True, False, False, True])
    check_keep_mask(model, opt, inputs, keep)
    blocks = [opt.gate(s).block_module for s in opt.sites]
    assert all(b.calls_compact for b in blocks)
    opt.set_keep_ratio(1.0)
    with torch.no_grad():
        assert_outputs_close(opt(**inputs), model(**inputs), what="gates open")


def test_broadcast_mqa_sdpa_is_rewritten_with_one_kv_head():
    class BroadcastMQA(nn.Module):
        def __init__(self, d=32, heads=4):
            super().__init__()
            self.heads, self.hd = heads, d // heads
            self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
            self.k, self.v = nn.Linear(d, self.hd), nn.Linear(d, self.hd)

        def forward(self, x):
            B, L, _ = x.shape
            q = self.q(x).view(B, L, self.heads, self.hd).transpose(1, 2)
            k, v = (p(x).view(B, L, 1, self.hd).transpose(1, 2) for p in (self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1))

    torch.manual_seed(0)
    module, x = BroadcastMQA().eval(), torch.randn(2, 5, 32)
    for config in (DHPConfig(), DHPConfig(scoring="static")):
        opt = check_gates_open(module, (x,), config=config)
        assert [(s.num_heads, s.num_kv_heads) for s in opt.sites] == [(4, 1)]
        check_keep_mask(module, opt, (x,), torch.tensor([[True, False, True, True], [False] * 4]))


_ROWS_APART = torch.tensor([[True, False, True, True], [False, True, False, False]])


def _static_skips(module, x):
    """Static gates on a hand-written block, after the gates-open check; (optimized, skipped roles)."""
    opt = check_gates_open(module, (x,), config=DHPConfig(scoring="static"))
    return opt, set(opt.sites[0].skipped_projections)


class NormedQK(nn.Module):
    """RMSNorm of q and k either per head (Qwen3: over the head dim, head-local) or over the
    whole projection width (OLMo 2: every head's features in one statistic)."""

    def __init__(self, per_head: bool, d=32, heads=4):
        super().__init__()
        self.per_head, self.heads, self.hd = per_head, heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    @staticmethod
    def _rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.per_head:
            q, k = (t.view(B, L, -1, self.hd) for t in (q, k))  # -1 heads, as HF writes it
            q, k = self._rms(q), self._rms(k)
        else:
            q, k = self._rms(q), self._rms(k)
        q, k, v = (t.reshape(B, L, -1, self.hd).transpose(1, 2) for t in (q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("per_head", [True, False])
def test_q_k_norms_skip_projections_only_when_head_local(per_head):
    torch.manual_seed(0)
    module, x = NormedQK(per_head).eval(), torch.randn(2, 5, 32)
    opt, skipped = _static_skips(module, x)
    if per_head:
        assert {"q", "k", "v", "out"} <= skipped and opt.sites[0].compact_block, opt.report()
    else:
        assert not {"q", "k"} & skipped, opt.report()  # skipping a head's rows would change the norm
    check_keep_mask(module, opt, (x,), _ROWS_APART)


@pytest.mark.parametrize("idx,sizes,expected", [
    ((Ellipsis, slice(None, 32)), [2, 7, 64], (0, 32)),
    ((Ellipsis, slice(32, 48)), [2, 7, 64], (32, 48)),
    ((slice(None), slice(None), slice(48, None)), [2, 7, 64], (48, 64)),
    ((Ellipsis, slice(None, 32, 2)), [2, 7, 64], None),  # strided: not a range of features
    ((slice(0, 1), Ellipsis, slice(None, 32)), [2, 7, 64], None),  # also cuts the batch
    ((Ellipsis, slice(10, 10)), [2, 7, 64], None),
])
def test_last_dim_slices_read_as_feature_ranges(idx, sizes, expected):
    from dhp_fx.passes.projections import last_dim_slice

    assert last_dim_slice(idx, sizes) == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fused_qkv_sliced_by_ranges_skips_every_projection(attn):
    """Phi-3 slices one qkv_proj output into q, k and v: each role is a feature range of the
    fused weight, and its pruned heads' rows are skipped (causal LM without a returned cache)."""
    from zoo import hf_entries

    entry = next(e for e in hf_entries(attn) if e.name == f"phi3-{attn}")
    model, inputs = entry.build(), {**entry.inputs(), "use_cache": False}
    opt = check_gates_open(model, inputs, config=DHPConfig(scoring="static"))
    assert all(set(s.skipped_projections) == {"q", "k", "v", "out"} for s in opt.sites), opt.report()
    assert [s.q_proj.features for s in opt.sites] == [(0, 32)] * 2
    check_keep_mask(model, opt, inputs, torch.tensor([[True, True, False, False], [True, False, False, True]]))


_LM = dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_PINNED = torch.tensor([[True, False, True, True], [False, False, True, False]])


def _hf_static(model_cls, config):
    """A tiny causal LM (sdpa, no cache) optimized with static gates, after the gates-open check."""
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    ids, mask = _ids()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    return model, inputs, check_gates_open(model, inputs, config=DHPConfig(scoring="static"))


def _skips_every_projection(opt) -> bool:
    return bool(opt.sites) and all(set(s.skipped_projections) == {"q", "k", "v", "out"} for s in opt.sites)


class InterleavedRope(nn.Module):
    """Rotary embedding over interleaved pairs (GPT-J's rotate_every_two, Cohere's rotate_half):
    x[..., ::2] and x[..., 1::2] stacked on a new last dim and flattened back. GPT-J rotates the
    first ``rot`` features of each head in [B, L, H, D] and concatenates the rest back.
    ``across_heads`` pairs head 2i with head 2i+1 instead, which must not pass as head-local."""

    def __init__(self, across_heads=False, d=32, heads=4, rot=4):
        super().__init__()
        self.across, self.heads, self.hd, self.rot = across_heads, heads, d // heads, rot
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        inv = 1.0 / (100 ** (torch.arange(0, rot, 2).float() / rot))
        self.register_buffer("angles", torch.arange(16).float()[:, None] * inv[None, :], persistent=False)

    def _rotate(self, x):
        if self.across:
            x1, x2 = x[:, :, ::2, :], x[:, :, 1::2, :]
            B, L, _, D = x.shape
            return torch.stack((-x2, x1), dim=-1).transpose(-1, -2).reshape(B, L, -1, D)
        x1, x2 = x[:, :, :, ::2], x[:, :, :, 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    def _rope(self, x):
        L = x.shape[1]
        sin = torch.repeat_interleave(self.angles[:L].sin()[None, :, None, :], 2, 3)
        cos = torch.repeat_interleave(self.angles[:L].cos()[None, :, None, :], 2, 3)
        if self.across:
            return x + self._rotate(x)
        x_rot, x_pass = x[:, :, :, :self.rot], x[:, :, :, self.rot:]
        return torch.cat([x_rot * cos + self._rotate(x_rot) * sin, x_pass], dim=-1)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.hd) for p in (self.q, self.k, self.v))
        q, k = self._rope(q), self._rope(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("across_heads", [False, True])
def test_interleaved_rope_skips_q_and_k_only_when_pairs_stay_in_one_head(across_heads):
    torch.manual_seed(0)
    module, x = InterleavedRope(across_heads).eval(), torch.randn(2, 5, 32)
    opt, skipped = _static_skips(module, x)
    if across_heads:
        assert not {"q", "k"} & skipped and {"v", "out"} <= skipped, opt.report()
    else:
        assert {"q", "k", "v", "out"} <= skipped and opt.sites[0].compact_block, opt.report()
    check_keep_mask(module, opt, (x,), _ROWS_APART)


@pytest.mark.parametrize("family", ["gptj", "cohere"])
def test_hf_interleaved_rope_models_skip_every_projection(family):
    import transformers as T

    if family == "gptj":
        model_cls, config = T.GPTJForCausalLM, T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                            n_positions=64, **_LM)
    else:  # per-head q/k LayerNorm weights [H, D] on the path: skipping holds, the chain declines
        model_cls, config = T.CohereForCausalLM, T.CohereConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=64, use_qk_norm=True, **_LM)
    model, inputs, opt = _hf_static(model_cls, config)
    assert len(opt.sites) == 2 and _skips_every_projection(opt), opt.report()
    assert [s.compact_block for s in opt.sites] == [family == "gptj"] * 2
    check_keep_mask(model, opt, inputs, _PINNED)


def test_gpt_neox_per_head_fused_qkv_is_skipped_scored_and_statically_pruned():
    """GPT-NeoX stores [q_h, k_h, v_h] per head in one projection: every role's heads start
    3·D apart. Before, the projection walk stopped at the per-head view: no Q/K/V skipping,
    weight norms from the output projection alone, and static_prune refused."""
    import transformers as T

    from dhp_fx.scoring import head_slices
    from dhp_fx.static_prune import static_prune

    config = T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                          "partial_rotary_factor": 0.25}, **_LM)
    model, inputs, opt = _hf_static(T.GPTNeoXForCausalLM, config)
    assert _skips_every_projection(opt), opt.report()
    site = opt.sites[0]
    assert [getattr(site, f"{r}_proj").head_stride for r in "qkv"] == [24] * 3
    assert head_slices(site, "k", 96) == (0, [(8, 16), (32, 40), (56, 64), (80, 88)])
    check_keep_mask(model, opt, inputs, _PINNED)

    plan = {opt.sites[0].name: [1, 3], opt.sites[1].name: [0]}
    pruned = static_prune(opt, plan=plan).model
    assert pruned.gpt_neox.layers[0].attention.query_key_value.weight.shape == (48, 32)
    kept = {opt.sites[0].name: torch.tensor([[True, False, True, False]] * 2),
            opt.sites[1].name: torch.tensor([[False, True, True, True]] * 2)}
    with heads_zeroed(model, opt.sites, kept):
        expected = model(**inputs).logits
    assert_outputs_close(pruned(**inputs).logits, expected, what="statically pruned GPT-NeoX")


def test_gpt_bigcode_fused_mqa_split_after_unsqueeze_skips_every_projection():
    """GPTBigCode splits c_attn's output into q (H heads) and one k/v head after an
    unsqueeze(1); the walk used to stop at the unsqueeze, so q, k and v were computed in full."""
    import transformers as T

    config = T.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True, **_LM)
    model, inputs, opt = _hf_static(T.GPTBigCodeForCausalLM, config)
    assert [(s.num_kv_heads, set(s.skipped_projections)) for s in opt.sites] == [(1, {"q", "k", "v", "out"})] * 2
    assert [opt.sites[0].k_proj.features, opt.sites[0].v_proj.features] == [(32, 40), (40, 48)]
    check_keep_mask(model, opt, inputs, _PINNED)


class PerHeadNorms(nn.Module):
    """StableLM's qk_layernorm: q and k split head by head, one LayerNorm module each, put back
    with cat on the head dim. ``order`` puts them back in another order, which moves heads."""

    def __init__(self, order=(0, 1, 2, 3), d=32, heads=4):
        super().__init__()
        self.order, self.heads, self.hd = order, heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.q_norms = nn.ModuleList(nn.LayerNorm(self.hd) for _ in range(heads))
        self.k_norms = nn.ModuleList(nn.LayerNorm(self.hd) for _ in range(heads))

    def _norm(self, x, norms):
        pieces = [norm(piece) for norm, piece in zip(norms, torch.split(x, 1, dim=1))]
        return torch.cat([pieces[i] for i in self.order], dim=1)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = self._norm(q, self.q_norms), self._norm(k, self.k_norms)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (1, 0, 2, 3)], ids=["in_order", "heads_swapped"])
def test_head_by_head_norm_modules_skip_q_and_k_only_when_heads_stay_in_place(order):
    torch.manual_seed(0)
    module, x = PerHeadNorms(order).eval(), torch.randn(2, 5, 32)
    with torch.no_grad():
        for norm in [*module.q_norms, *module.k_norms]:  # distinct per-head weights, as trained ones are
            norm.weight.normal_(1.0, 0.5)
            norm.bias.normal_(0.0, 0.5)
    opt, skipped = _static_skips(module, x)
    if order == (0, 1, 2, 3):
        assert {"q", "k", "v", "out"} <= skipped, opt.report()
    else:
        assert not {"q", "k"} & skipped and {"v", "out"} <= skipped, opt.report()
    check_keep_mask(module, opt, (x,), _ROWS_APART)


def test_stablelm_qk_layernorm_skips_every_projection():
    import transformers as T

    config = T.StableLmConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, max_position_embeddings=64, qk_layernorm=True, use_qkv_bias=True, **_LM)
    model, inputs, opt = _hf_static(T.StableLmForCausalLM, config)
    assert _skips_every_projection(opt), opt.report()
    check_keep_mask(model, opt, inputs, _PINNED)


class MatmulFusedMQA(nn.Module):
    """Falcon's multi-query block by hand: projections as ``x @ W.T + b`` (FalconLinear), one fused
    weight viewed [B, L, H + 2, D] and split by head slices: q = [..., :-2, :], k = [..., [-2], :].
    ``transposed`` views it [B, L, D, H + 2] and swaps the last two dims, so the head index is the
    inner digit of the features: slicing heads then takes features D apart, not a block."""

    def __init__(self, transposed=False, d=32, heads=4):
        super().__init__()
        self.transposed, self.heads, self.hd = transposed, heads, d // heads
        self.qkv_w = nn.Parameter(torch.randn((heads + 2) * self.hd, d) / d ** 0.5)
        self.qkv_b = nn.Parameter(torch.randn((heads + 2) * self.hd) / 10)
        self.out_w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        B, L, _ = x.shape
        fused = x @ self.qkv_w.T + self.qkv_b
        if self.transposed:
            fused = fused.view(B, L, self.hd, self.heads + 2).transpose(-1, -2)
        else:
            fused = fused.view(B, L, self.heads + 2, self.hd)
        q, k, v = (t.transpose(1, 2) for t in (fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(B, L, -1) @ self.out_w.t()


@pytest.mark.parametrize("transposed", [False, True], ids=["head-major", "head-inner"])
def test_matmul_projections_and_head_slices_skip_only_head_major_features(transposed):
    """Matmuls by a transposed parameter read as F.linear, and head slices of a fused projection
    as feature ranges; before, these blocks skipped no projection at all."""
    torch.manual_seed(0)
    module, x = MatmulFusedMQA(transposed).eval(), torch.randn(2, 6, 32)
    opt, skipped = _static_skips(module, x)
    site = opt.sites[0]
    assert (site.num_heads, site.num_kv_heads) == (4, 1)
    assert site.out_proj.weight == "out_w"
    assert skipped == ({"out"} if transposed else {"q", "k", "v", "out"})
    if not transposed:
        assert site.q_proj.weight == "qkv_w"
        assert [site.q_proj.features, site.k_proj.features, site.v_proj.features] == [(0, 32), (32, 40), (40, 48)]
    mask = torch.tensor([[True, False, True, True], [False] * 4])
    opt.set_keep_mask(mask)
    with torch.no_grad():
        got = opt(x)
        # the reference: pruned heads' outputs zeroed before the output projection
        B, L, _ = x.shape
        fused = x @ module.qkv_w.T + module.qkv_b
        fused = (fused.view(B, L, 8, 6).transpose(-1, -2) if transposed else fused.view(B, L, 6, 8))
        q, k, v = (t.transpose(1, 2) for t in (fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True) * mask[:, :, None, None]
        want = o.transpose(1, 2).reshape(B, L, -1) @ module.out_w.t()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_linear_forms_rewrite_only_products_with_transposed_parameters():
    from dhp_fx.passes.linear_forms import canonicalize_linear_forms

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
            self.w2 = nn.Parameter(torch.randn(4, 6))

        def forward(self, x, y):
            a = x @ self.w.T + self.b  # linear with bias
            c = x @ self.w.t()  # linear, no bias
            d = x @ self.w2  # not transposed: left alone
            e = x @ y.T  # not a parameter: left alone
            return a, c, d, e

    graphs, rewritten = [], []

    def backend(gm, example_inputs):
        rewritten.append(canonicalize_linear_forms(gm)[0])
        gm.recompile()
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    module, x, y = Mixed(), torch.randn(3, 5, 4), torch.randn(7, 4)
    got = torch.compile(module, backend=backend, fullgraph=True)(x, y)
    for a, b in zip(got, module(x, y)):
        torch.testing.assert_close(a, b)
    (gm,) = graphs
    assert rewritten == [2]
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
    assert len(linears) == 2 and linears[0].args[2] is not None and linears[1].args[2] is None
    assert sum(n.op == "call_function" and "matmul" in str(n.target) for n in gm.graph.nodes) == 2


@pytest.mark.parametrize("idx,sizes,expected", [
    ((Ellipsis, slice(None, -2), slice(None)), [2, 7, 6, 8], (0, 4)),
    ((Ellipsis, [-2], slice(None)), [2, 7, 6, 8], (4, 5)),
    ((slice(None), slice(None), [5]), [2, 7, 6, 8], (5, 6)),
    ((Ellipsis, [0, 1], slice(None)), [2, 7, 6, 8], None),  # two heads picked: a gather, not a range
    ((Ellipsis, slice(None, None, 2), slice(None)), [2, 7, 6, 8], None),
    ((Ellipsis, slice(None, -2), slice(0, 4)), [2, 7, 6, 8], None),  # also cuts within the heads
    ((Ellipsis, slice(None), slice(None)), [2, 7, 6, 8], None),  # takes everything: nothing to place
])
def test_head_dim_slices_read_as_head_ranges(idx, sizes, expected):
    from dhp_fx.passes.projections import head_dim_slice

    assert head_dim_slice(idx, sizes) == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_falcon_multi_query_skips_every_projection(attn):
    """FalconLinear multiplies by weight.T and the multi-query split slices heads of a view:
    before, Falcon skipped no projection (and its keep-mask reference had no module to hook)."""
    import transformers as T

    config = T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                            new_decoder_architecture=False, alibi=False, bias=True, **_LM)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = T.FalconForCausalLM(config).eval()
    ids, mask = _ids()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    opt = check_gates_open(model, inputs, config=DHPConfig(scoring="static"))
    assert _skips_every_projection(opt) and [s.num_kv_heads for s in opt.sites] == [1, 1]
    check_keep_mask(model, opt, inputs, _PINNED)


@pytest.mark.parametrize("family,attn", [("bloom", "eager"), ("falcon", "sdpa"), ("falcon-alibi", "eager")])
def test_hf_per_head_qkv_viewed_by_role_skips_every_projection_and_runs_as_a_chain(family, attn):
    """BLOOM and Falcon (one KV head per query head) view their fused projection (B, L, H, 3, D)
    and take role i as x[..., i, :]. Before, no q/k/v projection was found there
    (`no_skip_qkv_proj:no_hidden`): only the output projection skipped heads. BLOOM folds the
    heads into the batch (the matcher's unflatten(0, (-1, H)) names the head count, which the
    chain infers instead)."""
    import transformers as T

    if family == "bloom":
        config, model_cls = T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **_LM), T.BloomForCausalLM
    else:
        config = T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=False,
                                new_decoder_architecture=False, alibi=family == "falcon-alibi", bias=True, **_LM)
        model_cls = T.FalconForCausalLM
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = model_cls(config).eval()
    ids, mask = _ids()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    opt = check_gates_open(model, inputs, config=DHPConfig(scoring="static"))
    assert _skips_every_projection(opt) and all(s.compact_block for s in opt.sites), opt.report()
    # q: each head's first 8 features of its 24, from head 0's start to head 3's end
    assert [(s.q_proj.features, s.q_proj.head_stride) for s in opt.sites] == [((0, 80), 24)] * 2
    assert opt._compiler.counters.get("compact_chain") == 2
    check_keep_mask(model, opt, inputs, _PINNED)
    check_keep_mask(model, opt, inputs, _PINNED[:1].expand(2, -1))  # rows alike: the kept heads alone


@pytest.mark.parametrize("attn,rope_interleave", [("sdpa", True), ("eager", False)])
def test_hf_deepseek_mla_skips_the_q_v_and_output_projections(attn, rope_interleave):
    """Multi-head latent attention: each q head is split into a part without and a part with
    RoPE and concatenated again (before: q's projection was not found at all), and kv_b_proj runs
    on a [B, 1, L, r] latent and holds [k_nope_h, v_h] per head: its v rows are skipped, its
    k_nope rows (the split's other chunk) computed. Its k is assembled in a new_empty buffer
    and k_rot is shared by every head, so K stays whole. The site stays self-attention although
    q and k/v read different low-rank latents of the layer input."""
    import transformers as T

    config = T.DeepseekV3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                intermediate_size=64, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
                                qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, first_k_dense_replace=2, n_group=1, topk_group=1,
                                rope_interleave=rope_interleave, **_LM)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = T.DeepseekV3ForCausalLM(config).eval()
    ids, mask = _ids()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    for scoring in ("static", "router"):
        opt = check_gates_open(model, inputs, config=DHPConfig(scoring=scoring))
        assert [set(s.skipped_projections) for s in opt.sites] == [{"q", "v", "out"}] * 2, opt.report()
        assert not any(s.cross_attention for s in opt.sites)
        assert [(s.head_dim, s.value_head_dim) for s in opt.sites] == [(12, 8)] * 2
        q = opt.sites[0].q_proj
        assert q.weight.endswith("q_b_proj.weight") and q.features == (0, 48) and q.head_stride is None
        v = opt.sites[0].v_proj  # head h's value rows: 8 + 16 h .. 16 + 16 h of kv_b_proj
        assert v.weight.endswith("kv_b_proj.weight") and v.features == (8, 64) and v.head_stride == 16
        check_keep_mask(model, opt, inputs, _PINNED)
    # What kv_b_proj computes under the pinned mask: every k_nope_h, and v_h for heads some row
    # keeps (head 1 is kept by none). A pruned head's k_nope would not show in the output.
    flags = _head_linear_flags(opt, inputs, _PINNED, width=64)
    assert flags == [[True, True, True, False, True, True, True, True]] * 2, flags


def _head_linear_flags(opt, inputs, keep, width: int) -> list[list[bool]]:
    """The unit flags each head_linear_out call of the given output width received."""
    from unittest import mock

    real, seen = torch.ops.dhp.head_linear_out, []

    class Spy:
        default = property(lambda self: self)

        def __call__(self, x, weight, bias, flags, unit, in_out):
            if (weight.shape[1] if in_out else weight.shape[0]) == width:
                seen.append(flags.tolist())
            return real(x, weight, bias, flags, unit, in_out)

    opt.set_keep_mask({s.name: keep for s in opt.sites})
    try:
        opt(**inputs)  # any recompile happens here: the graph, not the compiler, must see the spy
        with mock.patch.object(torch.ops.dhp, "head_linear_out", Spy()):
            opt(**inputs)
    finally:
        opt.set_keep_mask(None)
    return seen


def _fused_qkv_model(name: str, attn: str):
    import transformers as T

    if name == "modernbert":
        config = T.ModernBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=64, global_attn_every_n_layers=1,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        model_cls = T.ModernBertModel
    elif name == "phi3":
        config = T.Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, max_position_embeddings=64, **_LM)
        model_cls = T.Phi3Model
    else:
        config = T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 rotary_pct=0.5, max_position_embeddings=64, **_LM)
        model_cls = T.GPTNeoXModel
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config).eval(), {} if name == "modernbert" else {"use_cache": False}


@pytest.mark.parametrize("name,attn", [("modernbert", "sdpa"), ("modernbert", "eager"), ("gpt_neox", "sdpa"),
                                       ("phi3", "sdpa")])
def test_hf_fused_qkv_with_rope_runs_as_a_compact_chain(name, attn, monkeypatch):
    """One projection of q, k and v, then RoPE: ModernBERT's Wqkv holds q's heads, k's, then v's
    (viewed [B, L, 3, -1, D], unbound); GPT-NeoX's query_key_value holds [q_h, k_h, v_h] head by
    head (viewed [B, L, -1, 3 D], chunked; RoPE on half of each head); Phi-3's qkv_proj (GQA)
    holds q's heads, k's, then v's, cut by slices at fixed widths, which become cuts at the
    computed heads' widths. The chain computes the kept heads' rows in that same layout, so the
    graph's own view, split and RoPE run unchanged on them: compact for a shared decision, each row its own heads (forced: these rows are
    short) or the masked dense block for rows apart; a router's outputs and weight gradients
    equal the head ops' (compact_heads=False)."""
    from dhp_fx import compact_block
    from dhp_fx.kernels import row_cost

    model, extra = _fused_qkv_model(name, attn)
    ids, mask = _ids()
    inputs = {"input_ids": ids, "attention_mask": mask, **extra}
    opt = check_gates_open(model, inputs, config=DHPConfig(scoring="static"))
    assert opt._compiler.counters.get("compact_chain") == 2, opt._compiler.counters
    assert all(s.compact_block for s in opt.sites) and len(opt.sites) == 2, opt.report()
    chains = [opt.gate(s).chain_module for s in opt.sites]
    apart = torch.tensor([[True, True, False, False], [False, False, True, True]])  # whole KV groups
    for keep, rows_min, path in ((apart[:1].expand(2, -1).clone(), None, "compact"), (apart, None, "masked"),
                                 (apart, 0.0, "rows")):
        if rows_min is not None:
            monkeypatch.setattr(row_cost, "ROWS_MIN_SAVED_FLOPS_PER_WEIGHT", rows_min)
        before = [(c.calls_compact, c.calls_rows, c.calls_masked) for c in chains]
        check_keep_mask(model, opt, inputs, keep)
        ran = [(c.calls_compact - a, c.calls_rows - b, c.calls_masked - m) for c, (a, b, m) in zip(chains, before)]
        want = {"compact": (1, 0, 0), "rows": (1, 1, 0), "masked": (0, 0, 1)}[path]
        assert ran == [want] * 2, (path, ran)
    assert compact_block.MASKED_DENSE_DEVICES == ("cpu",)
    results = []
    for compact in (True, False):
        opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.25, scoring="router", compact_heads=compact),
                              example_inputs=inputs)
        chains = [opt.gate(s).chain_module for s in opt.sites] if compact else []
        before = [c.calls_rows for c in chains]
        model.zero_grad()
        out = opt(**inputs).last_hidden_state
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None and ("attn." in n or "attention." in n)}))
        assert [c.calls_rows - b for c, b in zip(chains, before)] == [1] * len(chains), opt.report()
    (out_c, grads_c), (out_h, grads_h) = results
    assert_outputs_close(out_c, out_h, what="router chain vs head ops")
    assert grads_c.keys() == grads_h.keys() and any(w in n for w in ("Wqkv", "query_key_value", "qkv_proj") for n in grads_c)
    for n in grads_c:
        assert_outputs_close(grads_c[n], grads_h[n], what=f"grad {n}")


@pytest.mark.parametrize("name,kv_heads", [("llama", 2), ("phi3", 2), ("llama", 1)])
def test_gqa_chain_runs_the_kept_query_heads_over_every_kv_group(name, kv_heads, monkeypatch):
    """GQA with heads decided one by one (prune_kv_groups off), and MQA: where the kept heads
    touch every KV group, no group can be left out, but the chain still runs the kept query heads
    alone: their Q rows and W_o columns gathered (Phi-3: the fused projection's Q rows, then every
    K/V row), every group's K and V. Rows that keep the same heads attend densely; rows apart run the
    masked dense block on CPU (MASKED_DENSE_DEVICES), elsewhere the gated op over the gathered
    heads; a union of every head runs every head. A router's outputs and weight gradients equal
    the head ops'."""
    import transformers as T

    from dhp_fx import compact_block

    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
               intermediate_size=64, max_position_embeddings=64, **_LM)
    config = T.LlamaConfig(**cfg) if name == "llama" else T.Phi3Config(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = (T.LlamaModel if name == "llama" else T.Phi3Model)(config).eval()
    ids, mask = _ids()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    opt = check_gates_open(model, inputs, config=DHPConfig(scoring="static"))
    assert opt._compiler.counters.get("compact_chain") == 2, opt._compiler.counters
    chains = [opt.gate(s).chain_module for s in opt.sites]
    shared = torch.tensor([[True, False, True, False]] * 2)  # heads 0 and 2 (two groups, or the one) in both rows
    apart = torch.tensor([[True, False, False, False], [False, False, True, False]])  # union: 2 heads
    every = torch.tensor([[True, True, False, False], [False, False, True, True]])  # union: every head
    for keep, want, devices in ((shared, (1, 1, 0), ("cpu",)), (apart, (0, 0, 1), ("cpu",)),
                                (apart, (1, 1, 0), ()), (every, (0, 0, 1), ("cpu",))):
        monkeypatch.setattr(compact_block, "MASKED_DENSE_DEVICES", devices)
        before = [(c.calls_compact, c.calls_query_heads, c.calls_masked) for c in chains]
        check_keep_mask(model, opt, inputs, keep)
        ran = [(c.calls_compact - a, c.calls_query_heads - b, c.calls_masked - m)
               for c, (a, b, m) in zip(chains, before)]
        assert ran == [want] * 2, (keep, ran)
    static = dhp_fx.optimize(model, DHPConfig(scoring="static", keep_ratio=0.5), example_inputs=inputs)
    before = [static.gate(s).chain_module.calls_query_heads for s in static.sites]
    with torch.no_grad():
        static(**inputs)
    ran = [static.gate(s).chain_module.calls_query_heads - b for s, b in zip(static.sites, before)]
    assert ran == [1, 1] and "4 of them the kept query heads over every KV group" in static.report(), static.report()
    # rows apart, as on a GPU: the gathered query heads, not each row's own or the masked block
    monkeypatch.setattr(compact_block, "ROWS_DEVICES", ())
    monkeypatch.setattr(compact_block, "MASKED_DENSE_DEVICES", ())
    results = []
    for compact in (True, False):
        routed = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.25, scoring="router", compact_heads=compact),
                                 example_inputs=inputs)
        model.zero_grad()
        out = routed(**inputs).last_hidden_state
        out.square().sum().backward()
        if compact:  # the example call and this one
            assert [routed.gate(s).chain_module.calls_query_heads for s in routed.sites] == [2, 2]
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None and "self_attn." in n}))
    (out_c, grads_c), (out_h, grads_h) = results
    assert_outputs_close(out_c, out_h, what="router: query heads vs head ops")
    assert grads_c.keys() == grads_h.keys() and len(grads_c) >= 4
    for n in grads_c:
        assert_outputs_close(grads_c[n], grads_h[n], what=f"grad {n}")
