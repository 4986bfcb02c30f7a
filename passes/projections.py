"""Find the projection parameters that produce q/k/v and consume the attention output."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from .graph_utils import is_call, is_method, parameter_name
from .site import AttentionMatch, ProjectionRef

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)
_SHAPE_METHODS = ("view", "reshape", "transpose", "permute", "contiguous", "unflatten", "flatten", "to", "type_as", "float", "half", "bfloat16")
_SHAPE_FUNCS = (torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten)


@dataclass
class Projections:
    q: Optional[ProjectionRef] = None
    k: Optional[ProjectionRef] = None
    v: Optional[ProjectionRef] = None
    out: Optional[ProjectionRef] = None
    hidden: Optional[fx.Node] = None  # the input of the q projection: what a router may look at
    cross_attention: bool = False


def _linear_ref(node: fx.Node) -> Optional[ProjectionRef]:
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    name = parameter_name(weight)
    if name is None:
        return None
    return ProjectionRef(weight=name, bias=parameter_name(bias), layout="out_in")


def _walk_back(node, limit: int = 12) -> Optional[fx.Node]:
    for _ in range(limit):
        if not isinstance(node, fx.Node):
            return None
        if is_call(node, *_LINEAR):
            return node
        if is_method(node, *_SHAPE_METHODS) or is_call(node, *_SHAPE_FUNCS):
            node = node.args[0]
            continue
        return None
    return None


def _walk_forward(node: fx.Node, limit: int = 12) -> Optional[fx.Node]:
    for _ in range(limit):
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if is_call(user, *_LINEAR) and user.args[0] is node:
            return user
        if is_method(user, *_SHAPE_METHODS) or is_call(user, *_SHAPE_FUNCS):
            node = user
            continue
        return None
    return None


def find_projections(match: AttentionMatch, out_node: fx.Node) -> Projections:
    found = Projections()
    linears = {}
    for role in ("q", "k", "v"):
        lin = _walk_back(getattr(match, role))
        if lin is not None:
            linears[role] = lin
            setattr(found, role, _linear_ref(lin))
    out_lin = _walk_forward(out_node)
    if out_lin is not None:
        found.out = _linear_ref(out_lin)
    if "q" in linears:
        found.hidden = linears["q"].args[0]
        if "k" in linears:
            found.cross_attention = linears["k"].args[0] is not found.hidden
    return found
