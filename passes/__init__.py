"""Graph passes of dhp_fx: discover attention in captured FX graphs and rewrite it into a gated op.

Knows graphs only; calls ``dhp::gated_attention`` by name.
"""
if __name__ == "dhp_fx.passes":
    from .pipeline import rewrite_attention
    from .site import AttentionMatch, AttentionSite, PassResult, ProjectionRef, SkippedSite

    __all__ = ["rewrite_attention", "AttentionSite", "AttentionMatch", "PassResult", "ProjectionRef", "SkippedSite"]
else:
    # A top-level "passes" found on sys.path from a source checkout's root: a second copy of
    # the classes would break isinstance checks, so it defines nothing (see kernels/__init__.py).
    __all__ = []
