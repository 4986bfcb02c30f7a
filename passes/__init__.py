"""Graph passes of dhp_fx: discover attention in captured FX graphs and rewrite it into a gated op.

Knows graphs only; calls ``dhp::gated_attention`` by name.
"""
from .pipeline import rewrite_attention
from .site import AttentionMatch, AttentionSite, PassResult, ProjectionRef, SkippedSite

__all__ = ["rewrite_attention", "AttentionSite", "AttentionMatch", "PassResult", "ProjectionRef", "SkippedSite"]
