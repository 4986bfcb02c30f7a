"""Projection skipping (passes/skip_projections.py): exact against the same rewrite without it.

Each case compiles a model twice with the same pinned keep masks, once with
``rewrite_attention(..., skip_projections=True)`` and once without, and compares outputs (and,
where it says so, gradients). The head ops must appear where their preconditions hold and
nowhere else.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import dhp_fx.kernels  # noqa: F401  (registers the dhp ops)
from dhp_fx.passes import rewrite_attention
from dhp_fx.testing import AttentionSpec, assert_outputs_close, attention_specs, build_attention

# By name: op overload objects can be re-created (a transformers import does), so `is` may fail.
HEAD_OUT = "dhp.head_linear_out.default"
HEAD_IN = "dhp.head_linear_in.default"


class PinnedGate(nn.Module):
    """A fixed keep mask; with reads_qkv False it promises to look at ``hidden`` only."""

    def __init__(self, keep: torch.Tensor, reads_qkv: bool = False):
        super().__init__()
        self.keep = keep.tolist()  # Python data: AOT tracing bakes it in as a constant
        self.reads_qkv = reads_qkv

    def forward(self, q, k, v, attn_mask=None, hidden=None):
        if not self.reads_qkv:
            assert hidden is not None
        return torch.tensor(self.keep, dtype=torch.bool, device=hidden.device)


def masks_for(batch: int, seed: int = 0, mode: str = "random"):
    """Deterministic per site name, so two compiles of one model see the same masks."""

    def make(site) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(site.name.encode()) + seed)
        H, group = site.num_heads, site.num_heads // site.num_kv_heads
        if mode == "open":
            return torch.ones(batch, H, dtype=torch.bool)
        keep = torch.rand(batch, H, generator=g) < 0.6
        keep[:, 0] = False  # head 0 pruned everywhere: its projection rows really are skipped
        if mode == "group":  # a whole KV group pruned in every row: K/V rows skipped too
            keep[:, :group] = False
        if batch > 1:
            keep[-1] = False  # a row with no head at all
        return keep

    return make


class Run:
    def __init__(self, out, graphs):
        self.out, self.graphs = out, graphs
        self.sites = [s for _, r in graphs for s in r.sites]
        self.counters: dict[str, int] = {}
        for _, r in graphs:
            for k, v in r.counters.items():
                self.counters[k] = self.counters.get(k, 0) + v

    def count(self, target) -> int:
        return sum(n.op == "call_function" and str(n.target) == target for gm, _ in self.graphs for n in gm.graph.nodes)


def compile_run(model, inputs, make_mask, skip, reads_qkv=False, dynamic=False, grad=False, downstream=None):
    graphs = []

    def backend(gm, example_inputs):
        result = rewrite_attention(gm, lambda site: PinnedGate(make_mask(site), reads_qkv), skip_projections=skip)
        graphs.append((gm, result))
        if downstream == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.set_grad_enabled(grad):
        out = compiled(**inputs)
    return Run(out, graphs)


def compare(model, inputs, make_mask, reads_qkv=False, dynamic=False, atol=2e-5, **kw) -> Run:
    base = compile_run(model, inputs, make_mask, False, reads_qkv, dynamic, **kw)
    fast = compile_run(model, inputs, make_mask, True, reads_qkv, dynamic, **kw)
    assert fast.sites and len(fast.sites) == len(base.sites)
    assert_outputs_close(fast.out, base.out, atol=atol, rtol=1e-4, what="skip_projections output")
    assert base.count(HEAD_OUT) == base.count(HEAD_IN) == 0
    return fast


def expect(run: Run, per_site: tuple, out_ops: int, in_ops: int) -> None:
    assert [s.skipped_projections for s in run.sites] == [per_site] * len(run.sites)
    assert run.count(HEAD_OUT) == out_ops and run.count(HEAD_IN) == in_ops


# ---------------------------------------------------------------- hand-written attention


@pytest.mark.parametrize("style,kv_heads,seq_k,mask_kind", [
    ("sdpa", 4, 5, "bool"),
    ("sdpa_gqa", 2, 5, "none"),
    ("eager", 2, 5, "additive"),  # repeat_kv GQA
    ("eager_div", 4, 7, "bool"),  # cross-attention: k/v read the context
    ("bmm", 4, 5, "none"),  # heads folded into the batch
])
@pytest.mark.parametrize("mode", ["group", "open"])
def test_spec_attention(style, kv_heads, seq_k, mask_kind, mode):
    spec = AttentionSpec(style=style, batch=3, heads=4, kv_heads=kv_heads, seq_q=5, seq_k=seq_k, mask_kind=mask_kind)
    module, inputs = build_attention(spec)
    run = compare(module, inputs, masks_for(spec.batch, mode=mode))
    expect(run, ("q", "k", "v", "out"), 3, 1)
    assert run.counters["skip_q_proj"] == run.counters["skip_kv_proj"] == run.counters["skip_out_proj"] == 1


def test_spec_attention_dynamic_shapes_and_aot_eager():
    spec = AttentionSpec(style="sdpa_gqa", batch=2, heads=4, kv_heads=2, mask_kind="bool")
    module, inputs = build_attention(spec)
    run = compare(module, inputs, masks_for(spec.batch, mode="group"), dynamic=True, downstream="aot_eager")
    expect(run, ("q", "k", "v", "out"), 3, 1)


def test_gradients_flow_and_pruned_rows_get_none():
    spec = AttentionSpec(style="sdpa", batch=2, heads=4, kv_heads=4, mask_kind="bool")
    grads = {}
    for skip in (False, True):
        module, inputs = build_attention(spec)
        run = compile_run(module, inputs, masks_for(spec.batch), skip, grad=True)
        run.out.square().sum().backward()
        grads[skip] = {n: p.grad.clone() for n, p in module.named_parameters()}
    assert run.count(HEAD_OUT) == 3 and run.count(HEAD_IN) == 1
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-4, msg=name)
    wq = grads[True]["q_proj.weight"].view(spec.heads, spec.head_dim, -1)
    assert (wq[0] == 0).all() and (wq[1:].abs().sum() > 0)  # head 0 is pruned in every row


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(attention_specs(max_batch=3, max_heads=6, max_seq=6, head_dims=(4, 8)))
def test_any_spec_and_keep_mask(spec):
    module, inputs = build_attention(spec)
    keep = spec.keep_tensor()
    run = compare(module, inputs, lambda site: keep)
    assert run.counters.get("skip_out_proj") == 1 and run.count(HEAD_IN) == 1
    assert run.counters.get("skip_q_proj") == 1  # every spec style decides before q exists


class FusedConv1D(nn.Module):
    """GPT-2's layout: one Conv1D for q, k and v (weights [in, out]), split on the last dim."""

    def __init__(self, E=16, H=4):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.H, self.c_attn, self.c_proj = H, Conv1D(3 * E, E), Conv1D(E, E)

    def forward(self, x):
        B, L, E = x.shape
        q, k, v = (t.view(B, L, self.H, E // self.H).transpose(1, 2) for t in self.c_attn(x).split(E, dim=2))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(o.transpose(1, 2).reshape(B, L, E))


@pytest.mark.parametrize("dynamic", [False, True])
def test_fused_conv1d(dynamic):
    torch.manual_seed(0)
    run = compare(FusedConv1D().eval(), {"x": torch.randn(2, 5, 16)}, masks_for(2), dynamic=dynamic)
    expect(run, ("q", "k", "v", "out"), 1, 1)


class FusedPerHead(nn.Module):
    """GPT-NeoX's layout: one linear whose features are [q_h, k_h, v_h] for each head h, viewed as
    [B, L, H, 3·D] and chunked on the last dim. ``leak_k`` also returns k (a KV cache would)."""

    def __init__(self, E=16, H=4, leak_k=False):
        super().__init__()
        self.H, self.D, self.leak_k = H, E // H, leak_k
        self.qkv, self.dense = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        B, L, E = x.shape
        q, k, v = self.qkv(x).view(B, L, -1, 3 * self.D).transpose(1, 2).chunk(3, dim=-1)
        o = self.dense(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, E))
        return (o, k) if self.leak_k else o


def test_per_head_interleaved_fused_qkv_skips_each_heads_three_blocks():
    grads = {}
    for skip in (False, True):
        torch.manual_seed(0)
        module, x = FusedPerHead().eval(), torch.randn(2, 5, 16)
        keep = torch.tensor([[False, True, True, False], [False, True, False, True]])
        run = compile_run(module, {"x": x}, lambda site: keep, skip, grad=True)
        run.out.square().sum().backward()
        grads[skip] = {n: p.grad.clone() for n, p in module.named_parameters()}
    expect(run, ("q", "k", "v", "out"), 1, 1)
    site = run.sites[0]
    assert (site.q_proj.features, site.k_proj.features, site.v_proj.features) == ((0, 40), (4, 44), (8, 48))
    assert site.q_proj.head_stride == site.v_proj.head_stride == 12
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-4, msg=name)
    w = grads[True]["qkv.weight"].view(4, 3, 4, -1)  # head, role, feature, input
    assert (w[0] == 0).all() and (w[1:].abs().sum((1, 2, 3)) > 0).all()  # head 0: q, k and v rows skipped


def test_per_head_interleaved_fused_qkv_with_k_used_elsewhere_keeps_the_projection():
    torch.manual_seed(0)
    run = compare(FusedPerHead(leak_k=True).eval(), {"x": torch.randn(2, 5, 16)}, masks_for(2))
    expect(run, ("out",), 0, 1)  # q alone does not tile a head's block of the fused features
    assert run.counters["no_skip_k_proj:used_elsewhere"] == 1
    assert run.counters["no_skip_q_proj:fused_layout"] == 1


def test_sequence_first_hidden_keeps_qkv_projections():
    """nn.MultiheadAttention projects [L, B, E]: a gate reading the batch size off hidden's dim 0
    would get L, so the gate stays where it is."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"tgt": torch.randn(2, 5, 16, generator=g), "memory": torch.randn(2, 6, 16, generator=g)}
    run = compare(layer, inputs, masks_for(2))
    expect(run, ("out",), 0, 2)
    assert run.counters["no_skip_qkv_proj:batch_not_leading"] == 2


# ---------------------------------------------------------------- preconditions


class _Attn(nn.Module):
    def __init__(self, E=16, H=4):
        super().__init__()
        self.H, self.D = H, E // H
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def heads(self, t):
        return t.view(t.shape[0], t.shape[1], self.H, self.D).transpose(1, 2)

    def merge(self, o):
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


class QUsedElsewhere(_Attn):
    def forward(self, x, pad):
        q_lin = self.q(x)
        q, k, v = self.heads(q_lin), self.heads(self.k(x)), self.heads(self.v(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
        return self.o(self.merge(o)) + q_lin.mean()


class DimMajor(_Attn):
    """Heads are the inner digit of the features on both sides: widths match, layouts do not."""

    def forward(self, x, pad):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.D, self.H).permute(0, 3, 1, 2)
        k, v = self.heads(self.k(x)), self.heads(self.v(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
        return self.o(o.permute(0, 2, 3, 1).reshape(B, L, -1))


class MaskFromV(_Attn):
    """The mask needs the v projection, which comes after q and k: the gate cannot move up."""

    def forward(self, x, pad):
        q, k = self.heads(self.q(x)), self.heads(self.k(x))
        v_lin = self.v(x)
        mask = pad + (v_lin.mean(-1) > 100)[:, None, None, :] * -1e9
        o = F.scaled_dot_product_attention(q, k, self.heads(v_lin), attn_mask=mask)
        return self.o(self.merge(o))


class MaskAfterQ(_Attn):
    """The mask is built after the q projection in code order, from inputs only: it is hoisted."""

    def forward(self, x, pad):
        q = self.heads(self.q(x))
        mask = pad.clamp(min=-1e4) * 2.0
        k, v = self.heads(self.k(x)), self.heads(self.v(x))
        return self.o(self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class PastConcat(_Attn):
    """A decoding step: K/V are the past rows (inputs) and this step's, concatenated along the
    sequence, where only this step's rows come from the projections."""

    def __init__(self, returns_kv=False):
        super().__init__()
        self.returns_kv = returns_kv

    def forward(self, x, past_k, past_v):
        q = self.heads(self.q(x))
        k = torch.cat([past_k, self.heads(self.k(x))], dim=2)
        v = torch.cat([past_v, self.heads(self.v(x))], dim=2)
        out = self.o(self.merge(F.scaled_dot_product_attention(q, k, v)))
        return (out, k, v) if self.returns_kv else out


class PastHeads(_Attn):
    """K/V heads from an input put before the projected ones: two of the six heads the q
    projection computes attend over heads no projection computed."""

    def __init__(self, E=16, H=4, extra=2):
        super().__init__(E, H)
        self.q, self.o = nn.Linear(E, (H + extra) * self.D), nn.Linear((H + extra) * self.D, E)

    def forward(self, x, past_k, past_v):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, -1, self.D).transpose(1, 2)
        k = torch.cat([past_k, self.heads(self.k(x))], dim=1)
        v = torch.cat([past_v, self.heads(self.v(x))], dim=1)
        return self.o(self.merge(F.scaled_dot_product_attention(q, k, v)))


def _past_inputs(past_shape, batch=2, L=1, E=16):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(batch, L, E, generator=g), "past_k": torch.randn(batch, *past_shape, generator=g),
            "past_v": torch.randn(batch, *past_shape, generator=g)}


@pytest.mark.parametrize("returns_kv", [False, True])
def test_kv_after_past_rows_along_the_sequence_are_found_and_skipped_unless_returned(returns_kv):
    run = compare(_build(lambda: PastConcat(returns_kv)), _past_inputs((4, 5, 4)), masks_for(2))
    if returns_kv:  # the caller's cache reads every head's new rows
        expect(run, ("q", "out"), 1, 1)
        assert run.counters["no_skip_k_proj:used_elsewhere"] == run.counters["no_skip_v_proj:used_elsewhere"] == 1
    else:  # pruned heads' new K/V rows are never read: their projection rows are skipped
        expect(run, ("q", "k", "v", "out"), 3, 1)


def test_past_heads_put_before_the_projected_ones_keep_the_kv_projections():
    run = compare(_build(PastHeads), _past_inputs((2, 1, 4)), masks_for(2))
    expect(run, ("q", "out"), 1, 1)


def _pad_inputs(batch=2, L=6, E=16):
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(batch, 1, 1, L)
    pad[-1, ..., -2:] = float("-inf")
    return {"x": torch.randn(batch, L, E, generator=g), "pad": pad}


def _build(cls):
    torch.manual_seed(0)
    return cls().eval()


def test_q_used_elsewhere_keeps_its_projection():
    run = compare(_build(QUsedElsewhere), _pad_inputs(), masks_for(2))
    expect(run, ("k", "v", "out"), 2, 1)
    assert run.counters["no_skip_q_proj:used_elsewhere"] == 1


def test_gate_reading_q_only_skips_the_output_projection():
    run = compare(_build(MaskAfterQ), _pad_inputs(), masks_for(2), reads_qkv=True)
    expect(run, ("out",), 0, 1)
    assert run.counters["no_skip_qkv_proj:gate_reads_qkv"] == 1


def test_dim_major_head_layout_is_refused():
    run = compare(_build(DimMajor), _pad_inputs(), masks_for(2))
    expect(run, ("k", "v"), 2, 0)
    assert run.counters["no_skip_q_proj:layout"] == 1 and run.counters["no_skip_out_proj:layout"] == 1


def test_mask_needing_a_later_projection():
    run = compare(_build(MaskFromV), _pad_inputs(), masks_for(2))
    expect(run, ("out",), 0, 1)
    assert run.counters["no_skip_q_proj:mask_after_projection"] == 1
    assert run.counters["no_skip_v_proj:used_elsewhere"] == 1


def test_mask_built_after_q_is_hoisted():
    run = compare(_build(MaskAfterQ), _pad_inputs(), masks_for(2))
    expect(run, ("q", "k", "v", "out"), 3, 1)


# ---------------------------------------------------------------- HF models


def _ids(batch=2, seq=7, vocab=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -2:] = 0
    return ids, mask


def _hf(config_cls, model_cls, attn, **cfg):
    config = config_cls(**cfg)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_bert(attn):
    from transformers import BertConfig, BertModel

    model = _hf(BertConfig, BertModel, attn, vocab_size=64, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    ids, mask = _ids()
    run = compare(model, {"input_ids": ids, "attention_mask": mask}, masks_for(2))
    expect(run, ("q", "k", "v", "out"), 6, 2)
    # Per-sample projections read the gate's own [B, H] mask: the [H] union the pass builds for
    # other layouts must not be left behind, a kernel per layer and call with no reader.
    dead = [n for gm, _ in run.graphs for n in gm.graph.nodes
            if n.op == "call_method" and n.target in ("any", "unflatten") and not n.users]
    assert not dead, dead


def test_hf_llama_gqa_rope():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _hf(LlamaConfig, LlamaForCausalLM, "sdpa", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    ids, mask = _ids()
    run = compare(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, masks_for(2, mode="group"))
    expect(run, ("q", "k", "v", "out"), 6, 2)
    # With a cache, k/v are returned to the caller: zeroed rows would leak into it.
    run = compare(model, {"input_ids": ids, "attention_mask": mask}, masks_for(2, mode="group"))
    expect(run, ("q", "out"), 2, 2)
    assert run.counters["no_skip_k_proj:used_elsewhere"] == 2


def test_hf_gpt2_fused_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _hf(GPT2Config, GPT2LMHeadModel, "eager", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ids, mask = _ids()
    run = compare(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, masks_for(2))
    expect(run, ("q", "k", "v", "out"), 2, 2)  # one fused c_attn per layer
    run = compare(model, {"input_ids": ids, "attention_mask": mask}, masks_for(2))
    expect(run, ("q", "out"), 2, 2)  # only q's rows of c_attn skipped


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_hf_cross_attention(arch):
    from transformers import BartConfig, BartModel, T5Config, T5Model

    if arch == "t5":
        model = _hf(T5Config, T5Model, "eager", vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                    num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)
    else:
        model = _hf(BartConfig, BartModel, "sdpa", vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=64)
    ids, mask = _ids()
    dec, _ = _ids(seq=5)
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "use_cache": False}
    run = compare(model, inputs, masks_for(2))
    cross = [s for s in run.sites if s.cross_attention]
    assert len(run.sites) == 3 and len(cross) == 1
    expect(run, ("q", "k", "v", "out"), 9, 3)
