"""Regions of a graph between some nodes and one sink: what a compact chain spans, so that a
traced graph can run it as one opaque call (``dhp_fx/opaque.py``)."""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx

from .graph_utils import holds_non_tensor


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


def why_not_opaque(sources: Iterable[fx.Node], sink: fx.Node) -> str | None:
    """None when the region from ``sources`` to ``sink`` can become one call of tensors to a
    tensor: nothing inside is read from outside but the sink, and every input holds a tensor."""
    region = region_between(sources, sink)
    if sink not in region:
        return "unreached"
    if leaks(region, sink):
        return "region_leaks"
    if any(holds_non_tensor(n) for n in inputs_of(region)):
        return "symbolic_argument"
    return None
