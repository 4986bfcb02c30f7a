"""Where the device time of one attention block goes, per kernel, on a GPU.

    python benchmarks/profile_block.py [--shapes 32,12,512,64 8,32,2048,128,causal] [--p 1 0.5]

For each shape, p and block variant of ``bench_attention.py --block`` (dense, gated/row,
ops/shared, ops/row), the kernels one call launches with their device time per call
(torch.profiler), and for each head-projection kernel the autotuner's time for every config it
tried (a block that misses its target shows here which kernel, and whether any config of it was
fast). Nothing here is a target: the timed table stays in bench_attention.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import Shape, block_variants, n_kept  # noqa: E402
from profile_overhead import device_kernels  # noqa: E402


def tuning_report(kernels, seen: dict) -> list[str]:
    """Per kernel whose autotuner tuned since the last call: each config's median ms, best first."""
    lines = []
    for name, kernel in kernels.items():
        timings = getattr(kernel, "configs_timings", None)
        if not timings or seen.get(name) is timings:
            continue
        seen[name] = timings
        ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], (list, tuple)) else kv[1])
        for config, t in ranked:
            ms = t[0] if isinstance(t, (list, tuple)) else t
            lines.append(f"  tune {name:24s} {ms:8.4f} ms  {config}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=Shape.parse,
                    default=[Shape.parse(s) for s in ("32,12,512,64", "8,32,2048,128,causal")])
    ap.add_argument("--p", nargs="+", type=float, default=[1.0, 0.5])
    ap.add_argument("--variants", nargs="+", default=["block dense", "block gated/row", "block ops/shared",
                                                        "block ops/row"])
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("profile_block.py needs a CUDA GPU")
    from dhp_fx.kernels import triton_head_linear as hl

    kernels = {"head_linear_out": hl._head_linear_out_kernel, "head_linear_out_pair": hl._head_linear_out_pair_kernel,
               "head_linear_in": hl._head_linear_in_kernel}
    seen: dict = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for s in args.shapes:
        for p in args.p:
            keep = torch.zeros(s.H, dtype=torch.bool, device="cuda")
            keep[torch.randperm(s.H, device="cuda", generator=gen)[:n_kept(p, s.H)]] = True
            variants = block_variants(torch, F, s, keep, torch.bfloat16)
            for name in args.variants:
                fn = variants[name]
                for _ in range(3):  # autotuning and compiles stay out of the profile
                    fn()
                torch.cuda.synchronize()
                print(f"=== {s} p={p:.2f} {name}", flush=True)
                for line in tuning_report(kernels, seen):
                    print(line)
                print(device_kernels(torch, fn, args.top), flush=True)
            del variants
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
