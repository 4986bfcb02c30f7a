"""Per-row compact blocks (kernels/compact_rows.py): each row computes its own kept heads only.

Against the float64 zeroed-head reference of test_compact_heads over Hypothesis shapes, GQA
groups, cross-attention, fused and Conv1D weights, masks with a head dim, causal, any cap at
or above each row's own group count, rows keeping whole groups or not; gradients reach only
the kept heads' weights.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhp_fx.kernels.compact_heads import HeadProjection
from dhp_fx.kernels.compact_rows import compact_rows_block, gather_rows, kept_first_rows
from dhp_fx.testing import assert_outputs_close

from test_compact_heads import _reference, block_inputs, draw_geometry, zeroed_reference


@st.composite
def rows_cases(draw):
    geo = draw_geometry(draw, max_batch=4)
    B, G, KV, H = geo["B"], geo["G"], geo["KV"], geo["H"]
    whole = G == 1 or draw(st.booleans())
    keep = []
    for _ in range(B):
        groups = draw(st.lists(st.booleans(), min_size=KV, max_size=KV))
        keep.append([groups[h // G] and (whole or draw(st.booleans())) for h in range(H)])
    most = max(sum(any(r[g * G:(g + 1) * G]) for g in range(KV)) for r in keep)
    cap = draw(st.integers(max(most, 1), KV))
    mask_kind = draw(st.sampled_from(["none", "padding", "head_bias", "row_head_bias"]))
    causal = draw(st.booleans())
    return dict(**geo, whole=whole, keep=keep, cap=cap,
                mask_kind=mask_kind, causal=causal, in_out=draw(st.booleans()), fused=draw(st.booleans()),
                bias=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.3])), out_in_out=draw(st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_cases(), st.sampled_from([torch.float32, torch.float64]))
def test_rows_block_matches_zeroed_dense_block(case, dtype):
    ref, projs, w_o, b_o, mask, _ = block_inputs(case, dtype)
    want = zeroed_reference(case, ref)
    keep = torch.tensor(case["keep"], dtype=torch.bool)
    got = compact_rows_block(*projs, w_o, b_o, case["out_in_out"], keep, case["cap"], case["d"], case["dv"], mask,
                             0.0, case["causal"], case["scale"], case["whole"], kv_heads=case["KV"])
    assert got.shape == want.shape
    assert_outputs_close(got, want.to(dtype), what="per-row compact block")


def test_rows_block_gradients_reach_kept_heads_only():
    """Row 0 keeps heads {0, 2}, row 1 keeps {2}: heads 1 and 3 get zero weight gradients, the
    kept heads' gradients equal those of the zeroed reference (float64)."""
    case = dict(B=2, H=4, KV=4, d=4, dv=4, Lq=3, Lk=3, cross=False, whole=True, cap=2, mask_kind="none",
                causal=False, in_out=False, fused=False, bias=True, scale=None, out_in_out=False,
                keep=[[True, False, True, False], [False, False, True, False]])
    ref, projs, w_o, b_o, mask, params = block_inputs(case, torch.float64, requires_grad=True)
    keep = torch.tensor(case["keep"])
    out = compact_rows_block(*projs, w_o, b_o, False, keep, 2, 4, 4, kv_heads=4)
    x_q, x_kv, w, b, w_o64, b_o64, _ = ref
    ref_params = [t.clone().requires_grad_(True) for t in (*w, *b, w_o64)]
    want = _reference(x_q, x_kv, ref_params[:3], ref_params[3:6], ref_params[6], b_o64, keep, 4, 4, 4, 4, None,
                      False, None)
    seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got_grads = torch.autograd.grad((out * seed).sum(), [p for p in params])
    want_grads = torch.autograd.grad((want * seed).sum(), ref_params)
    # params: wq, bq, wk, bk, wv, bv, w_o (the order block_inputs creates them)
    by_name = dict(zip(["wq", "bq", "wk", "bk", "wv", "bv", "wo"], got_grads))
    ref_by_name = dict(zip(["wq", "wk", "wv", "bq", "bk", "bv", "wo"], want_grads))
    for name, g in by_name.items():
        torch.testing.assert_close(g, ref_by_name[name], msg=name)
    pruned = torch.tensor([False, True, False, True]).repeat_interleave(4)
    assert by_name["wq"][pruned].abs().max() == 0 and by_name["wo"][:, pruned].abs().max() == 0


def test_kept_first_rows_lists_each_rows_kept_heads_then_filler():
    keep = torch.tensor([[False, True, False, True], [True, False, False, False]])
    idx, valid = kept_first_rows(keep, 3)
    assert idx.tolist() == [[1, 3, 0], [0, 1, 2]]
    assert valid.tolist() == [[True, True, False], [True, False, False]]


def test_rows_block_refuses_a_bad_cap():
    x = torch.randn(2, 3, 4)
    p = HeadProjection(x, torch.randn(4, 4), None, False, 0)
    keep = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="compact_rows_block: cap must be in"):
        gather_rows(p, p, p, torch.randn(3, 4), False, keep, 3, 2, 2)


# ---------------------------------------------------------------------------- models
import dhp_fx  # noqa: E402
from dhp_fx.config import DHPConfig  # noqa: E402
from dhp_fx import compact_block  # noqa: E402
from dhp_fx.kernels import row_cost  # noqa: E402
from dhp_fx.testing import check_keep_mask  # noqa: E402

from test_compact_heads import COMPACTED, ENTRIES, _NO_CACHE  # noqa: E402


def _rows_apart(entry, whole: bool) -> torch.Tensor:
    """Each row keeps its own half of the KV groups, so the rows' union is every head while no
    row keeps more than half; whole=False also drops one head inside a kept group (GQA)."""
    H, group = entry.heads, entry.heads // entry.kv_heads
    keep = torch.zeros(entry.batch, H, dtype=torch.bool)
    half = (entry.kv_heads // 2) * group
    keep[0, :half] = True
    keep[1:, half:2 * half] = True
    if not whole:
        keep[0, 0] = False
    return keep


@pytest.fixture
def rows_always(monkeypatch):
    """The zoo's rows are a few tokens long, too short for per-row compaction to pay (rows_pay):
    these tests are of its exactness, so they switch the cost test off."""
    monkeypatch.setattr(row_cost, "ROWS_MIN_SAVED_FLOPS_PER_WEIGHT", 0.0)


def _modules(opt, name):
    chained = name.startswith(("llama", "qwen3"))
    return [opt.gate(s).chain_module if chained else opt.gate(s).block_module for s in opt.sites]


@pytest.mark.parametrize("name", [n for n in COMPACTED + ["llama-sdpa", "llama-eager", "qwen3-sdpa"] if n in ENTRIES])
def test_zoo_blocks_run_each_rows_own_heads_exactly(name, rows_always):
    entry = ENTRIES[name]
    model, inputs = entry.build(), entry.inputs()
    inputs.update(_NO_CACHE.get(name.split("-")[0], {}))
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    assert entry.batch >= 2 and all(s.compact_block for s in opt.sites), opt.report()
    modules = _modules(opt, name)
    for whole in ((True, False) if entry.kv_heads < entry.heads else (True,)):
        before = sum(m.calls_rows for m in modules)
        check_keep_mask(model, opt, inputs, _rows_apart(entry, whole))
        assert sum(m.calls_rows for m in modules) - before == len(modules)


@pytest.mark.parametrize("name", ["bert-sdpa", "gpt2-eager", "t5-sdpa", "opt-sdpa", "llama-sdpa", "qwen3-sdpa"])
def test_rows_apart_too_short_to_compact_run_the_masked_dense_block_exactly(name):
    """Rows that decide apart, a few tokens long: per-row compaction does not pay, so blocks and
    chains run the dense originals and zero the pruned heads' outputs, no gated op at all; the
    output equals the zeroed-head model's (GQA rows with part of a group too)."""
    from test_launch_count import kernel_ops

    entry = ENTRIES[name]
    model, inputs = entry.build(), entry.inputs()
    inputs.update(_NO_CACHE.get(name.split("-")[0], {}))
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    modules = _modules(opt, name)
    for whole in ((True, False) if entry.kv_heads < entry.heads else (True,)):
        keep = _rows_apart(entry, whole)
        before = [(m.calls_masked, m.calls_rows, m.calls_compact) for m in modules]
        check_keep_mask(model, opt, inputs, keep)
        assert [(m.calls_masked - a, m.calls_rows - b, m.calls_compact - c)
                for m, (a, b, c) in zip(modules, before)] == [(1, 0, 0)] * len(modules)
    opt.set_keep_mask({s.name: _rows_apart(entry, True) for s in opt.sites})
    try:
        ops = kernel_ops(lambda: opt(**inputs))
    finally:
        opt.set_keep_mask(None)
    assert not any(op.startswith("dhp::") for op in ops), ops
    # unpinned, a static gate hands one decision to every row: never apart
    assert not any(opt.gate(s).decides_rows_apart() for s in opt.sites)


def test_the_block_compacts_rows_only_where_their_tokens_pay():
    """Per-sample router decisions on 5 rows, each a quarter of the heads (cap 1 of 4 groups): at 8
    tokens a row, 2 · 8 · 3 / 1 = 48 saved multiply-adds per gathered weight, below the bound
    (masked dense); at 64 tokens, 384 (each row its own head). Both equal the head ops."""
    entry = ENTRIES["bert-sdpa"]
    model = entry.build()
    assert row_cost.rows_pay(64, 1, 4) and not row_cost.rows_pay(8, 1, 4)
    assert row_cost.ROWS_MIN_SAVED_FLOPS_PER_WEIGHT == 128.0
    for tokens, path in ((8, "calls_masked"), (64, "calls_rows")):
        # 5 rows: more than the 4 groups, so the budget does not bound the union below them
        ids = torch.randint(3, 60, (5, tokens), generator=torch.Generator().manual_seed(tokens))
        opts = [dhp_fx.optimize(model, DHPConfig(keep_ratio=0.25, scoring="router", compact_heads=compact),
                                example_inputs={"input_ids": ids}) for compact in (True, False)]
        with torch.no_grad():
            for site in opts[0].sites:  # rows that disagree (the union is every head); one router for both
                router = opts[0].gate(site).router
                torch.nn.init.normal_(router[-1].weight, std=4.0, generator=torch.Generator().manual_seed(1))
                opts[1].gate(site).router.load_state_dict(router.state_dict())
        blocks = [opts[0].gate(s).block_module for s in opts[0].sites]
        before = [(b.calls_masked, b.calls_rows, b.calls_compact + b.calls_every_head) for b in blocks]
        with torch.no_grad():
            outs = [opt(input_ids=ids).last_hidden_state for opt in opts]
        ran = [(b.calls_masked - m, b.calls_rows - r, b.calls_compact + b.calls_every_head - c)
               for b, (m, r, c) in zip(blocks, before)]
        assert ran == [((1, 0, 1) if path == "calls_masked" else (0, 1, 1))] * len(blocks), (tokens, ran)
        assert_outputs_close(outs[0], outs[1], what=f"{tokens} tokens: block vs head ops")


@pytest.mark.parametrize("name", ["bert-sdpa", "llama-sdpa"])
def test_router_batches_run_rows_and_match_the_head_ops(name, rows_always):
    """Per-sample router decisions on a batch of 3: each row's own heads (compact_rows) give the
    output and the weight gradients of the head ops (compact_heads=False)."""
    entry = ENTRIES[name]
    model = entry.build()
    ids = entry.inputs()["input_ids"][:1]
    ids = torch.cat([ids, ids.flip(1), ids.roll(2, 1)])
    inputs = {"input_ids": ids, **_NO_CACHE.get(name.split("-")[0], {})}
    results = []
    for compact in (True, False):
        opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.25, scoring="router", compact_heads=compact),
                              example_inputs=inputs)
        gates = [opt.gate(s) for s in opt.sites]
        modules = [g.chain_module if name.startswith("llama") else g.block_module for g in gates]
        model.zero_grad()
        before = sum(m.calls_rows for m in modules)
        result = opt(**inputs)
        out = result.logits if hasattr(result, "logits") else result.last_hidden_state
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()
                 if p.grad is not None and ("attn" in n or "attention" in n)}
        results.append((out.detach(), grads, sum(m.calls_rows for m in modules) - before))
    (out_r, grads_r, rows_r), (out_h, grads_h, rows_h) = results
    assert rows_r == len(opt.sites) and rows_h == 0
    assert_outputs_close(out_r, out_h, what="rows vs head ops")
    assert grads_r.keys() == grads_h.keys() and grads_r
    for n in grads_r:
        assert_outputs_close(grads_r[n], grads_h[n], what=f"grad {n}")


@pytest.mark.parametrize("name", ["bert-sdpa", "gpt2-sdpa", "llama-sdpa"])
def test_every_head_kept_runs_the_dense_originals(name):
    """Gates open (a budget keeping every head): the block or chain runs F.linear and SDPA, not the
    gated ops, and matches the original model; a budget below every head goes back to them."""
    from test_launch_count import kernel_ops

    entry = ENTRIES[name]
    model, inputs = entry.build(), entry.inputs()
    inputs.update(_NO_CACHE.get(name.split("-")[0], {}))
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=1.0, scoring="router"), example_inputs=inputs)
    assert all(s.compact_block for s in opt.sites), opt.report()
    ops = kernel_ops(lambda: opt(**inputs))
    assert not any(op.startswith("dhp::") for op in ops), ops
    with torch.no_grad():
        assert_outputs_close(opt(**inputs), model(**inputs), what="gates open")
    opt.set_keep_ratio(0.5)
    # per-sample decisions on 2 short rows: the dense originals with pruned heads zeroed on CPU,
    # the head ops where neither per-row nor masked blocks run (as on a GPU)
    ops = kernel_ops(lambda: opt(**inputs))
    assert not any(op.startswith("dhp::") for op in ops), ops
    saved = compact_block.ROWS_DEVICES, compact_block.MASKED_DENSE_DEVICES
    compact_block.ROWS_DEVICES = compact_block.MASKED_DENSE_DEVICES = ()
    try:
        ops = kernel_ops(lambda: opt(**inputs))
    finally:
        compact_block.ROWS_DEVICES, compact_block.MASKED_DENSE_DEVICES = saved
    assert ops["dhp::gated_attention"] == len(opt.sites), ops


def test_report_counts_what_the_blocks_ran(monkeypatch):
    """The sites table says where blocks compact; which path each call took is per call, and the
    report sums it: kept heads only (per row or not), every head (dense, masked dense or head ops)."""
    entry = ENTRIES["bert-sdpa"]
    model = entry.build()
    ids = entry.inputs()["input_ids"]
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="router"), example_inputs={"input_ids": ids[:1]})
    layers = len(opt.sites)
    base = opt.report()
    with torch.no_grad():
        opt(input_ids=ids[:1])  # batch 1: the budget bounds the union, compact
        opt(input_ids=ids[:1].repeat(3, 1))  # batch 3 of short rows: masked dense
        monkeypatch.setattr(row_cost, "ROWS_MIN_SAVED_FLOPS_PER_WEIGHT", 0.0)
        opt(input_ids=ids[:1].repeat(3, 1))  # rows apart, compaction forced
        opt.set_keep_ratio(1.0)
        opt(input_ids=ids[:1])  # every head kept: the dense originals
    report = opt.report()
    line = [ln for ln in report.splitlines() if ln.startswith("block calls so far")]
    assert len(line) == 1, report
    calls = [int(t) for t in line[0].replace("(", " ").split() if t.isdigit()]
    before = [int(t) for ln in base.splitlines() if ln.startswith("block calls so far")
              for t in ln.replace("(", " ").split() if t.isdigit()]
    got = [a - b for a, b in zip(calls, before or [0] * 5)]
    # compact, of them rows; every head, of them dense, masked
    assert got == [2 * layers, layers, 2 * layers, layers, layers], (got, report)
