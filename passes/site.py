"""Attention sites described as data: what discovery found and what it had to leave alone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

MASK_KINDS = ("none", "bool", "additive")


@dataclass(frozen=True)
class ProjectionRef:
    """A parameter that produces (q/k/v) or consumes (out) one attention site's heads.

    layout: "out_in" for F.linear weights [out_features, in_features]; "in_out" for HF Conv1D /
    addmm weights [in_features, out_features]. ``features`` is the half-open range of the
    projection's output features (q/k/v) or input features (out) that belong to this site,
    head-major; None means the whole dimension. ``head_stride`` is the distance between two
    heads' first features when they are not adjacent: GPT-NeoX's fused projection stores
    [q_h, k_h, v_h] per head, so its q heads start 3·D apart. Head h then owns features
    [start + h·head_stride, start + h·head_stride + D) and ``features`` spans all of them.
    """

    weight: str
    bias: Optional[str] = None
    layout: str = "out_in"
    features: Optional[tuple[int, int]] = None
    head_stride: Optional[int] = None


@dataclass
class AttentionSite:
    """One attention core found in a captured graph, in model terms."""

    name: str  # unique in the model; the owning module path, suffixed "#i" when it owns several
    module_path: str
    module_type: str
    pattern: str  # which matcher found it: "sdpa", "eager_matmul", "eager_bmm", "mha_fused", ...
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    scale: float
    is_causal: bool
    mask_kind: str
    dropout_p: float = 0.0
    cross_attention: bool = False
    q_proj: Optional[ProjectionRef] = None
    k_proj: Optional[ProjectionRef] = None
    v_proj: Optional[ProjectionRef] = None
    out_proj: Optional[ProjectionRef] = None
    # Projections routed through the head-skipping ops ("q", "k", "v", "out"); see skip_projections.
    skipped_projections: tuple[str, ...] = ()
    # Roles ("q", "k", "v", "out") whose weight features the graph proves head-major: head h owns
    # features [h*D, (h+1)*D) of the projection's range. None = not analysed (a site built by
    # hand). Static pruning cuts only proven projections.
    head_major: Optional[tuple[str, ...]] = None
    # The whole block (projections, core, output projection) is one call of the gate's block
    # module, which can run the kept heads alone (see compact_heads).
    compact_block: bool = False
    # What the projection-skipping and compaction passes declined here, as their counter names
    # ("no_skip_qkv_proj:gate_reads_qkv", "no_compact_chain:head_count_in_view", ...): why a
    # pruned head's work is not skipped further. Empty where the block is compact.
    declined: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mask_kind not in MASK_KINDS:
            raise ValueError(f"AttentionSite.mask_kind must be one of {MASK_KINDS}, got {self.mask_kind!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AttentionSite":
        d = dict(d)
        for key in ("q_proj", "k_proj", "v_proj", "out_proj"):
            if d.get(key) is not None:
                p = dict(d[key])
                if p.get("features") is not None:
                    p["features"] = tuple(p["features"])
                d[key] = ProjectionRef(**p)
        for key in ("skipped_projections", "declined"):
            if key in d:
                d[key] = tuple(d[key])
        if d.get("head_major") is not None:
            d["head_major"] = tuple(d["head_major"])
        return cls(**d)


@dataclass
class SkippedSite:
    """Something that looked like attention but was left unchanged, and why."""

    module_path: str
    pattern: str
    reason: str


@dataclass
class AttentionMatch:
    """What a matcher hands to the rewrite: graph nodes of one attention core.

    ``anchor`` is the node whose value is the attention output; the rewrite replaces its uses.
    q/k/v are the nodes to feed the gated op: 4-D [B, H, L, D], or 3-D [B*H, L, D] when
    ``heads_folded`` is the number of query heads folded into dim 0 (bmm-style attention).
    k/v may have fewer heads than q (GQA); the op maps query head h to kv head h // group.
    """

    pattern: str
    anchor: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    attn_mask: Optional[fx.Node] = None
    mask_kind: str = "none"
    scale: Optional[float] = None  # None = 1/sqrt(head_dim), as in SDPA
    is_causal: bool = False
    dropout_p: float = 0.0
    heads_folded: Optional[int] = None
    kv_heads_folded: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    # A scale known only at run time (dynamic=True lifts HF's float ``self.scaling`` to a graph
    # input): the node yielding it, passed to the op as is; ``scale`` then holds its value at capture.
    scale_node: Optional[fx.Node] = None


@dataclass
class PassResult:
    sites: list[AttentionSite] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def bump(self, counter: str, by: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + by
