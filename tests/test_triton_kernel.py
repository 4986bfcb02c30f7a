"""The Triton gated-attention kernels under the Triton interpreter (CPU tensors), against float64.

Triton picks interpreter mode when it and the kernels are imported (triton.language's own jit
helpers included), so the mode cannot be switched inside a process that already imported triton
compiled, e.g. through dhp_fx in another test module, nor should it be switched on a CUDA machine
whose other tests run real kernels. There this module runs itself in a child pytest process with
TRITON_INTERPRET=1 (test_interpreter_suite_in_subprocess) and skips the in-process copies.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import torch  # noqa: E402  (torch does not import triton)

_CHILD = "_DHP_FX_TRITON_INTERPRETER_CHILD"
_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")


def _set_interpret(on: bool):
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    elif _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


def _load_interpreted():
    """The interpreted kernel module, or None where this process cannot interpret."""
    if not (os.environ.get(_CHILD) == "1" or _PREV_INTERPRET == "1"
            or ("triton" not in sys.modules and not torch.cuda.is_available())):
        return None
    _set_interpret(True)
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.zeros, InterpretedFunction):
            return None
        name = "dhp_fx.kernels.triton_attention"
        mod = importlib.import_module(name)
        if not mod._INTERPRET:  # imported before in compiled mode: take a fresh interpreted copy
            for n in (name, name + "_bwd"):
                sys.modules.pop(n, None)
            mod = importlib.import_module(name)
        return mod
    finally:
        _set_interpret(False)


_ta = _load_interpreted()
IN_PROCESS = _ta is not None
if not IN_PROCESS and os.environ.get(_CHILD) == "1":
    raise RuntimeError("child process could not enter Triton interpreter mode")
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="run by test_interpreter_suite_in_subprocess")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from all_pairs import all_pairs  # noqa: E402
from dhp_fx.kernels.reference import gated_attention_reference  # noqa: E402

def load_interpreted(name: str):
    """Kernel module ``name`` in interpreter mode (re-imported if it was imported compiled)."""
    _set_interpret(True)
    try:
        mod = importlib.import_module(name)
        if not mod._INTERPRET:
            sys.modules.pop(name, None)
            mod = importlib.import_module(name)
        return mod
    finally:
        _set_interpret(False)


class NanEmpty:
    """Stands in for the torch module inside kernel host code: ``empty`` hands out NaN-filled
    memory (integers: -7), so an element no program stores stays NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, **kwargs):
        t = torch.empty(*shape, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)


if IN_PROCESS:
    _thl = load_interpreted("dhp_fx.kernels.triton_head_linear")
    triton_available = _ta.triton_available
    triton_gated_attention = _ta.triton_gated_attention
    triton_gated_attention_autograd = _ta.triton_gated_attention_autograd
    triton_gated_attention_backward = _ta.triton_gated_attention_backward


@pytest.fixture(scope="module", autouse=True)
def _interpreter_on():
    # Triton also consults the env var while kernels run, not only at import.
    if IN_PROCESS:
        _set_interpret(True)
    yield
    _set_interpret(False)


def run_interpreted_child(test_file: str, timeout: int = 900):
    """Runs ``test_file`` in a child pytest with TRITON_INTERPRET=1 and requires every test there
    to pass; the only skip allowed is the calling wrapper test itself."""
    env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                          env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    name = os.path.basename(test_file)
    assert proc.returncode == 0, f"{name} failed in the interpreter child:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"\d+ passed, 1 skipped(, \d+ warnings?)? in", proc.stdout.splitlines()[-1]), proc.stdout[-2000:]


@pytest.mark.skipif(IN_PROCESS, reason="the suite runs in this process")
def test_interpreter_suite_in_subprocess():
    run_interpreted_child(__file__)


@pytest.mark.skipif(os.environ.get(_CHILD) != "1", reason="conftest installs them in the interpreter child")
def test_interpreter_speedups_are_in_force():
    """Without them the seven interpreter suites take about twice as long (229 s against 430 s
    of CI time, 2026-11-28). A triton whose interpreter no longer looks as they expect leaves
    them out: then adapt tests/interpreter_speedup.py to it, or drop them and budget the time."""
    import triton
    from interpreter_speedup import skip_dropped_overflow_checks, skip_nested_lang_patches

    assert skip_nested_lang_patches(), f"triton {triton.__version__}: nested helper calls re-patch triton.language"
    assert skip_dropped_overflow_checks(), f"triton {triton.__version__}: the overflow sanitizer's early return is off"


TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SLOW = settings(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fold_causal(mask, Lq, Lk, is_causal):
    """SDPA refuses attn_mask together with is_causal; the kernel allows it, so the reference
    folds the causal triangle into the mask."""
    if not is_causal or mask is None:
        return mask, is_causal
    tril = torch.ones(Lq, Lk, dtype=torch.bool).tril()
    if mask.dtype == torch.bool:
        return mask & tril, False
    return mask.double() + torch.zeros(Lq, Lk, dtype=torch.float64).masked_fill(~tril, float("-inf")), False


def reference(q, k, v, keep, mask, is_causal, scale):
    """float64 output, per-(b, h) mean row entropy, and which rows have at least one visible key."""
    qd, kd, vd = q.double(), k.double(), v.double()
    md = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    md, causal = _fold_causal(md, q.shape[2], k.shape[2], is_causal)
    out = gated_attention_reference(qd, kd, vd, keep, md, is_causal=causal, scale=scale)

    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    g = Hq // k.shape[1]
    kd, vd = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
    logits = qd @ kd.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    visible = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    if md is not None:
        if md.dtype == torch.bool:
            visible = visible & md
        else:
            logits = logits + md
            visible = visible & (md > float("-inf"))
    if causal:
        visible = visible & torch.ones(Lq, Lk, dtype=torch.bool).tril()
    logits = logits.masked_fill(~visible, float("-inf"))
    row_ok = visible.any(-1)
    p = torch.softmax(logits.masked_fill(~row_ok[..., None], 0.0), -1) * visible
    ent_rows = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    ent_rows = torch.where(row_ok, ent_rows, torch.zeros_like(ent_rows))
    ent_rows = torch.where(keep[..., None], ent_rows, torch.zeros(()))
    return out, ent_rows.mean(-1), row_ok, ent_rows


def make_mask(kind, shape_kind, B, H, Lq, Lk, dtype, gen):
    if kind == "none":
        return None
    shape = {"pad": (B, 1, 1, Lk), "bias": (1, H, Lq, Lk), "full": (B, H, Lq, Lk), "2d": (Lq, Lk)}[shape_kind]
    if kind == "bool":
        return torch.rand(shape, generator=gen) > 0.25
    m = torch.randn(shape, generator=gen).to(dtype)
    # Some -inf entries: masked keys must drop out of the softmax and the entropy alike.
    return m.masked_fill(torch.rand(shape, generator=gen) < 0.15, float("-inf"))


def make_keep(pattern, B, H, gen):
    if pattern == "all":
        return torch.ones(B, H, dtype=torch.bool)
    if pattern == "one":
        keep = torch.zeros(B, H, dtype=torch.bool)
        keep[0, H - 1] = True
        return keep
    keep = torch.rand(B, H, generator=gen) > 0.5
    if pattern == "row_none":
        keep[B - 1] = False
    return keep


def qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, gen, model_layout=False):
    if model_layout:
        # [B, L, H, D] storage viewed as [B, H, L, D], as HF models hand it over: no copy.
        q = torch.randn(B, Lq, Hq, D, generator=gen).to(dtype).transpose(1, 2)
        k = torch.randn(B, Lk, Hkv, D, generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(B, Lk, Hkv, Dv, generator=gen).to(dtype).transpose(1, 2)
        return q, k, v
    return (torch.randn(B, Hq, Lq, D, generator=gen).to(dtype), torch.randn(B, Hkv, Lk, D, generator=gen).to(dtype),
            torch.randn(B, Hkv, Lk, Dv, generator=gen).to(dtype))


def check_forward(B, Hkv, group, Lq, Lk, D, Dv, dtype, mask_kind, mask_shape, is_causal, keep_pattern,
                  scale, model_layout, seed, **options):
    """Forward vs float64 on poisoned output; ``options`` go to the kernel call. Returns the
    inputs (q, k, v, keep, mask) and outputs (out, entropy) for further comparisons."""
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * group
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, gen, model_layout)
    keep = make_keep(keep_pattern, B, Hq, gen)
    mask = make_mask(mask_kind, mask_shape, B, Hq, Lq, Lk, dtype, gen)
    # Poisoned, so every element must be written; in model layout the buffer is strided too.
    out = torch.full((B, Lq, Hq, Dv) if model_layout else (B, Hq, Lq, Dv), float("nan"), dtype=dtype)
    out = out.transpose(1, 2) if model_layout else out
    got, ent = triton_gated_attention(q, k, v, keep, mask, is_causal, scale, return_entropy=True, out=out,
                                      **options)
    assert got is out and got.dtype == dtype and ent.dtype == torch.float32 and ent.shape == (B, Hq)
    assert not torch.isnan(got).any() and not torch.isnan(ent).any()

    ref, ref_ent, row_ok, _ = reference(q, k, v, keep, mask, is_causal, scale)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep])), "pruned heads must be exactly zero"
    assert torch.equal(ent[~keep], torch.zeros_like(ent[~keep]))
    # Fully masked rows: documented as zeros (SDPA's math path agrees); compare the rest.
    assert torch.equal(got[~row_ok], torch.zeros_like(got[~row_ok]))
    sel = row_ok[..., None].expand_as(got)
    tol = TOL[dtype]
    torch.testing.assert_close(got.double()[sel], ref[sel], atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=1e-3)
    return (q, k, v, keep, mask), (got, ent)


@interpreted
@SLOW
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]),
    Lq=st.sampled_from([1, 5, 16, 23, 40]), Lk=st.integers(1, 40),
    D=st.sampled_from([16, 24, 32, 40, 64]), dv_same=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    mask_kind=st.sampled_from(["none", "bool", "additive"]),
    mask_shape=st.sampled_from(["pad", "bias", "full", "2d"]),
    is_causal=st.booleans(), keep_pattern=st.sampled_from(["random", "all", "one", "row_none"]),
    scale=st.sampled_from([None, 0.3]), model_layout=st.booleans(), seed=st.integers(0, 2**16),
)
def test_forward_matches_reference(B, Hkv, group, Lq, Lk, D, dv_same, dtype, mask_kind, mask_shape, is_causal,
                                   keep_pattern, scale, model_layout, seed):
    check_forward(B, Hkv, group, Lq, Lk, D, D if dv_same else 16, dtype, mask_kind, mask_shape, is_causal,
                  keep_pattern, scale, model_layout, seed)


@interpreted
@pytest.mark.parametrize(
    "case",
    [
        # head dim 80 pads to a 128 block; causal with Lq != Lk; GQA 4:1
        dict(B=1, Hkv=1, group=4, Lq=33, Lk=33, D=80, Dv=80, dtype=torch.float16, mask_kind="none",
             mask_shape="pad", is_causal=True, keep_pattern="random"),
        # decode: one query row against a long KV with a padding mask
        dict(B=2, Hkv=2, group=1, Lq=1, Lk=100, D=64, Dv=64, dtype=torch.bfloat16, mask_kind="bool",
             mask_shape="pad", is_causal=False, keep_pattern="row_none"),
        # causal with more queries than keys: trailing rows see every key
        dict(B=1, Hkv=2, group=1, Lq=40, Lk=17, D=32, Dv=32, dtype=torch.float32, mask_kind="additive",
             mask_shape="bias", is_causal=True, keep_pattern="all"),
    ],
    ids=["d80-causal-gqa4", "decode-bf16", "causal-lq-gt-lk"],
)
def test_forward_edge_cases(case):
    check_forward(**case, scale=None, model_layout=True, seed=7)


@interpreted
def test_triton_available_only_for_cuda():
    assert not triton_available("cpu")
    assert triton_available("cuda") == (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))


@interpreted
def test_nothing_kept_launches_only_zero_stores():
    gen = torch.Generator().manual_seed(0)
    q, k, v = qkv(2, 2, 2, 9, 9, 16, 16, torch.float32, gen)
    out = torch.full((2, 2, 9, 16), float("nan"))
    keep = torch.zeros(2, 2, dtype=torch.bool)
    got, ent, lse = triton_gated_attention(q, k, v, keep, return_entropy=True, return_lse=True, out=out)
    assert torch.equal(got, torch.zeros_like(got)) and torch.equal(ent, torch.zeros_like(ent))


@interpreted
def test_entropy_rows_and_lse_only_pass():
    """Per-row entropies; compute_out=False (the backward's lse recompute) skips P@V, not them."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = qkv(2, 4, 2, 21, 30, 24, 24, torch.float32, gen)
    keep = make_keep("random", 2, 4, gen)
    mask = make_mask("bool", "pad", 2, 4, 21, 30, torch.float32, gen)
    none, rows, lse = triton_gated_attention(q, k, v, keep, mask, True, return_entropy=True, return_lse=True,
                                             compute_out=False, entropy_rows=True)
    assert none is None and rows.shape == (2, 4, 21)
    _, _, _, ref_rows = reference(q, k, v, keep, mask, True, None)
    torch.testing.assert_close(rows.double(), ref_rows, atol=1e-5, rtol=1e-5)
    _, lse_full = triton_gated_attention(q, k, v, keep, mask, True, return_lse=True)
    assert torch.equal(lse[keep], lse_full[keep])


@interpreted
def test_huge_negative_padding_mask_matches_sdpa_on_fully_masked_rows():
    """HF pads with finfo.min, not -inf; a row masked that way is uniform in SDPA, not zero."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(1, 2, 2, 6, 6, 16, 16, torch.float32, gen)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 2, :] = torch.finfo(torch.float32).min
    mask[..., :, 4] = torch.finfo(torch.float32).min
    keep = torch.ones(1, 2, dtype=torch.bool)
    got = triton_gated_attention(q, k, v, keep, mask)
    ref = gated_attention_reference(q.double(), k.double(), v.double(), keep, mask.double())
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@interpreted
def test_entropy_after_keys_padded_with_finfo_min():
    """HF left padding: a block of finfo.min keys, then visible ones. The running max jumps by
    ~1e38, which must not turn the carried entropy sum into inf * 0 = NaN (clamped to 0)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 2, 2, 3, 40, 16, 16, torch.float32, gen)
    mask = torch.zeros(1, 1, 3, 40)
    mask[..., :20] = torch.finfo(torch.float32).min
    keep = torch.ones(1, 2, dtype=torch.bool)
    out, ent = triton_gated_attention(q, k, v, keep, mask, return_entropy=True, entropy_rows=True)
    ref_out, _, _, ref_rows = reference(q, k, v, keep, mask, False, None)
    assert ref_rows.min() > 1.0  # 20 visible keys: far from the degenerate 0
    torch.testing.assert_close(ent.double(), ref_rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


BACKWARD_CASES = [
    dict(B=2, Hkv=2, group=2, Lq=19, Lk=27, D=24, dtype=torch.float32, mask_kind="additive", mask_shape="bias",
         is_causal=False, keep=[[1, 0, 1, 1], [0, 0, 1, 0]]),
    dict(B=1, Hkv=1, group=2, Lq=23, Lk=23, D=32, dtype=torch.float32, mask_kind="bool", mask_shape="pad",
         is_causal=True, keep=[[0, 1]]),
    dict(B=2, Hkv=2, group=1, Lq=17, Lk=30, D=16, dtype=torch.float16, mask_kind="none", mask_shape="pad",
         is_causal=True, keep=[[1, 1], [1, 0]]),
    # Multiples of the interpreter's 16-row blocks, so the unmasked interior paths run: below /
    # at / past the diagonal, Lq != Lk both ways, padded head dim (40 -> 64), GQA with a pruned head.
    dict(B=1, Hkv=1, group=2, Lq=48, Lk=48, D=32, dtype=torch.float32, mask_kind="none", mask_shape="pad",
         is_causal=True, keep=[[1, 1]]),
    dict(B=1, Hkv=2, group=1, Lq=32, Lk=64, D=16, dtype=torch.float32, mask_kind="bool", mask_shape="2d",
         is_causal=False, keep=[[1, 1]]),
    dict(B=1, Hkv=2, group=2, Lq=64, Lk=32, D=40, dtype=torch.float32, mask_kind="additive", mask_shape="full",
         is_causal=True, keep=[[1, 0, 1, 1]]),
    dict(B=2, Hkv=1, group=2, Lq=48, Lk=40, D=24, dtype=torch.float16, mask_kind="bool", mask_shape="pad",
         is_causal=True, keep=[[1, 1], [0, 1]]),
]


@interpreted
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=["gqa-bias-grad", "causal-bool", "fp16-causal", "causal-48",
                                                      "bool-32x64", "causal-64x32-pad-d", "fp16-causal-48x40"])
def test_backward_matches_reference(case):
    check_backward(case)


@interpreted
@settings(SLOW, max_examples=15)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 3]), Lq=st.sampled_from([1, 9, 24, 32]),
    Lk=st.integers(1, 48), D=st.sampled_from([16, 40]), dtype=st.sampled_from([torch.float32, torch.float16]),
    mask_kind=st.sampled_from(["none", "bool", "additive"]), mask_shape=st.sampled_from(["pad", "bias", "2d"]),
    is_causal=st.booleans(), data=st.data(),
)
def test_backward_random_shapes(B, Hkv, group, Lq, Lk, D, dtype, mask_kind, mask_shape, is_causal, data):
    keep = data.draw(st.lists(st.lists(st.booleans(), min_size=Hkv * group, max_size=Hkv * group),
                              min_size=B, max_size=B))
    check_backward(dict(B=B, Hkv=Hkv, group=group, Lq=Lq, Lk=Lk, D=D, dtype=dtype, mask_kind=mask_kind,
                        mask_shape=mask_shape, is_causal=is_causal, keep=keep))


def check_backward(case):
    gen = torch.Generator().manual_seed(3)
    B, Hkv, group, Lq, Lk, D, dtype = (case[n] for n in ("B", "Hkv", "group", "Lq", "Lk", "D", "dtype"))
    Hq = Hkv * group
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, D, D, dtype, gen, model_layout=True)
    keep = torch.tensor(case["keep"], dtype=torch.bool)
    mask = make_mask(case["mask_kind"], case["mask_shape"], B, Hq, Lq, Lk, dtype, gen)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.masked_fill(mask == float("-inf"), -5.0).requires_grad_()
    for t in (q, k, v):
        t.requires_grad_()
    out = triton_gated_attention_autograd(q, k, v, keep, mask, case["is_causal"])
    grad = torch.randn(B, Lq, Hq, D, generator=gen).to(dtype).transpose(1, 2)  # non-contiguous dO
    out.backward(grad)

    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rmask = ref_leaves[3] if len(ref_leaves) > 3 else mask
    rmask, causal = _fold_causal(rmask, Lq, Lk, case["is_causal"])
    ref = gated_attention_reference(*ref_leaves[:3], keep, rmask, is_causal=causal)
    ref.backward(grad.double())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == got.dtype and not torch.isnan(got.grad).any()
        torch.testing.assert_close(got.grad.double(), want.grad, atol=tol, rtol=tol)
    assert torch.equal(q.grad[~keep], torch.zeros_like(q.grad[~keep])), "pruned heads' dq must be exactly zero"
    # A kv head none of whose query heads is kept gets exactly zero dk/dv.
    dead_kv = ~keep.view(B, Hkv, group).any(-1)
    assert torch.equal(k.grad[dead_kv], torch.zeros_like(k.grad[dead_kv]))
    assert torch.equal(v.grad[dead_kv], torch.zeros_like(v.grad[dead_kv]))


@interpreted
def test_backward_recomputes_out_and_lse_when_not_given():
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 2, 1, 12, 12, 16, 16, torch.float32, gen)
    keep = torch.tensor([[True, False]])
    out, lse = triton_gated_attention(q, k, v, keep, is_causal=True, return_lse=True)
    grad = torch.randn(out.shape, generator=gen)
    with_lse = triton_gated_attention_backward(grad, q, k, v, keep, out, lse, is_causal=True)
    without = triton_gated_attention_backward(grad, q, k, v, keep, out, None, is_causal=True)
    neither = triton_gated_attention_backward(grad, q, k, v, keep, None, None, is_causal=True)
    for a, b, c in zip(with_lse[:3], without[:3], neither[:3]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert with_lse[3] is None


@interpreted
def test_gated_op_dispatches_to_triton_forward_and_backward(monkeypatch):
    """The wiring inside dhp::gated_attention: argument order of the Triton forward and backward."""
    op_module = importlib.import_module("dhp_fx.kernels.gated_attention")

    monkeypatch.setattr(op_module, "_triton_path", lambda q, v, dropout_p: _ta if dropout_p == 0.0 else None)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 7, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 7, 16, generator=g, requires_grad=True)
    bias = torch.randn(1, 4, 5, 7, generator=g, requires_grad=True)
    keep = torch.tensor([[True, False, True, True], [False, False, False, False]])
    out = torch.ops.dhp.gated_attention(q, k, v, keep, bias, 0.0, False, 0.3)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
    ref = gated_attention_reference(*ref_in[:3], keep, ref_in[3], 0.0, False, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ref.backward(grad.double())
    for got, want in zip((q, k, v, bias), ref_in):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=2e-4, rtol=1e-3)


# ------------------------------------------------------------------ head-skipping projections
@interpreted
@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 40), st.integers(1, 4), st.sampled_from([8, 24, 32]),
       st.booleans(), st.booleans(), st.booleans(), st.sampled_from([torch.float32, torch.float16]), st.integers(0, 999))
def test_head_linear_kernels_match_reference(B, L, K, H, D, per_sample, in_out, with_bias, dtype, seed):
    from dhp_fx.kernels.head_linear import head_linear_in_reference, head_linear_out_reference

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand((B, H) if per_sample else (H,), generator=g) < 0.6
    x = torch.randn(B, L, K, generator=g).to(dtype)
    w = torch.randn(H * D, K, generator=g).to(dtype)
    b = torch.randn(H * D, generator=g).to(dtype) if with_bias else None
    w_arg = w.t().contiguous() if in_out else w
    # the kernels allocate with torch.empty: an element they skipped would hold stale memory and
    # fail the element-wise comparison below
    y = _thl.head_linear_out_triton(x, w_arg, b, keep, D, in_out)
    want = head_linear_out_reference(x.double(), w_arg.double(), None if b is None else b.double(), keep, D, in_out)
    tol = TOL[dtype] * 10
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)
    flags = keep.repeat_interleave(D, -1)
    flags = flags[:, None, :] if per_sample else flags
    assert (y[~flags.expand_as(y)] == 0).all()

    o = (torch.randn(B, L, H * D, generator=g) * flags).to(dtype)
    w2 = torch.randn(K, H * D, generator=g).to(dtype)
    b2 = torch.randn(K, generator=g).to(dtype) if with_bias else None
    w2_arg = w2.t().contiguous() if in_out else w2
    got = _thl.head_linear_in_triton(o, w2_arg, b2, keep, D, in_out)
    want = head_linear_in_reference(o.double(), w2_arg.double(), None if b2 is None else b2.double(), keep, D, in_out)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, atol=tol * 4, rtol=tol)


@interpreted
@pytest.mark.parametrize("share,H,n_kept,rows,pairs", [
    (share, H, n, rows, pairs) for share, (H, n), rows, pairs in all_pairs(
        [0, 1, 3], [(2, 0), (2, 1), (5, 1), (5, 2), (6, 3), (7, 7), (8, 1), (8, 2)],
        [32, 24],  # 32: a block of rows inside one sample; 24: blocks straddle two samples
        ["1", "0"])])  # two heads per program, one head
def test_projection_stores_every_pruned_head_once(monkeypatch, share, H, n_kept, rows, pairs):
    """Pruned heads' features come out zero whether their own program stores them or a program
    with a kept head does (PRUNED_PROGRAMS_PER_KEPT), in both head_linear_out kernels; per-sample
    masks give each sample its count."""
    from dhp_fx.kernels.head_linear import head_linear_out_reference

    monkeypatch.setenv("DHP_FX_HEAD_PAIRS", pairs)
    monkeypatch.setattr(_thl, "PRUNED_PROGRAMS_PER_KEPT", share)
    monkeypatch.setattr(_thl, "torch", NanEmpty())
    g = torch.Generator().manual_seed(H * 10 + n_kept)
    B, K, D = 2, 24, 16
    keep = torch.zeros(B, H, dtype=torch.bool)
    for row, n in enumerate((n_kept, max(0, n_kept - 1))):
        keep[row, torch.randperm(H, generator=g)[:n]] = True
    x = torch.randn(B, rows, K, generator=g)
    w = torch.randn(H * D, K, generator=g)
    for mask in (keep, keep[0]):
        assert _thl._pairs_heads(D, H) == (pairs == "1" and H > 1)
        y = _thl.head_linear_out_triton(x, w, None, mask, D)
        assert not torch.isnan(y).any()
        want = head_linear_out_reference(x.double(), w.double(), None, mask, D)
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
