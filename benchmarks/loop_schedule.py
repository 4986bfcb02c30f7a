"""What the forward's inner loop keeps in flight on sm_90, read from its machine code (no GPU).

    python benchmarks/loop_schedule.py [--head-dim 128] [--block 128 64] [--warps 8] [--stages 3] [--tma]

Compiles the plain inference forward (no mask, entropy or lse; not causal) for an H100 twice, with
the plain inner loop and with P@V one block behind the softmax, and prints for the interior key
loop of each (the first loop in the SASS holding wgmmas):

* its instruction mix per iteration and thread (what the softmax costs in issue slots);
* its schedule: wgmma issues (HGMMA), wgmma waits (WARPGROUP.DEPBAR) and exp2s (MUFU.EX2), in
  order. The exp2s between a wgmma and the next wait run while the tensor cores work: that is
  the overlap the P@V-behind loop exists for, and the plain loop has none.

Reading the SASS is how the P@V-behind loop was made to overlap at all (see RESULTS.md,
session 6). ``tests/test_kernel_resources.py`` asserts the overlap, so a change that loses it
fails on the CPU CI instead of on the next GPU run.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_resources as kr  # noqa: E402  (sibling script: signatures, tool paths, SASS parsing)
from kernel_resources import wait_name, instructions, loops, opcode, serialized  # noqa: E402


def compile_forward(head_dim=128, block=(128, 64), warps=8, stages=3, tma=False, pv_behind=False, arch=90):
    """The SASS text of the plain bf16 forward with these tiles, compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dhp_fx.kernels import triton_attention as ta

    bd = max(16, 1 << (head_dim - 1).bit_length())
    kwargs = {"BLOCK_M": block[0], "BLOCK_N": block[1], "USE_TMA": tma, "PV_BEHIND": pv_behind}
    consts = dict(HEAD_D=head_dim, HEAD_DV=head_dim, BLOCK_D=bd, BLOCK_DV=bd, IS_CAUSAL=False, MASK_KIND=0,
                  ENTROPY=False, STORE_LSE=False, COMPUTE_PV=True, COMPACT=True, FOLD_SCALE=True,
                  ZERO_SHARE=ta.PRUNED_TILES_PER_KEPT,
                  DOT_F32=False, DOT_PRECISION="tf32", **kwargs)
    io = dict(Q="bf16", K="bf16", V="bf16", Mask="bf16", Out="bf16", Ent="fp32", Lse="fp32", Pairs="i32",
              NKept="i32")
    if tma:
        io.update({n: f"tensordesc<bf16[1, 1, {r}, {bd}]>"
                   for n, r in (("DescQ", block[0]), ("DescK", block[1]), ("DescV", block[1]), ("DescO", block[0]))})
    else:
        io.update(DescQ="bf16", DescK="bf16", DescV="bf16", DescO="bf16")
    sig, cs, attrs = kr._signature(ta._gated_attn_fwd.fn, io, consts)
    kernel = triton.compile(ASTSource(ta._gated_attn_fwd.fn, sig, constexprs=cs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        return subprocess.run([kr._tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


def interior_loop(sass: str):
    """The instructions of the first loop that issues wgmmas: the forward's interior key loop."""
    ins = instructions(sass)
    for lo, hi in loops(ins):
        body = [t for _, t in ins[lo:hi + 1]]
        if any("HGMMA" in t for t in body):
            return body
    raise RuntimeError("no loop with wgmma instructions: not an sm_90 wgmma build?")


def overlapped_exp2(body) -> int:
    """exp2s issued while a wgmma of this iteration is outstanding (after an HGMMA, before the
    next wgmma wait), scanning the loop body once from its head."""
    pending, count = False, 0
    for text in body:
        op = opcode(text)
        if op.startswith("HGMMA"):
            pending = True
        elif op.startswith("WARPGROUP.DEPBAR") and wait_name(text) == "wait":
            pending = False
        elif op == "MUFU.EX2" and pending:
            count += 1
    return count


def schedule(body) -> str:
    """The loop's wgmma issues, waits and exp2 runs, compressed: 'QK x8 | wait | exp2 x34 ...'."""
    out, last, n = [], None, 0
    for text in body:
        op = opcode(text)
        name = ("mma" if op.startswith("HGMMA") else wait_name(text) if op.startswith("WARPGROUP.DEPBAR")
                else "exp2" if op == "MUFU.EX2" else None)
        if name is None:
            continue
        if name == last:
            n += 1
            continue
        if last is not None:
            out.append(f"{last} x{n}" if n > 1 else last)
        last, n = name, 1
    if last is not None:
        out.append(f"{last} x{n}" if n > 1 else last)
    return " | ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, nargs=2, default=(128, 64), metavar=("M", "N"))
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--tma", action="store_true", help="TMA descriptor loads instead of pointers")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless the P@V-behind loop issues >= 3/4 of its exp2s with a wgmma in flight "
                         "and the plain loop none; 3 when ptxas serialised the plain loop (nothing can overlap)")
    args = ap.parse_args(argv)
    bodies = {}
    for behind in (False, True):
        body = bodies[behind] = interior_loop(compile_forward(args.head_dim, tuple(args.block), args.warps,
                                                              args.stages, args.tma, behind))
        mix = collections.Counter(opcode(t) for t in body)
        print(f"== {'P@V behind' if behind else 'plain loop'}: D={args.head_dim} tile {args.block[0]}x"
              f"{args.block[1]} w{args.warps} s{args.stages} {'tma' if args.tma else 'pointers'}")
        print(f"  {len(body)} instructions per iteration; "
              + ", ".join(f"{k} {v}" for k, v in mix.most_common(10)))
        print(f"  schedule: {schedule(body)}")
        print(f"  exp2 issued while a wgmma is in flight: {overlapped_exp2(body)} of {mix['MUFU.EX2']}"
              + ("; every wgmma waits for itself (serialised by ptxas)" if serialized(body) else ""))
    if args.check:
        if serialized(bodies[False]):
            return 3
        exp2 = sum(opcode(t) == "MUFU.EX2" for t in bodies[True])
        ok = exp2 > 0 and overlapped_exp2(bodies[False]) == 0 and overlapped_exp2(bodies[True]) >= 0.75 * exp2
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
