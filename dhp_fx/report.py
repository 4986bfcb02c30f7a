"""Reports of what dhp_fx found and changed: sites, keep frequencies, FLOPs, params, heatmaps."""
from __future__ import annotations

from typing import Optional

import torch

from .passes import AttentionSite, SkippedSite


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, row)) for row in rows]
    return "\n".join(lines)


def sites_table(sites: list[AttentionSite], skipped: list[SkippedSite]) -> str:
    if not sites and not skipped:
        return "dhp_fx: no attention found; the model runs unchanged."
    rows = [
        [s.name, s.module_type, s.num_heads, s.num_kv_heads, s.head_dim, s.pattern,
         s.mask_kind, "yes" if s.is_causal else "no", "cross" if s.cross_attention else "self", _skips(s)]
        for s in sites
    ]
    out = [f"dhp_fx: {len(sites)} attention site(s) rewritten into dhp::gated_attention"]
    if rows:
        out.append(_table(["site", "module", "heads", "kv heads", "head dim", "pattern", "mask", "causal", "kind",
                           "pruned heads skip"], rows))
    declined = [[s.name, ", ".join(s.declined)] for s in sites if s.declined]
    if declined:
        out.append("\nwhy pruned heads skip no more work (pass counters):")
        out.append(_table(["site", "declined"], declined))
    if skipped:
        out.append(f"\n{len(skipped)} candidate(s) left unchanged:")
        out.append(_table(["module", "pattern", "reason"], [[s.module_path or "<root>", s.pattern, s.reason] for s in skipped]))
    return "\n".join(out)


def _skips(site: AttentionSite) -> str:
    """Where a pruned head's work is skipped: the core always; which projections; or the block
    computed on the kept heads alone (compact, when the budget bounds them: whole, or as a chain
    around RoPE; or the kept query heads alone, where something else reads K and V whole)."""
    if site.compact_block:
        if "k" not in site.skipped_projections and "v" not in site.skipped_projections:
            return "kept query heads only (compact; K/V whole, read elsewhere)"
        return "kept heads only (compact)"
    return "+".join(["core", *site.skipped_projections])


# ---------------------------------------------------------------------------- FLOPs
def gated_attention_flop(q, k, v, keep, *args, out_val=None, **kwargs) -> int:
    """FLOPs of dhp::gated_attention for the kept (batch, head) pairs only."""
    per_head = 2 * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])
    try:
        kept = int(keep.sum())
    except Exception:  # no values to read (fake / meta tensors)
        kept = q.shape[0] * q.shape[1]
    return kept * per_head


def register_flop_formulas() -> None:
    """Teach torch.utils.flop_counter the gated op's true cost and CPU SDPA's cost (idempotent).

    dhp::gated_attention costs 2·Lq·Lk·(D + Dv) per kept (batch, head): the formula reads the
    keep tensor's values (get_raw), falling back to every head when it has none (fake tensors).
    torch leaves aten._scaled_dot_product_flash_attention_for_cpu uncounted, which would make
    the original model look cheaper on CPU than it is. The registry is keyed by op packet, and
    torch.ops may hand out a fresh packet later (seen after Dynamo runs), so this checks every
    time instead of once.
    """
    from torch.utils import flop_counter as fc

    _register_if_absent(torch.ops.dhp.gated_attention, get_raw=True)(gated_attention_flop)
    _register_if_absent(torch.ops.dhp.head_linear_out, get_raw=True)(head_linear_flop)
    _register_if_absent(torch.ops.dhp.head_linear_in, get_raw=True)(head_linear_flop)
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        @_register_if_absent(cpu_sdpa)
        def cpu_sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(q_shape, k_shape, v_shape)


def head_linear_flop(x, weight, bias, heads_keep, head_dim, weight_in_out=False, *args, out_val=None, **kwargs) -> int:
    """2·rows·in·out of the kept heads' share of a dhp::head_linear_* projection.

    Per-sample masks ([B, H]) count each sample's own heads when every row keeps as many (the op
    then computes exactly those), else the union of the rows' heads (what the op computes)."""
    rows = x.numel() // x.shape[-1]
    full = 2 * rows * weight.shape[0] * weight.shape[1]
    try:
        if heads_keep.dim() == 2:
            counts = heads_keep.sum(-1)
            equal = bool((counts == counts[0]).all())
            kept = int(counts[0]) if equal else int(heads_keep.any(0).sum())
            return full * kept // max(1, heads_keep.shape[-1])
        kept = int(heads_keep.sum())
    except Exception:  # fake tensors carry no values: count every head
        return full
    return full * kept // max(1, heads_keep.numel())


def _register_if_absent(target, get_raw=False):
    from torch.utils import flop_counter as fc

    def deco(fn):
        if target not in fc.flop_registry:
            fc.register_flop_formula(target, get_raw=get_raw)(fn)
        return fn

    return deco


def count_flops(model, batch) -> int:
    """FLOPs of one no_grad call (dicts as kwargs, tuples as args), compiled models included.

    Dynamo refuses to run compiled code under a dispatch mode unless the mode declares that it
    ignores compile internals, so the counter's mode is swapped for one that does; the gated
    graph (eager or aot_eager downstream) then runs op by op under the counter. Inductor fuses
    ops into kernels the counter cannot see: measure with compiler="eager".
    """
    from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

    register_flop_formulas()

    class _Mode(_FlopCounterMode):
        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Graphs keep the op packet they were rewritten with, which may no longer be the
            # one torch.ops hands out: recognise the gated op by name.
            packet = getattr(func, "_overloadpacket", None)
            if packet is not None and packet not in self.counter.flop_registry and func.name() == "dhp::gated_attention":
                self.counter.flop_registry[packet] = gated_attention_flop
            return super().__torch_dispatch__(func, types, args, kwargs)

    class _Counter(FlopCounterMode):
        def __enter__(self):
            self.flop_counts.clear()
            self.mod_tracker.__enter__()
            self.mode = _Mode(self)
            self.mode.__enter__()
            return self

    counter = _Counter(display=False)
    with torch.no_grad(), counter:
        if isinstance(batch, dict):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            model(batch)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------- calibration reports
def keep_frequency_table(stats) -> str:
    rows = []
    for s in stats.sites.values():
        if not s.keep_freq:
            continue
        freq = " ".join(f"{f:.2f}" for f in s.keep_freq)
        rows.append([s.name, s.num_heads, f"{s.keep_ratio:g}" if s.keep_ratio is not None else "-",
                     f"{sum(s.keep_freq):.2f}", freq])
    if not rows:
        return "no keep frequencies recorded (run dhp_fx.calibrate first)"
    return _table(["site", "heads", "keep ratio", "mean kept", "keep frequency per head"], rows)


def _fmt_change(before, after) -> str:
    if before is None or after is None:
        return "not measured"
    if not before:
        return f"original not countable (fused kernels torch.utils.flop_counter cannot see) -> {after:,}"
    pct = 100.0 * (after - before) / before if before else 0.0
    return f"{before:,} -> {after:,} ({pct:+.1f}%)"


def block_paths(model) -> str:
    """What the compact sites' blocks ran so far, summed over sites, or "" before any call: a
    decision is per call, so the sites table alone cannot say it."""
    blocks = []
    for site in model.sites:
        if site.compact_block:
            gate = model.gate(site)
            blocks += [m for m in (getattr(gate, "block_module", None), getattr(gate, "chain_module", None))
                       if m is not None]
    compact = sum(b.calls_compact for b in blocks)
    every = sum(b.calls_every_head for b in blocks)
    if not compact and not every:
        return ""
    rows = sum(b.calls_rows for b in blocks)
    query = sum(b.calls_query_heads for b in blocks)
    dense = sum(b.calls_dense for b in blocks)
    masked = sum(b.calls_masked for b in blocks)
    query_text = f", {query} of them the kept query heads over every KV group" if query else ""
    return (f"\nblock calls so far: {compact} on kept heads only ({rows} of them each row its own{query_text}), "
            f"{every} on every head ({dense} of them dense, the gate having kept every head; "
            f"{masked} dense with pruned heads zeroed, where no compaction paid)")


def model_report(model, stats=None, max_keep_freq: float = 0.01) -> str:
    """sites table, then (after calibration) keep frequencies, FLOPs before/after on the first
    calibration batch, and parameters before/after static pruning at ``max_keep_freq``."""
    from .static_prune import parameter_count, prune_plan, removed_parameter_count

    out = [sites_table(model.sites, model.skipped)]
    paths = block_paths(model)
    if paths:
        out.append(paths)
    stats = stats if stats is not None else getattr(model, "calibration_stats", None)
    if stats is None:
        out.append("\n(no calibration yet: dhp_fx.calibrate(model, batches) adds keep frequencies, FLOPs and params)")
        return "\n".join(out)
    out.append(f"\ncalibration: {stats.batches} batch(es), {stats.samples} sample(s)")
    out.append(keep_frequency_table(stats))
    out.append(f"FLOPs (first batch, original -> gated): {_fmt_change(stats.flops_before, stats.flops_after)}")
    plan = prune_plan(model.sites, stats, max_keep_freq)
    before = parameter_count(model.model)
    removed = removed_parameter_count(model.model, model.sites, plan)
    heads = sum(len(h) for h in plan.values())
    out.append(f"params (static pruning of {heads} head(s) kept <= {max_keep_freq:g} of the time): "
               f"{_fmt_change(before, before - removed)}")
    return "\n".join(out)


def heatmap(source, path: str, title: Optional[str] = None) -> str:
    """PNG of keep frequency, sites (layers) x heads; ``source`` is a model or CalibrationStats."""
    # Figure + Agg canvas directly: no pyplot, so the user's backend and figures are untouched.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = getattr(source, "calibration_stats", source)
    if stats is None or not getattr(stats, "sites", None):
        raise ValueError("no calibration statistics: run dhp_fx.calibrate(model, batches) first")
    sites = [s for s in stats.sites.values() if s.keep_freq]
    width = max(s.num_heads for s in sites)
    grid = np.full((len(sites), width), np.nan)
    for i, s in enumerate(sites):
        grid[i, : s.num_heads] = s.keep_freq  # heads a site lacks stay blank (non-uniform pruning)
    fig = Figure(figsize=(max(4.0, 0.45 * width + 2.5), max(2.5, 0.35 * len(sites) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("site")
    ax.set_yticks(range(len(sites)), [s.name for s in sites], fontsize=7)
    ax.set_xticks(range(width))
    ax.set_title(title or "keep frequency")
    fig.colorbar(image, ax=ax, label="fraction of inputs kept")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
