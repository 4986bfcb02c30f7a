"""The pass pipeline: find every attention core in a captured graph and route it through the gated op.

Order matters and is fixed:
  1. decompose fused multi-head-attention nodes (nn.MultiheadAttention / TransformerEncoderLayer
     fast paths) into projections + SDPA, so their heads become visible;
  2. match SDPA calls, then eager matmul-softmax-matmul cores;
  3. for each match: undo repeat-KV expansion (GQA), locate projections, describe the site;
  4. rewrite each match into gate + dhp::gated_attention; with ``skip_projections``, also route the
     site's projections through dhp::head_linear_out / head_linear_in where exact;
  5. lint and recompile.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch.fx as fx
import torch.nn as nn

from .graph_utils import example_value, module_path_of
from .projections import find_projections
from .rewrite import rewrite_match
from .sdpa import match_sdpa
from .site import AttentionMatch, AttentionSite, PassResult, SkippedSite
from .compact_chain import compact_chain_site, is_query_chain
from .compact_heads import compact_site
from .regions import why_not_opaque
from .skip_projections import prove_head_layouts, skip_site_projections

GateFactory = Callable[[AttentionSite], nn.Module]
Matcher = Callable[[fx.GraphModule], list]


def _matchers() -> list[tuple[str, Matcher]]:
    matchers: list[tuple[str, Matcher]] = [("sdpa", match_sdpa)]
    try:
        from .eager import match_eager
    except ImportError:  # pragma: no cover - the eager matcher is optional while it is developed
        pass
    else:
        matchers.append(("eager", match_eager))
    return matchers


def _pre_passes() -> list[tuple[str, Callable[[fx.GraphModule], tuple[int, list[SkippedSite]]]]]:
    """Graph-wide passes run before matching; each returns (nodes changed, sites it left alone)."""
    from .linear_forms import canonicalize_linear_forms

    passes = [("linear_forms", canonicalize_linear_forms)]
    try:
        from .fused_mha import decompose_fused_mha_report
    except ImportError:  # pragma: no cover
        return passes
    return passes + [("decompose_fused_mha", decompose_fused_mha_report)]


def _resolve_kv(match: AttentionMatch) -> None:
    try:
        from .gqa import resolve_repeat_kv
    except ImportError:  # pragma: no cover
        return
    resolve_repeat_kv(match)


def _unique_name(path: str, taken: set[str]) -> str:
    name, i = path or "<root>", 1
    while name in taken:
        name, i = f"{path or '<root>'}#{i}", i + 1
    taken.add(name)
    return name


def describe(match: AttentionMatch, name: str, projections) -> AttentionSite:
    q, k, v = (example_value(n) for n in (match.q, match.k, match.v))
    if match.heads_folded:
        num_heads, num_kv = match.heads_folded, match.kv_heads_folded or match.heads_folded
    else:
        num_heads, num_kv = int(q.shape[1]), int(k.shape[1])
    head_dim = int(q.shape[-1])
    path, cls = module_path_of(match.anchor)
    return AttentionSite(
        name=name,
        module_path=path,
        module_type=cls,
        pattern=match.pattern,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        value_head_dim=int(v.shape[-1]),
        scale=match.scale if match.scale is not None else 1.0 / math.sqrt(head_dim),
        is_causal=match.is_causal,
        mask_kind=match.mask_kind,
        dropout_p=match.dropout_p,
        cross_attention=projections.cross_attention,
        q_proj=projections.q,
        k_proj=projections.k,
        v_proj=projections.v,
        out_proj=projections.out,
    )


def insert_tap(gm: fx.GraphModule, gated: fx.Node, gate_target: str) -> Optional[fx.Node]:
    """``out = tap(out, q, k, v, mask)`` right after the op, when the gate offers a ``tap_module``.

    Gates decide before the heads run; what needs the heads' values (scores of a gate that ran
    before the projections, attention maps, training signals) happens in the tap. Placed after
    the projection-skipping pass, so the op's q/k/v arguments are final.
    """
    tap = getattr(gm.get_submodule(gate_target), "tap_module", None)
    if not isinstance(tap, nn.Module):
        return None
    target = gate_target.replace("dhp_gate_", "dhp_tap_", 1)
    gm.add_submodule(target, tap)
    q, k, v, _keep, mask = gated.args[:5]
    with gm.graph.inserting_after(gated):
        node = gm.graph.call_module(target, (gated, q, k, v, mask))
    gated.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    for key in ("example_value", "nn_module_stack", "source_fn_stack", "stack_trace"):
        if key in gated.meta:
            node.meta[key] = gated.meta[key]
    return node


def _why_not_opaque_chain(state) -> Optional[str]:
    """Why a chain could not run as one opaque call of a traced graph (``dhp_fx/opaque.py``):
    the graph between its projections and its output projection must read tensors and sizes
    only, nothing outside may read it but through the output projection (its widths follow the
    host's decision, which the trace cannot see), and the output's shape must follow from the
    first projection's input and those sizes."""
    replaced = state.replaced
    roles = ("q",) if is_query_chain(state) else ("q", "k", "v")
    if any(replaced.get(role) is None for role in (*roles, "out")):
        return None  # compact_chain_site says why
    out = example_value(replaced["out"])
    if out is None:
        return "output_shape"
    index = {n: i for i, n in enumerate(replaced["out"].graph.nodes)}
    sources = [replaced[r] for r in roles]
    first = min(sources, key=index.__getitem__)  # the chain's plan reads its input
    return why_not_opaque(sources, replaced["out"], like=out, reference=first.args[0])


def rewrite_attention(
    gm: fx.GraphModule,
    make_gate: Optional[GateFactory] = None,
    taken_names: Optional[set[str]] = None,
    skip_projections: bool = False,
    compact_heads: bool = False,
    opaque_blocks: bool = False,
) -> PassResult:
    """Rewrite every attention core of ``gm`` in place; returns the sites and what was skipped.

    ``make_gate(site)`` builds the module that decides, per call, which heads run
    (``gate(q, k, v, attn_mask, hidden=...) -> bool [B, H]``); without it every gate is open.
    ``taken_names`` lets several graphs of one model (graph breaks, recompiles) share a namespace.
    ``skip_projections`` also routes each site's projections through the head-skipping ops where
    that is provably exact (``skip_projections.py``); ``site.skipped_projections`` says where.
    ``compact_heads`` then hands each site whose four projections were all replaced, in the
    standard layout, to its gate's block module (``compact_heads.py``; ``site.compact_block``).
    ``opaque_blocks``: each block or chain will run as one opaque op of a traced graph, so a
    block takes tensor graph arguments only, a chain tensors and sizes.
    """
    result = PassResult()
    taken = taken_names if taken_names is not None else set()
    for name, pre in _pre_passes():
        changed, skipped = pre(gm)
        result.bump(name, changed)
        result.skipped.extend(skipped)
        if skipped:
            result.bump(f"skipped_{name}", len(skipped))

    matches: list[AttentionMatch] = []
    claimed: set[fx.Node] = set()
    for matcher_name, matcher in _matchers():
        for item in matcher(gm):
            if isinstance(item, SkippedSite):
                result.skipped.append(item)
                result.bump(f"skipped_{matcher_name}")
            elif item.anchor not in claimed:
                claimed.add(item.anchor)
                matches.append(item)

    for match in matches:
        _resolve_kv(match)
        path, _ = module_path_of(match.anchor)
        # The site is described before rewriting, while the original output node still exists.
        provisional = find_projections(match, match.anchor)
        site = describe(match, _unique_name(path, taken), provisional)
        gate_target = None
        if make_gate is not None:
            gate_target = f"dhp_gate_{len(result.sites)}"
            while hasattr(gm, gate_target):
                gate_target += "_"
            gm.add_submodule(gate_target, make_gate(site))
        out = rewrite_match(gm, match, site.num_heads, site.scale, gate_target, hidden=provisional.hidden)
        gated = out.args[0] if out.op == "call_method" else out  # bmm-style sites end in a flatten
        site.head_major = prove_head_layouts(gm, gated, site, provisional)
        compacted = False
        before = dict(result.counters)
        if skip_projections:
            state = skip_site_projections(gm, gated, site, provisional, gate_target, result)
            site.skipped_projections = state.roles()
            if compact_heads:
                compacted = site.compact_block = compact_site(gm, state, gate_target, opaque_blocks)
                if not compacted and (set(site.skipped_projections) == {"q", "k", "v", "out"}
                                      or is_query_chain(state)):
                    why = _why_not_opaque_chain(state) if opaque_blocks else None
                    if why is not None:
                        result.bump(f"no_compact_chain:{why}")
                    else:
                        core = compact_chain_site(gm, state, gate_target)
                        if core is not None:
                            gated, site.compact_block = core, True
        if not site.compact_block:
            site.declined = tuple(k for k, n in result.counters.items() if k.startswith("no_") and n > before.get(k, 0))
        if gate_target is not None and not compacted:  # a block module calls the tap itself
            insert_tap(gm, gated, gate_target)
        result.sites.append(site)
        result.bump(f"rewritten_{match.pattern}")

    gm.graph.lint()
    gm.recompile()
    return result
