"""How many kernels a gated forward adds to the dense one, counted on the CPU.

Under CUDA graphs a short forward is bound by its number of kernels, not their size: each small
op costs a launch slot and a few microseconds even when replayed (session 5's graphed BERT-base
ran 1.2-1.7x dense). Top-level ATen/dhp ops, views and metadata left out, are one kernel each on
a GPU, so counting them here guards the GPU property without one.
"""
from __future__ import annotations

import collections

import pytest
import torch

import dhp_fx

# Ops that only make a view or read metadata (or are no-ops on an already right tensor).
VIEWS = {"expand", "expand_as", "view", "transpose", "unsqueeze", "squeeze", "slice", "select", "as_strided",
         "permute", "t", "alias", "detach", "unflatten", "_unsafe_view", "reshape", "contiguous", "to", "new_ones"}


def kernel_ops(fn) -> collections.Counter:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    ops = collections.Counter()
    for e in prof.events():
        if not e.name.startswith(("aten::", "dhp::")):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "dhp::")):
            parent = parent.cpu_parent
        if parent is None and e.name.split("::")[1] not in VIEWS:
            ops[e.name] += 1
    return ops


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, attn_implementation="sdpa")).eval()
    inputs = {"input_ids": torch.randint(0, 500, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)}
    return model, inputs, kernel_ops(lambda: model(**inputs))


@pytest.mark.parametrize("scoring,granularity,keep", [("static", "batch", 0.5), ("static", "sample", 0.5),
                                                      ("router", "sample", 1.0), ("probe", "sample", 1.0)])
def test_gated_forward_adds_no_kernels_per_layer_beyond_its_own_ops(bert, scoring, granularity, keep):
    """A static ranking is decided once (no top-k or scatter per call), no unread flag
    reduction is left in the graph, an all-kept gate fills nothing: past the padding mask that the
    captured graph builds once per forward (eager HF skips it for an all-ones mask), the gated
    model launches what the dense one does, with dhp ops in place of the attention ops."""
    model, inputs, dense = bert
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=keep, scoring=scoring, granularity=granularity),
                          example_inputs=inputs)
    if scoring == "static":
        dhp_fx.calibrate(opt, [inputs], measure_flops=False)
    gated = kernel_ops(lambda: opt(**inputs))
    layers = 2
    mask_building = 10  # once per forward, whatever the depth
    if keep < 1.0 and all(s.compact_block for s in opt.sites):
        # a static decision is shared by every row: each block runs one Q/K/V GEMM on its kept
        # heads' weights, dense attention and the output GEMM; the weights were gathered by an
        # earlier call of the same decision (eager calls reuse them): fewer launches than the
        # dense block's three projections, attention and output projection
        assert "dhp::gather_heads" not in gated and not {"dhp::head_linear_out", "dhp::gated_attention"} & set(gated)
        assert gated["aten::scaled_dot_product_attention"] == layers, gated
        assert sum(gated.values()) <= sum(dense.values()) - 2 * layers + mask_building, (gated - dense, dense - gated)
        return
    if keep == 1.0 and all(s.compact_block for s in opt.sites):
        # every head kept, known on the host: the blocks run the dense originals, no gated op
        assert not any(k.startswith("dhp::") for k in gated), gated
        assert sum(gated.values()) <= sum(dense.values()) + mask_building, (gated - dense, dense - gated)
        return
    # gates deciding from the layer input skip the q/k/v projections too; the probe reads q
    qkv = 0 if scoring == "probe" else 3 * layers
    assert gated["dhp::gated_attention"] == layers and gated["dhp::head_linear_in"] == layers
    assert gated["dhp::head_linear_out"] == qkv
    assert not {"aten::topk", "aten::scatter_", "aten::zeros_like", "aten::ones", "aten::any"} & set(gated), gated
    dhp = sum(v for k, v in gated.items() if k.startswith("dhp::"))
    replaced = dhp  # each dhp op took the place of one linear or SDPA call
    assert sum(gated.values()) - dhp <= sum(dense.values()) - replaced + mask_building, (gated - dense, dense - gated)
