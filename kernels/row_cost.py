"""When computing each batch row's own kept heads pays for the weights it gathers per row.

Per-sample decisions can be honoured two ways. Row by row: each row gathers its kept heads'
weights and runs a batched GEMM on them (``compact_rows.py``; the per-sample GEMM of
``head_linear.py``). Or for the union of the rows' heads: one dense GEMM, pruned features
zeroed after. The first saves multiply-adds that grow with a row's tokens. It pays for weight
traffic that does not: the gather, then a batched GEMM streaming one weight copy per row, where
the dense GEMM reads one copy for every token of every row.

Both paths here are CPU paths (on CUDA, ``dhp_fx.compact_block`` keeps the head ops, whose
Triton kernels read kept weights in place; this rule has not been timed on a GPU).
"""
from __future__ import annotations

# Per-row work pays when the multiply-adds it saves per gathered weight element,
# 2 · tokens · (union − kept) / kept, reach this bound. Measured on MiniLM (d = 384, 12 heads)
# on the 2-core CI machine, session 16: rows lost at 21, 32 and 64, tied at 85 and 96, and won
# at 170 to 288 (benchmarks/RESULTS.md, "Session 16").
ROWS_MIN_SAVED_FLOPS_PER_WEIGHT = 128.0


def rows_pay(tokens: int, kept: int, union: int) -> bool:
    """Whether rows of ``tokens`` tokens should each compute their own ``kept`` heads (or KV
    groups) rather than all compute the ``union``."""
    return 2.0 * tokens * (union - kept) >= ROWS_MIN_SAVED_FLOPS_PER_WEIGHT * kept


def tokens_per_row(x, rows: int) -> int:
    """Tokens a row of ``x`` holds: x is [rows, L, features], or its rows flattened to
    [rows * L, features]."""
    return x.numel() // max(1, rows * x.shape[-1])
