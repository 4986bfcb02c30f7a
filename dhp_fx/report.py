"""Text reports of what dhp_fx found and changed."""
from __future__ import annotations

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
         s.mask_kind, "yes" if s.is_causal else "no", "cross" if s.cross_attention else "self"]
        for s in sites
    ]
    out = [f"dhp_fx: {len(sites)} attention site(s) rewritten into dhp::gated_attention"]
    if rows:
        out.append(_table(["site", "module", "heads", "kv heads", "head dim", "pattern", "mask", "causal", "kind"], rows))
    if skipped:
        out.append(f"\n{len(skipped)} candidate(s) left unchanged:")
        out.append(_table(["module", "pattern", "reason"], [[s.module_path or "<root>", s.pattern, s.reason] for s in skipped]))
    return "\n".join(out)
