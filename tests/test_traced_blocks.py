"""Compact blocks and gate taps under a downstream compiler that traces the graph (aot_eager here;
inductor in test_api): the same decisions and outputs as the eagerly run graph, no recompiles."""
from __future__ import annotations

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st

import dhp_fx
from dhp_fx.testing import assert_outputs_close
from zoo import hf_entries

ENTRIES = {e.name: e for e in hf_entries("sdpa")}


def _pair(name: str, **config):
    """The same model optimized twice: run eagerly and traced by aot_eager."""
    entry = ENTRIES[name]
    eager = dhp_fx.optimize(entry.build(), dhp_fx.DHPConfig(compiler="eager", **config))
    traced = dhp_fx.optimize(entry.build(), dhp_fx.DHPConfig(compiler="aot_eager", **config))
    return entry, eager, traced


def _blocks(opt):
    return [g.block_module for g in opt.gates.values()]


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def test_traced_static_gates_run_compact_blocks_as_opaque_ops():
    entry, eager, traced = _pair("bert-sdpa", keep_ratio=0.5, scoring="static")
    inputs = entry.inputs()
    with torch.no_grad():
        for _ in range(3):
            assert_outputs_close(_hidden(traced(**inputs)), _hidden(eager(**inputs)), atol=1e-6)
    assert traced.sites and all(s.compact_block and set(s.skipped_projections) == {"q", "k", "v", "out"}
                                for s in traced.sites)
    # each block's op calls its gate itself, which hands it the static decision's own tensor:
    # the weights were gathered once
    assert traced._compiler.counters["opaque_blocks"] == len(traced.sites)
    assert traced._compiler.counters["opaque_block_gates"] == len(traced.sites)
    assert [b.calls_compact for b in _blocks(traced)] == [3] * len(traced.sites)
    assert [b.gathers for b in _blocks(traced)] == [1] * len(traced.sites)
    # a budget change applies at the next call, without a recompile
    graphs = traced.graphs_compiled
    for opt in (eager, traced):
        opt.set_keep_ratio(0.75)
    with torch.no_grad():
        assert_outputs_close(_hidden(traced(**inputs)), _hidden(eager(**inputs)), atol=1e-6)
        full = dhp_fx.optimize(entry.build(), dhp_fx.DHPConfig(compiler="aot_eager", keep_ratio=1.0,
                                                                scoring="static"))
        assert_outputs_close(_hidden(full(**inputs)), _hidden(entry.build()(**inputs)), atol=1e-5)
    assert traced.graphs_compiled == graphs
    assert [b.gathers for b in _blocks(traced)] == [2] * len(traced.sites)
    # calibration scores heads at the tap, which the opaque block calls as the eager one does
    _same_calibration(eager, traced, [inputs, entry.inputs()])


def _same_calibration(eager, traced, batches):
    stats = [dhp_fx.calibrate(opt, batches, measure_flops=False) for opt in (eager, traced)]
    for site in traced.sites:
        ref, got = stats[0].sites[site.name], stats[1].sites[site.name]
        assert got.samples == ref.samples > 0
        assert got.score_mean == pytest.approx(ref.score_mean, abs=1e-5)
        assert got.keep_freq == pytest.approx(ref.keep_freq)


def test_traced_training_graphs_keep_the_head_ops():
    """Opaque ops have no autograd formula: a graph traced with gradients runs the head ops,
    whose gradients match the eagerly run blocks'."""
    entry, eager, traced = _pair("bert-sdpa", keep_ratio=0.5, scoring="static")
    inputs = entry.inputs()
    grads = []
    for opt in (eager, traced):
        _hidden(opt(**inputs)).square().sum().backward()
        grads.append({n: p.grad for n, p in opt.model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() <= grads[1].keys()
    # AOT autograd hands parameters the loss never reached (the pooler) zeros, eager None
    assert all(not grads[1][name].any() for name in grads[1].keys() - grads[0].keys())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(not s.compact_block and "no_compact_block:traced_training" in s.declined for s in traced.sites)
    assert all(set(s.skipped_projections) == {"q", "k", "v", "out"} for s in traced.sites)
    assert "opaque_blocks" not in traced._compiler.counters


@pytest.mark.parametrize("name", ["llama-sdpa", "qwen3-sdpa", "phi3-sdpa"])
def test_traced_static_gates_run_compact_chains_as_opaque_ops(name):
    """RoPE sits between the projections and attention (Qwen3 also normalises q and k per head;
    Phi-3 cuts one fused projection at fixed widths): eagerly a compact chain, traced one opaque
    op per chain, from the gate to the output projection. Same outputs as eager, one gather for a
    static decision, a budget change with no recompile, the same calibration."""
    entry, eager, traced = _pair(name, keep_ratio=0.5, scoring="static")
    inputs = {**entry.inputs(), "use_cache": False}  # a cache reads K and V whole
    with torch.no_grad():
        for _ in range(3):
            assert_outputs_close(_hidden(traced(**inputs)), _hidden(eager(**inputs)), atol=1e-5)
    n = len(traced.sites)
    assert n and all(s.compact_block and not s.declined for s in traced.sites), traced.report()
    counters = traced._compiler.counters
    assert counters["opaque_chains"] == counters["opaque_block_gates"] == n, counters
    assert counters["opaque_blocks"] == counters["opaque_taps"] == 0, counters
    chains = [g.chain_module for g in traced.gates.values()]
    assert [c.calls_compact for c in chains] == [3] * n
    assert [c.gathers for c in chains] == [1] * n
    graphs = traced.graphs_compiled
    for opt in (eager, traced):
        opt.set_keep_ratio(0.75)
    with torch.no_grad():
        assert_outputs_close(_hidden(traced(**inputs)), _hidden(eager(**inputs)), atol=1e-5)
    assert traced.graphs_compiled == graphs
    assert [c.gathers for c in chains] == [2] * n
    _same_calibration(eager, traced, [inputs, entry.inputs() | {"use_cache": False}])


def test_traced_router_chains_match_eager():
    """Per-sample routers decide inside the chain's op as eagerly: the same outputs, each row its
    own heads (or the masked dense block for short rows on CPU)."""
    entry, eager, traced = _pair("llama-sdpa", keep_ratio=0.5, scoring="router", granularity="sample")
    traced.load_state_dict(eager.state_dict())  # the same router weights
    inputs = {**entry.inputs(), "use_cache": False}
    with torch.no_grad():
        for _ in range(2):
            assert_outputs_close(_hidden(traced(**inputs)), _hidden(eager(**inputs)), atol=1e-5)
    assert all(s.compact_block for s in traced.sites), traced.report()
    assert traced._compiler.counters["opaque_chains"] == len(traced.sites)
    chains = [g.chain_module for g in traced.gates.values()]
    assert [c.calls_compact + c.calls_every_head for c in chains] == [2] * len(traced.sites)  # every call ran a chain


def test_traced_chains_follow_dynamic_shapes():
    """Under dynamic shapes the region reads symbolic sizes (its views') and its output's shape
    follows the first projection's input: one graph serves every length, chains included."""
    entry, eager, traced = _pair("llama-sdpa", keep_ratio=0.5, scoring="static", dynamic=True)
    vocab = entry.build().config.vocab_size
    g = torch.Generator().manual_seed(3)
    graphs = []
    with torch.no_grad():
        for length in (7, 12, 5):
            ids = torch.randint(0, vocab, (2, length), generator=g)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
            assert_outputs_close(_hidden(traced(**inputs)), _hidden(eager(**inputs)), atol=1e-5)
            graphs.append(traced.graphs_compiled)
    assert graphs[0] == graphs[-1]  # no recompile for a new length
    assert all(s.compact_block and not s.declined for s in traced.sites), traced.report()
    assert traced._compiler.counters["opaque_chains"] == len(traced.sites)
    assert [g.chain_module.calls_compact for g in traced.gates.values()] == [3] * len(traced.sites)


def test_traced_taps_record_calibration_where_no_block_runs():
    """Without compact blocks (compact_heads=False) a static gate still runs before the
    projections, so calibration scores come from the tap, fused with the gated op into one
    opaque op."""
    entry, eager, traced = _pair("llama-sdpa", keep_ratio=0.5, scoring="static", compact_heads=False)
    inputs = {**entry.inputs(), "use_cache": False}
    _same_calibration(eager, traced, [inputs, inputs])
    counters = traced._compiler.counters
    assert counters["opaque_taps"] == len(traced.sites) * traced.graphs_compiled > 0, counters
    assert counters["opaque_chains"] == 0, counters
    assert all(set(s.skipped_projections) == {"q", "k", "v", "out"} and not s.compact_block for s in traced.sites)
    with torch.no_grad():
        assert_outputs_close(_hidden(traced(**inputs)), _hidden(eager(**inputs)), atol=1e-5)


_GRAPH = torch.fx.Graph()
_NODES = [_GRAPH.placeholder(f"x{i}") for i in range(4)]
_leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=False), st.text(max_size=3),
                    st.sampled_from(_NODES))
_arguments = st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.from_regex(r"[a-z_]{1,6}", fullmatch=True), inner, max_size=3)), max_leaves=20)


@settings(max_examples=60, deadline=None)
@given(_arguments)
def test_opaque_call_arguments_rebuild_from_the_op_tensors(value):
    """What a block op rebuilds at each call is its graph call's arguments, every node replaced
    by the tensor the op received in its place (lists come back as tuples)."""
    from dhp_fx.opaque import _builder, _template

    nodes: list = []
    built = _builder(_template(value, nodes))([f"tensor of {n.name}" for n in nodes])

    def expected(v):
        if isinstance(v, torch.fx.Node):
            return f"tensor of {v.name}"
        if isinstance(v, (list, tuple)):
            return tuple(expected(x) for x in v)
        if isinstance(v, dict):
            return {k: expected(x) for k, x in v.items()}
        return v

    assert built == expected(value)
