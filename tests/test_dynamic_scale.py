"""dynamic=True: Dynamo lifts float attributes (HF's ``self.scaling``) to graph inputs, so the scale
is a run-time SymFloat (``.item()`` of a 0-dim input). Sites must still be rewritten, with the op
handed that run-time value; scales computed from tensor data stay skipped."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dhp_fx
from dhp_fx import DHPConfig
from dhp_fx.passes import rewrite_attention
from dhp_fx.testing import assert_outputs_close, check_gates_open, check_keep_mask

from zoo import _ids, hf_entries

DYNAMIC = DHPConfig(dynamic=True, compiler="eager")
HF = {e.name: e for attn in ("sdpa", "eager") for e in hf_entries(attn) if e.name.split("-")[0] in ("gpt2", "bert")}


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def _scaling_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "scaling", None), float)]


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_sites_rewritten_with_runtime_scale(name):
    entry = HF[name]
    model, inputs = entry.build(), entry.inputs()
    optimized = check_gates_open(model, inputs, DYNAMIC, atol=1e-5, expect_sites=entry.sites)
    assert not optimized.skipped, optimized.skipped
    for site in optimized.sites:
        assert site.scale == pytest.approx(1 / math.sqrt(entry.head_dim))  # the value at capture

    keep = torch.rand(entry.batch, entry.heads, generator=torch.Generator().manual_seed(3)) < 0.5
    keep[0, 0] = True
    keep[-1] = False
    check_keep_mask(model, optimized, inputs, keep, atol=1e-5)

    # Another batch size and length: the dynamic graph is reused, not recompiled.
    graphs = optimized.graphs_compiled
    ids, mask = _ids(batch=3, seq=11)
    longer = {"input_ids": ids, "attention_mask": mask}
    assert_outputs_close(_call(optimized, longer), _call(model, longer), atol=1e-5, what=f"{name} at length 11")
    assert optimized.graphs_compiled == graphs


def test_hf_runtime_scale_change_is_honoured():
    """The op reads the scale at run time: changing ``self.scaling`` after capture is followed."""
    entry = HF["gpt2-eager"]
    model, inputs = entry.build(), entry.inputs()
    optimized = dhp_fx.optimize(model, DYNAMIC, example_inputs=inputs)
    assert len(optimized.sites) == entry.sites
    graphs = optimized.graphs_compiled
    for module in _scaling_modules(model):
        module.scaling = 0.9
    assert len(_scaling_modules(model)) == entry.sites
    assert_outputs_close(_call(optimized, inputs), _call(model, inputs), atol=1e-5, what="after scaling change")
    # No guard on the float, so no recompile: the same rewritten graph followed the new value.
    assert optimized.graphs_compiled == graphs


def test_hf_runtime_scale_aot_eager():
    entry = HF["bert-eager"]
    model, inputs = entry.build(), entry.inputs()
    config = DHPConfig(dynamic=True, compiler="aot_eager")
    optimized = check_gates_open(model, inputs, config, atol=1e-5, expect_sites=entry.sites)
    graphs = optimized.graphs_compiled
    ids, mask = _ids(batch=3, seq=9)
    longer = {"input_ids": ids, "attention_mask": mask}
    assert_outputs_close(_call(optimized, longer), _call(model, longer), atol=1e-5, what="aot_eager at length 9")
    # AOT specializes the op's float scale (a guard on self.scaling), not the sequence length.
    assert optimized.graphs_compiled == graphs


# ---------------------------------------------------------------------------- matcher cases
B, L, E, H, D = 2, 6, 16, 4, 4


class ScaledAttention(nn.Module):
    """Attention scaled by float attributes, in several styles."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.qkv = nn.Linear(E, 3 * E)
        self.o = nn.Linear(E, E)
        self.temperature = 2.0
        self.scaling = 0.3

    def forward(self, x, bias):
        q, k, v = (t.view(x.shape[0], x.shape[1], H, D).transpose(1, 2) for t in self.qkv(x).split(E, dim=-1))
        if self.style == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
        else:
            if self.style == "div":  # constant and run-time factors mixed, division included
                s = (q @ k.transpose(-1, -2)) * D ** -0.5 / self.temperature + bias
            elif self.style == "mask_then_scale":
                s = (q @ k.transpose(-1, -2) + bias) * self.scaling
            elif self.style == "data":
                s = (q @ k.transpose(-1, -2)) * q.detach().abs().amax().item() + bias
            else:
                raise ValueError(self.style)
            out = s.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], E))


def _inputs(batch=B, length=L):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, length, E, generator=g), torch.randn(1, H, length, length, generator=g)


def _capture(model):
    results = []

    def backend(gm, example_inputs):
        results.append(rewrite_attention(gm))
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=True), results


@pytest.mark.parametrize("style, scale", [("div", D ** -0.5 / 2.0), ("sdpa", 0.3)])
def test_runtime_scale_rewritten_and_followed(style, scale):
    model = ScaledAttention(style).eval()
    compiled, results = _capture(model)
    x, bias = _inputs()
    with torch.no_grad():
        assert_outputs_close(compiled(x, bias), model(x, bias), atol=1e-5)
        assert [len(r.sites) for r in results] == [1] and not results[0].skipped
        assert results[0].sites[0].scale == pytest.approx(scale)
        model.temperature, model.scaling = 0.5, 0.7  # followed at run time (or recompiled)
        x, bias = _inputs(3, 9)
        assert_outputs_close(compiled(x, bias), model(x, bias), atol=1e-5)
    assert all(len(r.sites) == 1 for r in results)
    if style == "div":  # an unguarded float: the first graph itself followed the new temperature
        assert len(results) == 1


@pytest.mark.parametrize("style, reason", [
    ("mask_then_scale", "after a mask"),
    ("data", "neither a Python number nor a run-time scalar"),
])
def test_unsupported_runtime_scale_is_skipped(style, reason):
    # (SDPA with a data-dependent scale= is not captured at all: Dynamo breaks the graph there.)
    model = ScaledAttention(style).eval()
    compiled, results = _capture(model)
    x, bias = _inputs()
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        assert_outputs_close(compiled(x, bias), model(x, bias), atol=1e-5)
    assert results and not any(r.sites for r in results)
    reasons = [s.reason for r in results for s in r.skipped]
    assert len(reasons) == 1 and reason in reasons[0], reasons
