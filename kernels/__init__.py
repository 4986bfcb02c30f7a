"""Tensor-level kernels of dhp_fx: the gated attention op, head-skipping projections, entropy.

Importing this package registers ``torch.ops.dhp.gated_attention`` and
``torch.ops.dhp.head_linear_out`` / ``head_linear_in``.
"""
if __name__ == "dhp_fx.kernels":
    from .gated_attention import check_gated_attention_args, gated_attention
    from .head_linear import head_linear_in, head_linear_out
    from .reference import gated_attention_reference

    __all__ = [
        "gated_attention", "gated_attention_reference", "check_gated_attention_args",
        "head_linear_in", "head_linear_out",
    ]
else:
    # Imported as a top-level "kernels" because a source checkout's root is on sys.path
    # (python -m pytest from the root). transformers does exactly that when it probes for the
    # Hugging Face "kernels" package. Registering the ops a second time, from a module copy
    # that is then dropped, left torch.ops.dhp pointing at freed registrations: a segfault at
    # the next call. So this copy registers nothing.
    __all__ = []
