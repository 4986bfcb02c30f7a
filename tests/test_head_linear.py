"""Head-skipping projections: exact against the masked dense reference, grads, opcheck."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dhp_fx.kernels.head_linear import (
    head_linear_in, head_linear_in_reference, head_linear_out, head_linear_out_reference,
)


@st.composite
def cases(draw):
    heads = draw(st.integers(1, 5))
    head_dim = draw(st.sampled_from([1, 3, 8]))
    d_in = draw(st.integers(1, 12))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    keep = torch.tensor(draw(st.lists(st.booleans(), min_size=heads, max_size=heads)))
    return heads, head_dim, d_in, tuple(lead), keep, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 999))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_head_linear_out_and_in_match_masked_reference(case):
    heads, hd, d_in, lead, keep, in_out, with_bias = case[:7]
    g = torch.Generator().manual_seed(case[7])
    x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(heads * hd, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(heads * hd, generator=g, dtype=torch.float64) if with_bias else None
    w_arg = w.t().contiguous() if in_out else w
    y = head_linear_out(x, w_arg, b, keep, hd, in_out)
    torch.testing.assert_close(y, head_linear_out_reference(x, w_arg, b, keep, hd, in_out))
    assert (y[..., ~keep.repeat_interleave(hd)] == 0).all()

    o = torch.randn(*lead, heads * hd, generator=g, dtype=torch.float64) * keep.repeat_interleave(hd)
    w2 = torch.randn(d_in, heads * hd, generator=g, dtype=torch.float64)
    b2 = torch.randn(d_in, generator=g, dtype=torch.float64) if with_bias else None
    w2_arg = w2.t().contiguous() if in_out else w2
    torch.testing.assert_close(
        head_linear_in(o, w2_arg, b2, keep, hd, in_out), head_linear_in_reference(o, w2_arg, b2, keep, hd, in_out)
    )


@pytest.mark.parametrize("op", [head_linear_out, head_linear_in])
def test_gradcheck_and_opcheck(op):
    g = torch.Generator().manual_seed(0)
    keep = torch.tensor([True, False, True])
    x_dim, w_shape = (5, (6, 5)) if op is head_linear_out else (6, (5, 6))
    x = torch.randn(2, 3, x_dim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: op(x, w, b, keep, 2, False), (x, w, b))
    torch.library.opcheck(op, (x, w, b, keep, 2, False))


def test_pruned_rows_get_zero_weight_grad():
    keep = torch.tensor([True, False])
    x = torch.randn(4, 3)
    w = torch.randn(4, 3, requires_grad=True)
    head_linear_out(x, w, None, keep, 2).sum().backward()
    assert (w.grad[2:] == 0).all() and (w.grad[:2] != 0).any()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="heads_keep"):
        head_linear_out(torch.randn(2, 3), torch.randn(4, 3), None, torch.ones(2), 2)
    with pytest.raises(ValueError, match="head features"):
        head_linear_out(torch.randn(2, 3), torch.randn(5, 3), None, torch.ones(2, dtype=torch.bool), 2)


@st.composite
def per_sample_cases(draw):
    batch, heads = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    equal = draw(st.booleans())  # equal counts take the batched-GEMM path, others the union
    if equal:
        n = draw(st.integers(0, heads))
        rows = [sorted(draw(st.permutations(range(heads)))[:n]) for _ in range(batch)]
        keep = torch.zeros(batch, heads, dtype=torch.bool)
        for b, r in enumerate(rows):
            keep[b, r] = True
    else:
        keep = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=heads, max_size=heads),
                                          min_size=batch, max_size=batch)))
    return keep, draw(st.sampled_from([1, 3])), draw(st.integers(1, 6)), draw(st.integers(1, 3)), \
        draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 999))


@settings(max_examples=60, deadline=None)
@given(per_sample_cases())
def test_per_sample_masks_match_the_masked_reference_with_grads(case):
    keep, hd, d_in, seq, in_out, with_bias, seed = case
    batch, heads = keep.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(heads * hd, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(heads * hd, generator=g, dtype=torch.float64) if with_bias else None
    w_arg = w.t().contiguous() if in_out else w
    for op, ref, inp, weight, bias in (
        (head_linear_out, head_linear_out_reference, x, w_arg, b),
        (head_linear_in, head_linear_in_reference,
         torch.randn(batch, seq, heads * hd, generator=g, dtype=torch.float64) * keep.repeat_interleave(hd, -1)[:, None],
         w.t().contiguous().t() if not in_out else w.contiguous(), None if b is None else b[:1].expand(1).clone()),
    ):
        if op is head_linear_in:
            weight = torch.randn(1, heads * hd, generator=g, dtype=torch.float64)
            weight = weight.t().contiguous() if in_out else weight
        args = [t.clone().requires_grad_() if t is not None else None for t in (inp, weight, bias)]
        refs = [t.clone().requires_grad_() if t is not None else None for t in (inp, weight, bias)]
        got = op(args[0], args[1], args[2], keep, hd, in_out)
        want = ref(refs[0], refs[1], refs[2], keep, hd, in_out)
        torch.testing.assert_close(got, want)
        if op is head_linear_out:
            assert (got.detach()[~keep.repeat_interleave(hd, -1)[:, None].expand_as(got)] == 0).all()
        cot = torch.randn(got.shape, generator=g, dtype=torch.float64)
        (got * cot).sum().backward()
        (want * cot).sum().backward()
        for a, r in zip(args, refs):
            if a is not None:
                torch.testing.assert_close(a.grad, r.grad)


def test_per_sample_opcheck_and_bad_batch():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(head_linear_out, (x, w, None, keep, 2, False))
    o = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(head_linear_in, (o, torch.randn(5, 6, dtype=torch.float64, requires_grad=True), None, keep, 2, False))
    with pytest.raises(ValueError, match="batch"):
        head_linear_out(torch.randn(3, 3, 5), torch.randn(6, 5), None, keep, 2)
