"""Where the host time of one gated-attention call goes, on a GPU.

    python benchmarks/profile_overhead.py [--calls 300] [--top 14]

At short sequences and at decode the kernels finish before Python has launched the next one, so
``do_bench`` then measures the host: this prints, per case, the GPU time (``do_bench`` median), the
host time per call (calls queued back to back, one synchronize at the end), whether any call
synchronizes with the host (``torch.cuda.set_sync_debug_mode``), and cProfile's busiest functions.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time


def cases(torch, dtype):
    from dhp_fx.kernels.triton_attention import triton_gated_attention

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def keep_of(B, H, p):
        return torch.rand(B, H, device=dev, generator=g) < p

    out = {}
    B, H, L, D = 32, 12, 512, 64
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype) for _ in range(3))
    keep = keep_of(B, H, 0.5)
    out["prefill 32x12x512x64 tma auto"] = lambda: triton_gated_attention(q, k, v, keep)
    out["prefill 32x12x512x64 tma off"] = lambda: triton_gated_attention(q, k, v, keep, tma=False)
    for (B, Hq, Hkv, Lk, D) in ((1, 32, 8, 8192, 128), (1, 32, 32, 32768, 128)):
        qd = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
        kd, vd = (torch.randn(B, Hkv, Lk, D, device=dev, dtype=dtype) for _ in range(2))
        kp = keep_of(B, Hq, 0.5)
        name = f"decode {B},{Hq},{Hkv},{Lk},{D}"
        out[name] = lambda qd=qd, kd=kd, vd=vd, kp=kp: triton_gated_attention(qd, kd, vd, kp)
        out[name + " 1 split"] = lambda qd=qd, kd=kd, vd=vd, kp=kp: triton_gated_attention(qd, kd, vd, kp, num_splits=1)
    x = torch.randn(32, 512, 768, device=dev, dtype=dtype)
    w = torch.randn(768, 768, device=dev, dtype=dtype) / 28
    kh = keep_of(32, 12, 0.5)
    out["head_linear_out 32x512x768"] = lambda: torch.ops.dhp.head_linear_out(x, w, None, kh, 64)
    out["F.linear 32x512x768 (reference)"] = lambda: torch.nn.functional.linear(x, w)
    return out


def device_kernels(torch, fn, top: int, calls: int = 20) -> str:
    """The GPU kernels one call launches, with their device time per call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / calls, e.count / calls, e.key))
    rows.sort(reverse=True)
    return "\n".join(f"  device {us:9.1f} us/call  x{n:4.1f}  {key[:90]}" for us, n, key in rows[:top])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args(argv)
    import torch
    import triton.testing

    import dhp_fx.kernels  # noqa: F401  (registers the dhp ops)

    if not torch.cuda.is_available():
        sys.exit("profile_overhead.py needs a CUDA GPU")
    rows = []
    for name, fn in cases(torch, torch.bfloat16).items():
        fn()
        torch.cuda.synchronize()
        gpu = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        host = (time.perf_counter() - t0) / args.calls * 1e3
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            sync = "none"
        except RuntimeError as e:
            sync = str(e).splitlines()[0][:120]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
        print(f"\n=== {name}: do_bench {gpu:.4f} ms, host {host:.4f} ms/call, sync: {sync}")
        print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
        print(device_kernels(torch, fn, args.top))
        rows.append((name, gpu, host, sync))
    print(f"\n{'case':40s} {'do_bench ms':>12s} {'host ms/call':>13s}  sync")
    for name, gpu, host, sync in rows:
        print(f"{name:40s} {gpu:12.4f} {host:13.4f}  {sync}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
