"""Property-testing kit for attention rewrites: Hypothesis strategies, reference modules, checkers.

Everything dhp_fx's own tests use to property-test its transformations, public so users can do the
same on their models::

    from hypothesis import given
    from dhp_fx.testing import attention_specs, build_attention, check_gates_open, check_keep_mask

    @given(attention_specs())
    def test_my_rewrite(spec):
        module, inputs = build_attention(spec)
        optimized = check_gates_open(module, inputs)          # gates open => same outputs
        check_keep_mask(module, optimized, inputs, spec.keep)  # pruned heads => zeroed-head reference
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .config import DHPConfig

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover
    raise ImportError("dhp_fx.testing needs hypothesis: pip install 'dhp_fx[test]'") from exc

# "fused_rope": one projection for q, k and v cut by slices at each role's width (Phi-3), rotary
# embeddings on q and k, SDPA with enable_gqa; self-attention only.
STYLES = ("sdpa", "sdpa_gqa", "eager", "eager_div", "bmm", "fused_rope")
MASK_KINDS = ("none", "bool", "additive")

# Tolerances per dtype: the rewritten graph may take a different (but exact-in-math) kernel path.
TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass(frozen=True)
class AttentionSpec:
    """One attention configuration: shapes, masking, dtype, and the code style it is written in."""

    style: str = "sdpa"
    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    seq_q: int = 5
    seq_k: int = 5
    head_dim: int = 8
    causal: bool = False
    mask_kind: str = "none"
    dtype: torch.dtype = torch.float32
    scale: Optional[float] = None
    keep: Optional[tuple[tuple[bool, ...], ...]] = field(default=None, compare=False)
    seed: int = 0
    # forward also returns k and v as a KV cache would keep them (every KV head, RoPE applied):
    # read outside the block, they must stay whole
    returns_kv: bool = False

    @property
    def cross(self) -> bool:
        return self.seq_q != self.seq_k

    def keep_tensor(self) -> Optional[torch.Tensor]:
        return None if self.keep is None else torch.tensor(self.keep, dtype=torch.bool)


class SpecAttention(nn.Module):
    """A multi-head attention block written in the style the spec names.

    forward(x, context=None, mask=None, head_mask=None): ``head_mask`` [B, H] zeroes heads the
    plain way — the reference a gated rewrite must reproduce. Returns the output, or with
    ``spec.returns_kv`` (output, k, v).
    """

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        if spec.style not in STYLES:
            raise ValueError(f"AttentionSpec.style must be one of {STYLES}, got {spec.style!r}")
        if spec.heads % spec.kv_heads:
            raise ValueError(f"heads ({spec.heads}) must be a multiple of kv_heads ({spec.kv_heads})")
        if spec.style == "fused_rope" and (spec.cross or spec.head_dim % 2):
            raise ValueError("style 'fused_rope' needs self-attention (seq_q == seq_k) and an even head_dim")
        self.spec = spec
        d_model = spec.heads * spec.head_dim
        self.o_proj = nn.Linear(spec.heads * spec.head_dim, d_model)
        widths = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.kv_heads * spec.head_dim)
        if spec.style == "fused_rope":
            self.qkv_proj = nn.Linear(d_model, sum(widths))
            self.widths = widths
            angles = torch.arange(64.0)[:, None] * 10000.0 ** (-torch.arange(0, spec.head_dim, 2) / spec.head_dim)
            angles = torch.cat([angles, angles], -1)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d_model, w) for w in widths)
        if spec.causal and spec.style not in ("sdpa", "sdpa_gqa", "fused_rope"):
            self.register_buffer("tril", torch.ones(64, 64, dtype=torch.bool).tril(), persistent=False)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        if self.spec.style == "eager_div":  # OPT and old BART: the length inferred, the head count named
            return t.view(t.shape[0], -1, n, self.spec.head_dim).transpose(1, 2)
        return t.view(t.shape[0], t.shape[1], n, self.spec.head_dim).transpose(1, 2)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        n_rep = self.spec.heads // self.spec.kv_heads
        if n_rep == 1:
            return t
        b, h, s, d = t.shape
        return t[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)

    def _fused_rope(self, x):
        qkv = self.qkv_proj(x)
        wq, wk, _ = self.widths
        q, k, v = qkv[..., :wq], qkv[..., wq:wq + wk], qkv[..., wq + wk:]
        # view with -1 heads, as HF models write it; cos/sin broadcast over heads
        q, k, v = (t.view(x.shape[0], x.shape[1], -1, self.spec.head_dim).transpose(1, 2) for t in (q, k, v))
        cos, sin = self.cos[: x.shape[1]], self.sin[: x.shape[1]]

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

        return rotate(q), rotate(k), v

    def forward(self, x, context=None, mask=None, head_mask=None):
        s = self.spec
        src = x if context is None else context
        if s.style == "fused_rope":
            if context is not None:
                raise ValueError("style 'fused_rope' is self-attention: it takes no context")
            q, k, v = self._fused_rope(x)
        else:
            q = self._heads(self.q_proj(x), s.heads)
            k = self._heads(self.k_proj(src), s.kv_heads)
            v = self._heads(self.v_proj(src), s.kv_heads)
        cache = (k, v)
        scale = s.scale if s.scale is not None else 1.0 / math.sqrt(s.head_dim)
        if s.style in ("sdpa_gqa", "fused_rope"):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=s.causal, scale=s.scale, enable_gqa=s.heads != s.kv_heads
            )
        else:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
            if s.style == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=s.causal, scale=s.scale)
            else:
                out = self._eager(q, k, v, mask, scale)
        if head_mask is not None:
            out = out * head_mask[:, :, None, None].to(out.dtype)
        # fused_rope merges heads as HF models do, with -1: a chain needs views free of head counts
        width = -1 if s.style == "fused_rope" else s.heads * s.head_dim
        out = self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], width))
        return (out, *cache) if s.returns_kv else out

    def _eager(self, q, k, v, mask, scale):
        s = self.spec
        if s.style == "bmm":
            b, h, lq, d = q.shape
            scores = torch.bmm(q.reshape(b * h, lq, d), k.reshape(b * h, -1, d).transpose(1, 2)) * scale
            scores = scores.view(b, h, lq, -1)
        elif s.style == "eager_div":
            scores = torch.matmul(q, k.transpose(2, 3)) / (1.0 / scale)
        else:
            scores = q @ k.transpose(-1, -2) * scale
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        if s.causal:
            lq, lk = scores.shape[-2:]
            scores = scores.masked_fill(~self.tril[:lq, :lk], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if s.style == "bmm":
            b, h, lq, lk = probs.shape
            out = torch.bmm(probs.reshape(b * h, lq, lk), v.reshape(b * h, lk, -1))
            return out.view(b, h, lq, -1)
        return probs @ v


def build_attention(spec: AttentionSpec) -> tuple[SpecAttention, dict[str, Any]]:
    """The module for ``spec`` (eval mode, spec dtype) and keyword inputs to call it with."""
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        module = SpecAttention(spec).eval().to(spec.dtype)
    d_model = spec.heads * spec.head_dim
    inputs: dict[str, Any] = {"x": torch.randn(spec.batch, spec.seq_q, d_model, generator=gen).to(spec.dtype)}
    if spec.cross:
        inputs["context"] = torch.randn(spec.batch, spec.seq_k, d_model, generator=gen).to(spec.dtype)
    if spec.mask_kind == "bool":
        lengths = torch.randint(1, spec.seq_k + 1, (spec.batch,), generator=gen)
        inputs["mask"] = (torch.arange(spec.seq_k)[None, :] < lengths[:, None])[:, None, None, :]
    elif spec.mask_kind == "additive":
        bias = torch.randn(1, spec.heads, spec.seq_q, spec.seq_k, generator=gen)
        inputs["mask"] = bias.to(spec.dtype)
    return module, inputs



# ---------------------------------------------------------------------------- strategies
def keep_masks(batch: int, heads: int, allow_empty_rows: bool = True) -> st.SearchStrategy:
    """Per-sample keep masks [batch][heads], biased towards the edge cases that break kernels:
    every head kept, a single head kept, a batch row with no head kept."""
    all_kept = tuple(tuple([True] * heads) for _ in range(batch))
    one_kept = tuple(tuple(h == (b % heads) for h in range(heads)) for b in range(batch))
    edges = [all_kept, one_kept]
    if allow_empty_rows:
        edges.append(tuple(tuple([b > 0] * heads) for b in range(batch)))
    row = st.lists(st.booleans(), min_size=heads, max_size=heads)
    if not allow_empty_rows:
        row = row.filter(any)
    random = st.lists(row, min_size=batch, max_size=batch).map(lambda rows: tuple(map(tuple, rows)))
    return st.one_of(st.sampled_from(edges), random)


@st.composite
def attention_specs(
    draw,
    styles: Sequence[str] = STYLES,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    max_batch: int = 3,
    max_heads: int = 6,
    max_seq: int = 9,
    head_dims: Sequence[int] = (4, 8, 16),
    with_keep: bool = True,
    returns_kv: bool = False,
) -> AttentionSpec:
    """Attention configurations over styles, GQA groups, lengths (incl. 1 and odd), masks, dtypes;
    ``returns_kv``: modules that also return their k and v (see :class:`AttentionSpec`)."""
    style = draw(st.sampled_from(list(styles)))
    kv_heads = draw(st.integers(1, max(1, max_heads // 2)))
    heads = kv_heads * draw(st.integers(1, max(1, max_heads // kv_heads)))
    batch = draw(st.integers(1, max_batch))
    seq_q = draw(st.integers(1, max_seq))
    cross = draw(st.booleans()) and style != "fused_rope"
    seq_k = draw(st.integers(1, max_seq)) if cross else seq_q
    if seq_k == seq_q and cross:
        seq_k = seq_q + 1
    causal = draw(st.booleans()) and not cross
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    if causal and (style.startswith("sdpa") or style == "fused_rope"):
        mask_kind = "none"  # SDPA refuses attn_mask together with is_causal
    scale = draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    keep = draw(keep_masks(batch, heads)) if with_keep else None
    dims = ([d for d in head_dims if d % 2 == 0] or [2]) if style == "fused_rope" else list(head_dims)  # RoPE: even
    return AttentionSpec(
        style=style, batch=batch, heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_k=seq_k,
        head_dim=draw(st.sampled_from(dims)), causal=causal, mask_kind=mask_kind,
        dtype=draw(st.sampled_from(list(dtypes))), scale=scale, keep=keep, seed=draw(st.integers(0, 2**16)),
        returns_kv=returns_kv,
    )


# ---------------------------------------------------------------------------- checkers
def _call(model, inputs):
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs)


def _tensors(output) -> list[torch.Tensor]:
    if hasattr(output, "to_tuple"):  # HF ModelOutput
        output = output.to_tuple()
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def assert_outputs_close(actual, expected, atol: Optional[float] = None, rtol: Optional[float] = None, what: str = "output"):
    """Compare every tensor of two (nested) outputs; the message gives max abs/rel error and mismatches."""
    got, want = _tensors(actual), _tensors(expected)
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} tensors vs {len(want)} expected")
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            raise AssertionError(f"{what}[{i}]: shape {tuple(a.shape)} vs expected {tuple(b.shape)}")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise AssertionError(f"{what}[{i}]: integer tensors differ")
            continue
        d_atol, d_rtol = TOLERANCES.get(b.dtype, (1e-5, 1e-4))
        at, rt = atol if atol is not None else d_atol, rtol if rtol is not None else d_rtol
        a64, b64 = a.double(), b.double()
        bad = ~torch.isclose(a64, b64, atol=at, rtol=rt, equal_nan=True)
        if bad.any():
            err = (a64 - b64).abs().nan_to_num(float("inf"))
            rel = err / b64.abs().clamp_min(1e-12)
            raise AssertionError(
                f"{what}[{i}] {tuple(b.shape)} {b.dtype}: {int(bad.sum())} of {bad.numel()} elements "
                f"differ; max abs err {err.max().item():.3g}, max rel err {rel.max().item():.3g} "
                f"(atol={at}, rtol={rt})"
            )


def check_gates_open(model: nn.Module, inputs, config: Optional[DHPConfig] = None, atol=None, rtol=None, expect_sites: Optional[int] = None):
    """Optimize ``model``, run it with every gate open, assert the outputs equal the original's.

    Returns the optimized model so further checks can reuse its captured graph.
    """
    from .optimize import optimize

    expected = _call(model, inputs)
    optimized = optimize(model, config or DHPConfig(), example_inputs=inputs)
    assert_outputs_close(_call(optimized, inputs), expected, atol, rtol, "gates-open output")
    if expect_sites is not None and len(optimized.sites) != expect_sites:
        raise AssertionError(f"found {len(optimized.sites)} attention sites, expected {expect_sites}: {optimized.report()}")
    return optimized


@contextlib.contextmanager
def heads_zeroed(model: nn.Module, sites, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``model``'s pruned heads contribute nothing: the plain-PyTorch reference.

    Works for any model whose output projection is a module call (nn.Linear, HF Conv1D) reading
    heads in head-major order: a pre-hook zeroes each pruned head's slice of its input. Sites
    that share one output projection (ALBERT's shared layers) are told apart by call order: the
    i-th call of the module is the i-th of its sites, in graph order. Leaving the block raises
    when a hooked projection was never called as a module (nn.MultiheadAttention hands its
    weight to a functional call) or called out of step with its sites: the reference would
    otherwise zero nothing and prove nothing.
    """
    modules = dict(model.named_modules())
    owners = {site.name: _out_owner(site) for site in sites}
    for site in sites:
        if site.name in masks:
            if owners[site.name] is None:
                raise ValueError(f"site {site.name!r} has no known output projection to zero heads at")
            if owners[site.name] not in modules:
                raise ValueError(f"output projection {owners[site.name]!r} of site {site.name!r} is not a module "
                                 f"of the model")
    hooked = {owners[name] for name in masks if name in owners}
    ordered: dict[str, list] = {}
    for site in sites:  # every site calling a hooked module, masked or not, in graph order
        if owners[site.name] in hooked:
            ordered.setdefault(owners[site.name], []).append(site)
    calls = {owner: [0] for owner in ordered}
    handles = []
    try:
        for owner, owned in ordered.items():
            hook = _zero_heads_hook([(site, masks.get(site.name)) for site in owned], calls[owner])
            handles.append(modules[owner].register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
    for owner, owned in ordered.items():
        n = calls[owner][0]
        if n == 0:
            raise ValueError(f"output projection {owner!r} of site {owned[0].name!r} was never called as a module "
                             f"(its weight is read by a functional call): no zeroed-head reference for it")
        if n % len(owned):
            raise ValueError(f"output projection {owner!r} is shared by {len(owned)} sites but ran {n} times: "
                             f"its calls cannot be matched to sites")


def _out_owner(site) -> Optional[str]:
    """The module path of the site's output projection, or None when it has none we know."""
    return None if site.out_proj is None else site.out_proj.weight.rsplit(".", 1)[0]


def _zero_heads_hook(owned: list, calls: list) -> Callable:
    """owned: (site, keep or None) per site calling this module, in call order."""
    def hook(module, args):
        site, keep = owned[calls[0] % len(owned)]
        calls[0] += 1
        if keep is None:
            return None
        x = args[0]
        start, stop = site.out_proj.features or (0, x.shape[-1])
        width = site.value_head_dim
        head_mask = keep.to(x.device)
        if head_mask.dim() == 1:
            head_mask = head_mask.expand(x.shape[0], -1)
        scale = head_mask.to(x.dtype).repeat_interleave(width, dim=-1)  # [B, H*Dv]
        scale = scale.reshape(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[-1])
        x = x.clone()
        x[..., start:stop] = x[..., start:stop] * scale
        return (x, *args[1:])

    return hook


def check_keep_mask(model: nn.Module, optimized, inputs, keep, atol=None, rtol=None) -> None:
    """Pin ``keep`` ([B, H] bool, or {site name: mask}) in every gate; assert the optimized output
    is finite and equals ``model`` run with those heads zeroed."""
    masks = keep if isinstance(keep, dict) else {s.name: torch.as_tensor(keep) for s in optimized.sites}
    optimized.set_keep_mask(masks)
    try:
        got = _call(optimized, inputs)
    finally:
        optimized.set_keep_mask(None)
    for i, t in enumerate(_tensors(got)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AssertionError(f"gated output[{i}] has non-finite values")
    with heads_zeroed(model, optimized.sites, masks):
        expected = _call(model, inputs)
    assert_outputs_close(got, expected, atol, rtol, "gated output vs zeroed-head reference")
