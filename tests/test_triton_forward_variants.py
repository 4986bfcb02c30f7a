"""Variants of the Triton forward under the interpreter: the TMA variant (Q/K/V tiles and the
output through Hopper tensor descriptors) against float64 and against pointer loads, with the
rules that decide when it may run (layouts a descriptor accepts, which configs the autotuner may
try); and the two grids (compacted kept-first pair list, early exit), which must agree exactly.

Interpreter mode is fixed when triton is imported, so like test_triton_decode this module reuses
test_triton_kernel's loader and runs itself in a child pytest process where this one cannot
interpret.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import test_triton_kernel as tk
from test_triton_kernel import make_keep, make_mask, qkv
from test_triton_kernel import _interpreter_on  # noqa: F401  (module-scoped autouse fixture)

IN_PROCESS = tk.IN_PROCESS
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="run by test_forward_variants_suite_in_interpreter_subprocess")

from dhp_fx.kernels import triton_attention as ta_rules  # noqa: E402  (host-side rules only)


@pytest.mark.skipif(IN_PROCESS, reason="the suite runs in this process")
def test_forward_variants_suite_in_interpreter_subprocess():
    tk.run_interpreted_child(__file__, timeout=600)


@contextlib.contextmanager
def launches():
    """Records (TMA_MODE, USE_TMA, COMPACT, PV_BEHIND) of each forward launch. Under the
    interpreter the caller passes USE_TMA and PV_BEHIND (one config: see _fwd_configs)."""
    fwd = tk._ta._gated_attn_fwd
    seen, original = [], fwd.run

    def spy(*args, **kwargs):
        seen.append((args[fwd.arg_names.index("TMA_MODE")], kwargs.get("USE_TMA"), kwargs["COMPACT"],
                     kwargs.get("PV_BEHIND")))
        return original(*args, **kwargs)

    fwd.run = spy
    try:
        yield seen
    finally:
        fwd.run = original


def check_tma_forward(B, Hkv, group, Lq, Lk, D, Dv, dtype, mask_kind, mask_shape, is_causal, keep_pattern,
                      model_layout, seed):
    with launches() as seen:
        (q, k, v, keep, mask), (got, ent) = tk.check_forward(
            B, Hkv, group, Lq, Lk, D, Dv, dtype, mask_kind, mask_shape, is_causal, keep_pattern, None,
            model_layout, seed, tma=True)
    assert [x[:2] for x in seen] == [(tk._ta.TMA_ONLY, True)], "tma=True must run the descriptor variant"
    # Same numbers as the pointer loads: only the copy mechanism differs.
    with launches() as seen:
        p_out, p_ent = tk._ta.triton_gated_attention(q, k, v, keep, mask, is_causal, None, return_entropy=True,
                                                     tma=False)
    assert [x[:2] for x in seen] == [(tk._ta.TMA_OFF, False)]
    # Same numbers as the pointer loads up to summation order: the interpreter's numpy sums a
    # descriptor-loaded tile in another order on some CPUs (bitwise equal on the AMD machines of
    # sessions 1-20, within 2.4e-7 on an AVX-512 Intel one in session 21).
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got, p_out, atol=tol, rtol=tol)
    torch.testing.assert_close(ent, p_ent, atol=1e-6, rtol=1e-5)


# Query lengths above MAX_DECODE_LQ: shorter ones take the split-KV decode kernel, which has no TMA variant.
CASES = [
    # (B, Hkv, group, Lq, Lk, D, Dv, dtype, mask_kind, mask_shape, causal, keep, model_layout)
    (2, 2, 2, 40, 50, 24, 24, torch.float32, "none", "pad", True, "random", False),  # ragged, GQA
    (2, 2, 1, 33, 33, 32, 32, torch.float16, "additive", "bias", False, "row_none", True),  # HF layout
    (1, 1, 2, 24, 70, 80, 80, torch.bfloat16, "bool", "full", False, "one", True),  # head dim 80 pads to 128
    (2, 1, 2, 48, 48, 16, 32, torch.float32, "none", "pad", True, "all", False),  # Dv != D, full blocks
    (1, 2, 1, 20, 37, 40, 40, torch.float16, "bool", "pad", True, "random", False),
]


@interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_tma_forward_matches_reference_and_pointer_loads(case):
    check_tma_forward(*case, seed=0)


@interpreted
@settings(deadline=None, max_examples=18, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]),
       Lq=st.sampled_from([17, 23, 40]), Lk=st.integers(1, 40), D=st.sampled_from([16, 24, 40, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       mask_kind=st.sampled_from(["none", "bool", "additive"]), mask_shape=st.sampled_from(["pad", "bias", "2d"]),
       is_causal=st.booleans(), keep_pattern=st.sampled_from(["random", "all", "one", "row_none"]),
       model_layout=st.booleans(), seed=st.integers(0, 2**16))
def test_tma_forward_random_shapes(B, Hkv, group, Lq, Lk, D, dtype, mask_kind, mask_shape, is_causal,
                                   keep_pattern, model_layout, seed):
    check_tma_forward(B, Hkv, group, Lq, Lk, D, D, dtype, mask_kind, mask_shape, is_causal, keep_pattern,
                      model_layout, seed)


def check_pv_behind_forward(B, Hkv, group, Lq, Lk, D, dtype, mask_kind, mask_shape, is_causal, keep_pattern,
                            model_layout, tma, seed):
    with launches() as seen:
        (q, k, v, keep, mask), (got, ent) = tk.check_forward(
            B, Hkv, group, Lq, Lk, D, D, dtype, mask_kind, mask_shape, is_causal, keep_pattern, None,
            model_layout, seed, tma=tma, pv_behind=True)
        plain, plain_ent = tk._ta.triton_gated_attention(q, k, v, keep, mask, is_causal, None, return_entropy=True,
                                                         tma=tma, pv_behind=False)
    assert [x[3] for x in seen] == [True, False], "pv_behind must pick the inner loop"
    # The same float32 operations in the same order (rescale by alpha_j, then add P_j V_j), one
    # step later: the outputs agree bit for bit with the plain loop.
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
    torch.testing.assert_close(ent, plain_ent, atol=0, rtol=0)


# Lk spans several interpreter key blocks (16) so the loop runs 0 (first causal query block,
# Lk < 16), 1 and several interior steps; masks and entropy ride through the loop too.
PV_CASES = [
    # (B, Hkv, group, Lq, Lk, D, dtype, mask_kind, mask_shape, causal, keep, model_layout, tma)
    (2, 1, 2, 40, 70, 32, torch.float16, "none", "pad", False, "random", False, False),
    (1, 2, 1, 48, 48, 24, torch.float32, "additive", "bias", True, "all", True, False),
    (2, 1, 1, 20, 9, 16, torch.bfloat16, "bool", "pad", False, "row_none", False, False),  # no interior block
    (1, 1, 2, 33, 64, 40, torch.float16, "none", "pad", True, "one", False, True),  # descriptors, D pads to 64
    (2, 2, 1, 17, 37, 32, torch.bfloat16, "bool", "full", False, "random", True, True),
]


@interpreted
@pytest.mark.parametrize("case", PV_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_pv_behind_loop_matches_reference_and_the_plain_loop(case):
    check_pv_behind_forward(*case, seed=1)


@interpreted
@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]),
       Lq=st.sampled_from([17, 33]), Lk=st.integers(1, 70), D=st.sampled_from([16, 40, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       mask_kind=st.sampled_from(["none", "bool", "additive"]), is_causal=st.booleans(),
       keep_pattern=st.sampled_from(["random", "all", "one", "row_none"]), tma=st.booleans(),
       seed=st.integers(0, 2**16))
def test_pv_behind_loop_random_shapes(B, Hkv, group, Lq, Lk, D, dtype, mask_kind, is_causal, keep_pattern, tma,
                                      seed):
    check_pv_behind_forward(B, Hkv, group, Lq, Lk, D, dtype, mask_kind, "pad", is_causal, keep_pattern, False, tma,
                            seed)


def test_pv_mode_decides_which_inner_loops_the_autotuner_may_try(monkeypatch):
    """pv_behind=None lets the autotuner time both inner loops, True/False pins one; without
    timing AUTO means the plain loop. Configs limited to light launches (the descriptor ones with
    P@V behind spill with a mask, entropy or lse at D = 128) stay off heavier launches, causal
    or not."""
    plain, behind, behind_light = _Cfg(False), _Cfg(False), _Cfg(True)
    behind.kwargs["PV_BEHIND"] = behind_light.kwargs["PV_BEHIND"] = True
    ta_rules.set_config_limits(behind_light, light_only=True)
    monkeypatch.setattr(ta_rules, "_INTERPRET", False)
    monkeypatch.setattr(ta_rules, "_AUTOTUNE", True)
    prune = ta_rules.prune_fwd_configs
    args = lambda mode: {"TMA_MODE": ta_rules.TMA_AUTO, "PV_MODE": mode, "Lq": 512}  # noqa: E731
    light = dict(BLOCK_D=128, MASK_KIND=0, ENTROPY=False, STORE_LSE=False, IS_CAUSAL=True)
    every = [plain, behind, behind_light]
    assert prune(every, args(ta_rules.PV_OFF), **light) == [plain]
    assert prune(every, args(ta_rules.PV_ONLY), **light) == [behind, behind_light]
    assert prune(every, args(ta_rules.PV_AUTO), **light) == every
    for heavier in (dict(MASK_KIND=2), dict(ENTROPY=True), dict(STORE_LSE=True)):
        assert prune(every, args(ta_rules.PV_AUTO), **dict(light, **heavier)) == [plain, behind], heavier
    monkeypatch.setattr(ta_rules, "_AUTOTUNE", False)
    assert prune(every, args(ta_rules.PV_AUTO), **light) == [plain]


@interpreted
def test_tma_true_refuses_layouts_a_descriptor_cannot_describe():
    attention = tk._ta.triton_gated_attention
    keep = torch.ones(1, 2, dtype=torch.bool)
    q = torch.randn(1, 2, 16, 20, dtype=torch.float16)  # rows of 40 bytes: not 16-byte aligned
    with pytest.raises(ValueError, match="tma=True"):
        attention(q, q, q, keep, tma=True)
    # tma=None on CPU tensors is the pointer path, whatever the layout.
    torch.testing.assert_close(attention(q, q, q, keep), attention(q, q, q, keep, tma=False), atol=0, rtol=0)


def test_descriptor_strides_follow_the_copy_engine_rules():
    strides = ta_rules._descriptor_strides
    assert strides(torch.empty(2, 3, 5, 8, dtype=torch.float16)) == [120, 40, 8, 1]
    hf = torch.empty(2, 5, 3, 8, dtype=torch.bfloat16).transpose(1, 2)  # [B, L, H, D] storage
    assert strides(hf) == [120, 8, 24, 1]
    assert strides(hf, ordered=True) is None  # the default (tma=None) leaves this layout to pointers
    assert strides(torch.empty(2, 3, 5, 8, dtype=torch.float16), ordered=True) == [120, 40, 8, 1]
    assert strides(torch.empty(2, 3, 5, 12, dtype=torch.float16)) is None  # 24-byte rows
    assert strides(torch.empty(2, 3, 5, 16, dtype=torch.float16)[..., :8]) == [240, 80, 16, 1]
    assert strides(torch.empty(2, 3, 5, 17, dtype=torch.float32)[..., 1:]) is None  # base off by 4 bytes
    assert strides(torch.empty(2, 3, 8, 5, dtype=torch.float32).transpose(2, 3)) is None  # D not innermost
    # A size-1 dim is only read at index 0: any 16-byte multiple serves, even where torch says 1.
    one = torch.empty(2, 1, 5, 8, dtype=torch.float16)[:, :, :, :]
    s = strides(one.as_strided(one.shape, (40, 1, 8, 1)))
    assert s is not None and s[1] * 2 % 16 == 0 and s[1] >= 40


class _Cfg:
    def __init__(self, tma, m=64):
        self.kwargs = {"BLOCK_M": m, "BLOCK_N": 64, "USE_TMA": tma}


def test_tma_mode_decides_which_configs_the_autotuner_may_try(monkeypatch):
    ptr, tma = _Cfg(False), _Cfg(True)
    args = lambda mode: {"TMA_MODE": mode, "PV_MODE": ta_rules.PV_OFF, "Lq": 512}  # noqa: E731
    prune = ta_rules.prune_fwd_configs
    monkeypatch.setattr(ta_rules, "_INTERPRET", False)
    monkeypatch.setattr(ta_rules, "_AUTOTUNE", True)
    assert prune([ptr, tma], args(ta_rules.TMA_OFF), BLOCK_D=64) == [ptr]
    assert prune([ptr, tma], args(ta_rules.TMA_ONLY), BLOCK_D=64) == [tma]
    assert prune([ptr, tma], args(ta_rules.TMA_AUTO), BLOCK_D=64) == [ptr, tma]
    # Nothing to time with: exactly one config must remain, the pointer one.
    monkeypatch.setattr(ta_rules, "_AUTOTUNE", False)
    assert prune([ptr, tma], args(ta_rules.TMA_AUTO), BLOCK_D=64) == [ptr]
    assert prune([ptr, tma], args(ta_rules.TMA_ONLY), BLOCK_D=64) == [tma]


def test_plain_only_tiles_are_offered_only_to_plain_launches(monkeypatch):
    """128 x 128 tiles spill with a mask, entropy, lse or the causal test (sm_90): only a launch
    with none of them may try them; the others keep the rest of the list."""
    ptr, big = _Cfg(False), _Cfg(False, m=128)
    ta_rules.set_config_limits(big, plain_only=True)
    monkeypatch.setattr(ta_rules, "_INTERPRET", False)
    monkeypatch.setattr(ta_rules, "_AUTOTUNE", True)
    args = {"TMA_MODE": ta_rules.TMA_OFF, "PV_MODE": ta_rules.PV_OFF, "Lq": 512}
    plain = dict(BLOCK_D=128, MASK_KIND=0, ENTROPY=False, STORE_LSE=False, IS_CAUSAL=False)
    assert ta_rules.prune_fwd_configs([ptr, big], args, **plain) == [ptr, big]
    for change in (dict(MASK_KIND=1), dict(MASK_KIND=2), dict(ENTROPY=True), dict(STORE_LSE=True),
                   dict(IS_CAUSAL=True)):
        assert ta_rules.prune_fwd_configs([ptr, big], args, **dict(plain, **change)) == [ptr], change


def test_plain_only_tiles_join_the_list_only_when_tuning(monkeypatch):
    """Without tuning (DHP_FX_TRITON_AUTOTUNE=0) the list stays the first pointer, decode and TMA
    configs (pruning leaves one per launch): a plain-only config there would be launched untimed."""
    monkeypatch.setattr(ta_rules, "_INTERPRET", False)
    monkeypatch.setattr(ta_rules, "_AUTOTUNE", False)
    untuned = ta_rules._fwd_configs()
    # first pointer, decode and TMA configs, and the first P@V-behind config of each loading kind
    assert len(untuned) == 5 and not any(ta_rules.config_limits(c).plain_only for c in untuned)
    assert [c.kwargs["PV_BEHIND"] for c in untuned] == [False, False, False, True, True]
    monkeypatch.setattr(ta_rules, "_AUTOTUNE", True)
    plain = [c for c in ta_rules._fwd_configs() if ta_rules.config_limits(c).plain_only]
    assert plain and all(c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 128 for c in plain)


def test_every_autotuned_config_survives_the_autotune_disk_cache(monkeypatch):
    """TRITON_CACHE_AUTOTUNING=1 stores config.__dict__ and rebuilds Config(**it): nothing may
    ride on our configs that Config() does not take (an H100 run crashed on exactly that)."""
    import triton

    from dhp_fx.kernels import triton_attention_bwd, triton_head_linear

    monkeypatch.setattr(ta_rules, "_INTERPRET", False)
    monkeypatch.setattr(ta_rules, "_AUTOTUNE", True)
    lists = [ta_rules._fwd_configs(), ta_rules._gated_attn_fwd.configs,
             triton_head_linear._OUT_CONFIGS, triton_head_linear._IN_CONFIGS, triton_head_linear._WGRAD_CONFIGS]
    lists += [k.configs for k in vars(triton_attention_bwd).values() if hasattr(k, "configs") and hasattr(k, "fn")]
    for configs in lists:
        for c in configs:
            rebuilt = triton.Config(**c.__dict__)
            assert rebuilt.all_kwargs() == c.all_kwargs()


def test_tma_is_the_default_only_for_hopper_prefill(monkeypatch):
    assert not ta_rules._uses_tma_by_default("cpu", 4096)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ta_rules._uses_tma_by_default("cuda", 64) and not ta_rules._uses_tma_by_default("cuda", 63)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not ta_rules._uses_tma_by_default("cuda", 4096)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("DHP_FX_TRITON_TMA", "0")
    assert not ta_rules._uses_tma_by_default("cuda", 4096)


@interpreted
def test_default_on_hopper_offers_tma_only_for_bhld_storage(monkeypatch):
    """tma=None on a (pretended) sm_90 card: the autotuner may pick descriptors for [B, H, L, D]
    storage; HF's [B, L, H, D] views stay on pointers until measured on a card. (The interpreter
    cannot time, so it runs the pointer variant for TMA_AUTO, as untuned compiled runs do.)"""
    ta = tk._ta
    monkeypatch.setattr(ta, "_uses_tma_by_default", lambda device, Lq: True)
    gen = torch.Generator().manual_seed(0)
    keep = torch.ones(1, 2, dtype=torch.bool)
    with launches() as seen:
        for model_layout in (False, True):
            q, k, v = qkv(1, 2, 2, 24, 24, 16, 16, torch.float32, gen, model_layout)
            ta.triton_gated_attention(q, k, v, keep)
    assert [x[:2] for x in seen] == [(ta.TMA_AUTO, False), (ta.TMA_OFF, False)]


@interpreted
@settings(deadline=None, max_examples=16, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]),
       Lq=st.sampled_from([17, 23, 40]), Lk=st.integers(1, 40), D=st.sampled_from([16, 24, 40]),
       dtype=st.sampled_from([torch.float32, torch.float16]), mask_kind=st.sampled_from(["none", "bool", "additive"]),
       is_causal=st.booleans(), keep_pattern=st.sampled_from(["random", "all", "one", "row_none"]),
       tma=st.booleans(), seed=st.integers(0, 2**16))
def test_compacted_and_early_exit_grids_agree_exactly(B, Hkv, group, Lq, Lk, D, dtype, mask_kind, is_causal,
                                                      keep_pattern, tma, seed):
    ta = tk._ta
    gen = torch.Generator().manual_seed(seed)
    Hq = Hkv * group
    q, k, v = qkv(B, Hq, Hkv, Lq, Lk, D, D, dtype, gen)
    keep = make_keep(keep_pattern, B, Hq, gen)
    mask = make_mask(mask_kind, "pad", B, Hq, Lq, Lk, dtype, gen)
    results = []
    with launches() as seen:
        for pairs in (None, ta.kept_pairs(keep)):
            out = torch.full((B, Hq, Lq, D), float("nan"), dtype=dtype)  # every element must be written
            results.append(ta.triton_gated_attention(q, k, v, keep, mask, is_causal, None, return_entropy=True,
                                                     return_lse=True, out=out, pairs=pairs, tma=tma))
    assert [x[2] for x in seen] == [False, True], "small shapes exit early unless a pair list is passed"
    for early, compacted in zip(*results):
        assert not torch.isnan(early).any()
        torch.testing.assert_close(early, compacted, atol=0, rtol=0)
    assert torch.equal(results[0][0][~keep], torch.zeros_like(results[0][0][~keep]))


@interpreted
@pytest.mark.parametrize("n_kept", [0, 1, 2, 3, 5, 12])
@pytest.mark.parametrize("share", [0, 1, 3])
def test_kept_programs_store_the_pruned_tiles_they_cover(monkeypatch, n_kept, share):
    """Every pruned tile gets its zeros (output 0, entropy 0, lse +inf) exactly once, whether a
    kept program stores it or the pruned program itself (shares running out, none kept, all kept)."""
    ta = tk._ta
    monkeypatch.setattr(ta, "PRUNED_TILES_PER_KEPT", share)
    monkeypatch.setattr(ta, "torch", tk.NanEmpty())
    gen = torch.Generator().manual_seed(n_kept)
    B, Hq, L, D = 3, 4, 20, 16
    keep = torch.zeros(B * Hq, dtype=torch.bool)
    keep[torch.randperm(B * Hq, generator=gen)[:n_kept]] = True
    keep = keep.view(B, Hq)
    q, k, v = qkv(B, Hq, 2, L, L, D, D, torch.float32, gen)
    out = torch.full((B, Hq, L, D), float("nan"))
    got, ent, lse = ta.triton_gated_attention(q, k, v, keep, None, True, None, return_entropy=True, return_lse=True,
                                              out=out, pairs=ta.kept_pairs(keep), entropy_rows=True)
    assert not (torch.isnan(got).any() or torch.isnan(ent).any() or torch.isnan(lse).any())
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))
    assert torch.equal(ent[~keep], torch.zeros_like(ent[~keep]))
    assert torch.isinf(lse[~keep]).all() and (lse[~keep] > 0).all()
    want = tk.reference(q, k, v, keep, None, True, None)[0]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@interpreted
def test_long_pairs_take_the_compacted_grid(monkeypatch):
    ta = tk._ta
    monkeypatch.setattr(ta, "COMPACT_MIN_WORK", 24 * 24)
    gen = torch.Generator().manual_seed(1)
    keep = make_keep("random", 2, 2, gen)
    with launches() as seen:
        for L in (23, 24):
            q, k, v = qkv(2, 2, 2, L, L, 16, 16, torch.float32, gen)
            ta.triton_gated_attention(q, k, v, keep)
    assert [x[2] for x in seen] == [False, True]


@interpreted
@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(lead=st.sampled_from([(), (1,), (3,), (2, 2)]), n=st.integers(0, 70), p=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       dtype=st.sampled_from([torch.bool, torch.uint8, torch.int32]), sliced=st.booleans(), seed=st.integers(0, 2**16))
def test_stable_partition_equals_a_stable_argsort(lead, n, p, dtype, sliced, seed):
    """One launch, several 16-wide chunks under the interpreter: kept indices first in order, then
    the pruned ones in order, and the kept count, as torch's stable argsort and sum give them."""
    gen = torch.Generator().manual_seed(seed)
    flags = (torch.rand(*lead, n + 3 * sliced, generator=gen) < p).to(dtype)
    if sliced:  # a row stride that is not the row length
        flags = flags[..., 3:]
    order, count = tk._ta.stable_partition(flags)
    assert order.dtype == count.dtype == torch.int32
    assert order.shape == flags.shape and count.shape == flags.shape[:-1]
    assert torch.equal(order.long(), torch.argsort((flags == 0).to(torch.int8), dim=-1, stable=True))
    assert torch.equal(count.long(), (flags != 0).sum(-1))


@interpreted
def test_stable_partition_refuses_a_scalar():
    with pytest.raises(ValueError, match="at least one dimension"):
        tk._ta.stable_partition(torch.tensor(True))


@interpreted
def test_tma_lse_only_pass_matches_pointer_loads():
    """The backward's recompute (no P@V, no output to store through a descriptor) on TMA."""
    ta = tk._ta
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv(2, 4, 2, 40, 33, 24, 24, torch.float16, gen, model_layout=True)
    keep = make_keep("random", 2, 4, gen)
    got = ta.triton_gated_attention(q, k, v, keep, None, True, None, return_entropy=True, return_lse=True,
                                    compute_out=False, tma=True)
    want = ta.triton_gated_attention(q, k, v, keep, None, True, None, return_entropy=True, return_lse=True,
                                     compute_out=False, tma=False)
    assert got[0] is None and want[0] is None
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@interpreted
@pytest.mark.parametrize("compact", [False, True], ids=["early_exit", "compacted"])
def test_batch_shared_keep_is_read_through_its_strides(compact):
    """A batch-shared gate hands over a stride-0 [B, H] expand: the early-exit grid reads it in
    place (no flat copy per layer and call), and both grids give what a contiguous mask gives."""
    gen = torch.Generator().manual_seed(3)
    B, H, L, D = 3, 4, 20, 16
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    row = torch.tensor([True, False, True, False])
    shared = row[None].expand(B, H)
    assert shared.stride() == (0, 1)
    pairs = tk._ta.kept_pairs(shared.contiguous()) if compact else None
    got = tk._ta.triton_gated_attention(q, k, v, shared, pairs=pairs)
    want = tk._ta.triton_gated_attention(q, k, v, shared.contiguous(), pairs=pairs)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(got[:, ~row], torch.zeros_like(got[:, ~row])) and got[:, row].abs().sum() > 0
