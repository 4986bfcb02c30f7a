"""Tensor-level kernels of dhp_fx: the gated attention op, head-skipping projections, entropy.

Importing this package registers ``torch.ops.dhp.gated_attention`` and
``torch.ops.dhp.head_linear_out`` / ``head_linear_in``.
"""
from .gated_attention import check_gated_attention_args, gated_attention
from .head_linear import head_linear_in, head_linear_out
from .reference import gated_attention_reference

__all__ = [
    "gated_attention", "gated_attention_reference", "check_gated_attention_args",
    "head_linear_in", "head_linear_out",
]
