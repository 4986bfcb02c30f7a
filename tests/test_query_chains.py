"""Query chains: blocks whose K and V something else reads whole (a KV cache, a returned k/v) run
the kept query heads alone: Q rows and W_o columns gathered, every head's K/V as the graph
computes them. Exact against the zeroed-head reference; the K/V read elsewhere unchanged."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import dhp_fx
from dhp_fx import DHPConfig
from dhp_fx.testing import assert_outputs_close, attention_specs, build_attention, check_keep_mask, heads_zeroed
from zoo import hf_entries

ENTRIES = {e.name: e for e in hf_entries("sdpa")}


def _chains(opt):
    return [opt.gate(s).chain_module for s in opt.sites if s.compact_block]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(attention_specs(styles=("sdpa", "sdpa_gqa", "eager", "eager_div", "fused_rope"), returns_kv=True))
def test_kv_read_elsewhere_compacts_the_query_heads_exactly(spec):
    """Every style (views naming the head count included: the chain has them infer it; one
    projection for q, k and v cut by slices, with RoPE) compacts as a query chain when the
    module also returns its k and v; random keep masks (every head, one head, a row with none,
    rows apart) give the zeroed-head reference's output and the very same k and v."""
    module, inputs = build_attention(spec)
    opt = dhp_fx.optimize(module, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    (site,) = opt.sites
    assert set(site.skipped_projections) == {"q", "out"}, opt.report()
    if spec.heads > 1:
        assert site.compact_block, opt.report()
        assert opt._compiler.counters.get("compact_query_chain") == 1
        assert "kept query heads only" in opt.report()
    else:
        assert not site.compact_block
    keep = spec.keep_tensor()
    chains = _chains(opt)
    before = [(c.calls_query_heads, c.calls_dense, c.calls_masked) for c in chains]
    check_keep_mask(module, opt, inputs, keep)
    if chains:
        # every head kept: the dense originals; rows apart: on a CPU the masked dense block;
        # otherwise the kept heads alone
        counter = 1 if keep.all() else 2 if bool((keep != keep[:1]).any()) else 0
        after = (chains[0].calls_query_heads, chains[0].calls_dense, chains[0].calls_masked)
        assert [a - b for a, b in zip(after, before[0])] == [int(i == counter) for i in range(3)]


def _cache_tensors(cache) -> list[torch.Tensor]:
    caches = [getattr(cache, name) for name in ("self_attention_cache", "cross_attention_cache") if hasattr(cache, name)]
    return [t for c in (caches or [cache]) for layer in c.layers for t in (layer.keys, layer.values)]


def _extra_entry(name):
    """Decoders outside the zoo's SDPA list: GPTBigCode (StarCoder; one projection for every q
    head and one k and v head, split after an unsqueeze(1)), GPT-NeoX (Pythia; one projection
    laid out [q_h, k_h, v_h] head by head, viewed (B, L, H, 3D), transposed and chunked), BLOOM
    and Falcon (the same layout viewed (B, L, H, 3, D), role i taken as x[..., i, :])."""
    import transformers as T

    from zoo import ZooEntry, _hf, _ids

    def inputs():
        ids, mask = _ids()
        return {"input_ids": ids, "attention_mask": mask}

    ids = dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "bloom-eager":  # transformers has no SDPA BLOOM
        config = dict(hidden_size=32, n_layer=2, n_head=4, **ids)
        return ZooEntry(name, _hf(T.BloomConfig, T.BloomForCausalLM, "eager", **config), inputs, 2, 4, 4, 8)
    if name == "falcon-mha-sdpa":
        config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=False,
                      new_decoder_architecture=False, alibi=False, bias=True, **ids)
        return ZooEntry(name, _hf(T.FalconConfig, T.FalconForCausalLM, "sdpa", **config), inputs, 2, 4, 4, 8)
    if name == "gptbigcode-mqa-sdpa":
        config = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True, **ids)
        return ZooEntry(name, _hf(T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, "sdpa", **config), inputs, 2, 4, 1, 8)
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, rotary_pct=0.25, **ids)
    return ZooEntry(name, _hf(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, "sdpa", **config), inputs, 2, 4, 4, 8)


def _hf_case(name):
    entry = ENTRIES[name] if name in ENTRIES else _extra_entry(name)
    model, inputs = entry.build(), entry.inputs()  # HF's default: the model returns a KV cache
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    return entry, model, inputs, opt


def test_hf_decoders_with_a_kv_cache_run_query_chains():
    """Llama (GQA, RoPE), Qwen2 (one KV head), T5 (decoder self- and cross-attention, a
    position bias per head) and OPT (q scaled after its projection; view(B, -1, H, D), whose
    inferred length the chain names so that the head count can be inferred), Phi-3 (one
    projection for q, k and v, cut by slices the chain redoes at the kept heads' widths) and
    GPT-2 (one HF Conv1D for q, k and v, viewed at its full width and split), GPTBigCode (one
    projection for every q head and one k and v head, split after an unsqueeze) and GPT-NeoX (one
    projection laid out [q_h, k_h, v_h] head by head: each role's heads come from their own
    call, the graph's view, transpose and chunk redone per role; BLOOM and Falcon: the same
    layout viewed (B, L, H, 3, D)) with their default cache: every site whose K/V the cache
    reads is a
    query chain (T5's encoder stays a whole block), exact with shared and per-row masks, the
    cache's K and V those of the reference, and every head again with the gates open."""
    for name in ("llama-sdpa", "qwen2-sdpa", "t5-sdpa", "opt-sdpa", "phi3-sdpa", "gpt2-sdpa", "gptbigcode-mqa-sdpa",
                 "gpt-neox-sdpa", "bloom-eager", "falcon-mha-sdpa"):
        entry, model, inputs, opt = _hf_case(name)
        query = [s for s in opt.sites if s.compact_block and set(s.skipped_projections) == {"q", "out"}]
        expect = 4 if name.startswith("t5") else entry.sites
        assert len(query) == expect and all(s.compact_block for s in opt.sites), opt.report()
        assert opt._compiler.counters.get("compact_query_chain") == expect
        g = torch.Generator().manual_seed(3)
        shared = torch.zeros(entry.heads, dtype=torch.bool)
        shared[torch.randperm(entry.heads, generator=g)[: entry.heads // 2]] = True
        rows = shared[None].repeat(entry.batch, 1)
        rows[1, shared.nonzero()[0]] = False  # the second row keeps one head fewer
        chains = [opt.gate(s).chain_module for s in query]
        # rows that decide apart run, on a CPU, every head densely with the pruned ones zeroed
        # (compact_block.MASKED_DENSE_DEVICES)
        for keep, counter in ((shared, "calls_query_heads"), (rows, "calls_masked")):
            before = sum(getattr(c, counter) for c in chains)
            check_keep_mask(model, opt, inputs, keep)
            assert sum(getattr(c, counter) for c in chains) - before == len(chains), (name, counter)
        opt.set_keep_mask(rows)
        with torch.no_grad(), heads_zeroed(model, opt.sites, {s.name: rows for s in opt.sites}):
            got, want = opt(**inputs), model(**inputs)
        opt.set_keep_mask(None)
        assert_outputs_close(_cache_tensors(got.past_key_values), _cache_tensors(want.past_key_values),
                             what=f"{name} cache")
        opt.set_keep_ratio(1.0)
        with torch.no_grad():
            assert_outputs_close(opt(**inputs), model(**inputs), what=f"{name} gates open")


@pytest.mark.parametrize("name", ["llama-sdpa", "gpt2-sdpa", "gptbigcode-mqa-sdpa", "gpt-neox-sdpa", "bloom-eager",
                                  "falcon-mha-sdpa"])
def test_generate_runs_query_chains_at_every_step(name):
    """Greedy generation with a KV cache: prefill and each one-token step run the query chains
    (gathered once: the decision is static), and the logits equal those of the same pruning
    through the head ops. A step's K/V are the cache's rows and the step's own, concatenated
    along the sequence: GPT-2's, GPTBigCode's and GPT-NeoX's fused projections are still found
    (and their k/v cuts) through that concatenation; GPTBigCode cuts its roles after an
    unsqueeze, GPT-NeoX head by head."""
    entry, model, inputs, opt = _hf_case(name)
    heads_ops = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static", compact_heads=False),
                                example_inputs=inputs)
    keep = torch.tensor([True, False, True, True])  # both KV groups touched: only query heads compact
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    chains = _chains(opt)
    before = [(c.calls_query_heads, c.gathers) for c in chains]
    with torch.no_grad():
        runs = []
        for m in (opt, heads_ops):
            m.set_keep_mask(keep)
            runs.append(m.generate(**inputs, **kwargs))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert_outputs_close(runs[0].logits, runs[1].logits, what="logits, query chains vs head ops")
    calls = [(c.calls_query_heads - b[0], c.gathers - b[1]) for c, b in zip(chains, before)]
    assert calls == [(4, 1)] * entry.sites  # prefill + 3 one-token steps, one gather


def test_traced_query_chains_run_as_opaque_ops():
    """Under aot_eager each query chain is one dhp::run_chain (the region from the gate to the
    output projection; K/V enter it from the graph), with the outputs of the eager chains, also
    through generate()."""
    entry = ENTRIES["llama-sdpa"]
    eager = dhp_fx.optimize(entry.build(), DHPConfig(compiler="eager", keep_ratio=0.5, scoring="static"))
    traced = dhp_fx.optimize(entry.build(), DHPConfig(compiler="aot_eager", keep_ratio=0.5, scoring="static"))
    inputs = entry.inputs()
    with torch.no_grad():
        for _ in range(2):
            got, want = traced(**inputs), eager(**inputs)
            assert_outputs_close(got.logits, want.logits, atol=1e-6)
            assert_outputs_close(_cache_tensors(got.past_key_values), _cache_tensors(want.past_key_values))
    counters = traced._compiler.counters
    assert counters["compact_query_chain"] == counters["opaque_chains"] == entry.sites, counters
    assert [c.calls_query_heads for c in _chains(traced)] == [2] * entry.sites
    assert [c.gathers for c in _chains(traced)] == [1] * entry.sites
    # generate(): one-token steps over a growing cache (K/V enter the region with a symbolic
    # length once Dynamo goes dynamic), the tokens and logits of the eager chains
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        got, want = traced.generate(**inputs, **kwargs), eager.generate(**inputs, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert_outputs_close(got.logits, want.logits, atol=1e-6)
    assert traced._compiler.counters["opaque_chains"] == traced._compiler.counters["compact_query_chain"] > entry.sites


@pytest.mark.parametrize("name", ["opt-sdpa", "gpt2-sdpa"])
def test_query_chains_under_dynamic_lengths(name):
    """OPT's view(B, -1, H, D): a chain names the length so that the head count can be inferred;
    GPT-2 views its Conv1D output as torch.Size([B, L, 3 * E]) and its heads' output as
    view(-1, E): the chain reads those widths off the input dims that hold the same features.
    After Dynamo's switch to dynamic shapes the sizes are symbolic and read at run time (size
    calls): one graph serves every later length, exactly."""
    entry = ENTRIES[name]
    model = entry.build()
    opt = dhp_fx.optimize(model, DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=entry.inputs())
    keep = torch.tensor([True, False, True, False])
    for length in (5, 9, 11):
        ids = torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(length))
        check_keep_mask(model, opt, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, keep)
    # the second graph, dynamic, served lengths 9 and 11 and holds a query chain per site
    assert opt.graphs_compiled == 2
    assert opt._compiler.counters["compact_query_chain"] == 2 * entry.sites
    assert [c.calls_query_heads for c in _chains(opt)] == [4] * entry.sites  # the capture call, 3 checks
