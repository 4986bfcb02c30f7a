"""The split-KV decode forward (kernels/triton_decode.py) under the Triton interpreter, against
float64 and against the regular (unsplit) Triton forward.

Interpreter mode is fixed when triton is imported, so this module reuses test_triton_kernel's
loader and, where this process cannot interpret (it imported triton compiled, or has CUDA),
runs itself in a child pytest process with TRITON_INTERPRET=1, like that module does.
"""
from __future__ import annotations

import importlib
import sys
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

# Its import loads the interpreted forward (or skips this module too where triton is missing).
import test_triton_kernel as tk
from test_triton_kernel import TOL, make_keep, make_mask, qkv, reference
from test_triton_kernel import _interpreter_on  # noqa: F401  (module-scoped autouse fixture)

IN_PROCESS = tk.IN_PROCESS
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="run by test_decode_suite_in_interpreter_subprocess")


def _load_decode():
    """The interpreted decode module, bound to the interpreted forward test_triton_kernel loaded."""
    tk._set_interpret(True)
    try:
        name = "dhp_fx.kernels.triton_decode"
        mod = importlib.import_module(name)
        if not mod._INTERPRET or mod._attend is not tk._ta._attend:
            sys.modules.pop(name, None)
            mod = importlib.import_module(name)
        return mod
    finally:
        tk._set_interpret(False)


if IN_PROCESS:
    _td = _load_decode()
    attention = tk._ta.triton_gated_attention


@pytest.mark.skipif(IN_PROCESS, reason="the suite runs in this process")
def test_decode_suite_in_interpreter_subprocess():
    tk.run_interpreted_child(__file__, timeout=600)


def unsplit(*args, **kwargs):
    """The regular forward, even where the heuristic would split (it does for small test shapes)."""
    with mock.patch.object(_td, "decode_splits", lambda *a, **k: None):
        return attention(*args, **kwargs)


def mask_row_out(mask, B, Hq, Lq, Lk, row):
    """A (B, Hq, Lq, Lk) copy of ``mask`` with query row ``row`` of batch 0 seeing no key."""
    if mask is None:
        return None
    mask = mask.expand(B, Hq, Lq, Lk).clone()
    mask[0, :, row] = False if mask.dtype == torch.bool else float("-inf")
    return mask


def group_keep(pattern, B, Hkv, group):
    """keep [B, Hkv * group] by KV group: "mixed" = batch 0's first group all kept and its others
    partly kept, later batches nothing; "group_pruned" = batch 0's first group fully pruned and its
    others all kept, batch 1's first group partly kept and its others fully pruned."""
    keep = torch.zeros(B, Hkv, group, dtype=torch.bool)
    if pattern == "mixed":
        keep[0, 0] = True
        keep[0, 1:, ::2] = True
    elif pattern == "group_pruned":
        keep[0, 1:] = True
        if B > 1:
            keep[1, 0, 1:] = True
    else:
        raise ValueError(pattern)
    return keep.reshape(B, Hkv * group)


def check_decode(B=1, Hkv=2, group=2, Lq=1, Lk=100, D=32, Dv=None, dtype=torch.float32, mask_kind="none",
                 mask_shape="full", dead_row=None, is_causal=False, keep="random", splits=2, scale=None,
                 model_layout=False, seed=0, packed=None):
    """``packed`` forces the GQA-packed (True) or per-head (False) kernel and, forced either way,
    also compares against the other one."""
    gen = torch.Generator().manual_seed(seed)
    Hq, Dv = Hkv * group, Dv or D
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, gen, model_layout)
    keep = group_keep(keep, B, Hkv, group) if keep in ("mixed", "group_pruned") else make_keep(keep, B, Hq, gen)
    mask = make_mask(mask_kind, mask_shape, B, Hq, Lq, Lk, dtype, gen)
    if dead_row is not None and mask_shape == "pad":
        # [B, 1, 1, Lk] kept as it is: batch 0 sees no key at all, so every one of its rows is dead.
        mask = mask.clone()
        mask[0] = False if mask.dtype == torch.bool else float("-inf")
    elif dead_row is not None:
        mask = mask_row_out(mask, B, Hq, Lq, Lk, dead_row)
    # Poisoned, so every element must be written; in model layout the buffer is strided too.
    out = torch.full((B, Lq, Hq, Dv) if model_layout else (B, Hq, Lq, Dv), float("nan"), dtype=dtype)
    out = out.transpose(1, 2) if model_layout else out
    with mock.patch.object(_td, "PACK_GQA", packed), \
            mock.patch.object(_td, "_packed_forward", wraps=_td._packed_forward) as spy:
        got, ent, lse = attention(q, k, v, keep, mask, is_causal, scale, return_entropy=True, return_lse=True,
                                  out=out, entropy_rows=True, num_splits=splits)
    if packed is not None:
        assert spy.called == packed
    assert got is out and not torch.isnan(got).any()
    assert not torch.isnan(ent).any() and not torch.isnan(lse).any()

    ref, _, row_ok, ref_rows = reference(q, k, v, keep, mask, is_causal, scale)
    if dead_row is not None:
        assert not row_ok[0, :, dead_row].any()
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep])), "pruned heads must be exactly zero"
    assert torch.equal(got[~row_ok], torch.zeros_like(got[~row_ok])), "fully masked rows must be zero"
    sel = row_ok[..., None].expand_as(got)
    tol = TOL[dtype]
    torch.testing.assert_close(got.double()[sel], ref[sel], atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), ref_rows, atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=1e-3)

    # Same entropy and lse as the unsplit forward (+inf lse on fully masked rows and pruned heads).
    want_out, want_ent, want_lse = unsplit(q, k, v, keep, mask, is_causal, scale, return_entropy=True,
                                           return_lse=True, entropy_rows=True)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(lse.isinf(), want_lse.isinf())
    torch.testing.assert_close(got, want_out, atol=tol, rtol=tol)

    if packed is not None:  # the other decode kernel, same splits: the same rows, tile by tile
        with mock.patch.object(_td, "PACK_GQA", not packed):
            other = attention(q, k, v, keep, mask, is_causal, scale, return_entropy=True, return_lse=True,
                              entropy_rows=True, num_splits=splits)
        for a, b in zip((got, ent, lse), other):
            torch.testing.assert_close(a, b, atol=1e-5 if dtype == torch.float32 else tol, rtol=1e-5)
        assert torch.equal(lse.isinf(), other[2].isinf())


DECODE_CASES = {
    # one split per key block, GQA 2:1
    "lq1-gqa-7splits": dict(Lq=1, Lk=100, splits=7),
    # a bool row with no visible key; splits == key blocks
    "lq3-fp16-bool-deadrow": dict(Lq=3, Lk=37, dtype=torch.float16, mask_kind="bool", dead_row=1, splits=3),
    # causal keeps Lq keys = one block, so six of seven splits are empty; additive mask, -inf row
    "lq16-bf16-causal-add-deadrow": dict(Lq=16, Lk=37, dtype=torch.bfloat16, mask_kind="additive",
                                         mask_shape="bias", dead_row=15, is_causal=True, splits=7),
    # padded head blocks: 80 -> 128, 96 -> 128 with a different Dv
    "d80-fp16-pad-all": dict(Lq=1, Lk=100, D=80, dtype=torch.float16, mask_kind="bool", mask_shape="pad",
                             keep="all", splits=2),
    "d96-dv64-bf16-1split": dict(B=2, Lq=3, Lk=100, D=96, Dv=64, dtype=torch.bfloat16, keep="row_none", splits=1),
    # additive bias over all 16 rows, one head kept, strided output
    "lq16-fp32-add-one": dict(Lq=16, Lk=100, mask_kind="additive", mask_shape="bias", keep="one", splits=3,
                              model_layout=True),
    # more splits than key blocks (3): bf16 D=128 in model layout
    "d128-bf16-splits-gt-blocks": dict(Hkv=1, group=2, Lq=1, Lk=37, D=128, dtype=torch.bfloat16, keep="all",
                                       splits=7, model_layout=True, scale=0.3),
    # causal decode with 3 rows against a long KV, 2-D bool mask
    "lq3-causal-2d-bool": dict(B=2, Hkv=1, Lq=3, Lk=100, mask_kind="bool", mask_shape="2d", is_causal=True,
                               splits=2),
    # per-head kernel, one pair of eight kept: the launch's 16 programs go to it (3 pieces of the
    # 7 key blocks, not 2), the others run nothing (SHARE_PIECES)
    "mha-one-kept-shares-pieces": dict(B=2, Hkv=4, group=1, Lq=1, Lk=100, keep="one", splits=2),
    # random keeps over 19 key blocks: up to 9 pieces per kept pair, additive mask, fp16
    "mha-random-shares-pieces-fp16": dict(B=2, Hkv=3, group=1, Lq=2, Lk=300, dtype=torch.float16,
                                          mask_kind="additive", mask_shape="bias", keep="random", splits=3),
}


@interpreted
@pytest.mark.parametrize("case", list(DECODE_CASES.values()), ids=list(DECODE_CASES))
def test_split_forward_matches_reference_and_unsplit_forward(case):
    check_decode(**case)


@interpreted
@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(
    Lq=st.sampled_from([1, 3, 16]), Lk=st.integers(1, 70), group=st.sampled_from([1, 2]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    mask_kind=st.sampled_from(["none", "bool", "additive"]), is_causal=st.booleans(),
    keep=st.sampled_from(["random", "all", "row_none"]), splits=st.sampled_from([1, 2, 3, 7]),
    seed=st.integers(0, 2**16),
)
def test_split_forward_random_shapes(Lq, Lk, group, dtype, mask_kind, is_causal, keep, splits, seed):
    check_decode(B=2, Hkv=1, group=group, Lq=Lq, Lk=Lk, D=16, dtype=dtype, mask_kind=mask_kind,
                 mask_shape="full", is_causal=is_causal, keep=keep, splits=splits, seed=seed)


# GQA-packed decode: one program per (batch, KV head) over GROUP * Lq rows (16 to 64 padded).
PACKED_CASES = {
    "g2-lq1-1split-mixed": dict(B=2, Hkv=2, group=2, Lq=1, Lk=100, D=16, keep="mixed", splits=1),
    "g2-lq5-fp16-headbool-deadrow-3splits": dict(B=2, Hkv=2, group=2, Lq=5, Lk=37, D=16, dtype=torch.float16,
                                                 mask_kind="bool", mask_shape="full", dead_row=2,
                                                 keep="group_pruned", splits=3),
    "g4-lq2-bf16-causal-headadd-deadrow": dict(B=2, Hkv=1, group=4, Lq=2, Lk=70, D=16, dtype=torch.bfloat16,
                                               mask_kind="additive", mask_shape="full", dead_row=1,
                                               is_causal=True, keep="mixed", splits=3),
    "g4-lq5-biasadd-1split-group-pruned": dict(B=2, Hkv=2, group=4, Lq=5, Lk=53, D=16, mask_kind="additive",
                                               mask_shape="bias", keep="group_pruned", splits=1),
    "g8-lq1-pad-deadbatch-3splits": dict(B=2, Hkv=1, group=8, Lq=1, Lk=100, D=16, mask_kind="bool",
                                         mask_shape="pad", dead_row=0, keep="mixed", splits=3),
    "g8-lq5-64rows-fp16-causal-padadd-deadbatch": dict(B=2, Hkv=2, group=8, Lq=5, Lk=37, D=16,
                                                       dtype=torch.float16, mask_kind="additive",
                                                       mask_shape="pad", dead_row=0, is_causal=True,
                                                       keep="group_pruned", splits=1),
    "g2-lq2-bf16-d32-model-layout-all": dict(B=1, Hkv=2, group=2, Lq=2, Lk=100, D=32, dtype=torch.bfloat16,
                                             keep="all", splits=3, model_layout=True, scale=0.3),
    "g4-lq16-64rows-headbool-all": dict(B=1, Hkv=1, group=4, Lq=16, Lk=45, D=16, mask_kind="bool",
                                        mask_shape="full", keep="all", splits=3),
}


@interpreted
@pytest.mark.parametrize("case", list(PACKED_CASES.values()), ids=list(PACKED_CASES))
def test_packed_gqa_matches_reference_unsplit_and_unpacked(case):
    check_decode(**case, packed=True)


@interpreted
@settings(deadline=None, max_examples=8, suppress_health_check=[HealthCheck.too_slow])
@given(
    group=st.sampled_from([2, 4, 8]), Hkv=st.sampled_from([1, 2]), Lq=st.sampled_from([1, 2, 5]),
    Lk=st.integers(1, 90), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    mask_kind=st.sampled_from(["none", "bool", "additive"]), mask_shape=st.sampled_from(["full", "bias", "pad"]),
    is_causal=st.booleans(), keep=st.sampled_from(["mixed", "group_pruned", "all", "random"]),
    splits=st.sampled_from([1, 3]), seed=st.integers(0, 2**16),
)
def test_packed_gqa_random_shapes(group, Hkv, Lq, Lk, dtype, mask_kind, mask_shape, is_causal, keep, splits, seed):
    check_decode(B=2, Hkv=Hkv, group=group, Lq=Lq, Lk=Lk, D=16, dtype=dtype, mask_kind=mask_kind,
                 mask_shape=mask_shape, is_causal=is_causal, keep=keep, splits=splits, seed=seed, packed=True)


def check_head_map(B=2, Hkv=2, group=2, cap=3, Lq=1, Lk=70, D=16, dtype=torch.float32, mask_kind="none",
                   mask_shape="full", is_causal=False, keep="random", splits=2, packed=None, model_layout=False,
                   seed=0):
    """A query chain's decode: q holds ``cap`` of the Hkv * group query heads (kept heads ascending,
    then filler heads, as ``kept_first`` orders them), K/V every KV head's, ``kv_heads`` naming each
    slot's KV head. Against float64 on K/V gathered per slot, and against the kernel on those
    gathered K/V; pruned and filler slots exactly zero, every element written."""
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * group
    q_all, k, v = qkv(B, Hq, Hkv, Lq, Lk, D, D, dtype, gen, model_layout)
    union = torch.rand(Hq, generator=gen) > 0.5
    union[torch.randint(Hq, (1,), generator=gen)] = True
    idx = torch.sort((~union).to(torch.int32), stable=True).indices[:cap]
    valid = union.index_select(0, idx)
    q = q_all.index_select(1, idx)
    keep_rows = (make_keep(keep, B, cap, gen) if keep != "shared" else torch.ones(B, cap, dtype=torch.bool)) & valid
    mask = make_mask(mask_kind, mask_shape, B, Hq, Lq, Lk, dtype, gen)
    if mask is not None and mask.dim() == 4 and mask.shape[1] > 1:
        mask = mask.index_select(1, idx)
    kv_heads = torch.div(idx, group, rounding_mode="floor")
    out = torch.full((B, cap, Lq, D), float("nan"), dtype=dtype)
    with mock.patch.object(_td, "PACK_GQA", packed), \
            mock.patch.object(_td, "_packed_forward", wraps=_td._packed_forward) as spy:
        got, ent = attention(q, k, v, keep_rows, mask, is_causal, None, return_entropy=True, out=out,
                             entropy_rows=True, num_splits=splits, kv_heads=kv_heads, kv_group=group)
    if packed is not None:
        assert spy.called == packed
    assert got is out and not torch.isnan(got).any() and not torch.isnan(ent).any()
    k_sel, v_sel = k.index_select(1, kv_heads), v.index_select(1, kv_heads)
    ref, _, row_ok, ref_rows = reference(q, k_sel, v_sel, keep_rows, mask, is_causal, None)
    assert torch.equal(got[~keep_rows], torch.zeros_like(got[~keep_rows])), "pruned and filler slots must be zero"
    sel = row_ok[..., None].expand_as(got)
    torch.testing.assert_close(got.double()[sel], ref[sel], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ent.double(), ref_rows, atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=1e-3)
    gathered = attention(q, k_sel.contiguous(), v_sel.contiguous(), keep_rows, mask, is_causal, None,
                         num_splits=splits)
    torch.testing.assert_close(got, gathered, atol=TOL[dtype], rtol=TOL[dtype])


HEAD_MAP_CASES = {
    # MHA: the per-head kernel, each kept slot reading its own head's K/V
    "mha-cap3-of-4": dict(Hkv=4, group=1, cap=3, Lq=1, Lk=70, splits=2, packed=False),
    # GQA packed: a group's slots found by their KV head, one split storing results itself
    "g2-cap3-packed-1split": dict(Hkv=2, group=2, cap=3, splits=1, packed=True),
    "g4-cap5-packed-3splits-fp16-headmask": dict(Hkv=2, group=4, cap=5, Lq=2, Lk=53, dtype=torch.float16,
                                                 mask_kind="additive", mask_shape="full", splits=3, packed=True),
    "g4-cap2-packed-bf16-pad-model-layout": dict(Hkv=2, group=4, cap=2, Lk=100, dtype=torch.bfloat16,
                                                 mask_kind="bool", mask_shape="pad", splits=2, packed=True,
                                                 model_layout=True),
    # GQA through the per-head kernel, causal, shared rows
    "g2-cap4-per-head-causal-shared": dict(Hkv=2, group=2, cap=4, Lq=3, Lk=37, is_causal=True, keep="shared",
                                           splits=2, packed=False),
}


@interpreted
@pytest.mark.parametrize("case", list(HEAD_MAP_CASES.values()), ids=list(HEAD_MAP_CASES))
def test_head_map_reads_each_slots_kv_head_in_place(case):
    check_head_map(**case)


@interpreted
@settings(deadline=None, max_examples=6, suppress_health_check=[HealthCheck.too_slow])
@given(group=st.sampled_from([1, 2, 4]), Hkv=st.sampled_from([1, 2]), cap_share=st.floats(0.1, 1.0),
       Lq=st.sampled_from([1, 2]), Lk=st.integers(1, 60), mask_kind=st.sampled_from(["none", "bool", "additive"]),
       keep=st.sampled_from(["random", "shared", "row_none"]), splits=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**16))
def test_head_map_random_shapes(group, Hkv, cap_share, Lq, Lk, mask_kind, keep, splits, seed):
    Hq = group * Hkv
    check_head_map(B=2, Hkv=Hkv, group=group, cap=max(1, round(cap_share * Hq)), Lq=Lq, Lk=Lk, mask_kind=mask_kind,
                   keep=keep, splits=splits, seed=seed)


@interpreted
def test_head_map_refuses_what_it_cannot_serve():
    q, k = torch.randn(1, 3, 1, 16), torch.randn(1, 2, 20, 16)
    keep = torch.ones(1, 3, dtype=torch.bool)
    heads = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="kv_group"):
        attention(q, k, k, keep, kv_heads=heads)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        attention(q, k, k, keep, kv_heads=torch.tensor([0, 1, 2]), kv_group=2)
    with pytest.raises(ValueError, match="2 times, more than kv_group = 1"):
        attention(q, k, k, keep, kv_heads=heads, kv_group=1)
    with pytest.raises(ValueError, match=r"int32/int64 \[3\]"):
        attention(q, k, k, keep, kv_heads=heads[:2], kv_group=2)
    with pytest.raises(ValueError, match="serves decode"):
        attention(torch.randn(1, 3, 17, 16), k, k, keep, kv_heads=heads, kv_group=2)


@interpreted
def test_packed_dispatch():
    gen = torch.Generator().manual_seed(3)
    calls = []
    real = _td._packed_forward

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    k = torch.randn(1, 2, 100, 16, generator=gen)
    with mock.patch.object(_td, "_packed_forward", spy):
        for Hq, Hkv, Lq, Lk in [(8, 2, 1, 100), (8, 2, 1, 40), (8, 2, 16, 100), (8, 1, 9, 100), (2, 2, 1, 100)]:
            q = torch.randn(1, Hq, Lq, 16, generator=gen)
            kv = k[:, :Hkv, :Lk]
            attention(q, kv, kv, torch.ones(1, Hq, dtype=torch.bool))
    # 4 heads x 1 and x 16 rows pack, and the heuristic counts B*Hkv = 2 programs, not 8; too few
    # key blocks to split (Lk = 40) still packs, at one split. 8 heads x 9 rows are over the cap; no
    # GQA at Hq = Hkv. (No causal here: top-left causal decode sees one key block.)
    blocks = _td._key_blocks(1, 100, False)
    sms = _td._INTERPRET_SMS
    assert calls == [_td.split_heuristic(2, blocks, sms), 1, _td.split_heuristic(2, blocks, sms)]
    assert calls[0] > 1 and _td.split_heuristic(8, blocks, sms) != calls[0]
    with mock.patch.object(_td, "PACK_GQA", True), pytest.raises(ValueError, match="packed cap"):
        attention(torch.randn(1, 8, 9, 16), k[:, :1], k[:, :1], torch.ones(1, 8, dtype=torch.bool), num_splits=2)


@interpreted
def test_packed_lse_only_pass():
    """compute_out=False (the backward's lse recompute) on the packed kernel, one split and three."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(2, 8, 2, 2, 75, 16, 16, torch.float32, gen)
    keep = group_keep("mixed", 2, 2, 4)
    mask = make_mask("additive", "full", 2, 8, 2, 75, torch.float32, gen)
    _, want = unsplit(q, k, v, keep, mask, return_lse=True)
    for splits in (1, 3):
        with mock.patch.object(_td, "_packed_forward", wraps=_td._packed_forward) as spy:
            none, lse = attention(q, k, v, keep, mask, return_lse=True, compute_out=False, num_splits=splits)
        assert spy.called and none is None
        torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(lse.isinf(), want.isinf())


@interpreted
def test_nothing_kept_and_no_keys():
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(2, 2, 1, 3, 40, 16, 16, torch.float32, gen)
    out = torch.full((2, 2, 3, 16), float("nan"))
    none = torch.zeros(2, 2, dtype=torch.bool)
    got, ent, lse = attention(q, k, v, none, return_entropy=True, return_lse=True, out=out, num_splits=3)
    assert torch.equal(got, torch.zeros_like(got)) and torch.equal(ent, torch.zeros_like(ent))
    assert torch.isinf(lse).all() and (lse > 0).all()
    # Lk = 0: every split is empty, every kept row fully masked.
    k0, v0 = k[:, :, :0], v[:, :, :0]
    got, lse = attention(q, k0, v0, ~none, return_lse=True, out=out, num_splits=2)
    assert torch.equal(got, torch.zeros_like(got)) and torch.isinf(lse).all()


@interpreted
def test_lse_only_pass_and_backward_through_split_forward():
    """compute_out=False (the backward's lse recompute) and autograd over the split forward."""
    gen = torch.Generator().manual_seed(4)
    B, Hq, Hkv, Lq, Lk, D = 1, 4, 2, 2, 70, 16
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, D, D, torch.float32, gen)
    keep = torch.tensor([[True, False, True, True]])
    mask = make_mask("additive", "bias", B, Hq, Lq, Lk, torch.float32, gen)
    mask = mask.masked_fill(mask == float("-inf"), -5.0)  # finite, as the backward reference needs
    none, lse = attention(q, k, v, keep, mask, return_lse=True, compute_out=False, num_splits=3)
    _, want = unsplit(q, k, v, keep, mask, return_lse=True)
    assert none is None
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)

    with mock.patch.object(_td, "gated_decode_forward", wraps=_td.gated_decode_forward) as spy:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = tk._ta.triton_gated_attention_autograd(*leaves, keep, mask)
        assert spy.called, "the heuristic should split this shape under the interpreter"
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = tk.gated_attention_reference(*ref_leaves, keep, mask.double())
    ref.backward(grad.double())
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=2e-5, rtol=2e-5)


@interpreted
def test_huge_negative_padding_row_matches_sdpa():
    """finfo.min padding (HF) on every key of a row: uniform over the keys, as SDPA gives."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = qkv(1, 2, 2, 3, 40, 16, 16, torch.float32, gen)
    mask = torch.zeros(1, 1, 3, 40)
    mask[..., 1, :] = torch.finfo(torch.float32).min
    keep = torch.ones(1, 2, dtype=torch.bool)
    got = attention(q, k, v, keep, mask, num_splits=3)
    want = tk.gated_attention_reference(q.double(), k.double(), v.double(), keep, mask.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@interpreted
def test_dispatch():
    gen = torch.Generator().manual_seed(2)
    keep = torch.ones(1, 2, dtype=torch.bool)
    calls = []
    real = _td.gated_decode_forward

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    with mock.patch.object(_td, "gated_decode_forward", spy):
        q, k, v = qkv(1, 2, 2, 1, 100, 16, 16, torch.float32, gen)
        attention(q, k, v, keep, num_splits=5)  # forced
        attention(q, k, v, keep)  # 2 programs on the interpreter's pretend 4 SMs: the heuristic splits
        attention(q, k[:, :, :40], v[:, :, :40], keep)  # 3 key blocks: too short to split
        attention(q, k, v, keep, is_causal=True)  # causal decode sees one key block
        q17 = torch.randn(1, 2, 17, 16, generator=gen)
        attention(q17, k, v, keep)  # too many query rows for the split path
    assert calls == [5, _td.split_heuristic(2, 7, _td._INTERPRET_SMS)] and calls[1] > 1
    with pytest.raises(ValueError, match="Lq <= 16"):
        attention(q17, k, v, keep, num_splits=2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_splits"):
            attention(q, k, v, keep, num_splits=bad)


@interpreted
def test_split_heuristic():
    h = _td.split_heuristic
    assert h(32, 512, 132) > 1  # B=1, Hq=32 decode at 32k keys on an H100
    assert h(256, 512, 132) == 1  # already most of a wave
    assert h(32, 3, 132) == 1  # too few key blocks to share out
    for programs in (1, 3, 8, 32, 100):
        for n_blocks in (1, 2, 5, 64, 512, 4096):
            s = h(programs, n_blocks, 132)
            assert 1 <= s <= max(1, n_blocks // 2) and s <= 128
