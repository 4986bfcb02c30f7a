"""Projections written as ``x @ W.T (+ b)`` become F.linear(x, W, b) before matching.

Falcon's FalconLinear (and hand-written attention blocks) multiply by the transposed weight
instead of calling F.linear. The projection walk, the head-skipping projections and the compact
blocks all read F.linear, so this pass rewrites the matmul form into it: the same product, with
the bias added by the GEMM instead of after it (a rounding-level difference). Only a matmul by a
transposed 2-D parameter is rewritten, with a following bias add folded in when the bias is a
1-D parameter of the output width and the matmul has no other user.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import example_value, is_call, parameter_name, static_int, untranspose
from .site import SkippedSite

_MATMUL = (operator.matmul, torch.matmul)
_ADD = (operator.add, torch.add)


def _transposed_parameter(node) -> Optional[fx.Node]:
    """The 2-D parameter P when node is P with its two dims swapped (P.T, P.t(), ...)."""
    source = untranspose(node)
    if source is None or parameter_name(source) is None:
        return None
    val = example_value(source)
    return source if val is not None and val.dim() == 2 else None


def _bias_of(matmul: fx.Node, weight: torch.Tensor) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """(the add node, the bias) when matmul's only user adds a 1-D parameter of the weight's
    output width and dtype."""
    if len(matmul.users) != 1:
        return None, None
    (add,) = matmul.users
    if not is_call(add, *_ADD) or len(add.args) != 2 or add.kwargs:
        return None, None
    other = add.args[1] if add.args[0] is matmul else add.args[0] if add.args[1] is matmul else None
    if other is None or parameter_name(other) is None:
        return None, None
    val = example_value(other)
    if val is None or val.dim() != 1 or val.shape[0] != weight.shape[0] or val.dtype != weight.dtype:
        return None, None
    return add, other


def canonicalize_linear_forms(gm: fx.GraphModule) -> tuple[int, list[SkippedSite]]:
    """Rewrite every ``x @ P.T (+ b)`` into F.linear; returns (how many, nothing skipped)."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, *_MATMUL) or len(node.args) != 2 or node.kwargs:
            continue
        x, transposed = node.args
        weight = _transposed_parameter(transposed)
        x_val, out_val = example_value(x), example_value(node)
        if weight is None or x_val is None or out_val is None or x_val.dim() < 2:
            continue  # a 1-D x is a matrix-vector product: F.linear would keep its shape, matmul not
        w_val = example_value(weight)
        if static_int(x_val.shape[-1]) != w_val.shape[1] or x_val.dtype != w_val.dtype:
            continue
        add, bias = _bias_of(node, w_val)
        replaced = add if add is not None else node
        with gm.graph.inserting_before(replaced):
            linear = gm.graph.call_function(F.linear, (x, weight, bias))
        linear.meta.update(replaced.meta)
        replaced.replace_all_uses_with(linear)
        gm.graph.erase_node(replaced)
        if add is not None:
            gm.graph.erase_node(node)
        if not transposed.users:
            gm.graph.erase_node(transposed)
        count += 1
    return count, []
