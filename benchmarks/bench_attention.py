"""Time gated attention on a GPU: dense SDPA, FlexAttention with a head BlockMask,
gather -> SDPA -> scatter, and the dhp_fx Triton kernel, at several kept-head fractions p.

    python benchmarks/bench_attention.py [--check | --check-only] [--block [--graphs]] [--tma auto|on|off]
                                         [--pv-behind auto|on|off]
                                         [--shapes 8,32,2048,128,causal ...]

Each p keeps round(p * H) random heads per batch row. Times are medians of
triton.testing.do_bench in ms; "x ideal" is time / (p * T_dense_SDPA). The Triton column calls
dhp_fx.kernels.triton_attention.triton_gated_attention, the function the tests exercise; after
each shape the config its autotuner chose is printed (USE_TMA: whether the Hopper descriptor
variant won). The check runs both loading variants where the card has TMA (sm_90+).
``--dry-run`` prints the plan and exits, and is the only mode that works without CUDA.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass

DEFAULT_SHAPES = ["8,32,2048,128,causal", "8,32,2048,128", "32,12,512,64", "4,32,4096,128,causal"]
# Decode: one query row against Lk cached keys, B,Hq,Hkv,Lk,D.
DEFAULT_DECODE = ["1,32,32,32768,128", "1,32,8,8192,128", "8,32,32,4096,128", "4,32,8,16384,128"]
DEFAULT_P = [1.0, 0.75, 0.5, 0.25]
DEVICE = "cuda"


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    L: int
    D: int
    causal: bool

    @classmethod
    def parse(cls, text: str) -> "Shape":
        parts = text.split(",")
        if len(parts) not in (4, 5) or (len(parts) == 5 and parts[4] not in ("causal", "full")):
            raise argparse.ArgumentTypeError(f"shape {text!r}: want B,H,L,D[,causal|full]")
        B, H, L, D = (int(x) for x in parts[:4])
        return cls(B, H, L, D, len(parts) == 5 and parts[4] == "causal")

    def __str__(self) -> str:
        return f"{self.B}x{self.H}x{self.L}x{self.D}{' causal' if self.causal else ''}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=Shape.parse, default=[Shape.parse(s) for s in DEFAULT_SHAPES],
                    help="B,H,L,D[,causal] (default: %(default)s)")
    ap.add_argument("--p", nargs="+", type=float, default=DEFAULT_P, help="kept-head fractions")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--check", action="store_true", help="validate the kernel against SDPA before timing")
    ap.add_argument("--check-only", action="store_true", help="validate, then exit without timing")
    ap.add_argument("--layout", choices=["bhld", "model"], default="bhld",
                    help="q/k/v storage of the timed table: contiguous [B, H, L, D], or HF's [B, L, H, D] "
                         "viewed as [B, H, L, D] (the layout dhp_fx meets inside models)")
    ap.add_argument("--tma", choices=["auto", "on", "off"], default="auto",
                    help="how the timed prefill kernel loads tiles: autotuner's choice, TMA descriptors only, "
                         "pointers only")
    ap.add_argument("--pv-behind", choices=["auto", "on", "off"], default="auto",
                    help="the forward's inner loop: auto lets the autotuner time both, on/off pins P@V one "
                         "key block behind the softmax or the plain loop")
    ap.add_argument("--block", action="store_true",
                    help="also time the attention block (QKV proj + core + out proj), d_model = H*D")
    ap.add_argument("--graphs", action="store_true",
                    help="with --block, also time every block variant replayed from a CUDA graph: the "
                         "GPU's time without the per-launch host cost that bounds short shapes")
    ap.add_argument("--decode", nargs="*", default=None, metavar="B,HQ,HKV,LK,D",
                    help="also time decode (one query row, long KV; GQA when HQ > HKV): SDPA, gather, the "
                         f"Triton kernel with and without split-KV (no value: {' '.join(DEFAULT_DECODE)})")
    ap.add_argument("--no-prefill", action="store_true", help="skip the --shapes table (e.g. decode only)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (e.g. torch without it)")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (works without CUDA)")
    args = ap.parse_args(argv)
    for p in args.p:
        if not 0.0 < p <= 1.0:
            ap.error(f"--p values must be in (0, 1], got {p}")
    if args.decode is not None:
        try:
            args.decode = [parse_decode(t) for t in (args.decode or DEFAULT_DECODE)]
        except ValueError as e:
            ap.error(str(e))
    return args


def parse_decode(text: str):
    parts = text.split(",")
    if len(parts) != 5 or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise ValueError(f"decode shape {text!r}: want B,HQ,HKV,LK,D (positive integers)")
    B, Hq, Hkv, Lk, D = map(int, parts)
    if Hq % Hkv:
        raise ValueError(f"decode shape {text!r}: HQ ({Hq}) not a multiple of HKV ({Hkv})")
    return B, Hq, Hkv, Lk, D


def n_kept(p: float, H: int) -> int:
    return max(1, min(H, round(p * H)))


def plan(args) -> list[tuple[Shape, float, int]]:
    return [(s, p, n_kept(p, s.H)) for s in args.shapes for p in args.p]


def attention_floor_ms(B, Hq, Hkv, Lq, Lk, D, kept_q, kept_kv, causal, elem_bytes, flops_per_s, bytes_per_s):
    """(arithmetic floor, memory floor) in ms for gated attention with ``kept_q`` of the B*Hq
    (batch, head) pairs and ``kept_kv`` of the B*Hkv KV pairs still needed.

    Arithmetic: QK^T and PV, 2 flops per multiply-add, over the kept pairs; causal with Lq == Lk
    halves it. Memory: each needed input read once (q of kept heads, k and v of needed KV heads)
    and the whole output written once (pruned heads' zeros too).
    """
    work = 4.0 * kept_q * Lq * Lk * D * (0.5 if causal and Lq == Lk else 1.0)
    moved = elem_bytes * (kept_q * Lq * D + 2 * kept_kv * Lk * D + B * Hq * Lq * D)
    return 1e3 * work / flops_per_s, 1e3 * moved / bytes_per_s


# ----------------------------------------------------------------------------------------------
# GPU part: everything below imports torch/triton lazily so --dry-run needs neither CUDA nor triton.


def measure_ceilings(torch, bench, dtype):
    """(flop/s of a large matmul in ``dtype``, bytes/s of a large device-to-device copy, counting
    bytes read plus bytes written): the two rates the floors are taken against, measured here."""
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=dtype) for _ in range(2))
    flops = 2.0 * 8192 ** 3 / (bench(lambda: a @ b) * 1e-3)
    src = torch.randn(1 << 28, device=DEVICE, dtype=torch.float32)  # 1 GiB: far past L2
    dst = torch.empty_like(src)
    bw = 2.0 * src.numel() * 4 / (bench(lambda: dst.copy_(src)) * 1e-3)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return flops, bw


def random_keep(torch, B, H, k, device, gen):
    idx = torch.stack([torch.randperm(H, generator=gen)[:k] for _ in range(B)]).to(device)
    keep = torch.zeros(B, H, dtype=torch.bool, device=device)
    keep.scatter_(1, idx, True)
    return keep, idx.sort(1).values


TMA_ARG = {"auto": None, "on": True, "off": False}


def make_methods(torch, F, s: Shape, q, k, v, keep, idx, flex, tma=None, pv_behind=None):
    from dhp_fx.kernels.triton_attention import triton_gated_attention

    B = s.B
    rows = torch.arange(B, device=q.device)[:, None]

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=s.causal)

    def gathered():
        o = F.scaled_dot_product_attention(q[rows, idx], k[rows, idx], v[rows, idx], is_causal=s.causal)
        out = torch.zeros_like(q)
        out[rows, idx] = o
        return out

    def ours():
        return triton_gated_attention(q, k, v, keep, is_causal=s.causal, tma=tma, pv_behind=pv_behind)

    methods = {"sdpa": dense, "gather": gathered, "triton": ours}
    if flex is not None:
        flex_fn, create_block_mask, keep_buf, mask_mod = flex
        keep_buf.copy_(keep)  # same tensor and mask_mod for every p: no recompile per p
        block_mask = create_block_mask(mask_mod, B, s.H, s.L, s.L, device=q.device)
        methods["flex"] = lambda: flex_fn(q, k, v, block_mask=block_mask)
    return methods


def with_settings(settings: dict, fn):
    """fn run with module attributes {(module, name): value} set, restored after each call. The
    kernels read these switches at launch (at capture when graphed)."""
    def run():
        saved = {key: getattr(*key) for key in settings}
        for (module, name), value in settings.items():
            setattr(module, name, value)
        try:
            return fn()
        finally:
            for (module, name), value in saved.items():
                setattr(module, name, value)
    return run


def core_target_ms(p: float, t_sdpa: float) -> float:
    """Issue 3's bound on the gated core: T(1) <= 1.15 T_SDPA, T(p) <= 1.1 p T_SDPA + 0.01 ms."""
    return 1.15 * t_sdpa if p >= 1.0 else 1.1 * p * t_sdpa + 0.01


def block_target_ms(p: float, t_dense_block: float) -> float:
    """Issue 3's bound on the whole attention block (projections + core): (p + 0.1) x dense."""
    return min(p + 0.1, 1.0) * t_dense_block if p < 1.0 else 1.15 * t_dense_block


def verdict(t: float, target: float) -> str:
    return "met" if t <= target else f"MISS +{100 * (t / target - 1):.0f}%"


def chosen_config() -> str:
    """The forward config the autotuner picked for the last launch and, from its last tuning run,
    the fastest config of each loading kind and inner loop (ms), so one run says whether
    descriptors and the P@V-behind loop pay."""
    from dhp_fx.kernels.triton_attention import _gated_attn_fwd

    c = getattr(_gated_attn_fwd, "best_config", None)
    if c is None:
        return "none (not launched)"
    text = " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" warps={c.num_warps} stages={c.num_stages}"
    best = {}
    for cfg, t in (getattr(_gated_attn_fwd, "configs_timings", None) or {}).items():
        t = t[0] if isinstance(t, (list, tuple)) else t
        kind = ("tma" if cfg.kwargs.get("USE_TMA") else "pointer") + (" pv-behind" if cfg.kwargs.get("PV_BEHIND") else "")
        best[kind] = min(best.get(kind, float("inf")), t)
    return text + "".join(f"; fastest {kind} {t:.3f} ms" for kind, t in sorted(best.items()))


def head_mask_mod(keep_buf, causal):
    def mask_mod(b, h, q_idx, kv_idx):
        ok = keep_buf[b, h]
        return (ok & (q_idx >= kv_idx)) if causal else ok

    return mask_mod


def check(torch, F, args, dtype, gen) -> bool:
    """Kernel vs SDPA (fp32 math reference) on the benchmark shapes and a few odd cases."""
    from dhp_fx.kernels.triton_attention import triton_gated_attention, triton_gated_attention_autograd

    dev = DEVICE
    ok = True

    def ref(q, k, v, keep, mask=None, causal=False):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.float()
        o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
        return torch.where(keep[:, :, None, None], o, 0.0)

    def ref_entropy(q, k, v, keep, mask):
        g = q.shape[1] // k.shape[1]
        logits = q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        p = logits.softmax(-1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)
        return torch.where(keep, ent, 0.0)

    def report(name, got, want, tol):
        nonlocal ok
        err = (got.float() - want.float()).abs().max().item()
        good = err <= tol and not torch.isnan(got).any().item()
        ok &= good
        print(f"  {'PASS' if good else 'FAIL'} {name}: max abs err {err:.2e} (tol {tol:.0e})")

    print("check: Triton kernel vs SDPA")
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    # Pointer loads everywhere; the TMA descriptor variant too where the card has a copy engine.
    variants = (False, True) if torch.cuda.get_device_capability() >= (9, 0) else (False,)
    for s in args.shapes:
        q, k, v = (torch.randn(s.B, s.H, s.L, s.D, device=dev, dtype=dtype) for _ in range(3))
        # Below a quarter kept, kept programs run out of pruned tiles to store and the rest store
        # their own (PRUNED_TILES_PER_KEPT): both halves on poisoned memory.
        for p in (0.5, 0.25, 1 / s.H):
            keep, _ = random_keep(torch, s.B, s.H, n_kept(p, s.H), dev, gen)
            want = ref(q, k, v, keep, causal=s.causal)
            for tma in variants:
                for behind in (False, True):
                    out = torch.full_like(q, float("nan"))
                    triton_gated_attention(q, k, v, keep, is_causal=s.causal, out=out, tma=tma, pv_behind=behind)
                    report(f"{s} p={p:.2f}{' tma' if tma else ''}{' pv-behind' if behind else ''}", out, want, tol)
        del q, k, v, out, want
    # GQA + model layout + padding mask + head dim 80, decode, additive bias, fp32.
    B, Hq, Hkv, L = 2, 8, 2, 300
    for D, Lq, mask_kind, dt in [(80, 300, "pad", dtype), (128, 1, "pad", dtype), (64, 257, "bias", dtype),
                                 (64, 129, "bias", torch.float32)]:
        q = torch.randn(B, Lq, Hq, D, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(B, L, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
        v = torch.randn(B, L, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
        keep = torch.rand(B, Hq, device=dev, generator=None) > 0.5
        if mask_kind == "pad":
            mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device=dev)
            mask[0, ..., L - 37:] = False
        else:
            mask = torch.randn(1, Hq, Lq, L, device=dev, dtype=dt)
        # Lq <= 16 is the decode kernel: no TMA variant, no inner-loop choice
        for tma, behind in [(t, b) for t in variants for b in (False, True)] if Lq > 16 else [(None, None)]:
            got, ent = triton_gated_attention(q, k, v, keep, mask, return_entropy=True, tma=tma, pv_behind=behind)
            report(f"GQA {Hq}/{Hkv} D={D} Lq={Lq} mask={mask_kind} {dt}{' tma' if tma else ''}"
                   f"{' pv-behind' if behind else ''}", got,
                   ref(q, k, v, keep, mask), 1e-4 if dt == torch.float32 else tol)
            report("  entropy", ent, ref_entropy(q, k, v, keep, mask), 2e-2)
    # Split-KV decode (forced splits) against the same reference, pruned heads exactly zero.
    q = torch.randn(2, 8, 1, 128, device=dev, dtype=dtype)
    k, v = (torch.randn(2, 2, 5000, 128, device=dev, dtype=dtype) for _ in range(2))
    keep = torch.rand(2, 8, device=dev) > 0.5
    mask = torch.ones(2, 1, 1, 5000, dtype=torch.bool, device=dev)
    mask[1, ..., :1234] = False  # left padding
    for splits in (1, 7, 64):
        got, ent = triton_gated_attention(q, k, v, keep, mask, return_entropy=True, num_splits=splits)
        report(f"decode GQA 8/2 Lk=5000 splits={splits}", got, ref(q, k, v, keep, mask), tol)
        report("  entropy", ent, ref_entropy(q, k, v, keep, mask), 2e-2)
        report("  pruned heads zero", got[~keep].abs().amax() if (~keep).any() else got.new_zeros(()),
               got.new_zeros(()), 0.0)
    # Backward vs autograd through SDPA.
    q, k, v = (torch.randn(2, 4, 200, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    keep = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool, device=dev)
    do = torch.randn(2, 4, 200, 64, device=dev, dtype=dtype)
    grads = torch.autograd.grad(triton_gated_attention_autograd(q, k, v, keep, None, True), (q, k, v), do)
    want = torch.autograd.grad(ref(q, k, v, keep, causal=True), (q, k, v), do.float())
    for name, g, w in zip("qkv", grads, want):
        report(f"backward d{name} causal", g, w, 5e-2 if dtype == torch.bfloat16 else 1e-2)
    return ok


def time_decode(torch, F, args, dtype, gen, bench, ceilings=None):
    """Decode table: SDPA (dense, GQA by enable_gqa), gather -> SDPA -> scatter, the Triton kernel
    with its split-KV heuristic, with one split, with GQA packing off (per-head programs), and
    with pruned pairs' programs idle instead of shared among the kept ones, at each p; "x ideal"
    against p * SDPA."""
    from dhp_fx.kernels.triton_attention import triton_gated_attention

    from dhp_fx.kernels import triton_decode

    # GQA without packing: each query head streams its group's K/V (what packing saves)
    per_head = functools.partial(with_settings, {(triton_decode, "PACK_GQA"): False})
    # pruned pairs' programs exit instead of serving the kept pairs: the A/B of SHARE_PIECES
    own_pieces = functools.partial(with_settings, {(triton_decode, "SHARE_PIECES"): False})

    names = ["sdpa", "gather", "triton", "triton 1 split", "triton per-head", "triton unshared"]
    if ceilings is None:
        ceilings = measure_ceilings(torch, bench, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    header = (f"{'decode B,Hq,Hkv,Lk,D':28s} {'p':>5s} " + " ".join(f"{n + ' ms':>16s} {'x ideal':>8s}" for n in names)
              + f" {'floor ms':>9s} {'triton x floor':>15s}")
    print("\n" + header)
    print("-" * len(header))
    for B, Hq, Hkv, Lk, D in args.decode:
        q = torch.randn(B, Hq, 1, D, device=DEVICE, dtype=dtype)
        k, v = (torch.randn(B, Hkv, Lk, D, device=DEVICE, dtype=dtype) for _ in range(2))
        g = Hq // Hkv
        t_dense = None
        for p in args.p:
            keep, idx = random_keep(torch, B, Hq, n_kept(p, Hq), DEVICE, gen)
            rows = torch.arange(B, device=DEVICE)[:, None]

            def gathered():
                o = F.scaled_dot_product_attention(q[rows, idx], k[rows, idx // g], v[rows, idx // g])
                out = torch.zeros_like(q)
                out[rows, idx] = o
                return out

            methods = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=g > 1),
                "gather": gathered,
                "triton": lambda: triton_gated_attention(q, k, v, keep),
                "triton 1 split": lambda: triton_gated_attention(q, k, v, keep, num_splits=1),
                "triton per-head": per_head(lambda: triton_gated_attention(q, k, v, keep)),
                "triton unshared": own_pieces(lambda: triton_gated_attention(q, k, v, keep)),
            }
            times = {}
            for name, fn in methods.items():
                try:
                    times[name] = bench(fn)
                except Exception as e:  # e.g. a torch without enable_gqa
                    print(f"  {name} failed at decode {B},{Hq},{Hkv},{Lk},{D} p={p}: {type(e).__name__}: {e}")
                    times[name] = float("nan")
            t_dense = times["sdpa"] if t_dense is None else t_dense
            cells = " ".join(f"{times[n]:16.4f} {times[n] / (p * t_dense):8.2f}" for n in names)
            # K/V of a group are needed while any of its heads is kept (random keeps: count them)
            kept_kv = int(keep.view(B, Hkv, g).any(-1).sum())
            floor = max(attention_floor_ms(B, Hq, Hkv, 1, Lk, D, int(keep.sum()), kept_kv, False, elem, *ceilings))
            cells += f" {floor:9.4f} {times['triton'] / floor:15.2f}"
            print(f"{f'{B},{Hq},{Hkv},{Lk},{D}':28s} {p:5.2f} {cells}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


def block_variants(torch, F, s: Shape, keep_shared, dtype) -> dict:
    """The attention block (projections + core) as callables: dense; a per-row gate (full
    projections, gated core); a gate shared by the batch (kept heads' projection rows sliced once,
    as a deployment would cache them); and the library's head-skipping projections around the op,
    with the batch-shared and with per-row keep sets."""
    from dhp_fx.kernels.triton_attention import triton_gated_attention

    d = s.H * s.D
    x = torch.randn(s.B, s.L, d, device=DEVICE, dtype=dtype)
    w_qkv = torch.randn(3 * d, d, device=DEVICE, dtype=dtype) / math.sqrt(d)
    w_o = torch.randn(d, d, device=DEVICE, dtype=dtype) / math.sqrt(d)
    heads = keep_shared.nonzero().flatten()
    hk = heads.numel()
    wq, wk, wv = (w.view(s.H, s.D, d)[heads].reshape(hk * s.D, d) for w in w_qkv.chunk(3))
    w_qkv_kept = torch.cat([wq, wk, wv])
    w_o_kept = w_o.view(d, s.H, s.D)[:, heads].reshape(d, hk * s.D)
    keep_rows = keep_shared[None].expand(s.B, s.H).contiguous()

    def split(qkv, h):
        return qkv.view(s.B, s.L, 3, h, s.D).permute(2, 0, 3, 1, 4)

    def dense():
        q, k, v = split(x @ w_qkv.T, s.H)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal)
        return o.transpose(1, 2).reshape(s.B, s.L, d) @ w_o.T

    def gated_rows():
        q, k, v = split(x @ w_qkv.T, s.H)
        o = triton_gated_attention(q, k, v, keep_rows, is_causal=s.causal)
        return o.transpose(1, 2).reshape(s.B, s.L, d) @ w_o.T

    def gated_shared():
        q, k, v = split(x @ w_qkv_kept.T, hk)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal)
        return o.transpose(1, 2).reshape(s.B, s.L, hk * s.D) @ w_o_kept.T

    import dhp_fx.kernels  # noqa: F401  (registers the dhp ops)

    wq_full, wk_full, wv_full = w_qkv.chunk(3)
    proj = torch.ops.dhp.head_linear_out
    keep_random = torch.zeros_like(keep_rows)
    n_keep = int(keep_shared.sum())
    for b in range(s.B):  # every row its own heads, as per-input gates give
        keep_random[b, torch.randperm(s.H, device=DEVICE)[:n_keep]] = True

    def gated_ops(proj_keep, keep):
        def run():
            # what optimize() runs with a gate that decides from the layer input: the library's
            # head-skipping projections (Triton on CUDA, mask read on the device) around the op;
            # a batch-shared gate hands the projections its [H] union (skip_projections' keep.any(0))
            q, k, v = (proj(x, w, None, proj_keep, s.D).view(s.B, s.L, s.H, s.D).transpose(1, 2)
                       for w in (wq_full, wk_full, wv_full))
            o = triton_gated_attention(q, k, v, keep, is_causal=s.causal)
            return torch.ops.dhp.head_linear_in(o.transpose(1, 2).reshape(s.B, s.L, d), w_o, None, proj_keep, s.D)
        return run

    from dhp_fx.kernels.compact_heads import HeadProjection, compact_attention_block

    def compact_shared():
        # what optimize() runs for a static or batch-shared gate (compact_heads): the kept heads'
        # weights gathered on every call by a device-side index, then cuBLAS + SDPA on those heads
        roles = (HeadProjection(x, w, None, False, 0) for w in (wq_full, wk_full, wv_full))
        return compact_attention_block(*roles, w_o, None, False, keep_rows, n_keep, s.D, s.D,
                                       is_causal=s.causal, rows_shared=True)

    return {"block dense": dense, "block gated/row": gated_rows, "block gated/shared": gated_shared,
            "block compact/shared": compact_shared,
            "block ops/shared": gated_ops(keep_shared, keep_rows),
            "block ops/row": gated_ops(keep_random, keep_random)}


def graph_replay(torch, fn):
    """fn captured once in a CUDA graph (after two warm-up calls: compiles and autotuning stay
    outside), returned as its replay. Zero-argument closures over fixed tensors: dhp_fx's
    CUDAGraphRunner would run these uncaptured (it graphs calls with CUDA tensor arguments, and
    copies those in on every call, which would be timed too). Off CUDA (the interpreter's smoke
    run of this table) it returns fn: the rows are then eager times under a graph label."""
    if DEVICE != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_block(torch, F, s: Shape, keep_shared, bench, dtype, graphs: bool = False):
    """:func:`block_variants` timed; with ``graphs`` each is also timed replayed from a CUDA graph
    ("name +graph")."""
    variants = list(block_variants(torch, F, s, keep_shared, dtype).items())
    times = {name: bench(fn) for name, fn in variants}
    if graphs:
        for name, fn in variants:
            times[name + " +graph"] = bench(graph_replay(torch, fn))
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for s, p, k in [] if args.no_prefill else plan(args):
            print(f"{str(s):28s} p={p:.2f} kept heads per row={k}")
        for B, Hq, Hkv, Lk, D in args.decode or []:
            print(f"decode {B},{Hq},{Hkv},{Lk},{D}: p in {args.p}")
        return 0
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        sys.exit("bench_attention.py: torch is not installed")
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "use --dry-run to see the plan")
    try:
        import triton.testing
        from dhp_fx.kernels.triton_attention import triton_available
    except ImportError as e:
        sys.exit(f"bench_attention.py: triton / dhp_fx kernels unavailable: {e}")
    if not triton_available(DEVICE):
        sys.exit("bench_attention.py: the Triton kernel needs compute capability >= 8.0")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"dtype {args.dtype}  layout {args.layout}  tma {args.tma}  pv-behind {args.pv_behind}")
    if (args.check or args.check_only) and not check(torch, F, args, dtype, gen):
        print("check FAILED; not timing")
        return 1
    if args.check_only:
        return 0

    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = (torch.compile(flex_attention, dynamic=False), create_block_mask)
            for knob in ("recompile_limit", "cache_size_limit"):  # one recompile per shape
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
        except ImportError:
            print("FlexAttention unavailable; skipping it")

    def bench(fn):
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    ceilings = measure_ceilings(torch, bench, dtype)
    print(f"ceilings: {ceilings[0] / 1e12:.0f} TFLOP/s ({args.dtype} 8192^3 matmul), "
          f"{ceilings[1] / 1e9:.0f} GB/s (1 GiB copy, read + write); 'floor' = max(arithmetic, memory) "
          f"time at those rates, 'triton x floor' = how far the kernel is from it")
    elem = torch.empty((), dtype=dtype).element_size()
    names = ["sdpa", "flex", "gather", "triton"] if flex is not None else ["sdpa", "gather", "triton"]
    header = (f"{'shape':28s} {'p':>5s} " + " ".join(f"{n + ' ms':>10s} {'x ideal':>8s}" for n in names)
              + f" {'floor ms':>9s} {'bound':>6s} {'triton x floor':>15s} {'target ms':>10s} {'triton':>11s}")
    print(header)
    print("-" * len(header))
    for s in [] if args.no_prefill else args.shapes:
        if args.layout == "model":
            q, k, v = (torch.randn(s.B, s.L, s.H, s.D, device=DEVICE, dtype=dtype).transpose(1, 2) for _ in range(3))
        else:
            q, k, v = (torch.randn(s.B, s.H, s.L, s.D, device=DEVICE, dtype=dtype) for _ in range(3))
        t_dense = None
        flex_s = None
        if flex is not None:
            keep_buf = torch.zeros(s.B, s.H, dtype=torch.bool, device=DEVICE)
            flex_s = (*flex, keep_buf, head_mask_mod(keep_buf, s.causal))
        for p in args.p:
            keep, idx = random_keep(torch, s.B, s.H, n_kept(p, s.H), DEVICE, gen)
            times = {}
            methods = make_methods(torch, F, s, q, k, v, keep, idx, flex_s, TMA_ARG[args.tma], TMA_ARG[args.pv_behind])
            for name, fn in methods.items():
                try:
                    times[name] = bench(fn)
                except Exception as e:  # one failing method should not hide the others
                    print(f"  {name} failed at {s} p={p}: {type(e).__name__}: {e}")
                    times[name] = float("nan")
            t_dense = times["sdpa"] if t_dense is None else t_dense
            ideal = p * t_dense
            cells = " ".join(f"{times[n]:10.3f} {times[n] / ideal:8.2f}" for n in names)
            kq = s.B * n_kept(p, s.H)
            arith, mem = attention_floor_ms(s.B, s.H, s.H, s.L, s.L, s.D, kq, kq, s.causal, elem, *ceilings)
            floor = max(arith, mem)
            cells += f" {floor:9.3f} {'math' if arith >= mem else 'memory':>6s} {times['triton'] / floor:15.2f}"
            target = core_target_ms(p, t_dense)
            cells += f" {target:10.3f} {verdict(times['triton'], target):>11s}"
            print(f"{str(s):28s} {p:5.2f} {cells}", flush=True)
            if p == args.p[0]:  # before --block's own launches replace the tuning record
                print(f"  triton config: {chosen_config()}")
            if args.block:
                shared = keep[0]
                blocks = time_block(torch, F, s, shared, bench, dtype, args.graphs)
                for name, t in blocks.items():
                    line = f"{'  ' + name:28s} {p:5.2f} {t:10.3f} ms"
                    if name.startswith(("block ops", "block compact")):  # the library's paths: the target's
                        dense = "block dense +graph" if name.endswith("+graph") else "block dense"
                        target = block_target_ms(p, blocks[dense])
                        line += f"  target {target:.3f} ms: {verdict(t, target)}"
                    print(line)
        del q, k, v
        torch.cuda.empty_cache()
    if args.decode:
        time_decode(torch, F, args, dtype, gen, bench, ceilings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
