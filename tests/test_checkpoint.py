"""dhp_fx.save / dhp_fx.load round trips and distillation checkpoints with exact resume."""
from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

import dhp_fx
from dhp_fx import checkpoint as ckpt
from dhp_fx.distill import DistillConfig

VOCAB = 32


def _gpt2(seed=0, dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
                     eos_token_id=1, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


def _ids(batch=4, seq=12, seed=0):
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _batches(n, seed=1):
    return [{"input_ids": _ids(seed=seed + i)} for i in range(n)]


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = _ids(n, 12, seed=5)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


@pytest.fixture(scope="module")
def distilled():
    """A pruned GPT-2 after a few distillation steps, with router gates (learned state to save)."""
    teacher = _gpt2()
    ids = _ids()
    student = dhp_fx.optimize(copy.deepcopy(teacher), dhp_fx.DHPConfig(scoring="router"), example_inputs=(ids,))
    student.set_keep_ratio(0.5)
    dhp_fx.distill(student, teacher, _batches(3), DistillConfig(steps=3, lr=1e-3, progress=False))
    return student, teacher, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_save_load_round_trip_is_exact(distilled, tmp_path, monkeypatch):
    student, teacher, ids = distilled
    expected = _logits(student, ids)
    out = dhp_fx.save(student, str(tmp_path / "m"))
    assert sorted(os.listdir(out)) == ["dhp_config.json", "model.safetensors", "sites.json"]
    # nothing in a save is pickled: loading must not need pickle at all
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    loaded = dhp_fx.load(out, lambda: _gpt2(seed=7))
    assert loaded.dhp_config.scoring == "router"
    assert all(g.keep_ratio == 0.5 for g in loaded.gates.values())
    assert torch.equal(_logits(loaded, ids), expected)
    # the routers were trained: a fresh router would decide differently than the saved state
    for key, gate in student.gates.items():
        for (n, a), (_, b) in zip(gate.state_dict().items(), loaded.gates[key].state_dict().items()):
            assert torch.equal(a, b), n


def test_pinned_masks_and_tied_weights_round_trip(tmp_path):
    model = _gpt2()
    ids = _ids()
    opt = dhp_fx.optimize(model, example_inputs=(ids,))
    names = [s.name for s in opt.sites]
    opt.set_keep_mask({names[0]: torch.tensor([True, False, True, False]), names[1]: torch.tensor([False, False, True, True])})
    expected = _logits(opt, ids)
    dhp_fx.save(opt, str(tmp_path / "m"))
    assert os.path.exists(tmp_path / "m" / "gate_masks.safetensors")
    loaded = dhp_fx.load(str(tmp_path / "m"), _gpt2(seed=3))
    # GPT-2 ties lm_head to the token embedding; the tie must survive
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    assert torch.equal(_logits(loaded, ids), expected)
    # saving again over an existing save replaces it whole
    dhp_fx.save(loaded, str(tmp_path / "m"))
    assert torch.equal(_logits(dhp_fx.load(str(tmp_path / "m"), _gpt2(seed=4)), ids), expected)


def test_static_pruned_model_round_trips(tmp_path):
    from dhp_fx.static_prune import static_prune

    ids = _ids()
    opt = dhp_fx.optimize(_gpt2(), example_inputs=(ids,))
    plan = {opt.sites[0].name: [1, 3], opt.sites[1].name: [0]}
    result = static_prune(opt, plan=plan)
    pruned = dhp_fx.optimize(result.model, dhp_fx.DHPConfig(keep_ratio=0.5), example_inputs=(ids,))
    assert [s.num_heads for s in pruned.sites] == [2, 3]
    expected = _logits(pruned, ids)
    dhp_fx.save(pruned, str(tmp_path / "p"), pruning=result)
    loaded = dhp_fx.load(str(tmp_path / "p"), lambda: _gpt2(seed=9))  # an unpruned architecture
    assert [s.num_heads for s in loaded.sites] == [2, 3]
    assert torch.equal(_logits(loaded, ids), expected)


def test_load_rejects_a_foreign_directory_and_a_wrong_architecture(tmp_path, distilled):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "sites.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a dhp_fx model save"):
        dhp_fx.load(str(tmp_path / "x"), _gpt2())
    student = distilled[0]
    dhp_fx.save(student, str(tmp_path / "m"))
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="does not fit the model"):
        dhp_fx.load(str(tmp_path / "m"), other)


def test_rng_and_optimizer_state_round_trip(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    tensors, meta = ckpt.rng_state()
    ckpt.save_tensors(tensors, str(tmp_path / "rng.safetensors"))
    json.dumps(meta)
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(ckpt.load_tensors(str(tmp_path / "rng.safetensors")), json.loads(json.dumps(meta)))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (expected[0].tolist(), *expected[1:])

    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.9))
    p.grad = torch.ones(4)
    opt.step()
    t, m = ckpt.optimizer_state(opt)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.1)
    ckpt.load_optimizer_state(opt2, t, json.loads(json.dumps(m)))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    for k, v in opt.state[p].items():
        assert torch.equal(v, opt2.state[q][k])


class Interrupting:
    """Re-iterable data that raises KeyboardInterrupt at the n-th batch it ever yields (Ctrl-C)."""

    def __init__(self, data, at):
        self.data, self.at, self.count = data, at, 0

    def __iter__(self):
        for batch in self.data:
            self.count += 1
            if self.count == self.at:
                raise KeyboardInterrupt
            yield batch


def _resume_config(tmp, **kw):
    base = dict(steps=6, lr=3e-3, grad_accum=2, dropout=True, progress=False, seed=11, checkpoint_dir=str(tmp),
                checkpoint_every=2, keep_checkpoints=2, eval_every=3)
    base.update(kw)
    return DistillConfig(**base)


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(tmp_path):
    teacher = _gpt2(dropout=0.1)  # dropout on: the RNG must be restored too
    ids = _ids()
    # a shuffling DataLoader draws its order from the global RNG at every epoch (5 batches/epoch)
    loader = DataLoader(TokenDataset(10), batch_size=2, shuffle=True)
    held = _batches(2, seed=50)

    def student():
        s = dhp_fx.optimize(copy.deepcopy(teacher), example_inputs=(ids,))
        s.set_keep_ratio(0.5)
        return s

    full = dhp_fx.distill(student(), teacher, loader, _resume_config(tmp_path / "a"), eval_data=held)
    assert full.steps == 6

    # Ctrl-C in the middle of step 4's accumulation (micro-batch 8 of 12): the checkpoint holds step 3
    interrupted = student()
    with pytest.raises(KeyboardInterrupt):
        dhp_fx.distill(interrupted, teacher, Interrupting(loader, at=8), _resume_config(tmp_path / "b"), eval_data=held)
    latest = json.loads((tmp_path / "b" / "latest.json").read_text())
    assert latest["step"] == 3
    assert not [d for d in os.listdir(tmp_path / "b") if d.startswith(".tmp")]

    resumed = dhp_fx.distill(student(), teacher, loader, _resume_config(tmp_path / "b", resume=True), eval_data=held)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    a, b = full.student.state_dict(), resumed.student.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [e["objective"] for e in resumed.evals] == [e["objective"] for e in full.evals]
    # the log holds each step once, as if the run had never stopped
    steps = [json.loads(ln)["step"] for ln in open(tmp_path / "b" / "metrics.jsonl") if '"event": "step"' in ln]
    assert steps == [1, 2, 3, 4, 5, 6]
    kept = sorted(d for d in os.listdir(tmp_path / "b") if d.startswith("step-"))
    assert kept == ["step-00000004", "step-00000006"]


def test_a_crash_loses_only_the_steps_since_the_last_checkpoint(tmp_path):
    teacher = _gpt2()
    ids = _ids()
    batches = _batches(4)

    class Crashing:
        def __init__(self):
            self.n = 0

        def __iter__(self):
            for b in batches:
                self.n += 1
                if self.n == 4:
                    raise RuntimeError("disk on fire")
                yield b

    s = dhp_fx.optimize(copy.deepcopy(teacher), example_inputs=(ids,))
    s.set_keep_ratio(0.5)
    cfg = DistillConfig(steps=5, lr=1e-3, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(RuntimeError, match="disk on fire"):
        dhp_fx.distill(s, teacher, Crashing(), cfg)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    s2 = dhp_fx.optimize(copy.deepcopy(teacher), example_inputs=(ids,))
    s2.set_keep_ratio(0.5)
    result = dhp_fx.distill(s2, teacher, batches, cfg.replace(resume=True))
    assert result.resumed_from == 2 and result.steps == 5
