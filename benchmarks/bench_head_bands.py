"""A query chain's decode attention on a CPU: kept query heads over the cache's K/V.

    python benchmarks/bench_head_bands.py [--reps 200]

Per shape (B, H, KV heads, keys, D; one query row, fp32) and kept fraction p (a random set of
heads, seeded): SDPA over every head (what the dense model runs), every head with the pruned
heads' q zero (``compact_heads.HEAD_BANDS = False``, session 21's CPU path), the kept heads' K/V
gathered then SDPA, and bands of adjacent heads sliced in place (``kernels/head_runs.py``).
Best of five medians of ``--reps`` calls; warm caches (a decoding step's K/V were just written).
"""
from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(8, 8, 8, 136, 64, 0.5), (8, 8, 8, 512, 64, 0.5), (8, 8, 8, 2048, 64, 0.5), (8, 12, 12, 136, 64, 0.25),
          (8, 32, 32, 512, 128, 0.5), (8, 32, 8, 512, 128, 0.5), (8, 32, 8, 512, 128, 0.25), (1, 32, 8, 4096, 128, 0.5)]


def best_us(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps * 1e6)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args(argv)
    from dhp_fx.kernels.compact_heads import dense_attention, kept_first
    from dhp_fx.kernels.head_runs import attend_head_bands, head_bands

    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, fp32, one query row; µs per call")
    print("| B, H, KV, keys, D | p | bands | SDPA every head | every head, q zero | K/V gathered | bands in place |")
    print("|---|---|---|---|---|---|---|")
    for B, H, KV, L, D, p in SHAPES:
        union = torch.zeros(H, dtype=torch.bool)
        union[torch.randperm(H, generator=g)[: int(H * p)]] = True
        cap = int(union.sum())
        idx, valid = kept_first(union, cap)
        group = H // KV
        groups = torch.div(idx, group, rounding_mode="floor")
        q_all = torch.randn(B, H, 1, D, generator=g)
        q = q_all.index_select(1, idx)
        k, v = (torch.randn(B, KV, L, D, generator=g) for _ in range(2))
        bands = head_bands(idx.tolist(), valid.tolist(), group)

        def every_head_zero_q():
            full = q.new_zeros(B, H, 1, D).index_copy(1, idx, q)
            return dense_attention(full, k, v, None, 0.0, False, None, group).index_select(1, idx)

        def gathered():
            return dense_attention(q, k.index_select(1, groups), v.index_select(1, groups), None, 0.0, False, None, 1)

        def in_place():
            return attend_head_bands(q, k, v, bands, group, None, False, None)

        torch.testing.assert_close(in_place(), gathered())
        torch.testing.assert_close(every_head_zero_q(), gathered())
        times = [best_us(f, args.reps) for f in (lambda: dense_attention(q_all, k, v, None, 0.0, False, None, group),
                                                 every_head_zero_q, gathered, in_place)]
        print(f"| {B}, {H}, {KV}, {L}, {D} | {p:g} | {len(bands)} | " + " | ".join(f"{t:.0f}" for t in times) + " |")


if __name__ == "__main__":
    main()
