"""CPU timing of dhp::gated_attention against dense SDPA and a naive gather/scatter.

    python benchmarks/bench_cpu_attention.py [--reps 30] [--pattern random|shared|both]

For every shape and keep fraction p it prints the median time of
  dense  - F.scaled_dot_product_attention on all heads (what the model costs unpruned),
  naive  - index_select the kept (batch, head) pairs, one SDPA call, index_copy back,
  ours   - torch.ops.dhp.gated_attention,
and the speedups of naive and ours over dense. Each keep row holds exactly round(p * H) heads
at random positions ("random": a different set per batch row; "shared": one set for the
whole batch, as a per-layer gate gives). The three are timed round-robin, one call each per
round, so load from other processes on a shared machine hits them alike.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.nn.functional as F

import dhp_fx.kernels  # noqa: F401  (registers torch.ops.dhp.gated_attention)

# (B, H, S, D, causal)
SHAPES = [
    (8, 12, 128, 32, False),
    (8, 12, 128, 64, False),
    (4, 12, 512, 64, False),
    (2, 16, 1024, 64, True),
]


def make_keep(B: int, H: int, p: float, shared: bool, gen: torch.Generator) -> torch.Tensor:
    n = max(1, round(p * H))
    keep = torch.zeros(B, H, dtype=torch.bool)
    for b in range(B):
        if shared and b > 0:
            keep[b] = keep[0]
        else:
            keep[b, torch.randperm(H, generator=gen)[:n]] = True
    return keep


def naive(q, k, v, keep, causal):
    B, H, S, D = q.shape
    idx = keep.reshape(-1).nonzero().squeeze(1)
    qg = q.flatten(0, 1).index_select(0, idx)[None]
    kg = k.flatten(0, 1).index_select(0, idx)[None]
    vg = v.flatten(0, 1).index_select(0, idx)[None]
    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
    out = q.new_zeros(B * H, S, v.shape[-1])
    out.index_copy_(0, idx, o[0])
    return out.view(B, H, S, -1)


def time_round_robin(fns: dict, reps: int, warmup: int) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30, help="timed rounds per configuration")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--p", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25], help="fractions kept")
    ap.add_argument("--pattern", choices=["random", "shared", "both"], default="random")
    ap.add_argument("--layout", choices=["bhsd", "bshd"], default="bhsd",
                    help="bshd: q/k/v are transposed views of [B, S, H, D] tensors, as models produce")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    patterns = ["random", "shared"] if args.pattern == "both" else [args.pattern]
    print(f"# {datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"fp32  layout {args.layout}  median of {args.reps} rounds (ms)")
    print(f"{'B,H,S,D':>16} {'causal':>6} {'pattern':>7} {'p':>5} {'dense':>8} {'naive':>8} {'ours':>8}"
          f" {'naive x':>8} {'ours x':>7}")
    for B, H, S, D, causal in SHAPES:
        def rand(*shape):
            if args.layout == "bshd":
                return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=gen).transpose(1, 2)
            return torch.randn(*shape, generator=gen)

        q, k, v = rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, D)
        for pattern in patterns:
            for p in args.p:
                keep = make_keep(B, H, p, pattern == "shared", gen)
                ours = lambda: torch.ops.dhp.gated_attention(q, k, v, keep, None, 0.0, causal, None)  # noqa: E731
                torch.testing.assert_close(ours(), naive(q, k, v, keep, causal), atol=1e-5, rtol=1e-4)
                t = time_round_robin(
                    {
                        "dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                        "naive": lambda: naive(q, k, v, keep, causal),
                        "ours": ours,
                    },
                    args.reps, args.warmup,
                )
                print(f"{str((B, H, S, D)):>16} {str(causal):>6} {pattern:>7} {p:>5.2f} {t['dense']:>8.3f}"
                      f" {t['naive']:>8.3f} {t['ours']:>8.3f} {t['dense'] / t['naive']:>7.2f}x"
                      f" {t['dense'] / t['ours']:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
