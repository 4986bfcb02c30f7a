"""Hypothesis properties of the rewrite, written with dhp_fx.testing itself."""
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dhp_fx
from dhp_fx.passes import rewrite_attention
from dhp_fx.testing import (
    AttentionSpec, attention_specs, build_attention, check_gates_open, check_keep_mask,
)

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _capture(module, inputs) -> list[fx.GraphModule]:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=backend)(**inputs)
    return graphs


@PROPERTY_SETTINGS
@given(attention_specs(dtypes=(torch.float32, torch.float16)))
def test_gates_open_equal_and_keep_mask_matches_reference(spec: AttentionSpec):
    module, inputs = build_attention(spec)
    optimized = check_gates_open(module, inputs, expect_sites=1)
    check_keep_mask(module, optimized, inputs, spec.keep_tensor())


@PROPERTY_SETTINGS
@given(attention_specs())
def test_discovery_matches_construction_and_graph_lints(spec: AttentionSpec):
    module, inputs = build_attention(spec)
    (gm,) = _capture(module, inputs)
    result = rewrite_attention(gm)
    gm.graph.lint()
    assert len(result.sites) == 1, result
    site = result.sites[0]
    assert site.num_heads == spec.heads
    assert site.head_dim == spec.head_dim
    assert site.is_causal == spec.causal or spec.style not in ("sdpa", "sdpa_gqa")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.dhp.gated_attention.default in targets


@settings(max_examples=10, deadline=None)
@given(attention_specs(styles=("sdpa", "eager", "bmm")))
def test_rewriting_twice_equals_once(spec: AttentionSpec):
    module, inputs = build_attention(spec)
    (gm,) = _capture(module, inputs)
    rewrite_attention(gm)
    code_once = gm.code
    again = rewrite_attention(gm)
    assert again.sites == [] and gm.code == code_once


def test_site_count_scales_with_construction():
    blocks = torch.nn.ModuleList(build_attention(AttentionSpec(seed=i))[0] for i in range(3))

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = blocks

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    _, inputs = build_attention(AttentionSpec())
    optimized = check_gates_open(Stack().eval(), {"x": inputs["x"]}, expect_sites=3)
    assert [s.name for s in optimized.sites] == [f"blocks.{i}" for i in range(3)]
