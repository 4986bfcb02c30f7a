"""Small helpers for reading Dynamo-captured FX graphs."""
from __future__ import annotations

import math
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


def holds_non_tensor(node: Any) -> bool:
    """True for a node recorded as a number or symbol (a SymInt size, a SymFloat scale); nodes
    without a recorded value (gates, helper reductions a pass inserted) hold tensors."""
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("example_value", node.meta.get("val"))
    return val is not None and not isinstance(val, torch.Tensor)


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
    # Dynamo may reach a child through the instance dict: "x.__dict__['_modules']['attention']"
    path = re.sub(r"(^|\.)__dict__\[['\"](_(?:modules|parameters|buffers))['\"]\]", r"\1\2", path)
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


_SYM_NUMBERS = (torch.SymInt, torch.SymFloat)


def constant_factor(node: Any) -> Optional[float]:
    """c for ``x * c``, ``c * x`` or ``x / c`` with c a Python number (x a node), else None."""
    if not isinstance(node, fx.Node) or len(node.all_input_nodes) != 1 or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    number = lambda c: isinstance(c, (int, float)) and not isinstance(c, bool)  # noqa: E731
    if is_call(node, operator.mul, torch.mul) or is_method(node, "mul"):
        c = b if isinstance(a, fx.Node) else a
        return float(c) if number(c) else None
    if (is_call(node, operator.truediv, torch.div) or is_method(node, "div")) and isinstance(a, fx.Node):
        return 1.0 / b if number(b) and b != 0 else None
    return None


def scalar_value(node: Any) -> Any:
    """The Python number or SymInt/SymFloat a node yields at capture (``.item()``, size reads,
    sym arithmetic); None for tensors and for nodes without one."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, bool) or not isinstance(val, (int, float) + _SYM_NUMBERS):
        return None
    return val


def runtime_scalar_hint(node: Any) -> Optional[float]:
    """For a node that yields a Python number at run time (a value the graph computes, not a
    literal argument), its value at capture; None for tensors, non-nodes, and numbers that depend
    on tensor data.

    Under ``dynamic=True`` Dynamo lifts float attributes (HF's ``self.scaling``) to 0-dim graph
    inputs read back with ``.item()``: a *backed* SymFloat, i.e. a function of the graph's inputs
    (scalars and sizes), with the captured value as its hint. ``.item()`` of a computed tensor
    (q, k, v, ...) gives an *unbacked* symbol instead, which has no hint and is refused here.
    """
    val = scalar_value(node)
    if val is None:
        return None
    if not isinstance(val, _SYM_NUMBERS):
        return float(val)
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    try:
        if free_unbacked_symbols(val):
            return None
        sym = val.node
        hint = sym.hint if sym.has_hint() else None
        if hint is None:
            constant = sym.maybe_as_float() if isinstance(val, torch.SymFloat) else sym.maybe_as_int()
            hint = constant
        return None if hint is None or isinstance(hint, bool) else float(hint)
    except Exception:
        return None


def shape_of(node: Any) -> Optional[tuple]:
    val = example_value(node)
    return None if val is None else tuple(val.shape)


def _fake_mode_of(values) -> Any:
    # The tensors' own mode, not detect_fake_mode(): inside a backend the tracing context may
    # hold a different mode than the one that made the graph's example values.
    modes = {id(m): m for m in (getattr(v, "fake_mode", None) for v in values) if m is not None}
    return next(iter(modes.values())) if len(modes) == 1 else None


def _meta_value(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
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
        if not flat and op == "call_function" and all(
            isinstance(v, (int, float) + _SYM_NUMBERS) for v in (*vargs, *vkwargs.values())
        ):
            try:  # arithmetic on run-time scalars (SymFloat/SymInt): no tensors, no fake mode
                return target(*vargs, **vkwargs)
            except Exception:
                return None
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


def float_scalar_node(graph: fx.Graph, node: fx.Node, meta_like: Optional[fx.Node] = None) -> fx.Node:
    """``node`` if it yields a float at run time, else ``torch.sym_float(node)`` inserted at the
    graph's current insertion point (ops declared ``float`` are handed a float, not an int)."""
    if isinstance(scalar_value(node), (float, torch.SymFloat)):
        return node
    return insert_node(graph, "call_function", torch.sym_float, (node,), meta_like=meta_like)


def functionalize_writes(x: fx.Node, pure_of: dict[str, str]) -> bool:
    """Turn in-place method writes on x (``s.mul_(c); s.masked_fill_(m, v); f(s)``) into a pure
    chain ending in the last write, with every reader moved to it. Exact only when x is a fresh
    tensor (not a view: the caller checks) and nothing reads x, or an alias of it, before its
    last write; returns False, changing nothing, otherwise."""
    aliases, writes, readers = {x}, [], []
    node = x.next
    while node.op != "output":
        refs: list = []
        fx.node.map_arg((node.args, node.kwargs), refs.append)
        n_alias = sum(r in aliases for r in refs)
        if n_alias:
            if node.op == "call_method" and node.target in pure_of and node.args[0] in aliases:
                if n_alias > 1 or readers:
                    return False  # reads itself, or someone read a value this write changes
                writes.append(node)
                aliases.add(node)
            else:
                readers.append(node)
        node = node.next
    if not writes:
        return False
    prev = x
    for w in writes:
        w.target = pure_of[w.target]
        w.args = (prev,) + tuple(w.args[1:])
        prev = w
    for r in readers:
        for a in aliases:
            if a is not prev and a in r.all_input_nodes:
                r.replace_input_with(a, prev)
    return True


def _static_sizes(node: fx.Node) -> Optional[list[int]]:
    val = example_value(node)
    if val is None:
        return None
    sizes = [static_int(s) for s in val.shape]
    return None if any(s is None for s in sizes) else sizes


_SCALE_OPS = (operator.mul, operator.truediv, torch.mul, torch.div)


def folded_heads(node: Any, limit: int = 12) -> Optional[int]:
    """How many heads were folded into dim 0 of a bmm operand [B*H, L, D], read from the
    reshape that produced it; None when no reshape in its history says."""
    axis = 0
    for _ in range(limit):
        if not isinstance(node, fx.Node):
            return None
        out = _static_sizes(node)
        if out is None:
            return None
        if is_method(node, "contiguous", "clone", "float", "half", "bfloat16", "to", "type_as"):
            node = node.args[0]
            continue
        if is_call(node, *_SCALE_OPS) or is_method(node, "mul", "div"):
            tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(tensors) != 1:
                return None
            node = tensors[0]  # a constant scale keeps the layout
            continue
        if is_method(node, "transpose") or is_call(node, torch.transpose):
            a, b = (d % len(out) for d in node.args[1:3])
            axis = b if axis == a else a if axis == b else axis
            node = node.args[0]
            continue
        if is_method(node, "permute") or is_call(node, torch.permute):
            dims = node.args[1:] if is_method(node, "permute") else node.args[1]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            axis = dims[axis] % len(out)
            node = node.args[0]
            continue
        if is_method(node, "view", "reshape", "flatten", "unflatten") or is_call(node, torch.reshape, torch.flatten):
            src = _static_sizes(node.args[0])
            if src is None:
                return None
            if axis == 0 and len(src) == 4 and len(out) == 3 and src[2:] == out[1:]:
                return src[1]  # [B, H, L, D] -> [B*H, L, D], whatever B and H are (1 included)
            before = math.prod(out[:axis])
            k = next((i for i in range(len(src) + 1) if math.prod(src[:i]) == before), None)
            if k is None or k >= len(src):
                return None
            if src[k] == out[axis]:
                axis, node = k, node.args[0]
                continue
            if out[axis] % src[k] == 0 and out[axis] > src[k]:
                return out[axis] // src[k]
            return None
        return None
    return None


def untranspose(node: Any) -> Optional[fx.Node]:
    """x when node is x with its last two dims swapped (``transpose``, ``permute``, ``.mT``; for a
    2-D x also ``.T`` and ``.t()``); None for anything else."""
    val = example_value(node)
    if val is None or not isinstance(node, fx.Node):
        return None
    nd = val.dim()
    last = {nd - 1, nd - 2}
    if is_method(node, "transpose") or is_call(node, torch.transpose):
        dims = node.args[1:3]
        if len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % nd for d in dims} == last:
            return node.args[0]
    if is_method(node, "permute") or is_call(node, torch.permute):
        dims = node.args[1:] if is_method(node, "permute") else node.args[1]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        expect = list(range(nd - 2)) + [nd - 1, nd - 2]
        if [d % nd for d in dims if isinstance(d, int)] == expect and len(dims) == nd:
            return node.args[0]
    if is_call(node, getattr) and node.args[1] in (("mT", "T") if nd == 2 else ("mT",)):
        return node.args[0]
    if nd == 2 and (is_method(node, "t") or is_call(node, torch.t)):
        return node.args[0]
    return None
