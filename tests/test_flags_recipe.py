"""Feature flags carried as a recipe: a compact block or chain computes them only on its fallback."""
import operator

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from dhp_fx.passes.compact_heads import RECIPE, _flags_spec, flags_recipe, replay_flags


def _graph(build):
    """A graph computing flags from a [B, H] keep placeholder, as skip_projections builds them."""
    graph = fx.Graph()
    keep = graph.placeholder("keep")
    flags = build(graph, keep)
    graph.output(flags)
    return graph, keep, flags


def _interleaved(heads, kv_group, base, gap, tail, trim):
    """GPT-NeoX-like per-head [q_h, k_h, v_h] flags with a KV union (unflatten + any), ones
    before, after and between heads, and a trimmed last period."""
    def build(graph, keep):
        union = graph.call_method("any", (keep, 0))
        kv = graph.call_method("any", (graph.call_method("unflatten", (union, -1, (heads // kv_group, kv_group))), -1))
        kv_heads = graph.call_method("repeat_interleave", (kv, kv_group))
        per_head = [graph.call_method("expand", (graph.call_method("unsqueeze", (f, -1)), -1, 2))
                    for f in (union, kv_heads, kv_heads)]
        if gap:
            per_head.append(graph.call_method("new_ones", (union, (heads, gap))))
        flat = graph.call_method("flatten", (graph.call_function(torch.cat, (per_head, -1)),))
        if trim:
            flat = graph.call_function(operator.getitem, (flat, slice(None, -trim)))
        pieces = [flat]
        if base:
            pieces.insert(0, graph.call_method("new_ones", (union, (base,))))
        if tail:
            pieces.append(graph.call_method("new_ones", (union, (tail,))))
        return graph.call_function(torch.cat, (pieces,)) if len(pieces) > 1 else flat
    return build


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), heads=st.sampled_from([2, 4, 6]), kv_group=st.sampled_from([1, 2]),
       base=st.integers(0, 2), gap=st.integers(0, 2), tail=st.integers(0, 2), trim=st.integers(0, 1),
       seed=st.integers(0, 2**16))
def test_recipe_replays_the_graphs_flags(B, heads, kv_group, base, gap, tail, trim, seed):
    """A recipe computes what the graph's own ops compute from the same keep, for any keep."""
    graph, keep, flags = _graph(_interleaved(heads, kv_group, base, gap, tail, trim))
    spec = _flags_spec(flags, keep)
    assert spec[0] == RECIPE
    module = fx.GraphModule(torch.nn.Module(), graph)
    g = torch.Generator().manual_seed(seed)
    keep_value = torch.rand(B, heads, generator=g) < 0.5
    want = module(keep_value)
    got = replay_flags(spec, keep_value)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_plain_forms_keep_their_names():
    graph, keep, _ = _graph(lambda graph, keep: keep)
    assert _flags_spec(keep, keep) == "keep"
    graph, keep, union = _graph(lambda graph, keep: graph.call_method("any", (keep, 0)))
    assert _flags_spec(union, keep) == "any"


@pytest.mark.parametrize("case", ["other_input", "unknown_op", "kwargs", "string_literal", "slice_bound"])
def test_flags_read_from_elsewhere_stay_nodes(case):
    """What a recipe cannot replay exactly stays the graph's node (computed by the graph)."""
    graph = fx.Graph()
    keep = graph.placeholder("keep")
    other = graph.placeholder("other")
    union = graph.call_method("any", (keep, 0))
    flags = {
        "other_input": lambda: graph.call_function(torch.cat, ((union, other),)),
        "unknown_op": lambda: graph.call_method("logical_not", (union,)),
        "kwargs": lambda: graph.call_method("any", (keep,), {"dim": 0}),
        "string_literal": lambda: graph.call_method("to", (union, "cpu")),
        "slice_bound": lambda: graph.call_function(operator.getitem, (union, slice(None, graph.call_method(
            "size", (other, 0))))),
    }[case]()
    graph.output(flags)
    assert flags_recipe(flags, keep) is None
    assert _flags_spec(flags, keep) is flags


@pytest.mark.parametrize("name", ["gpt-neox-sdpa", "bloom-eager", "gpt2-sdpa"])
def test_chain_fallback_replays_fused_flags_exactly(name):
    """A query chain over one fused projection carries its feature flags as a recipe; where the
    chain falls back to the head ops, the replayed flags give the head ops' own output."""
    from unittest import mock

    import dhp_fx
    from dhp_fx import DHPConfig
    from dhp_fx.testing import assert_outputs_close
    from test_query_chains import _hf_case

    entry, model, inputs, opt = _hf_case(name)
    heads_ops = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static", compact_heads=False),
                                example_inputs=inputs)
    keep = torch.tensor([True, False, True, True])
    assert all(s.compact_block for s in opt.sites), opt.report()
    replayed = []
    import dhp_fx.compact_block as cb

    real = cb.replay_flags

    def spy(recipe, keep):
        replayed.append(recipe)
        return real(recipe, keep)

    with torch.no_grad(), mock.patch.object(cb, "replay_flags", spy):
        for m in (opt, heads_ops):
            m.set_keep_mask(keep)
        with mock.patch.object(type(opt.gate(opt.sites[0])), "compact_head_plan", return_value=None):
            got = opt(**inputs)
        want = heads_ops(**inputs)
    assert replayed and all(r[0] == RECIPE for r in replayed), "the fallback read no recipe"
    assert_outputs_close(got, want, what=f"{name}: head ops through replayed flags")
