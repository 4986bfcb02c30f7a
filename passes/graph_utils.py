"""Small helpers for reading Dynamo-captured FX graphs."""
from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.fx as fx


def example_value(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo (or make_fx) recorded for a node, if any."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def static_int(x: Any) -> Optional[int]:
    """An int if x is a concrete integer (plain or a SymInt with a hint-free constant value)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.maybe_as_int()) if x.node.maybe_as_int() is not None else None
        except Exception:
            return None
    return None


def is_call(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument by position or keyword, as Dynamo may record either."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_SOURCE_ITEM = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def module_path_of(node: fx.Node) -> tuple[str, str]:
    """(dotted path, class name) of the innermost module that called this node; ("", "") at top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return normalize_source_path(path), getattr(cls, "__name__", str(cls))


def normalize_source_path(path: str) -> str:
    """"L['self'].encoder.layer.0" or "L['self']._modules['encoder']..." -> "encoder.layer.0"."""
    # The root module is L['self'] for torch.compile(model), or the first positional argument
    # (L['args'][0]) when a decorated forward is the compiled frame.
    path = re.sub(r"^L\['args'\](?:\[0\]|\.0)\.?", "", path)
    path = re.sub(r"^L\['(?:self|mod|fn|dhp_fx_root)'\]\.?", "", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"^_(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def parameter_name(node: Any) -> Optional[str]:
    """Qualified parameter/buffer name of a placeholder or get_attr that holds module state."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return str(node.target)
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name() if callable(source.name) else source.name
    if "_parameters[" not in name and "_buffers[" not in name:
        return None
    return normalize_source_path(name)


def users_outside(node: fx.Node, allowed: set[fx.Node]) -> list[fx.Node]:
    return [u for u in node.users if u not in allowed]


GETITEM = operator.getitem


def const_number(x: Any) -> Optional[float]:
    """x as a float if it is a plain Python int/float (bools and symbolic numbers are not constants)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def shape_of(node: Any) -> Optional[tuple]:
    val = example_value(node)
    return None if val is None else tuple(val.shape)


def _fake_mode_of(values) -> Any:
    from torch._guards import detect_fake_mode

    try:
        return detect_fake_mode(values)
    except Exception:
        return None


def _meta_value(op: str, target: Any, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Run a new node's target on its inputs' fake values, so later passes can read its shape."""
    missing = []

    def value(n: fx.Node):
        val = n.meta.get("example_value", n.meta.get("val"))
        if val is None:
            missing.append(n)
        return val

    vargs, vkwargs = fx.node.map_arg((args, kwargs), value)
    if missing:
        return None
    flat: list = []
    fx.node.map_aggregate((vargs, vkwargs), lambda v: flat.append(v) if isinstance(v, torch.Tensor) else None)
    mode = _fake_mode_of(flat)
    if mode is None:
        return None
    try:
        with mode:
            if op == "call_method":
                return getattr(vargs[0], target)(*vargs[1:], **vkwargs)
            return target(*vargs, **vkwargs)
    except Exception:
        return None


def insert_node(
    graph: fx.Graph,
    op: str,
    target: Any,
    args: tuple,
    kwargs: Optional[dict] = None,
    meta_like: Optional[fx.Node] = None,
) -> fx.Node:
    """Create a call node at the graph's current insertion point, with example_value meta where
    the inputs carry fake values, and the module ownership of ``meta_like``."""
    kwargs = kwargs or {}
    node = graph.create_node(op, target, args, kwargs)
    val = _meta_value(op, target, args, kwargs)
    if val is not None:
        node.meta["example_value"] = val
    if meta_like is not None:
        for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
            if key in meta_like.meta:
                node.meta[key] = meta_like.meta[key]
    return node
