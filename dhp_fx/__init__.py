"""dhp_fx: dynamic attention-head pruning as graph passes.

    import dhp_fx
    fast = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.7))
"""
from . import kernels  # noqa: F401  (registers torch.ops.dhp.gated_attention)
from .backend import DHPCompiler, dhp_fx_backend
from .config import DHPConfig
from .optimize import DHPModel, optimize
from .passes import AttentionSite, SkippedSite

__all__ = ["optimize", "DHPConfig", "DHPModel", "DHPCompiler", "dhp_fx_backend", "AttentionSite", "SkippedSite"]
__version__ = "0.1.0"
