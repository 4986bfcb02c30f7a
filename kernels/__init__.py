"""Tensor-level kernels of dhp_fx: the gated attention op and its implementations.

Importing this package registers ``torch.ops.dhp.gated_attention``.
"""
from .reference import gated_attention_reference
from .gated_attention import gated_attention, check_gated_attention_args

__all__ = ["gated_attention", "gated_attention_reference", "check_gated_attention_args"]
