"""passes/regions.py against its definitions, computed by brute force on random graphs."""
from __future__ import annotations

import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from dhp_fx.passes.regions import inputs_of, leaks, region_between, why_not_opaque


def _combine(*args):
    return sum(args)


@st.composite
def _graphs(draw):
    """A random DAG: node i reads a random subset of nodes before it; some sources and a sink."""
    n = draw(st.integers(3, 14))
    reads = [draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else [] for i in range(n)]
    graph = fx.Graph()
    nodes = []
    for i, inputs in enumerate(reads):
        if not inputs:
            nodes.append(graph.placeholder(f"p{i}"))
        else:
            nodes.append(graph.call_function(_combine, tuple(nodes[j] for j in inputs)))
    graph.output(nodes[-1])
    sink = draw(st.integers(1, n - 1))
    sources = draw(st.lists(st.integers(0, sink), min_size=1, max_size=3, unique=True))
    return graph, nodes, reads, sources, sink


def _reaches(reads, a, b) -> bool:
    """Is node b reachable from node a along reads (a == b counts)?"""
    frontier, seen = [b], set()
    while frontier:
        x = frontier.pop()
        if x == a:
            return True
        if x not in seen:
            seen.add(x)
            frontier.extend(reads[x])
    return False


@settings(max_examples=150, deadline=None)
@given(_graphs())
def test_region_leaks_and_inputs_match_their_definitions(case):
    graph, nodes, reads, sources, sink = case
    region = region_between([nodes[i] for i in sources], nodes[sink])
    want = [i for i in range(len(nodes))
            if any(_reaches(reads, s, i) for s in sources) and _reaches(reads, i, sink)]
    assert region == [nodes[i] for i in want]  # graph order
    inside = set(want)
    # who reads node i: later nodes, and the graph's output for the last node
    readers = {i: [j for j in range(len(nodes)) if i in reads[j]] + (["output"] if i == len(nodes) - 1 else [])
               for i in range(len(nodes))}
    want_leaks = [i for i in want if i != sink and any(j not in inside for j in readers[i])]
    assert leaks(region, nodes[sink]) == [nodes[i] for i in want_leaks]
    firsts: list[int] = []
    for i in want:
        for j in reads[i]:
            if j not in inside and j not in firsts:
                firsts.append(j)
    assert inputs_of(region) == [nodes[j] for j in firsts]
    why = why_not_opaque([nodes[i] for i in sources], nodes[sink])
    # placeholders hold no recorded value, so they count as tensors: only reach and leaks decide
    assert why == ("unreached" if sink not in inside else "region_leaks" if want_leaks else None)


def test_a_region_reads_tensors_and_sizes_but_no_other_number():
    graph = fx.Graph()
    x, n = graph.placeholder("x"), graph.placeholder("n")
    a = graph.call_function(_combine, (x,))
    b = graph.call_function(_combine, (a, n))
    graph.output(b)
    assert why_not_opaque([a], b) is None
    n.meta["example_value"] = 5  # a size, as Dynamo records it (a SymInt under dynamic shapes)
    assert why_not_opaque([a], b) is None
    n.meta["example_value"] = 0.5  # a scale: an opaque op's size list cannot carry it
    assert why_not_opaque([a], b) == "symbolic_argument"
    assert inputs_of(region_between([a], b)) == [x, n]


def test_shape_recipe_rebuilds_symbolic_output_shapes_from_the_reference_and_sizes():
    from types import SimpleNamespace

    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from dhp_fx.passes.regions import shape_recipe

    env = ShapeEnv()
    batch, length = (env.create_symintnode(env.create_symbol(v, ConstantSource(name)), hint=v)
                     for name, v in (("B", 2), ("L", 7)))
    reference = SimpleNamespace(shape=(batch, length, 64))
    assert shape_recipe(SimpleNamespace(shape=(batch, length, 32)), reference, []) == (
        ("dim", 0), ("dim", 1), ("const", 32))
    flat = SimpleNamespace(shape=(batch * length, 32))
    assert shape_recipe(flat, reference, []) is None  # B * L is no dim of the reference
    size = fx.Graph().placeholder("tokens")
    size.meta["example_value"] = batch * length
    assert shape_recipe(flat, reference, [size]) == (("size", 0), ("const", 32))
