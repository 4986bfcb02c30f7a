"""Attention of kept query heads over K/V read in place, by bands of adjacent heads."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhp_fx.kernels.compact_heads import dense_attention, kept_first
from dhp_fx.kernels.head_runs import Band, attend_head_bands, head_bands


def _bands(kept_heads, H, group, cap=None):
    union = torch.zeros(H, dtype=torch.bool)
    union[list(kept_heads)] = True
    idx, valid = kept_first(union, cap or len(kept_heads))
    return head_bands(idx.tolist(), valid.tolist(), group)


def test_mha_heads_band_by_adjacent_runs():
    assert _bands([0, 1, 2, 5, 7], 8, 1) == [Band(0, 0, 3, 1, 0, True), Band(3, 5, 1, 1, 5, True),
                                             Band(4, 7, 1, 1, 7, True)]
    # filler slots after the kept ones are left out of every band
    assert _bands([3, 4], 8, 1, cap=4) == [Band(0, 3, 2, 1, 3, True)]


def test_gqa_bands_join_groups_keeping_as_many_heads():
    # group 4: groups 0 and 1 whole (one band through enable_gqa), group 2 keeps heads 8 and 10
    # (folded: not adjacent), group 3 keeps 13 and 14 (folded with group 2: same count, next group)
    bands = _bands([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 14], 16, 4)
    assert bands == [Band(0, 0, 2, 4, 0, True), Band(8, 2, 2, 2, 8, False)]
    assert _bands([1, 6], 8, 4) == [Band(0, 0, 2, 1, 1, False)]


def test_slots_out_of_order_are_not_banded():
    assert head_bands([2, 1], [True, True], 1) is None
    assert head_bands([1, 2, 0], [True, False, True], 1) is None  # a kept slot after a filler


def _reference(q, k, v, idx, group, mask, causal):
    """Each slot's own head alone, in float64."""
    kv = torch.div(idx, group, rounding_mode="floor")
    heads_mask = mask
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] != 1:
        heads_mask = mask.index_select(mask.dim() - 3, idx)
    # dense_attention folds causality into a mask where both are given (SDPA takes one)
    return dense_attention(q, k.index_select(1, kv), v.index_select(1, kv), heads_mask, 0.0, causal, None, 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), kv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 4]),
       Lq=st.sampled_from([1, 2, 5]), Lk=st.integers(1, 12), mask=st.sampled_from(["none", "pad", "rows", "bias"]),
       causal=st.booleans(), spare=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_bands_equal_each_kept_head_alone(B, kv, group, Lq, Lk, mask, causal, spare, seed):
    """Kept slots equal attention of their own head alone (float64), filler slots are zero, and
    a band declines (None) only for what it cannot slice in place: a per-head mask over folded
    or scattered heads. Causality with a mask, or across folded heads, goes into the mask."""
    g = torch.Generator().manual_seed(seed)
    H, D = kv * group, 3
    union = torch.rand(H, generator=g) < 0.6
    union[int(torch.randint(H, (), generator=g))] = True
    cap = min(H, int(union.sum()) + spare)
    idx, valid = kept_first(union, cap)
    q = torch.randn(B, cap, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, kv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, kv, Lk, D + 1, generator=g, dtype=torch.float64)
    attn_mask = {"none": None, "pad": torch.rand(B, 1, 1, Lk, generator=g) < 0.8,
                 "rows": torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64),
                 "bias": torch.randn(1, H, Lq, Lk, generator=g, dtype=torch.float64)}[mask]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[..., 0] = True
    bands = head_bands(idx.tolist(), valid.tolist(), group)
    assert bands is not None
    got = attend_head_bands(q, k, v, bands, group, attn_mask, causal, None)
    folded = any(1 < b.per_group < group for b in bands)
    per_head = mask == "bias"
    blocked = per_head and (folded or not all(b.adjacent for b in bands))
    if blocked:
        assert got is None
        return
    assert got is not None and got.shape == (B, cap, Lq, D + 1)
    kept = int(valid.sum())
    want = _reference(q[:, :kept], k, v, idx[:kept], group, attn_mask, causal)
    torch.testing.assert_close(got[:, :kept], want, atol=1e-10, rtol=1e-10)
    assert torch.equal(got[:, kept:], torch.zeros_like(got[:, kept:]))


def test_bands_read_kv_in_place():
    """The point of the bands: K/V are sliced, never copied (a gather would index_select them)."""
    from unittest import mock

    H, group = 8, 2
    idx, valid = kept_first(torch.tensor([1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool), 5)
    q = torch.randn(2, 5, 1, 4)
    k, v = torch.randn(2, H // group, 6, 4), torch.randn(2, H // group, 6, 4)
    bands = head_bands(idx.tolist(), valid.tolist(), group)
    with mock.patch.object(torch.Tensor, "index_select", side_effect=AssertionError("K/V copied")):
        out = attend_head_bands(q, k, v, bands, group, None, False, None)
    assert out is not None and out.shape == (2, 5, 1, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bands_in_low_precision_match_float64(dtype):
    torch.manual_seed(0)
    idx, valid = kept_first(torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool), 7)
    group = 3
    q = torch.randn(2, 7, 1, 16)
    k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 4, 33, 16)
    bands = head_bands(idx.tolist(), valid.tolist(), group)
    got = attend_head_bands(q.to(dtype), k.to(dtype), v.to(dtype), bands, group, None, False, None)
    want = _reference(q.double(), k.double(), v.double(), idx, group, None, False)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
