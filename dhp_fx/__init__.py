"""dhp_fx: dynamic attention-head pruning as graph passes.

    import dhp_fx
    fast = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.7))
"""
from . import kernels  # noqa: F401  (registers torch.ops.dhp.gated_attention)
from .backend import DHPCompiler, dhp_fx_backend
from .config import DHPConfig
from .optimize import DHPModel, optimize
from .passes import AttentionSite, SkippedSite
from .calibrate import CalibrationStats, calibrate
from .report import heatmap, register_flop_formulas
from .static_prune import load_pruned, save_pruned, static_prune

# FlopCounterMode copies the formula registry when it is created: register before any user does.
register_flop_formulas()

__all__ = ["optimize", "DHPConfig", "DHPModel", "DHPCompiler", "dhp_fx_backend", "AttentionSite", "SkippedSite",
           "calibrate", "CalibrationStats", "static_prune", "save_pruned", "load_pruned", "heatmap"]
__version__ = "0.1.0"
from .distill import DistillConfig, DistillResult, distill, evaluate as evaluate_distillation
from .checkpoint import load, save

__all__ += ["distill", "DistillConfig", "DistillResult", "evaluate_distillation", "save", "load"]
