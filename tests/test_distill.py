"""dhp_fx.distill: distillation buys back what pruning costs; every model family and bad input."""
from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch

import dhp_fx
from dhp_fx.distill import DistillConfig, evaluate
from dhp_fx.testing import AttentionSpec, build_attention

VOCAB = 32


def _gpt2(seed=0, vocab=VOCAB, dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
                     eos_token_id=1, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


def copy_task(n, batch, seed, labels=True):
    """Sequences whose second half repeats the first: solvable only by attending back."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        half = torch.randint(2, VOCAB, (batch, 8), generator=g)
        ids = torch.cat([half, half], 1)
        b = {"input_ids": ids}
        if labels:
            lab = ids.clone()
            lab[:, :9] = -100  # only the copied half is predictable
            b["labels"] = lab
        out.append(b)
    return out


@functools.lru_cache(maxsize=1)
def _trained_state():
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for b in copy_task(200, 32, seed=0):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, "the teacher did not learn the copy task"
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_teacher():
    model = _gpt2()
    model.load_state_dict(_trained_state())
    return model.eval()


def pruned_student(teacher, keep=0.5, **config):
    ids = copy_task(1, 4, seed=99, labels=False)[0]["input_ids"]
    student = dhp_fx.optimize(copy.deepcopy(teacher), dhp_fx.DHPConfig(**config), example_inputs=(ids,))
    student.set_keep_ratio(keep)
    return student


# ------------------------------------------------------------------------------ what it buys
def test_distillation_halves_the_kl_and_beats_task_only_finetuning():
    teacher = trained_teacher()
    train = copy_task(40, 16, seed=1)
    held_out = copy_task(4, 32, seed=2, labels=False)
    cfg = DistillConfig(steps=40, lr=1e-3, progress=False, eval_every=40)

    student = pruned_student(teacher)
    result = dhp_fx.distill(student, teacher, train, cfg, eval_data=held_out)
    kl_before, kl_after = result.evals[0]["kl"], result.evals[-1]["kl"]
    assert kl_before > 0.02, "pruning half the heads should cost something"
    assert kl_after <= 0.5 * kl_before, (kl_before, kl_after)
    assert {"kd", "task"} <= set(result.history[-1])  # labels present: KD + task loss, as in the paper

    finetuned = pruned_student(teacher)
    baseline = dhp_fx.distill(finetuned, teacher, train, cfg.replace(kd_weight=0.0, task_weight=1.0),
                              eval_data=held_out)
    assert "kd" not in baseline.history[-1]
    assert kl_after < baseline.evals[-1]["kl"], (kl_after, baseline.evals[-1]["kl"])
    # the budget is the gates' business: still half the heads after training
    assert all(g.keep_ratio == 0.5 for g in student.gates.values())


def test_router_gates_receive_gradients():
    teacher = _gpt2()
    student = pruned_student(teacher, scoring="router")
    routers = {k: copy.deepcopy(g.router.state_dict()) for k, g in student.gates.items()}
    weights = copy.deepcopy(student.model.state_dict())
    seen = []
    for gate in student.gates.values():
        for p in gate.router.parameters():
            p.register_hook(lambda grad: seen.append(float(grad.abs().sum())) or grad)
    result = dhp_fx.distill(student, teacher, copy_task(3, 8, seed=3, labels=False),
                            DistillConfig(steps=3, lr=1e-3, train_weights=False, progress=False))
    assert all(r["gate"] > 0 for r in result.history)
    assert any(g > 0 for g in seen)
    for key, gate in student.gates.items():
        changed = [not torch.equal(v, gate.router.state_dict()[n]) for n, v in routers[key].items()]
        assert any(changed), f"router of {key} did not move"
    assert all(torch.equal(v, student.model.state_dict()[k]) for k, v in weights.items())


# ------------------------------------------------------------------------------ model families
def test_encoder_distils_on_hidden_states():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # a wide init, so that attention (and pruning it) matters to the output
    teacher = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=32, initializer_range=0.2)).eval()
    ids = torch.randint(2, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    data = [{"input_ids": ids, "attention_mask": mask, "text": ["not a tensor"] * 4}]
    student = dhp_fx.optimize(copy.deepcopy(teacher), example_inputs={"input_ids": ids, "attention_mask": mask})
    student.set_keep_ratio(0.5)
    before = evaluate(student, teacher, data)
    result = dhp_fx.distill(student, teacher, data, DistillConfig(steps=6, lr=1e-3, dropout=False, progress=False))
    after = evaluate(student, teacher, data)
    assert set(before) >= {"cosine", "mse", "objective"}
    assert before["cosine"] < 0.9 and after["cosine"] > 0.95
    assert result.history[-1]["kd"] < result.history[0]["kd"]


def test_seq2seq_makes_decoder_inputs_from_labels():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    teacher = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                  num_heads=4, decoder_start_token_id=0, pad_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(2, VOCAB, (2, 7), generator=g),
             "labels": torch.randint(2, VOCAB, (2, 5), generator=g)}
    student = dhp_fx.optimize(copy.deepcopy(teacher), example_inputs=batch)
    student.set_keep_ratio(0.5)
    result = dhp_fx.distill(student, teacher, [batch], DistillConfig(steps=2, lr=1e-3, progress=False))
    assert {"kd", "task"} <= set(result.history[-1])
    assert all(math.isfinite(r["loss"]) for r in result.history)


def _spec_module():
    module, inputs = build_attention(AttentionSpec(heads=4, kv_heads=4, seq_q=6, seq_k=6, head_dim=8))
    return module, inputs["x"]


def test_plain_module_with_tuple_batches_logits_or_hidden():
    teacher, x = _spec_module()
    student = dhp_fx.optimize(copy.deepcopy(teacher), example_inputs=(x,))
    student.set_keep_ratio(0.5)
    labels = torch.randint(0, x.shape[-1], x.shape[:-1], generator=torch.Generator().manual_seed(0))
    as_logits = dhp_fx.distill(student, teacher, [(x, labels)],
                               DistillConfig(steps=2, target="logits", tuple_labels=True, progress=False))
    assert {"kd", "task"} <= set(as_logits.history[-1])
    # a bare tensor output is hidden states unless the config says logits
    as_hidden = dhp_fx.distill(student, teacher, [(x,)], DistillConfig(steps=1, progress=False))
    assert set(as_hidden.history[-1]) >= {"kd"} and "task" not in as_hidden.history[-1]
    with pytest.raises(ValueError, match="tuple_labels"):
        dhp_fx.distill(student, teacher, [(x,)], DistillConfig(steps=1, task_weight=1.0, progress=False))


def test_alignment_of_inner_layers_and_jsonl_log(tmp_path):
    teacher = _gpt2()
    student = pruned_student(teacher)
    log_path = tmp_path / "log.jsonl"
    result = dhp_fx.distill(student, teacher, copy_task(2, 4, seed=5, labels=False),
                            DistillConfig(steps=2, align_weight=1.0, align_modules="auto", log_path=str(log_path),
                                          eval_every=1, progress=False),
                            eval_data=copy_task(1, 4, seed=6, labels=False))
    assert result.history[-1]["align"] > 0
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["eval", "step", "eval", "step", "eval"]
    # the hooks are gone afterwards
    assert not any(m._forward_hooks for m in student.model.modules())


class ExampleDataset:
    """Duck-typed like datasets.Dataset: single examples with ragged token lists."""

    def __init__(self, n=5):
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(2, VOCAB, (int(n_),), generator=g).tolist() for n_ in torch.randint(4, 9, (n,), generator=g)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "attention_mask": [1] * len(self.rows[i]), "id": f"row{i}"}


def test_datasets_of_examples_and_dataloaders():
    teacher = _gpt2()
    student = pruned_student(teacher)
    # 5 examples in batches of 3: the run crosses an epoch boundary
    result = dhp_fx.distill(student, teacher, ExampleDataset(), DistillConfig(steps=3, batch_size=3, progress=False))
    assert result.steps == 3
    loader = torch.utils.data.DataLoader(copy_task(1, 6, seed=7, labels=False)[0]["input_ids"], batch_size=3)
    assert dhp_fx.distill(student, teacher, loader, DistillConfig(steps=2, progress=False)).steps == 2
    # a one-shot generator ends the run when it runs out
    gen = (b for b in copy_task(2, 4, seed=8, labels=False))
    short = dhp_fx.distill(student, teacher, gen, DistillConfig(steps=5, progress=False))
    assert short.steps == 2 and short.stop_reason == "data_exhausted"


def test_early_stopping():
    teacher = _gpt2()
    student = pruned_student(teacher)
    data = copy_task(2, 4, seed=9, labels=False)
    result = dhp_fx.distill(student, teacher, data, DistillConfig(steps=10, eval_every=1, patience=1, min_delta=1e9,
                                                                  restore_best=True, progress=False), eval_data=data)
    assert result.stopped_early and result.steps == 1 and result.best_step == 0


# ------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def pair():
    teacher = _gpt2()
    return teacher, pruned_student(teacher)


def test_empty_data(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="data yielded no batches"):
        dhp_fx.distill(student, teacher, [], DistillConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="data yielded no batches"):
        dhp_fx.distill(student, teacher, ExampleDataset(0), DistillConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="eval_data yielded no batches"):
        dhp_fx.distill(student, teacher, copy_task(1, 2, seed=0), DistillConfig(steps=1, eval_every=1, progress=False),
                       eval_data=[])


def test_batches_without_what_the_loss_needs(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match=r"keys \['tokens'\].*input_ids"):
        dhp_fx.distill(student, teacher, [{"tokens": torch.ones(2, 4, dtype=torch.long)}],
                       DistillConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="task_weight=1.0 needs a 'labels' key"):
        dhp_fx.distill(student, teacher, copy_task(1, 2, seed=0, labels=False),
                       DistillConfig(steps=1, task_weight=1.0, progress=False))
    with pytest.raises(ValueError, match="target='hidden'.*no last_hidden_state"):
        dhp_fx.distill(student, teacher, copy_task(1, 2, seed=0), DistillConfig(steps=1, target="hidden", progress=False))


def test_vocabulary_mismatch_names_both_shapes(pair):
    _, student = pair
    with pytest.raises(ValueError, match=r"vocabularies differ: teacher logits \(2, 16, 40\), student logits \(2, 16, 32\)"):
        dhp_fx.distill(student, _gpt2(vocab=40), copy_task(1, 2, seed=0, labels=False),
                       DistillConfig(steps=1, progress=False))


def test_teacher_that_is_or_shares_the_student():
    model = _gpt2()
    student = dhp_fx.optimize(model)  # weights shared with `model`: the classic mistake
    for teacher in (student, model, student.model):
        with pytest.raises(ValueError, match=r"optimize\(copy.deepcopy\(model\)"):
            dhp_fx.distill(student, teacher, copy_task(1, 2, seed=0), DistillConfig(steps=1, progress=False))
    partial = _gpt2()
    partial.transformer.h[0] = student.model.transformer.h[0]
    with pytest.raises(ValueError, match="shares .* parameter"):
        dhp_fx.distill(student, partial, copy_task(1, 2, seed=0), DistillConfig(steps=1, progress=False))


def test_non_finite_loss_raises_with_the_step_or_is_skipped():
    teacher, x = _spec_module()
    student = dhp_fx.optimize(copy.deepcopy(teacher), example_inputs=(x,))
    student.set_keep_ratio(0.5)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    data = [(x,), (x,), (bad,), (x,)]
    with pytest.raises(FloatingPointError, match="at step 3"):
        dhp_fx.distill(student, teacher, data, DistillConfig(steps=4, progress=False))
    result = dhp_fx.distill(student, teacher, data, DistillConfig(steps=4, skip_nonfinite=True, progress=False))
    assert result.skipped_steps == 1 and "skipped" in result.history[2]
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="DistillConfig.steps"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="DistillConfig.target"):
        DistillConfig(target="probabilities")
    with pytest.raises(ValueError, match="align_modules"):
        DistillConfig(align_weight=1.0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        DistillConfig(resume=True)


def test_model_calls_ask_for_no_kv_cache():
    """A returned cache reads every head's K and V, so distillation asks HF decoders for none:
    the student's K/V projections then skip pruned heads too."""
    from dhp_fx.distill_io import CallSpec, run_model, split_batch

    seen = []

    class Decoder(torch.nn.Module):
        def forward(self, input_ids, use_cache=True):
            seen.append(use_cache)
            return input_ids.float()

    class Encoder(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids.float()

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    for module in (Decoder(), Encoder()):
        spec = CallSpec.of(module)
        run_model(module, split_batch(batch, spec, False, "m"), spec, torch.device("cpu"), False)
    assert seen == [False]
    student = pruned_student(trained_teacher(), keep=0.5, scoring="static")  # decides before the projections
    ids = copy_task(1, 2, seed=5, labels=False)[0]["input_ids"]
    spec = CallSpec.of(student.model)
    with torch.no_grad():
        run_model(student, split_batch({"input_ids": ids}, spec, False, "student"), spec, torch.device("cpu"), False)
    assert all({"k", "v"} <= set(s.skipped_projections) for s in student.sites), student.report()
