"""The integrated GPU path without a GPU: optimize() -> dhp:: ops -> Triton kernels, run by the Triton
interpreter on CPU tensors.

On CUDA the ops send work to the Triton kernels (attention, head-skipping projections); on CPU they
take the PyTorch path, so the CPU suite never runs the wiring between the two: argument order, the
layouts the model hands the kernels (projection outputs viewed head-major, masks broadcast from
[B, 1, 1, L]), per-sample keep masks. Here both dispatchers are forced to the interpreted kernels
and ``benchmarks/gpu_check.py``'s own exactness check runs on BERT, GPT-2 and Llama-GQA: gates
open equal the original model, random per-sample keep masks equal the zeroed-head reference.
The interpreter is fixed when triton is imported, so this runs in a child process.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD = "_DHP_FX_TRITON_INTEGRATION_CHILD"
IN_CHILD = os.environ.get(_CHILD) == "1"


@pytest.mark.skipif(IN_CHILD, reason="this is the child")
def test_integrated_triton_path_in_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "7 passed, 1 skipped" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not IN_CHILD, reason="run by test_integrated_triton_path_in_interpreter_subprocess")
def test_models_through_interpreted_triton_kernels_match_references(monkeypatch):
    ta = importlib.import_module("dhp_fx.kernels.triton_attention")
    thl = importlib.import_module("dhp_fx.kernels.triton_head_linear")
    assert ta._INTERPRET and thl._INTERPRET, "kernels were imported compiled"
    calls = {"attention": 0, "projection": 0}

    def counted(fn, key):
        def run(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(ta, "triton_gated_attention", counted(ta.triton_gated_attention, "attention"))
    for name in ("head_linear_out_triton", "head_linear_in_triton"):
        monkeypatch.setattr(thl, name, counted(getattr(thl, name), "projection"))
    tg = importlib.import_module("dhp_fx.kernels.triton_gather_heads")
    calls.update(gather=0, gather_rows=0)
    monkeypatch.setattr(tg, "gather_heads_triton", counted(tg.gather_heads_triton, "gather"))
    monkeypatch.setattr(tg, "gather_rows_triton", counted(tg.gather_rows_triton, "gather_rows"))
    _triton_path(monkeypatch)

    gpu_check = _gpu_check()
    # one layer of four heads of 16 on a width of 64: every interpreted kernel call costs per tile
    # and step (the device run checks two layers of wider models)
    rows = gpu_check.check_exactness("cpu", [torch.float32], batch=2, seq=12, width=64, heads=4, layers=1)
    assert [r["model"] for r in rows] == ["bert", "gpt2", "llama-gqa"]
    for r in rows:
        assert r["ok"], r
    # every site's attention and its head-skipping projections ran on the kernels
    assert calls["attention"] >= 3 * 2 and calls["projection"] >= 3 * 2, calls
    # compact blocks (BERT, GPT-2) and chains (Llama) gathered through the kernels, per row too
    assert calls["gather"] >= 3 and calls["gather_rows"] >= 3, calls


def _torch_path(monkeypatch):
    op = importlib.import_module("dhp_fx.kernels.gated_attention")
    hl = importlib.import_module("dhp_fx.kernels.head_linear")
    monkeypatch.setattr(op, "_triton_path", lambda q, v, dropout_p: None)
    monkeypatch.setattr(hl, "_triton_module", lambda x, weight, bias, head_dim: None)


def _triton_path(monkeypatch):
    ta = importlib.import_module("dhp_fx.kernels.triton_attention")
    thl = importlib.import_module("dhp_fx.kernels.triton_head_linear")
    op = importlib.import_module("dhp_fx.kernels.gated_attention")
    hl = importlib.import_module("dhp_fx.kernels.head_linear")
    monkeypatch.setattr(op, "_triton_path", lambda q, v, dropout_p: ta if dropout_p == 0.0 else None)
    monkeypatch.setattr(hl, "_triton_module", lambda x, weight, bias, head_dim: thl)
    # compact blocks' weight gathers, union and per row (inference only: under autograd they stay torch)
    tg = importlib.import_module("dhp_fx.kernels.triton_gather_heads")
    for name in ("compact_heads", "compact_rows"):
        monkeypatch.setattr(importlib.import_module(f"dhp_fx.kernels.{name}"), "triton_gather_for",
                            lambda keep, tensors, per_row=False: tg)


@pytest.mark.skipif(not IN_CHILD, reason="run by test_integrated_triton_path_in_interpreter_subprocess")
@pytest.mark.parametrize("scoring,granularity", [("router", "sample"), ("static", "batch")])
def test_gates_deciding_before_the_projections_match_the_torch_path_forward_and_backward(
        monkeypatch, scoring, granularity):
    """Router (per-sample [B, H] masks) and static ([H]) gates skip the Q/K/V rows of pruned heads:
    the projections' Triton forward and backward against the PyTorch path, same model, same masks."""
    import dhp_fx

    model = _gpu_check().tiny_models(torch.float32, "cpu", width=64, heads=4, layers=1)["bert"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring=scoring, granularity=granularity),
                          example_inputs=inputs)
    if scoring == "static":
        dhp_fx.calibrate(opt, [inputs], measure_flops=False)

    def run():
        opt.zero_grad(set_to_none=True)
        out = opt(**inputs).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in opt.named_parameters()
                 if p.grad is not None and ("attention" in n)}
        return out.detach(), grads

    _torch_path(monkeypatch)
    want, want_grads = run()
    _triton_path(monkeypatch)
    got, got_grads = run()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert want_grads and got_grads.keys() == want_grads.keys()
    for name, w in want_grads.items():
        torch.testing.assert_close(got_grads[name], w, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.skipif(not IN_CHILD, reason="run by test_integrated_triton_path_in_interpreter_subprocess")
def test_gpu_check_generate_reads_the_cache_in_place_interpreted(monkeypatch):
    """The device run's generate() check: GPT-2's and Llama-GQA's query chains decode through the
    decode kernels' head map (each kept query head reads its own KV head's cached rows in place),
    token for token and logit for logit the head-skipping ops' generation."""
    _triton_path(monkeypatch)
    rows = _gpu_check().check_generate("cpu", torch.float32, new=3, width=64, heads=4, layers=1, in_place=True)
    assert [r["model"] for r in rows] == ["gpt2", "llama-gqa"]
    assert all(r["ok"] and r["in_place_calls"] == 3 for r in rows), rows


@pytest.mark.skipif(not IN_CHILD, reason="run by test_integrated_triton_path_in_interpreter_subprocess")
def test_gpu_check_projection_cases_pass_interpreted():
    """The device run's projection check (each loading kind forced, NaN-filled memory), small, in
    one dtype (the interpreter computes bf16 and fp16 tiles alike, in float32) and at one head dim
    (test_head_linear's interpreted cases take others)."""
    rows = _gpu_check().check_projections("cpu", dims=(32,), lengths=(16, 10), K=32, dtypes=(torch.float16,))
    kinds = {(r["loading"], r["mask"], r["in_out"]) for r in rows}
    assert len(kinds) == 4 * 3 * 2 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


@pytest.mark.skipif(not IN_CHILD, reason="run by test_integrated_triton_path_in_interpreter_subprocess")
def test_gpu_check_router_cases_pass_interpreted():
    """The device run's router check (kernel against the torch router in float64), small."""
    rows = _gpu_check().check_router("cpu", batch=3, seq=20, d=24, heads=5, width=8)
    assert len(rows) == 12 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


@pytest.mark.skipif(not IN_CHILD, reason="run by test_integrated_triton_path_in_interpreter_subprocess")
def test_gpu_check_backward_cases_pass_interpreted(monkeypatch):
    """The device run's backward check (projections with pointer and descriptor loads, attention
    through the op's autograd on the interpreted kernels) against float64 autograd, small."""
    _triton_path(monkeypatch)
    attn_cases = ((torch.float32, 16, True, "bool"), (torch.float16, 32, False, "additive"))
    rows = _gpu_check().check_backward("cpu", proj_cases=((torch.float16, 16),), lengths=(16, 10), K=32,
                                       attn_cases=attn_cases, attn_shape=(3, 4, 2, 20))
    parts = [(r["part"], r.get("loading"), r["mask"]) for r in rows]
    assert len(parts) == 2 * 2 * 2 + 2, parts
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
