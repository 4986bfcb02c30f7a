"""Registers, spills and shared memory of every dhp_fx Triton kernel config, without a GPU.

    python benchmarks/kernel_resources.py [--arch 90] [--head-dims 64 128] [--dtype bf16] [--only fwd ...]
                                          [--no-sass] [--each-config-once]
                                          [--ledger PATH [--recheck N] [--write-ledger]]

Covers every config each autotuned kernel would try at each head dim (attention forward, dQ,
dK/dV, head-skipping projections and their weight gradient) and the split-KV decode kernel at
its fixed launch options (per head and GQA-packed), each specialised as a contiguous launch would be.
``--each-config-once`` (the test suite's lighter survey) compiles each config at the widest head
dim that runs it, in its heaviest launch and one weight layout: half the compiles.

Triton compiles for a target it is told about (``GPUTarget``) and ships ptxas and cuobjdump, so
the machine code for an H100 (sm_90) or A100 (sm_80) can be built and inspected here. Spills
show up as a non-zero STACK (local memory per thread): on a GPU they turn into slow local-memory
traffic in the inner loop, and a config that spills rarely wins an autotune but still costs its
tuning run. Shared memory above the card's per-block limit makes the launch fail outright.

Prints one row per (kernel, head dim, config), with the number of async copies in the PTX (0: the
main loop's loads are not software-pipelined) and whether ptxas serialised a loop's wgmmas (each
waits for itself, C7513/C7515: correct but slow, and version-dependent); exits 1 when a config spills or overflows shared
memory, so it can gate a change to the config lists. Numbers come from the local triton; the
device's (3.6) may allocate a few registers differently — rerun there to confirm.

A compile takes seconds (LLVM, ptxas); ``--ledger`` skips the ones already done. The ledger
records each config's usage under Triton's own compile cache key, which hashes the kernel's
source and every jit function it calls, the specialisation, the launch options, triton itself and
the ptxas version: any change to any of these is a new key, and a new key is compiled. Recorded
configs are read, except each kernel's ``--recheck`` configs with the most registers, which are
compiled and must match their record. CI's survey reads ``benchmarks/sm90_ledger.json``; after
changing a kernel or a config list, refresh it (only the changed configs compile):

    python benchmarks/kernel_resources.py --each-config-once --ledger benchmarks/sm90_ledger.json --write-ledger
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Per-block shared memory opt-in limits (bytes).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TORCH_TO_TRITON = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass
class Usage:
    kernel: str
    head_dim: int
    config: str
    registers: int
    stack: int
    shared: int
    async_copies: int
    tma_copies: int
    wgmma: int
    serialized: bool | None = None  # None: not disassembled (--no-sass)

    @property
    def spills(self) -> bool:
        return self.stack > 0


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"triton ships no {name} at {path}: cannot inspect machine code")
    return path


def attention_unit_stride(name: str) -> bool:
    # Innermost strides of contiguous [B, H, L, D] tensors and of a [.., Lq, Lk] mask.
    return name.startswith("stride_") and (name.endswith("d") or name == "stride_mn")


def _signature(jitfn, pointers: dict, constexprs: dict, unit_stride=attention_unit_stride, aligned=()):
    """Signature, constants and attributes as the launcher would specialise a contiguous call:
    unit strides become constants and pointers / outer strides are 16-divisible, which changes
    vectorisation and so register use."""
    params = inspect.signature(jitfn.fn).parameters
    names = list(params)
    # Constexprs the caller leaves out take their defaults, as a launch would (not i32 arguments).
    consts = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    consts.update(constexprs)
    consts.update({n: 1 for n in names if unit_stride(n) and n not in consts})
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n in pointers and pointers[n].startswith("tensordesc"):
            sig[n] = pointers[n]
        elif n in pointers:
            sig[n] = "*" + pointers[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n.startswith("scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride_") or n in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, {(names.index(k),): v for k, v in consts.items()}, attrs


def _compile_inputs(jitfn, pointers, constexprs, arch, num_warps, num_stages, unit_stride, aligned):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = _signature(jitfn, pointers, constexprs, unit_stride, aligned)
    return (ASTSource(jitfn, sig, constexprs=consts, attrs=attrs), GPUTarget("cuda", arch, 32),
            {"num_warps": num_warps, "num_stages": num_stages})


def compile_key(jitfn, pointers: dict, constexprs: dict, arch: int = 90, num_warps: int = 4, num_stages: int = 3,
                unit_stride=attention_unit_stride, aligned=()) -> str | None:
    """Triton's own cache key for the compile ``compile_usage`` would run, or None when this
    triton does not expose it. The key covers what decides the machine code: the kernel's source
    and every jit function it calls, the specialisation, the options, triton's own sources and
    libtriton, and the ptxas version. Computing it takes milliseconds; the compile takes seconds."""
    import hashlib

    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.compiler.compiler import make_backend
        from triton.runtime.cache import get_cache_key
    except ImportError:
        return None
    src, target, options = _compile_inputs(jitfn, pointers, constexprs, arch, num_warps, num_stages, unit_stride,
                                           aligned)
    backend = make_backend(target)
    # As triton.compile builds its key (compiler.py): the source's own options, then the backend's.
    options = backend.parse_options(dict(options, **src.parse_options()))
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def compile_usage(jitfn, pointers: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                  num_stages: int = 3, unit_stride=attention_unit_stride, aligned=(), sass: bool = True):
    """(registers, stack bytes, shared bytes, async copies, TMA copies, wgmma instructions in the PTX,
    whether ptxas serialised the wgmmas of a loop: each waits for itself, nothing overlaps)
    of one specialisation compiled for sm_<arch> (no async copies: the loads of the main loop are
    not pipelined; no wgmma on sm_90: the dots run on the older, synchronous mma.sync path);
    ``unit_stride(name)`` says which stride arguments a contiguous launch passes as 1, ``aligned``
    names the size arguments it passes as multiples of 16 (the launcher specialises on that, and
    whether a masked load can be vectorised, hence pipelined, depends on it). ``sass=False`` leaves
    the serialisation unknown (None): disassembling is about a third of a cold compile's time."""
    import triton

    src, target, options = _compile_inputs(jitfn, pointers, constexprs, arch, num_warps, num_stages, unit_stride,
                                           aligned)
    kernel = triton.compile(src, target=target, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        dump = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
        machine_code = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                                      check=True).stdout if sass else None
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", dump)
    if found is None:
        raise RuntimeError(f"no resource line in cuobjdump output:\n{dump}")
    ptx = kernel.asm["ptx"]
    copies = len(re.findall(r"\bcp\.async\.", ptx))
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    serial = None
    if machine_code is not None:
        ins = instructions(machine_code)
        serial = any(serialized([t for _, t in ins[lo:hi + 1]]) for lo, hi in loops(ins))
    return (int(found.group(1)), int(found.group(2)), int(kernel.metadata.shared), copies, tma, wgmma,
            serial)


# ---------------------------------------------------------------- reading SASS
# (loop_schedule.py prints schedules with these too)

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_OPCODE = re.compile(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9]+)?)")


def instructions(sass: str):
    """(address, text) of every instruction, in order."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, sass.splitlines()) if m]


def loops(ins):
    """(start, end) index ranges of the loops: a branch back to an earlier address closes one."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    found = []
    for i, (a, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            found.append((at[int(m.group(1), 16)], i))
    return found


def opcode(text: str) -> str:
    return _OPCODE.match(text).group(1)


def serialized(body) -> bool:
    """Whether every wgmma waits for itself (ptxas's C7513/C7515 fallback): no wgmma then
    overlaps anything, in any loop of the kernel."""
    ops = [opcode(t) for t in body]
    mma = [i for i, op in enumerate(ops) if op.startswith("HGMMA")]
    return bool(mma) and all(any(op.startswith("WARPGROUP.DEPBAR") and wait_name(body[k]) == "wait"
                                 for k, op in enumerate(ops[i + 1:j], i + 1))
                             for i, j in zip(mma, mma[1:] + [len(ops)]))


def wait_name(text: str) -> str:
    # WARPGROUP.DEPBAR.LE gsb0, 0xN: wait until at most N wgmma groups are in flight
    m = re.search(r"gsb0,\s*0x([0-9a-f]+)", text)
    n = int(m.group(1), 16) if m else 0
    return "wait" if n == 0 else f"wait<={n}"


def _configs(autotuned, block_d: int, launch: dict = None):
    """The configs the autotuner would try at this head dim (the head-dim pruning applied) for a
    launch with these constexprs (its mask, entropy, lse and causal flags rule out the configs
    limited to lighter launches)."""
    from dhp_fx.kernels.triton_attention import fits_head_dim, launch_allows

    return [(c.kwargs, c.num_warps, c.num_stages) for c in autotuned.configs
            if fits_head_dim(c, block_d) and launch_allows(c, launch or {})]


def attention_cases(dtype: str, head_dims, mask_kind: int = 2, causal: bool = True, each_once: bool = False):
    """(name, jitfn, pointers, constexprs, head_dim, kwargs, warps, stages) for the attention kernels.
    ``each_once``: the causal light forward only in the configs reserved to light launches; the
    others run its causal edge loop in ``fwd`` too (with the mask and entropy on top), and its
    unmasked interior loop in ``fwd_plain``."""
    from dhp_fx.kernels import triton_attention as fwd
    from dhp_fx.kernels import triton_attention_bwd as bwd

    t = _TORCH_TO_TRITON[dtype]
    precision = "ieee" if dtype == "fp32" else "tf32"
    def fwd_pointers(kwargs, block):
        io = dict(Q=t, K=t, V=t, Mask=t, Out=t, Ent="fp32", Lse="fp32", Pairs="i32", NKept="i32")
        if not kwargs["USE_TMA"]:  # the descriptor slots then carry the plain tensors, unused
            return dict(io, DescQ=t, DescK=t, DescV=t, DescO=t)
        m, n = kwargs["BLOCK_M"], kwargs["BLOCK_N"]
        desc = {name: f"tensordesc<{t}[1, 1, {rows}, {block}]>"
                for name, rows in (("DescQ", m), ("DescK", n), ("DescV", n), ("DescO", m))}
        return dict(io, **desc)

    kernels = [
        ("fwd", fwd._gated_attn_fwd, fwd_pointers,
         dict(ENTROPY=True, STORE_LSE=True, COMPUTE_PV=True, COMPACT=True, FOLD_SCALE=True,
              ZERO_SHARE=fwd.PRUNED_TILES_PER_KEPT)),
        # What inference runs most: no mask, no entropy, not causal (the folded-scale interior loop).
        ("fwd_plain", fwd._gated_attn_fwd, fwd_pointers,
         dict(ENTROPY=False, STORE_LSE=False, COMPUTE_PV=True, COMPACT=True, FOLD_SCALE=True, MASK_KIND=0,
              IS_CAUSAL=False, ZERO_SHARE=fwd.PRUNED_TILES_PER_KEPT)),
        # A causal LM's prefill: light (no mask, entropy or lse) but with the causal edge loop.
        ("fwd_causal", fwd._gated_attn_fwd, fwd_pointers,
         dict(ENTROPY=False, STORE_LSE=False, COMPUTE_PV=True, COMPACT=True, FOLD_SCALE=True, MASK_KIND=0,
              IS_CAUSAL=True, ZERO_SHARE=fwd.PRUNED_TILES_PER_KEPT)),
        ("bwd_dq", bwd._bwd_dq, dict(Q=t, K=t, V=t, Mask=t, DO=t, Lse="fp32", Delta="fp32", DQ=t,
                                     DMask="fp32", Pairs="i32", NKept="i32"), dict(STORE_DS=False)),
        ("bwd_dkdv", bwd._bwd_dkdv, dict(Q=t, K=t, V=t, Mask=t, DO=t, Lse="fp32", Delta="fp32", DK=t, DV=t,
                                         Keep="u8"), {}),
    ]
    heaviest = dict(kernels[0][3], IS_CAUSAL=causal, MASK_KIND=mask_kind)
    for name, autotuned, pointers, extra in kernels:
        for d in head_dims:
            block = max(16, 1 << (d - 1).bit_length())
            base = dict(HEAD_D=d, HEAD_DV=d, BLOCK_D=block, BLOCK_DV=block, IS_CAUSAL=causal,
                        MASK_KIND=mask_kind, DOT_F32=False, DOT_PRECISION=precision)
            base.update(extra)
            configs = _configs(autotuned, block, base)
            if each_once and name == "fwd_causal":
                configs = [c for c in configs if c not in _configs(autotuned, block, dict(base, **heaviest))]
            for kwargs, warps, stages in configs:
                consts = dict(base, **kwargs)
                ptrs = pointers(kwargs, block) if callable(pointers) else pointers
                yield name, autotuned.fn, ptrs, consts, d, kwargs, warps, stages


def decode_cases(dtype: str, head_dims):
    """The split-KV decode kernels at the fixed launch options they use (not autotuned): per head,
    and GQA-packed at 8 and 64 rows (GROUP * Lq; 16- and 64-row tiles), storing partials for the
    combine (SPLIT0) or the results themselves (SPLIT1, one split); each also with the head map
    (HEAD_MAP: q holds some heads only, a query chain's), packed at 64 rows."""
    import torch

    from dhp_fx.kernels import triton_decode as dec

    t = _TORCH_TO_TRITON[dtype]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    pointers = dict(Q=t, K=t, V=t, Mask=t, Acc="fp32", M="fp32", L="fp32", S="fp32", KeepFlags="u8", KvHeads="i32")
    for d in head_dims:
        block = max(16, 1 << (d - 1).bit_length())
        launch = dec._launch_options(torch_dtype, block)
        kwargs = dict(BLOCK_M=dec._BLOCK_M, BLOCK_N=dec._BLOCK_N)
        consts = dict(HEAD_D=d, HEAD_DV=d, BLOCK_D=block, BLOCK_DV=block, IS_CAUSAL=False, MASK_KIND=2,
                      ENTROPY=True, COMPUTE_PV=True, DOT_F32=False,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **kwargs)
        # the default: programs shared among the kept pairs (ranks over up to 256 pairs)
        consts = dict(consts, SHARE=dec.SHARE_PIECES, BLOCK_PAIRS=256)
        for head_map in (False, True):
            yield ("decode_split", dec._decode_split, pointers, dict(consts, HEAD_MAP=head_map), d,
                   dict(kwargs, HEAD_MAP=1) if head_map else kwargs, launch["num_warps"], launch["num_stages"])
    packed = dict(pointers, Out=t, Ent="fp32", Lse="fp32")
    for d in head_dims:
        block = max(16, 1 << (d - 1).bit_length())
        for rows in (8, 64):
            block_m = max(16, 1 << (rows - 1).bit_length())
            launch = dict(dec._packed_launch_options(torch_dtype, block, block_m))
            warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
            for one in (0, 1):
                kwargs = dict(BLOCK_M=block_m, BLOCK_N=launch["BLOCK_N"], ONE_SPLIT=one)
                consts = dict(HEAD_D=d, HEAD_DV=d, BLOCK_D=block, BLOCK_DV=block, IS_CAUSAL=False, MASK_KIND=2,
                              ENTROPY=True, STORE_LSE=True, COMPUTE_PV=True, DOT_F32=False,
                              DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **kwargs)
                yield "decode_packed", dec._decode_split_packed, packed, consts, d, kwargs, warps, stages
                if rows == 64:
                    mapped = dict(kwargs, HEAD_MAP=1)
                    yield ("decode_packed", dec._decode_split_packed, packed, dict(consts, **mapped), d, mapped,
                           warps, stages)


def projection_unit_stride(name: str) -> bool:
    # nn.Linear weights [out, in] and contiguous activations / gradients.
    return name in ("stride_xk", "stride_wk", "stride_yn", "stride_af", "stride_bt", "stride_dwt")


def projection_cases(dtype: str, head_dims, each_once: bool = False):
    """The head-skipping projection kernels with [H] and per-sample [B, H] masks (each row looks
    up its own sample's mask). ``each_once``: descriptor configs in nn.Linear's weight layout only
    (their registers were within 2 of the [K, N] layout's, shared memory within 32 bytes, no
    spills in either: every config, triton 3.9, 2026-11-27)."""
    from dhp_fx.kernels import triton_head_linear as hl

    t = _TORCH_TO_TRITON[dtype]
    io = dict(X=t, W=t, Bias=t, Keep="u8", Y=t)
    # proj_in walks a kept-head list for [H] masks and a per-head nest for [B, H]: both compiled.
    kernels = [
        # 32 heads: the mask row each program ranks (BLOCK_H lanes)
        ("proj_out", hl._head_linear_out_kernel, io,
         lambda d, b: dict(HEAD_D=d, BLOCK_D=b, BLOCK_H=32, ZERO_SHARE=hl.PRUNED_PROGRAMS_PER_KEPT), (True, False)),
        ("proj_in", hl._head_linear_in_kernel, io, lambda d, b: dict(HEAD_D=d, BLOCK_H=32), (True, False)),
        ("proj_out_pair", hl._head_linear_out_pair_kernel, io,
         lambda d, b: dict(HEAD_D=d, BLOCK_D=b, BLOCK_H=32, ZERO_SHARE=hl.PRUNED_PROGRAMS_PER_KEPT), (True, False)),
        ("proj_wgrad", hl._head_weight_grad_kernel, dict(A=t, Bm=t, Keep="u8", DW=t, DBias=t),
         lambda d, b: dict(HEAD_D=d, BLOCK_D=b, BLOCK_B=8), (True,)),
    ]
    for name, autotuned, pointers, head, per_sample in kernels:
        for d in head_dims:
            block = max(16, 1 << (d - 1).bit_length())
            if name == "proj_out_pair" and block > hl.PAIR_MAX_BLOCK_D:
                continue  # never launched for heads this wide
            for c in autotuned.configs:
                tma = c.kwargs.get("USE_TMA")
                if tma and (d != block or d < 64):
                    continue  # descriptors serve power-of-two heads of 64+ only
                # Descriptor configs compile for both weight layouts: each reads its tile its own way
                # (a [K, N] weight once failed to compile on the card only).
                for in_out in ((False, True) if tma and not each_once else (False,)):
                    loading = {}
                    if tma is not None:  # the descriptor slots carry the plain tensors without TMA
                        loading = dict(W_IN_OUT=in_out)
                        cols, k = c.kwargs.get("BLOCK_N", block), c.kwargs["BLOCK_K"]
                        w_tile = f"[{k}, {cols}]" if in_out else f"[{cols}, {k}]"
                        pointers = dict(pointers, DescX=f"tensordesc<{t}[{c.kwargs['BLOCK_M']}, {k}]>" if tma else t,
                                        DescW=f"tensordesc<{t}{w_tile}>" if tma else t)
                    for ps in per_sample:
                        consts = dict(HAS_BIAS=True, PER_SAMPLE=ps, DOT_F32=False, DOT_PRECISION="tf32",
                                      **head(d, block), **loading, **c.kwargs)
                        shown = dict(c.kwargs, **({} if len(per_sample) == 1 else {"_sample": int(ps)}),
                                     **({"_wT": 1} if in_out else {}))
                        yield name, autotuned.fn, pointers, consts, d, shown, c.num_warps, c.num_stages


def partition_cases(dtype: str, head_dims):
    """The kept-first list builder at its smallest and largest chunk (not per head dim or dtype)."""
    from dhp_fx.kernels import triton_attention as ta

    for block in (16, ta._PARTITION_MAX_BLOCK):
        yield ("partition", ta._stable_partition_kernel, dict(Flags="u8", Order="i32", Count="i32"),
               dict(BLOCK=block), 0, dict(BLOCK_N=block), 4 if block <= 256 else 8, 1)


def router_cases(dtype: str, head_dims):
    """The router's pooling kernel (padding on) and head kernel, with the fused top-k, at
    RouterGate's default width (32) and at the widest tiles head_blocks admits (not per head dim:
    d is a runtime size)."""
    from dhp_fx.kernels import triton_router as tr

    t = _TORCH_TO_TRITON[dtype]
    for split in (False, True):
        yield ("router_pool", tr._pool_kernel, dict(X=t, Valid="u8", Pooled="fp32", Counts="fp32"),
               dict(HAS_VALID=True, SPLIT=split, BLOCK_L=32, BLOCK_C=128), 0, dict(SPLIT=split, BLOCK_C=128), 4, 1)
    yield ("router_pool_finish", tr._pool_finish_kernel, dict(Partial="fp32", Counts="fp32", Pooled="fp32"),
           dict(HAS_VALID=True, BLOCK_S=tr.POOL_MAX_SPLITS, BLOCK_C=128), 0, dict(BLOCK_S=tr.POOL_MAX_SPLITS), 4, 1)
    yield ("router_vote", tr._batch_vote_kernel, dict(Keep="u8", Scores="fp32", Shared="u8"),
           dict(BLOCK_B=32, BLOCK_H=tr.TOP_K_MAX_HEADS), 0, dict(BLOCK_H=tr.TOP_K_MAX_HEADS), 4, 1)
    head = dict(Pooled="fp32", LnW="fp32", LnB="fp32", W1="fp32", B1="fp32", W2="fp32", B2="fp32", Out="fp32",
                Keep="u8")
    for width, heads in ((32, 12), (32, 128), (1024, 16), (256, 64), (0, 128)):
        block_k, block_n1, block_n2, warps = tr.head_blocks(width, heads)
        consts = dict(HAS_LN_W=True, HAS_LN_B=True, HAS_B1=True, HAS_B2=True, HIDDEN=width > 0, ACT=tr.ACT_GELU,
                      TOP_K=tr.fuses_top_k(width, heads), BLOCK_K=block_k, BLOCK_N1=block_n1, BLOCK_N2=block_n2)
        yield ("router_head", tr._router_head_kernel, head, consts, 0,
               dict(BLOCK_K=block_k, HIDDEN=block_n1, HEADS=block_n2), warps, 1)


def gather_cases(dtype: str, head_dims):
    """The compact block's weight gathers (the batch's union, each row's own), with and without
    biases (not per head dim: D is a runtime size), at BERT-base's 12 heads and at the most heads
    they take."""
    from dhp_fx.kernels import triton_gather_heads as tg

    t = _TORCH_TO_TRITON[dtype]
    ptrs = dict(Keep="i8", Wq=t, Bq=t, Wk=t, Bk=t, Wv=t, Bv=t, Wo=t, Idx="i64", Valid="i8", WQKV=t, BQKV=t, WO=t)
    for bias, hp, hp_rows in ((True, 16, 16), (False, tg.MAX_HEADS, tg.ROWS_MAX_HEADS)):
        consts = dict(HAS_BIAS=bias, HP=hp, BLOCK_B=16, BLOCK_R=tg.BLOCK_R, BLOCK_K=tg.BLOCK_K)
        yield ("gather_heads", tg._gather_heads_kernel, ptrs, consts, 0, dict(HP=hp, BIAS=bias), 4, 1)
        consts = dict(HAS_BIAS=bias, HP=hp_rows, BLOCK_R=tg.BLOCK_R, BLOCK_K=tg.BLOCK_K)
        yield ("gather_rows", tg._gather_rows_kernel, ptrs, consts, 0, dict(HP=hp_rows, BIAS=bias), 4, 1)


def _widest_head_dim_only(cases: list) -> list:
    """Each (kernel, config) at the widest head dim that runs it: the most registers in every
    config surveyed but one (M32 N128 w8 once spilled at D = 64 only; session 3)."""
    def config(case):
        name, _, _, _, _, kwargs, warps, stages = case
        return name, tuple(sorted(kwargs.items())), warps, stages

    widest: dict = {}
    for case in cases:
        widest[config(case)] = max(widest.get(config(case), 0), case[4])
    return [c for c in cases if c[4] == widest[config(c)]]


def survey(arch: int = 90, dtype: str = "bf16", head_dims=(64, 128), only=None, sass: bool = True,
           each_once: bool = False, ledger: dict | None = None, recheck: int = 1):
    """(rows, keys, counts). ``ledger`` maps compile keys (:func:`compile_key`) to usage recorded by
    an earlier survey: a case whose key is there is read from it, not compiled, except for the
    ``recheck`` recorded cases of each kernel with the most registers (the nearest to spilling),
    which are compiled and must reproduce their record. ``keys`` holds each row's compile key
    (None when this triton does not expose one); counts: compiled, read, rechecked, mismatches."""
    # Model widths (the projections' K, N, T) are multiples of 16; sequence lengths need not be.
    cases = [(attention_cases(dtype, head_dims, each_once=each_once), attention_unit_stride, ()),
             (decode_cases(dtype, head_dims), attention_unit_stride, ()),
             (projection_cases(dtype, head_dims, each_once), projection_unit_stride, ("K", "N", "T")),
             (partition_cases(dtype, head_dims), lambda name: False, ()),
             (router_cases(dtype, head_dims), lambda name: name in ("stride_xd", "stride_w1k", "stride_w2k"), ()),
             (gather_cases(dtype, head_dims), lambda name: name in ("sq_i", "sk_i", "sv_i", "so_f", "stride_kh"),
              ("d_in", "d_out"))]
    planned = []
    for generated, unit_stride, aligned in cases:
        generated = [c for c in generated if not only or c[0] in only]
        if each_once:
            generated = _widest_head_dim_only(generated)
        for name, jitfn, pointers, consts, d, kwargs, warps, stages in generated:
            cfg = " ".join(f"{k.split('_')[-1]}{int(v)}" for k, v in kwargs.items()) + f" w{warps} s{stages}"
            planned.append((name, d, cfg, (jitfn, pointers, consts, arch, warps, stages, unit_stride, aligned)))
    keys = [compile_key(*args) if ledger is not None else None for *_, args in planned]
    # The disassembly (serialised wgmma) is not recorded: a survey that reads it compiles everything.
    recorded = {i: ledger[k]["usage"] for i, k in enumerate(keys) if k in (ledger or {}) and not sass}
    checked = set()
    for name in dict.fromkeys(p[0] for p in planned):
        mine = sorted((i for i in recorded if planned[i][0] == name), key=lambda i: -recorded[i][0])
        checked.update(mine[:recheck])
    rows, counts = [], dict(compiled=0, read=0, rechecked=len(checked), mismatches=[])
    for i, (name, d, cfg, args) in enumerate(planned):
        if i in recorded and i not in checked:
            usage = (*recorded[i], None)
            counts["read"] += 1
        else:
            usage = compile_usage(*args, sass=sass)
            counts["compiled"] += 1
            if i in checked:
                if list(usage[:6]) != list(recorded[i]):
                    counts["mismatches"].append(f"{name} D={d} {cfg}: recorded {recorded[i]}, "
                                                f"compiled {list(usage[:6])}")
        rows.append(Usage(name, d, cfg, *usage))
    return rows, keys, counts


def read_ledger(path: str) -> dict:
    import json

    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["entries"]


def write_ledger(path: str, rows, keys, arch: int, dtype: str, only=None) -> int:
    """Record every row that has a compile key; returns how many entries the file holds. Entries
    of the surveyed kernels that this survey did not produce are dropped (a key no current case
    produces again is dead weight); with ``only``, other kernels' entries are kept as they were."""
    import json

    import triton

    entries = {k: e for k, e in read_ledger(path).items() if only and e["kernel"] not in only}
    entries.update({k: {"kernel": r.kernel, "D": r.head_dim, "config": r.config,
                        "usage": [r.registers, r.stack, r.shared, r.async_copies, r.tma_copies, r.wgmma]}
                    for r, k in zip(rows, keys) if k is not None})
    head = {"about": f"sm_{arch} {dtype} usage [registers, stack, shared, async copies, TMA copies, wgmma] per "
                     "triton compile key; written by benchmarks/kernel_resources.py --write-ledger, read by "
                     "--ledger (see its docstring)", "triton": triton.__version__}
    # One entry a line: a refresh then reads as a diff of the configs that changed.
    lines = [f"  {json.dumps(k)}: {json.dumps(entries[k])}" for k in sorted(entries)]
    with open(path, "w") as f:
        f.write(json.dumps(head, indent=1)[:-2] + ',\n "entries": {\n' + ",\n".join(lines) + "\n }\n}\n")
    return len(entries)


_SERIAL = {True: "SERIAL", False: "", None: "not read"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(_TORCH_TO_TRITON))
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--only", nargs="*",
                    help="kernel names: fwd fwd_plain fwd_causal bwd_dq bwd_dkdv "
                         "decode_split decode_packed proj_out proj_out_pair proj_in proj_wgrad partition "
                         "router_pool router_pool_finish router_vote router_head gather_heads gather_rows")
    ap.add_argument("--each-config-once", action="store_true",
                    help="each config once: at the widest head dim that runs it, in its heaviest launch, "
                         "in one weight layout (CI's survey)")
    ap.add_argument("--no-sass", action="store_true",
                    help="skip the disassembly, hence the serialised-wgmma column (a third of the time)")
    ap.add_argument("--ledger", metavar="PATH",
                    help="read usage recorded under each compile's triton cache key from this JSON file instead "
                         "of compiling (implies --no-sass); unknown keys are compiled")
    ap.add_argument("--recheck", type=int, default=1, metavar="N",
                    help="with --ledger: still compile each kernel's N recorded configs with the most registers, "
                         "and fail when one does not reproduce its record (default 1)")
    ap.add_argument("--write-ledger", action="store_true",
                    help="with --ledger: rewrite PATH with this survey's rows afterwards")
    args = ap.parse_args(argv)
    if args.write_ledger and not args.ledger:
        ap.error("--write-ledger needs --ledger PATH")
    os.environ.setdefault("DHP_FX_TRITON_AUTOTUNE", "1")  # survey every config, not only the first
    ledger = read_ledger(args.ledger) if args.ledger else None
    rows, keys, counts = survey(args.arch, args.dtype, args.head_dims, args.only,
                                sass=not (args.no_sass or args.ledger), each_once=args.each_config_once,
                                ledger=ledger, recheck=args.recheck)
    limit = SMEM_LIMIT.get(args.arch, 232448)
    bad = 0
    print(f"| kernel | D | config | registers | stack (spill) B | shared B | async copies | TMA | wgmma "
          f"| serialised wgmma | sm_{args.arch} {args.dtype} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flag = "SPILLS" if r.spills else ""
        if r.shared > limit:
            flag += " SHARED>LIMIT"
        bad += bool(flag)
        print(f"| {r.kernel} | {r.head_dim} | {r.config} | {r.registers} | {r.stack} | {r.shared} | "
              f"{r.async_copies} | {r.tma_copies} | {r.wgmma} | {_SERIAL[r.serialized]} | "
              f"{flag.strip()} |")
    print(f"{bad} of {len(rows)} configs spill or overflow shared memory", file=sys.stderr)
    if ledger is not None:
        print(f"ledger: {counts['read']} configs read, {counts['compiled']} compiled "
              f"({counts['rechecked']} of them rechecks of recorded ones)", file=sys.stderr)
        if ledger and None in keys:
            print("ledger: this triton exposes no compile keys; everything was compiled", file=sys.stderr)
    if args.write_ledger:
        print(f"ledger: {write_ledger(args.ledger, rows, keys, args.arch, args.dtype, args.only)} configs in "
              f"{args.ledger}", file=sys.stderr)
    if counts["mismatches"]:
        print("ledger: compiled configs that do not reproduce their record (the ledger is wrong or compiles "
              "are not deterministic here; rebuild it with --write-ledger):\n  " + "\n  ".join(counts["mismatches"]),
              file=sys.stderr)
        return 2
    # Reported, not failed: it depends on the ptxas version (see RESULTS.md, session 6), and the
    # autotuner times such a config like any other.
    if all(r.serialized is not None for r in rows):
        print(f"{sum(r.serialized for r in rows)} of {len(rows)} configs have serialised wgmma loops",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
