"""The matchers on real captured graphs: eager attention styles, HF eager models, fused MHA, GQA.

Each case captures a tiny model with a backend that runs rewrite_attention (gates open) and checks
the sites found against the truth and the rewritten graph's output against the original model.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dhp_fx.kernels  # noqa: F401  (registers dhp::gated_attention)
from dhp_fx.passes import rewrite_attention

B, L, E, H, D = 2, 6, 16, 4, 4


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


_GRAPHS: list = []  # the graphs of the latest capture


def gated_nodes():
    op = torch.ops.dhp.gated_attention.default
    return [n for gm in _GRAPHS for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def capture(model, *args, reference=None, dynamic=False, **kwargs):
    """(PassResult merged over graphs, rewritten graphs' code, original output, rewritten output)."""
    results, codes = [], []
    _GRAPHS.clear()

    def backend(gm, example_inputs):
        results.append(rewrite_attention(gm))
        codes.append(gm.code)
        _GRAPHS.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(*args, **kwargs) if reference is None else reference(*args, **kwargs)
        got = torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    assert results, "nothing was captured"
    merged = results[0]
    for r in results[1:]:
        merged.sites += r.sites
        merged.skipped += r.skipped
    return merged, "\n".join(codes), expected, got


def assert_same(expected, got, atol=1e-5):
    e, g = _flat(expected), _flat(got)
    assert len(e) == len(g) and e
    for a, b in zip(e, g):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-4)


def heads(x):  # [B, L, E] -> [B, H, L, D]
    return x.view(x.shape[0], x.shape[1], H, D).transpose(1, 2)


def merge(o):  # [B, H, L, D] -> [B, L, E]
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], E)


# ---------------------------------------------------------------- hand-written eager styles


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.register_buffer("tril", torch.tril(torch.ones(8, 8)))

    def qkv(self, x):
        return heads(self.q(x)), heads(self.k(x)), heads(self.v(x))


class MatmulDiv(_Attn):
    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores + pad[:, None, None, :]
        return self.o(merge(torch.matmul(F.softmax(scores, dim=-1), v)))


class PrescaledQ(_Attn):
    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        q = q * D**-0.5
        probs = (q @ k.transpose(2, 3)).softmax(dim=-1)
        return self.o(merge(probs @ v))


class Bmm3D(_Attn):
    def forward(self, x, pad):
        q, k, v = (t.reshape(B * H, L, D) for t in self.qkv(x))
        scores = torch.bmm(q, k.transpose(1, 2)) * D**-0.5
        scores = scores + pad[:, None, None, :].expand(B, H, 1, L).reshape(B * H, 1, L)
        probs = F.dropout(torch.softmax(scores, -1), p=0.1, training=self.training)
        return self.o(merge(torch.bmm(probs, v).view(B, H, L, D)))


class Baddbmm(_Attn):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, L, L))

    def forward(self, x, pad):
        q, k, v = (t.reshape(B * H, L, D) for t in self.qkv(x))
        bias = self.bias.repeat(B, 1, 1)
        scores = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=1.0, alpha=D**-0.5)
        return self.o(merge(torch.bmm(scores.softmax(-1), v).view(B, H, L, D)))


class MaskedFillCausal(_Attn):
    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        scores = q @ k.mT
        scores = scores / math.sqrt(D)
        scores = scores.masked_fill(self.tril[:L, :L] == 0, float("-inf"))
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        return self.o(merge(probs @ v))


class WhereMask(_Attn):
    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.5
        scores = torch.where(self.tril[:L, :L].bool(), scores, torch.finfo(scores.dtype).min)
        scores += pad[:, None, None, :]
        return self.o(merge(scores.softmax(-1) @ v))


class InplaceMask(_Attn):
    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        scores = q @ k.transpose(-1, -2)
        scores.mul_(0.5)
        scores.masked_fill_(self.tril[:L, :L] == 0, float("-inf"))
        return self.o(merge(scores.softmax(-1) @ v))


class ViewsHeadMajor(_Attn):
    """Views the product as the [B, H, L, D]-contiguous tensor matmul returns: the gated op lays
    its output out as q is (token-major here), so the rewrite must keep such views valid."""

    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        o = torch.matmul(F.softmax(q @ k.transpose(-1, -2) * 0.5 + pad[:, None, None, :], dim=-1), v)
        o = o.view(B * H, L, D)
        return self.o(o.view(B, H, L, D).transpose(1, 2).reshape(B, L, E))


def _pad():
    pad = torch.zeros(B, L)
    pad[-1, -2:] = float("-inf")
    return pad


@pytest.mark.parametrize(
    "cls,pattern,mask_kind",
    [
        (MatmulDiv, "eager_matmul", "additive"),
        (PrescaledQ, "eager_matmul", "none"),
        (Bmm3D, "eager_bmm", "additive"),
        (Baddbmm, "eager_bmm", "additive"),
        (MaskedFillCausal, "eager_matmul", "additive"),
        (WhereMask, "eager_matmul", "additive"),
        (InplaceMask, "eager_matmul", "additive"),
        (ViewsHeadMajor, "eager_matmul", "additive"),
    ],
    ids=lambda p: p.__name__ if isinstance(p, type) else p,
)
def test_eager_styles(cls, pattern, mask_kind):
    torch.manual_seed(0)
    model = cls().eval()
    result, code, expected, got = capture(model, torch.randn(B, L, E), _pad())
    assert len(result.sites) == 1, (result.sites, result.skipped)
    site = result.sites[0]
    assert (site.pattern, site.num_heads, site.num_kv_heads, site.head_dim) == (pattern, H, H, D)
    assert site.mask_kind == mask_kind
    assert site.scale == pytest.approx(0.5)
    assert (site.q_proj.weight, site.k_proj.weight, site.v_proj.weight) == ("q.weight", "k.weight", "v.weight")
    assert site.q_proj.bias == "q.bias" and site.q_proj.features is None
    assert site.out_proj.weight == "o.weight"
    assert "softmax" not in code and "gated_attention" in code
    assert_same(expected, got)


class TiledKV(_Attn):
    """k/v heads tiled with .repeat (head j reads j % h): not the GQA grouping, so not undone."""

    def __init__(self, interleave: bool):
        super().__init__()
        self.k, self.v = nn.Linear(E, E // 2), nn.Linear(E, E // 2)
        self.interleave = interleave

    def forward(self, x, pad):
        q = heads(self.q(x))
        k, v = (t.view(B, L, H // 2, D).transpose(1, 2) for t in (self.k(x), self.v(x)))
        if self.interleave:
            k, v = k.repeat_interleave(2, dim=1), torch.repeat_interleave(v, 2, dim=1)
        else:
            k, v = k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
        return self.o(merge(F.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v))


@pytest.mark.parametrize("interleave,kv_heads", [(True, H // 2), (False, H)])
def test_repeat_kv_only_undone_when_grouped(interleave, kv_heads):
    torch.manual_seed(0)
    result, code, expected, got = capture(TiledKV(interleave).eval(), torch.randn(B, L, E), _pad())
    (site,) = result.sites
    assert (site.num_heads, site.num_kv_heads) == (H, kv_heads)
    (op,) = gated_nodes()
    assert op.args[1].meta["example_value"].shape[1] == kv_heads
    if interleave:
        assert site.k_proj.weight == "k.weight" and "repeat_interleave" not in code
    assert_same(expected, got)


# ---------------------------------------------------------------- negative cases


class SoftmaxOverQueries(_Attn):
    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        return self.o(merge(F.softmax(q @ k.transpose(-1, -2), dim=-2) @ v))


class ProbsOnRight(_Attn):
    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        probs = F.softmax(q @ k.transpose(-1, -2), dim=-1)  # [B, H, L, L]
        return self.o(merge((v.transpose(-1, -2) @ probs).transpose(-1, -2)))


class NotAttention(nn.Module):
    """matmul → softmax over dim 1 → matmul: a mixing layer, not attention."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, L))
        self.u = nn.Parameter(torch.randn(L, E))

    def forward(self, x, pad):
        return torch.softmax(x @ self.w, dim=1) @ self.u


@pytest.mark.parametrize("cls", [SoftmaxOverQueries, ProbsOnRight, NotAttention], ids=lambda c: c.__name__)
def test_not_rewritten(cls):
    torch.manual_seed(0)
    result, code, expected, got = capture(cls().eval(), torch.randn(B, L, E), _pad())
    assert result.sites == []
    assert "gated_attention" not in code
    if cls is not NotAttention:
        assert len(result.skipped) == 1 and result.skipped[0].pattern == "eager"
    assert_same(expected, got, atol=0)


# ---------------------------------------------------------------- HF eager models


def _ids(pad_first=False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad_first:
        mask[-1, :2] = 0
    else:
        mask[-1, -2:] = 0
    return ids, mask


def _hf(config_cls, model_cls, **cfg):
    config = config_cls(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return model_cls(config).eval()


def test_hf_bert_eager():
    from transformers import BertConfig, BertModel

    model = _hf(BertConfig, BertModel, vocab_size=64, hidden_size=E, num_hidden_layers=2, num_attention_heads=H,
                intermediate_size=32, max_position_embeddings=16)
    ids, mask = _ids()
    result, _, expected, got = capture(model, input_ids=ids, attention_mask=mask)
    assert [s.name for s in result.sites] == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    for i, s in enumerate(result.sites):
        assert (s.pattern, s.num_heads, s.num_kv_heads, s.head_dim, s.mask_kind) == ("eager_matmul", H, H, D, "additive")
        assert s.scale == pytest.approx(0.5)
        prefix = f"encoder.layer.{i}.attention"
        assert s.q_proj.weight == f"{prefix}.self.query.weight" and s.v_proj.bias == f"{prefix}.self.value.bias"
        assert s.out_proj.weight == f"{prefix}.output.dense.weight"
    assert_same(expected, got)


def test_hf_bert_output_attentions_is_skipped():
    from transformers import BertConfig, BertModel

    model = _hf(BertConfig, BertModel, vocab_size=64, hidden_size=E, num_hidden_layers=1, num_attention_heads=H,
                intermediate_size=32, max_position_embeddings=16)
    ids, mask = _ids()
    result, code, expected, got = capture(model, input_ids=ids, attention_mask=mask, output_attentions=True)
    assert result.sites == [] and "gated_attention" not in code
    (skip,) = result.skipped
    assert skip.module_path == "encoder.layer.0.attention.self" and "probabilities" in skip.reason
    assert_same(expected, got, atol=0)


def test_hf_gpt2_eager_fused_qkv():
    from transformers import GPT2Config, GPT2Model

    model = _hf(GPT2Config, GPT2Model, vocab_size=64, n_embd=E, n_layer=1, n_head=H, n_positions=16,
                bos_token_id=0, eos_token_id=0)
    ids, mask = _ids()
    result, _, expected, got = capture(model, input_ids=ids, attention_mask=mask)
    (s,) = result.sites
    assert (s.name, s.pattern, s.num_heads, s.head_dim, s.mask_kind) == ("h.0.attn", "eager_matmul", H, D, "additive")
    for i, ref in enumerate((s.q_proj, s.k_proj, s.v_proj)):
        assert (ref.weight, ref.bias, ref.layout, ref.features) == (
            "h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "in_out", (i * E, (i + 1) * E))
    assert (s.out_proj.weight, s.out_proj.layout) == ("h.0.attn.c_proj.weight", "in_out")
    assert_same(expected, got)


def test_hf_llama_gqa_eager_with_padding():
    from transformers import LlamaConfig, LlamaModel

    model = _hf(LlamaConfig, LlamaModel, vocab_size=64, hidden_size=E, num_hidden_layers=1, num_attention_heads=H,
                num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16)
    ids, mask = _ids(pad_first=True)
    result, code, expected, got = capture(model, input_ids=ids, attention_mask=mask)
    (s,) = result.sites
    assert (s.pattern, s.num_heads, s.num_kv_heads, s.head_dim, s.mask_kind) == ("eager_matmul", H, 2, D, "additive")
    p = "layers.0.self_attn"
    assert (s.q_proj.weight, s.k_proj.weight, s.v_proj.weight, s.out_proj.weight) == (
        f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.v_proj.weight", f"{p}.o_proj.weight")
    (op,) = gated_nodes()  # the op reads the un-repeated kv heads
    assert op.args[1].meta["example_value"].shape[1] == 2 and op.args[2].meta["example_value"].shape[1] == 2
    assert_same(expected, got)


def test_hf_t5_eager_bias_as_mask_and_cross_attention():
    from transformers import T5Config, T5Model

    model = _hf(T5Config, T5Model, vocab_size=64, d_model=E, d_kv=D, d_ff=32, num_layers=1, num_decoder_layers=1,
                num_heads=H, decoder_start_token_id=0)
    ids, mask = _ids()
    dec = ids[:, :4]
    result, _, expected, got = capture(model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    names = {s.name: s for s in result.sites}
    assert set(names) == {
        "encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.0.SelfAttention",
        "decoder.block.0.layer.1.EncDecAttention"}
    for name, s in names.items():
        assert (s.num_heads, s.head_dim, s.scale, s.mask_kind) == (H, D, 1.0, "additive")
        assert s.cross_attention == ("EncDec" in name)
        assert s.k_proj.weight == f"{name}.k.weight" and s.out_proj.weight == f"{name}.o.weight"
    assert_same(expected, got)


# ---------------------------------------------------------------- fused nn.MultiheadAttention paths


def _padding_mask():
    return torch.tensor([[False] * 5, [False] * 3 + [True] * 2])


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_transformer_encoder_layer_fast_path(norm_first, padded):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, batch_first=True, norm_first=norm_first,
                                       activation="gelu" if norm_first else "relu").eval()
    x = torch.randn(B, 5, E)
    kwargs = {"src_key_padding_mask": _padding_mask()} if padded else {}
    result, code, expected, got = capture(layer, x, **kwargs)
    assert result.counters.get("decompose_fused_mha") == 1 and "_transformer_encoder_layer_fwd" not in code
    (s,) = result.sites
    assert (s.name, s.module_type, s.pattern, s.num_heads, s.head_dim) == ("self_attn", "MultiheadAttention", "sdpa", H, D)
    assert s.mask_kind == ("bool" if padded else "none")
    for i, ref in enumerate((s.q_proj, s.k_proj, s.v_proj)):
        assert (ref.weight, ref.bias, ref.features) == (
            "self_attn.in_proj_weight", "self_attn.in_proj_bias", (i * E, (i + 1) * E))
    assert s.out_proj.weight == "self_attn.out_proj.weight"
    assert_same(expected, got)  # against the eager module, which itself runs the fast path


def test_transformer_encoder_padded_rows():
    """The eager encoder runs on a nested tensor and zeroes padded rows; the captured graph has
    no nested conversion, so only the real tokens are compared with eager, and the whole
    output with the captured graph left as it was."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, batch_first=True), 2).eval()
    x, pad = torch.randn(B, 5, E), _padding_mask()
    result, _, expected, got = capture(enc, x, src_key_padding_mask=pad)
    assert [s.name for s in result.sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    torch.testing.assert_close(got[~pad], expected[~pad], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
    with torch.no_grad():
        plain = torch.compile(enc, backend="eager")(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-4)


class NativeMHA(nn.Module):
    """Calls the MHA fast-path kernel directly (Dynamo rarely reaches it through the module)."""

    def __init__(self, mask, mask_type):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.register_buffer("mask", mask)
        self.mask_type = mask_type

    def forward(self, x):
        a = self.attn
        mask = None if self.mask_type is None else self.mask
        out, _ = torch._native_multi_head_attention(
            x, x, x, E, H, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias, mask, False, True,
            self.mask_type)
        return out


def _native_masks():
    g = torch.Generator().manual_seed(1)
    kpm = _padding_mask()
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    rand = torch.rand(B, H, 5, 5, generator=g) < 0.3
    rand[..., 0] = False  # no fully masked row
    return [
        ("none", torch.zeros(1), None),
        ("kpm_bool", kpm, 1),
        ("kpm_float", torch.zeros(B, 5).masked_fill(kpm, -5.0), 1),  # non-zero = ignored
        ("causal_bool", causal, 0),
        ("causal_float", torch.zeros(5, 5).masked_fill(causal, float("-inf")), 0),
        ("full_bool", rand, 2),
    ]


@pytest.mark.parametrize("name,mask,mask_type", _native_masks(), ids=[m[0] for m in _native_masks()])
def test_native_multi_head_attention(name, mask, mask_type):
    torch.manual_seed(0)
    model = NativeMHA(mask, mask_type).eval()
    result, code, expected, got = capture(model, torch.randn(B, 5, E))
    assert "_native_multi_head_attention" not in code
    (s,) = result.sites
    assert (s.pattern, s.num_heads, s.head_dim) == ("sdpa", H, D)
    assert s.q_proj.features == (0, E) and s.v_proj.features == (2 * E, 3 * E)
    assert_same(expected, got)


class MHAWrapper(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, **kw)

    def forward(self, x, y=None, key_padding_mask=None, attn_mask=None, need_weights=False, is_causal=False):
        y = x if y is None else y
        out, weights = self.mha(x, y, y, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                need_weights=need_weights, is_causal=is_causal)
        return out if weights is None or not need_weights else (out, weights)


@pytest.mark.parametrize(
    "case", ["self", "bool_masks", "float_masks", "causal", "cross", "cross_kdim", "weights_ignored"])
def test_standalone_multihead_attention(case):
    torch.manual_seed(0)
    model = MHAWrapper(**({"kdim": 8, "vdim": 8} if case == "cross_kdim" else {})).eval()
    x = torch.randn(B, 5, E)
    args, kwargs = (x,), {}
    if case == "bool_masks":  # True = ignore, merged with the padding mask
        attn_mask = torch.rand(B * H, 5, 5, generator=torch.Generator().manual_seed(1)) < 0.3
        attn_mask[..., 0] = False
        kwargs = {"key_padding_mask": _padding_mask(), "attn_mask": attn_mask}
    elif case == "float_masks":
        kwargs = {"key_padding_mask": torch.zeros(B, 5).masked_fill(_padding_mask(), -2.0),
                  "attn_mask": torch.randn(5, 5)}
    elif case == "causal":
        kwargs = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True}
    elif case == "cross":
        args = (x, torch.randn(B, 3, E))
    elif case == "cross_kdim":
        args = (x, torch.randn(B, 3, 8))
    if case == "weights_ignored":
        model = _FirstOutput(model)
    result, code, expected, got = capture(model, *args, **kwargs)
    (s,) = result.sites
    prefix = "mha" if case != "weights_ignored" else "inner.mha"
    assert (s.name, s.module_type, s.num_heads, s.head_dim) == (prefix, "MultiheadAttention", H, D)
    assert s.cross_attention == case.startswith("cross")
    assert s.mask_kind == ("additive" if case.endswith("masks") else "none")
    assert s.is_causal == (case == "causal")
    if case == "cross_kdim":
        assert (s.q_proj.weight, s.k_proj.weight) == (f"{prefix}.q_proj_weight", f"{prefix}.k_proj_weight")
        assert s.k_proj.features is None and s.k_proj.bias == f"{prefix}.in_proj_bias"
    else:
        assert (s.k_proj.weight, s.k_proj.features) == (f"{prefix}.in_proj_weight", (E, 2 * E))
    assert s.out_proj.weight == f"{prefix}.out_proj.weight"
    assert_same(expected, got)


class _FirstOutput(nn.Module):
    """need_weights=True, but the weights are dropped: the decomposition still applies."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x, need_weights=True)[0]


def test_multihead_attention_weights_used_is_skipped():
    torch.manual_seed(0)
    model = MHAWrapper().eval()
    result, code, expected, got = capture(model, torch.randn(B, 5, E), need_weights=True)
    assert result.sites == [] and "multi_head_attention_forward" in code
    (skip,) = result.skipped
    assert (skip.module_path, skip.pattern) == ("mha", "mha_fused") and "weights" in skip.reason
    assert_same(expected, got, atol=0)


class Einsum(_Attn):
    def forward(self, x, pad):
        q, k, v = self.qkv(x)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5 + pad[:, None, None, :]
        return self.o(merge(torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)))


class RepeatKV(_Attn):
    """HF repeat_kv written out, with batch and length read from the input (dynamic shapes)."""

    def __init__(self):
        super().__init__()
        self.k, self.v = nn.Linear(E, E // 2), nn.Linear(E, E // 2)

    def forward(self, x, pad):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, D).transpose(1, 2)
        k, v = (t.view(b, n, H // 2, D).transpose(1, 2) for t in (self.k(x), self.v(x)))
        k, v = (t[:, :, None, :, :].expand(b, H // 2, 2, n, D).reshape(b, H, n, D) for t in (k, v))
        scores = q @ k.transpose(-1, -2) * 0.5 + pad[:, None, None, :n]
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, E))


class FairseqBmm(_Attn):
    """Sequence-first heads folding: [L, B, E] -> view(L, B*H, D) -> transpose(0, 1)."""

    def forward(self, x, pad):
        x = x.transpose(0, 1)
        q, k, v = (p(x).contiguous().view(L, B * H, D).transpose(0, 1) for p in (self.q, self.k, self.v))
        probs = torch.softmax(torch.bmm(q * 0.5, k.transpose(1, 2)), dim=-1)
        out = torch.bmm(probs, v).transpose(0, 1).contiguous().view(L, B, E)
        return self.o(out).transpose(0, 1)


class MultiQueryExpand(_Attn):
    """One kv head broadcast to all query heads with expand."""

    def __init__(self):
        super().__init__()
        self.k, self.v = nn.Linear(E, D), nn.Linear(E, D)

    def forward(self, x, pad):
        q = heads(self.q(x))
        k, v = (t.view(B, L, 1, D).transpose(1, 2).expand(B, H, L, D) for t in (self.k(x), self.v(x)))
        return self.o(merge(F.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("cls,kv_heads", [(Einsum, H), (RepeatKV, H // 2), (MaskedFillCausal, H), (FairseqBmm, H),
                                          (MultiQueryExpand, 1)],
                         ids=lambda p: p.__name__ if isinstance(p, type) else str(p))
def test_more_styles_and_dynamic_shapes(cls, kv_heads, dynamic):
    torch.manual_seed(0)
    result, _, expected, got = capture(cls().eval(), torch.randn(B, L, E), _pad(), dynamic=dynamic)
    (s,) = result.sites
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.scale) == (H, kv_heads, D, pytest.approx(0.5))
    assert (s.q_proj.weight, s.k_proj.weight, s.out_proj.weight) == ("q.weight", "k.weight", "o.weight")
    assert_same(expected, got)


def test_training_dropout_is_kept():
    torch.manual_seed(0)
    result, _, _, got = capture(Bmm3D().train(), torch.randn(B, L, E), _pad())
    (s,) = result.sites
    assert s.dropout_p == pytest.approx(0.1) and torch.isfinite(got).all()
