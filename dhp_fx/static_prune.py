"""Static pruning: physically remove heads that calibration found (nearly) never kept.

Works from the AttentionSite projection info alone: the removed heads' slices are cut out of the
Q/K/V weights (and biases) and the output projection's input columns, nn.Linear / HF Conv1D
size attributes are updated, and the attention module's head-count attributes are rewritten so
its own code still runs (``num_heads``, ``num_attention_heads``, ``all_head_size``, ...). Each
layer may end up with a different number of heads.

A pruned model is saved as safetensors (weights) + JSON (which heads went where); loading
re-applies the cuts to a freshly built base model, so no code is ever unpickled::

    result = static_prune(optimized, stats)          # copy of the original, heads removed
    save_pruned(result, "out/")
    model = load_pruned("out/", lambda: BertModel(config))
    fast = dhp_fx.optimize(model)                     # rewrite the smaller model again
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

from .passes import AttentionSite
from .scoring import _feature_axis, head_slices

FORMAT = "dhp_fx.static_prune/1"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "pruning.json"

# Attribute names that hold a site's head counts / widths in common attention code.
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "nheads", "num_q_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads", "n_kv_head")
_WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size", "q_dim")
_GROUP_ATTRS = ("num_key_value_groups", "n_rep", "num_queries_per_kv")


@dataclass
class PruneResult:
    model: nn.Module
    records: list = field(default_factory=list)  # [{"site": AttentionSite dict, "remove": [heads]}]
    params_before: int = 0
    params_after: int = 0

    @property
    def removed(self) -> dict:
        return {r["site"]["name"]: r["remove"] for r in self.records}

    @property
    def reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already skips tied duplicates


def prune_plan(sites, stats, max_keep_freq: float = 0.01, min_heads: int = 1) -> dict:
    """{site name: query heads to remove}: heads kept <= max_keep_freq of the calibration inputs.

    GQA sites (fewer KV heads) lose whole KV groups only (every query head of the group rare),
    so the repeat-KV grouping stays uniform; every site keeps at least min_heads heads.
    """
    by_name = {s.name: s for s in sites}
    plan = {}
    for name, heads in stats.prunable(max_keep_freq, min_heads).items():
        site = by_name.get(name)
        if site is None:
            continue
        rare = set(heads)
        if site.num_kv_heads < site.num_heads:
            group = site.num_heads // site.num_kv_heads
            full = [g for g in range(site.num_kv_heads) if all(g * group + i in rare for i in range(group))]
            full = full[: site.num_kv_heads - 1]  # one group must stay
            rare = {g * group + i for g in full for i in range(group)}
        if rare:
            plan[name] = sorted(rare)
    return plan


def _kv_removed(site: AttentionSite, remove: list) -> list:
    if site.num_kv_heads == site.num_heads:
        return sorted(remove)
    group = site.num_heads // site.num_kv_heads
    gone = set(remove)
    groups = [g for g in range(site.num_kv_heads) if all(g * group + i in gone for i in range(group))]
    if {g * group + i for g in groups for i in range(group)} != gone:
        raise ValueError(f"site {site.name!r}: GQA heads can only be removed by whole KV groups, got {sorted(gone)}")
    return groups


def _cuts(params: Mapping[str, torch.Tensor], records: list) -> dict:
    """{weight name: (axis, sorted feature indices to drop, bias name or None)} over all records.

    Gathered before cutting anything: a fused QKV weight is shared by several roles, and cutting
    one role first would shift the feature ranges of the others.
    """
    cuts: dict = {}
    for rec in records:
        site = AttentionSite.from_dict(rec["site"])
        remove = sorted(rec["remove"])
        removed_kv = _kv_removed(site, remove)
        for role in ("q", "k", "v", "out"):
            ref = getattr(site, f"{role}_proj")
            if ref is None:
                if role == "out" or role == "q":
                    raise ValueError(f"site {site.name!r}: its {role} projection is unknown, heads cannot be cut")
                continue
            if site.head_major is not None and role not in site.head_major:
                raise ValueError(
                    f"site {site.name!r}: the graph does not prove that the {role} projection {ref.weight} "
                    "stores heads head-major (head h = features [h*D, (h+1)*D)); cutting its features by head "
                    "could remove the wrong ones, so static_prune refuses"
                )
            weight = params[ref.weight]
            sl = head_slices(site, role, weight.shape[_feature_axis(role, ref.layout)])
            if sl is None:
                raise ValueError(f"site {site.name!r}: {role} projection {ref.weight} does not split into heads")
            axis, spans = sl
            heads = removed_kv if role in ("k", "v") else remove
            idx = [i for h in heads for i in range(*spans[h])]
            prev = cuts.setdefault(ref.weight, (axis, set(), None if role == "out" else ref.bias))
            if prev[0] != axis:
                raise ValueError(f"weight {ref.weight} is cut along two different axes")
            prev[1].update(idx)
    return {name: (axis, sorted(idx), bias) for name, (axis, idx, bias) in cuts.items()}


def removed_parameter_count(model: nn.Module, sites, plan: dict) -> int:
    """Parameters static pruning by ``plan`` would remove from ``model`` (nothing is changed)."""
    by_name = {s.name: s for s in sites}
    records = [{"site": by_name[n].to_dict(), "remove": h} for n, h in plan.items() if n in by_name]
    params = dict(model.named_parameters(remove_duplicate=False))
    total = 0
    for name, (axis, idx, bias) in _cuts(params, records).items():
        w = params[name]
        total += len(idx) * w.shape[1 - axis] + (len(idx) if bias is not None and bias in params else 0)
    return total


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> nn.Module:
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path)
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    return owner


def _fix_sizes(module: nn.Module) -> None:
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif hasattr(module, "nf") and hasattr(module, "nx"):  # HF Conv1D: weight [in, out]
        module.nx, module.nf = w.shape


def _fix_attention_module(module: nn.Module, site: AttentionSite, new_h: int, new_kv: int) -> dict:
    """Rewrite the head counts the module's code reads; returns {attr: new value}."""
    old_h, old_kv = site.num_heads, site.num_kv_heads
    changes = {}
    width_old, width_new = old_h * site.head_dim, new_h * site.head_dim
    for attr in _HEAD_ATTRS + _KV_ATTRS + _WIDTH_ATTRS + _GROUP_ATTRS:
        value = getattr(module, attr, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if attr in _HEAD_ATTRS and value == old_h:
            changes[attr] = new_h
        elif attr in _KV_ATTRS and value == old_kv:
            changes[attr] = new_kv
        elif attr in _WIDTH_ATTRS and value == width_old:
            changes[attr] = width_new
        elif attr in _GROUP_ATTRS and value == old_h // old_kv:
            changes[attr] = new_h // new_kv
    for attr, value in changes.items():
        setattr(module, attr, value)
    # Frozen spec dataclasses owned by the module (like dhp_fx.testing's): replace fields. Mutable
    # ones are left alone: HF configs are dataclasses shared by every layer, and rebuilding one
    # drops runtime state such as the attention implementation.
    for attr, value in list(vars(module).items()):
        if (dataclasses.is_dataclass(value) and not isinstance(value, type)
                and value.__dataclass_params__.frozen):
            fields = {f.name for f in dataclasses.fields(value)}
            upd = {f: new_h for f in fields & set(_HEAD_ATTRS) if getattr(value, f) == old_h}
            upd.update({f: new_kv for f in fields & set(_KV_ATTRS) if getattr(value, f) == old_kv})
            if upd:
                setattr(module, attr, dataclasses.replace(value, **upd))
                changes.update({f"{attr}.{k}": v for k, v in upd.items()})
    return changes


def _check_no_other_head_params(model: nn.Module, site: AttentionSite) -> None:
    """Refuse modules with per-head parameters beyond Q/K/V/O (T5's relative position bias is
    [buckets, heads]): cutting only the projections would leave them the wrong size."""
    refs = [getattr(site, f"{r}_proj") for r in ("q", "k", "v", "out")]
    known = {n for r in refs if r is not None for n in (r.weight, r.bias) if n}
    module = model.get_submodule(site.module_path)
    prefix = f"{site.module_path}." if site.module_path else ""
    for name, p in module.named_parameters():
        if prefix + name not in known and p.dim() >= 2 and site.num_heads in p.shape:
            raise ValueError(f"site {site.name!r}: parameter {prefix + name} {tuple(p.shape)} looks per-head; "
                             "dhp_fx only cuts Q/K/V/O projections, so this model cannot be pruned statically")


def apply_pruning(model: nn.Module, records: list) -> dict:
    """Cut the heads named in ``records`` out of ``model`` in place; returns {site: attr changes}."""
    for rec in records:
        _check_no_other_head_params(model, AttentionSite.from_dict(rec["site"]))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, (axis, idx, bias) in _cuts(params, records).items():
        w = params[name]
        keep = torch.tensor(sorted(set(range(w.shape[axis])) - set(idx)), dtype=torch.long, device=w.device)
        owner = _set_param(model, name, w.detach().index_select(axis, keep))
        if bias is not None and bias in params:
            _set_param(model, bias, params[bias].detach().index_select(0, keep))
        _fix_sizes(owner)
    changed = {}
    for rec in records:
        site = AttentionSite.from_dict(rec["site"])
        new_h = site.num_heads - len(rec["remove"])
        new_kv = site.num_kv_heads - len(_kv_removed(site, rec["remove"]))
        module = model.get_submodule(site.module_path)
        if isinstance(module, nn.MultiheadAttention):
            raise ValueError(f"site {site.name!r}: nn.MultiheadAttention fixes embed_dim = heads * head_dim; "
                             "its heads cannot be removed")
        changed[site.name] = _fix_attention_module(module, site, new_h, new_kv)
    return changed


def static_prune(optimized, stats=None, max_keep_freq: float = 0.01, plan: Optional[dict] = None,
                 inplace: bool = False, min_heads: int = 1) -> PruneResult:
    """Remove the heads calibration found (nearly) never kept from the model ``optimize`` was given.

    ``plan`` ({site: heads}) overrides the stats; without inplace the original is deep-copied.
    Re-run ``dhp_fx.optimize`` on ``result.model`` to gate the heads that remain.
    """
    stats = stats if stats is not None else getattr(optimized, "calibration_stats", None)
    if plan is None:
        if stats is None:
            raise ValueError("static_prune needs calibration stats (dhp_fx.calibrate) or an explicit plan")
        plan = prune_plan(optimized.sites, stats, max_keep_freq, min_heads)
    by_name = {s.name: s for s in optimized.sites}
    unknown = sorted(set(plan) - set(by_name))
    if unknown:
        raise KeyError(f"no attention sites named {unknown}")
    records = [{"site": by_name[n].to_dict(), "remove": sorted(int(h) for h in heads)} for n, heads in plan.items() if heads]
    for rec in records:
        if len(rec["remove"]) >= rec["site"]["num_heads"]:
            raise ValueError(f"site {rec['site']['name']!r}: removing every head is not allowed")
    model = optimized.model if inplace else copy.deepcopy(optimized.model)
    before = parameter_count(model)
    apply_pruning(model, records)
    # dhp_fx.save reads this to record the cuts; applied in order, repeated prunings replay exactly.
    model.dhp_fx_pruning = list(getattr(model, "dhp_fx_pruning", []) or []) + records
    return PruneResult(model=model, records=records, params_before=before, params_after=parameter_count(model))


def save_pruned(result: PruneResult, directory: str) -> None:
    """weights -> model.safetensors, cuts -> pruning.json (safe formats only)."""
    from safetensors.torch import save_model

    os.makedirs(directory, exist_ok=True)
    save_model(result.model, os.path.join(directory, WEIGHTS_FILE))
    meta = {"format": FORMAT, "records": result.records,
            "params_before": result.params_before, "params_after": result.params_after}
    with open(os.path.join(directory, PLAN_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def load_pruned(directory: str, base_model_factory: Callable[[], nn.Module], device=None) -> nn.Module:
    """Build the unpruned architecture, re-apply the recorded cuts, load the saved weights."""
    from safetensors.torch import load_model

    with open(os.path.join(directory, PLAN_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a dhp_fx pruned model (format {meta.get('format')!r})")
    model = base_model_factory()
    apply_pruning(model, meta["records"])
    load_model(model, os.path.join(directory, WEIGHTS_FILE), strict=True, device=str(device or "cpu"))
    return model
