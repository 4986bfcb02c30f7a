"""Regions of a graph between some nodes and one sink: what a compact chain spans, so that a
traced graph can run it as one opaque call (``dhp_fx/opaque.py``)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx as fx

from .graph_utils import example_value, holds_non_tensor


def region_between(sources: Iterable[fx.Node], sink: fx.Node) -> list[fx.Node]:
    """The nodes reachable from ``sources`` from which ``sink`` is reachable, both ends included,
    in graph order. The forward walk stops at the sink's position: descendants of a projection
    span the rest of the model."""
    graph = sink.graph
    index = {n: i for i, n in enumerate(graph.nodes)}
    limit = index[sink]
    forward: set[fx.Node] = set()
    stack = [s for s in sources if index[s] <= limit]
    while stack:
        node = stack.pop()
        if node in forward:
            continue
        forward.add(node)
        stack.extend(u for u in node.users if index[u] <= limit)
    region: set[fx.Node] = set()
    stack = [sink] if sink in forward else []
    while stack:
        node = stack.pop()
        if node in region or node not in forward:
            continue
        region.add(node)
        stack.extend(node.all_input_nodes)
    return sorted(region, key=index.__getitem__)


def leaks(region: list[fx.Node], sink: fx.Node) -> list[fx.Node]:
    """Nodes of the region other than the sink that a node outside it reads."""
    inside = set(region)
    return [n for n in region if n is not sink and any(u not in inside for u in n.users)]


def inputs_of(region: list[fx.Node]) -> list[fx.Node]:
    """The nodes outside the region that it reads, in the order it first reads them."""
    inside = set(region)
    seen: dict[fx.Node, None] = {}
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in inside:
                seen.setdefault(arg, None)
    return list(seen)


def holds_size(node: fx.Node) -> bool:
    """A node recorded as an integer, plain or symbolic (a size under dynamic shapes)."""
    val = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)


def _same_size(a, b) -> bool:
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr  # structural: compares without adding a guard
    return False


def shape_recipe(like: torch.Tensor, reference: torch.Tensor, sizes: list[fx.Node]) -> Optional[tuple]:
    """How ``like``'s shape follows from a reference tensor's and some size inputs' values at
    call time, one entry per dim: ("const", n), ("dim", j) of the reference, ("size", k) of
    ``sizes``; None where a symbolic dim is neither."""
    recipe = []
    for d in like.shape:
        if isinstance(d, int):
            recipe.append(("const", d))
            continue
        j = next((j for j, r in enumerate(reference.shape) if _same_size(r, d)), None)
        if j is not None:
            recipe.append(("dim", j))
            continue
        k = next((k for k, n in enumerate(sizes) if _same_size(n.meta.get("example_value", n.meta.get("val")), d)),
                 None)
        if k is None:
            return None
        recipe.append(("size", k))
    return tuple(recipe)


def why_not_opaque(sources: Iterable[fx.Node], sink: fx.Node, like: Optional[torch.Tensor] = None,
                   reference: Optional[fx.Node] = None) -> Optional[str]:
    """None when the region from ``sources`` to ``sink`` can become one call of tensors and
    sizes to a tensor: nothing inside is read from outside but the sink, every input holds a
    tensor or an integer, and (given ``like``, the sink's value) the output's shape follows
    from ``reference``'s and the size inputs'."""
    region = region_between(sources, sink)
    if sink not in region:
        return "unreached"
    if leaks(region, sink):
        return "region_leaks"
    inputs = inputs_of(region)
    if any(holds_non_tensor(n) and not holds_size(n) for n in inputs):
        return "symbolic_argument"
    if like is not None:
        ref = example_value(reference)
        if ref is None or shape_recipe(like, ref, [n for n in inputs if holds_size(n)]) is None:
            return "output_shape"
    return None
