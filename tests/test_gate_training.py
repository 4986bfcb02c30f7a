"""Gates after the op: Q/K/V skipping with the built-in gates, the straight-through estimator,
attention maps for distillation."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dhp_fx
from dhp_fx.distill import DistillConfig
from dhp_fx.distill_attention import attention_kl
from dhp_fx.gates import AttentionCapture
from dhp_fx.kernels.entropy import attention_log_probs
from dhp_fx.testing import assert_outputs_close, heads_zeroed


def _bert(attn="sdpa"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     vocab_size=64, max_position_embeddings=32, attn_implementation=attn)
    return BertModel(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def _inputs(batch=3, length=10, pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class KeepRecorder:
    """Forward hooks on every gate: the keep mask each one returned in the last call."""

    def __init__(self, model):
        self.keeps = {}
        assert model.sites, "capture the graph first (example_inputs)"
        self.handles = [model.gate(s.name).register_forward_hook(self._hook(s.name)) for s in model.sites]

    def _hook(self, name):
        def hook(module, args, out):
            self.keeps[name] = out.clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------ Q/K/V skipping with built-in gates
@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("scoring", ["static", "router"])
def test_hidden_deciding_gates_skip_qkv_projections_exactly(build, scoring):
    model = build()
    inputs = _inputs()
    if build is _gpt2:
        inputs["use_cache"] = False  # a returned KV cache would need K/V of every head
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring=scoring), example_inputs=inputs)
    rec = KeepRecorder(opt)
    with torch.no_grad():
        got = opt(**inputs)
    rec.remove()
    assert opt.sites and all(set(s.skipped_projections) == {"q", "k", "v", "out"} for s in opt.sites)
    assert all(not opt.gate(s.name).reads_qkv for s in opt.sites)
    assert all(int(k.sum(-1).min()) == 2 for k in rec.keeps.values())
    with torch.no_grad(), heads_zeroed(model, opt.sites, rec.keeps):
        expected = model(**inputs)
    assert_outputs_close(got, expected, what="Q/K/V-skipped gated output vs zeroed-head reference")


def test_probe_gates_keep_qkv_projections_under_every_compiler():
    model, inputs = _bert(), _inputs()
    for compiler in ("eager", "aot_eager"):
        probe = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="probe", compiler=compiler),
                                example_inputs=inputs)
        assert all(s.skipped_projections == ("out",) for s in probe.sites)
        assert all("no_skip_qkv_proj:gate_reads_qkv" in s.declined for s in probe.sites)


def test_static_calibration_scores_heads_after_the_op():
    """A static gate decides before q exists; calibration still records probe scores (at the tap),
    with every head run so that the scores are those of the unpruned heads."""
    model, inputs = _bert(), _inputs()
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    stats = dhp_fx.calibrate(opt, [inputs, inputs], measure_flops=False)
    reference = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=1.0, scoring="probe", alpha=0.5),
                                example_inputs=inputs)
    for site in opt.sites:
        s = stats.sites[site.name]
        assert s.samples == 6 and s.score_mean is not None
        assert all(0.0 <= v <= 1.0 for v in s.score_mean)
        assert sum(s.keep_freq) == pytest.approx(2.0)  # 2 of 4 heads per sample
        assert opt.gate(site.name).calibrated
    # with every head run, layer 2 sees the unpruned layer 1: its scores equal a gates-open probe
    gate, ref_gate = opt.gate(opt.sites[-1].name), reference.gate(opt.sites[-1].name)
    ref_gate.start_recording()
    with torch.no_grad():
        reference(**inputs)
    ref_gate.stop_recording()
    torch.testing.assert_close(torch.tensor(stats.sites[opt.sites[-1].name].score_mean),
                               torch.tensor(ref_gate.recorded()["score_mean"]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ straight-through estimator
def test_straight_through_forward_is_hard_gating_and_every_head_gets_a_gradient():
    model, inputs = _bert(), _inputs()
    opt = dhp_fx.optimize(copy.deepcopy(model), dhp_fx.DHPConfig(keep_ratio=0.5, scoring="router"),
                          example_inputs=inputs)
    gates = [opt.gate(s.name) for s in opt.sites]
    softs = {}
    for g in gates:
        g.ste = "ste"
        original = g.soft_scores

        def soft_scores(*args, g=g, original=original):
            s = original(*args)
            s.retain_grad()
            softs[g.site_name] = s
            return s

        g.soft_scores = soft_scores
    hard = {}
    try:
        out = opt(**inputs).last_hidden_state
        for g in gates:
            assert g.last_budget_loss is not None and g.last_budget_loss.requires_grad
            hard[g.site_name] = g.decide(softs[g.site_name].detach())
        out.square().mean().backward()
    finally:
        for g in gates:
            g.ste = False
            del g.soft_scores
    with torch.no_grad():
        opt.set_keep_mask(hard)
        pinned = opt(**inputs).last_hidden_state
        opt.set_keep_mask(None)
    torch.testing.assert_close(out.detach(), pinned, atol=1e-6, rtol=1e-5)
    for name, s in softs.items():
        assert s.grad is not None
        pruned = ~hard[name]
        assert pruned.any() and (s.grad[pruned] != 0).any(), "pruned heads must learn too"
        assert (s.grad[~pruned] != 0).any()
    assert all(p.grad is not None for g in gates for p in g.router.parameters())


def test_relaxed_gate_weights_heads_by_a_soft_top_k():
    model, inputs = _bert(), _inputs()
    opt = dhp_fx.optimize(copy.deepcopy(model), dhp_fx.DHPConfig(keep_ratio=0.5, scoring="router"),
                          example_inputs=inputs)
    gate = opt.gate(opt.sites[0].name)
    soft = torch.tensor([[0.9, 0.2, 0.7, 0.4]], requires_grad=True)
    hard = gate.decide(soft.detach())
    assert hard.tolist() == [[True, False, True, False]]
    assert gate._boundary(soft.detach(), hard).item() == pytest.approx(0.55)
    gate.ste = "relaxed"
    out = torch.ones(1, 4, 2, 3)
    weighted = gate.after_attention(out, None, None, None, None, {"keep": hard, "ste": soft})
    expected = torch.sigmoid((soft.detach() - 0.55) / gate.relax_temperature)
    torch.testing.assert_close(weighted[0, :, 0, 0], expected[0])
    weighted.sum().backward()
    assert (soft.grad != 0).all()


def test_gates_without_learned_scores_ignore_the_ste_switch():
    model, inputs = _bert(), _inputs()
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="probe"), example_inputs=inputs)
    rec = KeepRecorder(opt)
    for s in opt.sites:
        opt.gate(s.name).ste = "ste"
    opt(**inputs)
    rec.remove()
    assert all(int(k.sum(-1).max()) == 2 for k in rec.keeps.values())  # still gated, not all-run


def test_distill_trains_routers_through_the_keep_decision():
    from test_distill import copy_task, pruned_student, trained_teacher

    teacher = trained_teacher()
    student = pruned_student(teacher, scoring="router")
    routers = {k: copy.deepcopy(g.router.state_dict()) for k, g in student.gates.items()}
    weights = copy.deepcopy(student.model.state_dict())
    result = dhp_fx.distill(student, teacher, copy_task(3, 8, seed=3, labels=False),
                            DistillConfig(steps=3, train_weights=False, gate_weight=0.0, gate_grad="ste",
                                          progress=False))
    assert all("budget" in r and "gate" not in r for r in result.history)
    for key, gate in student.gates.items():
        assert not gate.ste, "the switch is reset after the run"
        assert any(not torch.equal(v, gate.router.state_dict()[n]) for n, v in routers[key].items()), key
    assert all(torch.equal(v, student.model.state_dict()[k]) for k, v in weights.items())
    # and with the estimator off and no regression loss there is nothing to train
    student = pruned_student(teacher, scoring="router")
    with pytest.raises(ValueError, match="nothing to train"):
        dhp_fx.distill(student, teacher, copy_task(1, 4, seed=3, labels=False),
                       DistillConfig(steps=1, train_weights=False, gate_weight=0.0, progress=False))


_ROUTER_CHILD = "_DHP_FX_ROUTER_DISTILL_CHILD"


@pytest.mark.skipif(os.environ.get(_ROUTER_CHILD) == "1", reason="this is the child")
def test_the_distillation_loss_alone_teaches_routers_which_heads_to_keep():
    """Runs the test below in a fresh process. In two of five full xdist runs on a fresh clone
    (session 22) it failed with the KL unchanged to the last digit (0.8858...), while it passed
    alone, after the same worker's files in one process, and with router seeds 0-5: something a
    worker's earlier tests leave behind, not yet found."""
    env = {**os.environ, _ROUTER_CHILD: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::"
                           "test_routers_learn_from_the_distillation_loss_alone"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, f"child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"


@pytest.mark.skipif(os.environ.get(_ROUTER_CHILD) != "1", reason="run by the test above, in a fresh process")
def test_routers_learn_from_the_distillation_loss_alone():
    """Routers started on the wrong heads (reversed prior), weights frozen, no S regression: only
    the gradient through the keep decision can lower the KL, and it must."""
    from test_distill import copy_task, pruned_student, trained_teacher

    teacher = trained_teacher()
    torch.manual_seed(0)  # the routers' init draws from the global generator
    student = pruned_student(teacher, scoring="router")
    with torch.no_grad():
        for gate in student.gates.values():
            gate.router[-1].bias.neg_()
    result = dhp_fx.distill(student, teacher, copy_task(20, 16, seed=1),
                            DistillConfig(steps=20, gate_lr=3e-2, gate_grad="ste", gate_weight=0.0,
                                          train_weights=False, eval_every=20, progress=False),
                            eval_data=copy_task(4, 32, seed=2, labels=False))
    before, after = result.evals[0]["kl"], result.evals[-1]["kl"]
    assert before > 0.5 and after < 0.5 * before, (before, after, result.history[-3:])


def test_budget_loss_is_zero_on_budget_and_grows_off_it():
    model, inputs = _bert(), _inputs()
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="router"), example_inputs=inputs)
    gate = opt.gate(opt.sites[0].name)
    assert float(gate.budget_loss(torch.full((2, 4), 0.5))) == pytest.approx(0.0)
    assert float(gate.budget_loss(torch.full((2, 4), 0.9))) == pytest.approx(0.16)
    gate.set_score_threshold(0.6)  # soft count σ((S − t)/0.05): 2 of 4 well above t is on budget
    on = torch.tensor([[0.9, 0.9, 0.1, 0.1]])
    assert float(gate.budget_loss(on)) < 1e-4 < 0.2 < float(gate.budget_loss(torch.full((1, 4), 0.9)))


# ------------------------------------------------------------------ attention maps
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(2, 2), (4, 2), (4, 1)]), st.integers(1, 5), st.integers(1, 6),
       st.sampled_from(["none", "bool", "additive", "causal"]), st.integers(0, 99))
def test_attention_log_probs_match_softmax(batch, heads, lq, lk, mask_kind, seed):
    hq, hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, lq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(batch, hkv, lk, 8, generator=g, dtype=torch.float64)
    scores = (q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * 0.3
    mask, causal = None, mask_kind == "causal"
    allowed = torch.ones(batch, 1, lq, lk, dtype=torch.bool)
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, lq, lk, generator=g) > 0.3
        allowed = mask
    elif mask_kind == "additive":
        mask = torch.randn(batch, 1, lq, lk, generator=g, dtype=torch.float64)
        scores = scores + mask
    if causal:
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril()[None, None]
    logp, got_allowed, n_keys = attention_log_probs(q, k, mask, causal, 0.3)
    expected = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1)
    has_key = allowed.any(-1, keepdim=True).expand_as(expected)
    torch.testing.assert_close(logp.exp()[has_key], expected[has_key], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(logp[has_key & allowed.expand_as(expected)]).all()
    assert not torch.isnan(logp).any()


def test_attention_kl_counts_kept_heads_and_real_rows_only():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4, 5).log_softmax(-1)
    s = torch.randn(2, 3, 4, 5).log_softmax(-1)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    rows = torch.ones(1, 1, 1, dtype=torch.bool)
    q_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = attention_kl(AttentionCapture(s, None, rows, keep), AttentionCapture(t, None, rows, keep), q_mask, "x")
    kl = (t.exp() * (t - s)).sum(-1)
    w = keep[:, :, None].float() * q_mask[:, None, :].float()
    assert float(got) == pytest.approx(float((kl * w).sum() / w.sum()), rel=1e-5)
    assert float(attention_kl(AttentionCapture(t, None, rows, keep), AttentionCapture(t, None, rows, keep),
                              None, "x")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="site 'x'"):
        attention_kl(AttentionCapture(s[:, :2], None, rows, keep[:, :2]), AttentionCapture(t, None, rows, keep), None, "x")


def test_distill_aligns_attention_maps():
    from test_distill import copy_task, pruned_student, trained_teacher

    teacher = trained_teacher()
    student = pruned_student(teacher)
    torch.manual_seed(0)
    with torch.no_grad():  # detune the student's Q/K so that its maps start far from the teacher's
        for name, p in student.model.named_parameters():
            if name.endswith("attn.c_attn.weight"):
                p[:, :64].add_(0.3 * torch.randn_like(p[:, :64]))
    before = copy.deepcopy(teacher.state_dict())
    batch = copy_task(1, 8, seed=4, labels=False)
    result = dhp_fx.distill(student, teacher, batch * 15,
                            DistillConfig(steps=15, lr=1e-3, kd_weight=0.0, attention_weight=1.0, progress=False))
    attn = [r["attention"] for r in result.history]
    assert attn[0] > 0.05 and attn[-1] < 0.5 * attn[0], attn
    # the teacher is untouched and the capture switches are off again
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(not g.capture_attention and g.last_attention is None for g in student.gates.values())


def test_attention_alignment_bad_input():
    from test_distill import _gpt2, copy_task, pruned_student

    teacher = _gpt2()
    student = pruned_student(teacher)
    data = copy_task(1, 4, seed=3, labels=False)
    with pytest.raises(ValueError, match="'transformer.h.9.attn' is not a rewritten site"):
        dhp_fx.distill(student, teacher, data, DistillConfig(steps=1, attention_weight=1.0,
                                                              attention_sites=["transformer.h.9.attn"], progress=False))
    with pytest.raises(ValueError, match="attention_sites"):
        DistillConfig(attention_sites=[])
    with pytest.raises(ValueError, match="gate_grad"):
        DistillConfig(gate_grad="hard-concrete")
    plain = copy.deepcopy(teacher)
    with pytest.raises(TypeError, match="dhp_fx.optimize"):
        dhp_fx.distill(plain, teacher, data, DistillConfig(steps=1, attention_weight=1.0, progress=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad", [True, False])
def test_router_pools_half_precision_inputs_as_float32_pooling_would(dtype, pad):
    # The router sums the layer input with float32 accumulation instead of copying it to float32
    # first; with 0/1 padding weights that is the same pooling, so the prediction must match the
    # one made from the float32 upcast of the same input.
    model, inputs = _bert(), _inputs(pad=pad)
    opt = dhp_fx.optimize(copy.deepcopy(model), dhp_fx.DHPConfig(keep_ratio=0.5, scoring="router"),
                          example_inputs=inputs)
    gate = opt.gate(opt.sites[0].name)
    with torch.no_grad():
        for p in gate.router.parameters():
            p.normal_(0.0, 0.2)  # depends on its input (it starts out constant), unsaturated
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 10, 32, generator=g).to(dtype)
    mask = inputs["attention_mask"][:, None, None, :].bool()
    got = gate.predict(hidden, mask)
    want = gate.predict(hidden.float(), mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if pad:  # the padded positions of sample 1 must not count
        poked = hidden.clone()
        poked[1, -3:] = 100
        torch.testing.assert_close(gate.predict(poked, mask), got, atol=1e-6, rtol=1e-5)
        unmasked = poked.clone()
        unmasked[1, 0] = 100  # a real token: the prediction must move
        assert not torch.allclose(gate.predict(unmasked, mask)[1], got[1], atol=1e-3)
