"""The integrated path on a GPU: optimize() -> dhp::gated_attention -> Triton, end to end.

    python benchmarks/gpu_check.py [--device cuda] [--out DIR] [--quick]

``benchmarks/bench_attention.py --check`` validates the kernel alone; this checks what users run:
  1. tiny BERT / GPT-2 / Llama-GQA models (random weights) in fp32, fp16 and bf16: every gate open
     equals the original model, and random per-sample keep masks equal the zeroed-head reference
     (relative error ‖out − ref‖ / ‖ref‖ against the dtype's tolerance);
  1a. the head-skipping projection kernels alone, every loading kind forced, on NaN-filled memory;
  1b. host syncs: one forward of each gating mode under torch.cuda.set_sync_debug_mode("error")
     (the gated op and the head-skipping projections read masks on the device; any sync left is
     reported with the op that made it);
  2. training through the op: two distillation steps (bf16 autocast on CUDA), finite loss, every
     student weight that should learn gets a gradient;
  3. a BERT encoder end to end (BERT-base shape, 12 x 768, random weights: timing does not depend
     on them, and the device machine has no model hub), batch x seq tokens in the chosen dtype:
     dense vs optimize() with static (batch-shared, calibrated) and router (per-sample) gates at
     keep p = 1, .75, .5, .25 — median ms over CUDA-synchronised calls, and the ratio to dense.
Prints one table per part; with --out, writes the same as JSON there. On a machine without CUDA,
``--device cpu --quick`` runs the same code small (what the test suite does).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def tiny_models(dtype, device, width: int = 128, heads: int = 8, layers: int = 2):
    """BERT, GPT-2 and Llama (two KV heads) of two layers; the interpreter asks for narrower and
    shallower ones."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    models = {
        "bert": BertModel(BertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                     intermediate_size=2 * width, vocab_size=512)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=heads, vocab_size=512, n_positions=256)),
        "llama-gqa": LlamaForCausalLM(LlamaConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                                  num_key_value_heads=2, intermediate_size=2 * width,
                                                  vocab_size=512)),
    }
    return {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_exactness(device, dtypes, batch, seq, width: int = 128, heads: int = 8, layers: int = 2) -> list[dict]:
    import dhp_fx
    from dhp_fx.testing import heads_zeroed

    rows = []
    for dtype in dtypes:
        for name, model in tiny_models(dtype, device, width, heads, layers).items():
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(3, 512, (batch, seq), generator=g).to(device)
            mask = torch.ones_like(ids)
            mask[-1, seq // 2:] = 0
            inputs = {"input_ids": ids, "attention_mask": mask}
            opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=1.0), example_inputs=inputs)
            with torch.no_grad():
                ref = _out(model(**inputs))
                open_err = rel_err(_out(opt(**inputs)), ref)
                keep = {s.name: torch.rand(batch, s.num_heads, generator=g).to(device) < 0.5 for s in opt.sites}
                for k in keep.values():
                    k[:, 0] = True  # a row with no head left is legal, but its reference is all bias
                opt.set_keep_mask(keep)
                got = _out(opt(**inputs))
                opt.set_keep_mask(None)
                with heads_zeroed(model, opt.sites, keep):
                    want = _out(model(**inputs))
            mask_err = rel_err(got, want)
            ok = open_err <= TOL[dtype] and mask_err <= TOL[dtype] and bool(torch.isfinite(got).all())
            row = {"model": name, "dtype": str(dtype).split(".")[-1], "sites": len(opt.sites),
                   "gates_open_rel_err": open_err, "keep_mask_rel_err": mask_err}
            # every model compacts: BERT and GPT-2 whole, Llama (RoPE, GQA) as a chain
            errs = _compact_errors(dhp_fx, heads_zeroed, model, {**inputs, "use_cache": False}, g, device)
            row.update(errs)
            ok = ok and all(e <= TOL[dtype] for e in errs.values())
            rows.append({**row, "ok": ok})
    return rows


def check_traced(device, dtype, batch, seq, compiler: str, width: int = 128, heads: int = 8,
                 layers: int = 2, models=("bert", "llama-gqa")) -> list[dict]:
    """Static gates at p = .5 under a downstream compiler that traces the graph, against the same
    gates run eagerly: BERT's blocks and Llama's RoPE chains run as opaque ops, each calling its
    gate. Counts what became opaque."""
    import dhp_fx

    rows = []
    for name, model in tiny_models(dtype, device, width, heads, layers).items():
        if name not in models:
            continue
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(3, 512, (batch, seq), generator=g).to(device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        outs, opts = [], []
        for comp in ("eager", compiler):
            opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static", compiler=comp),
                                  example_inputs=inputs)
            with torch.no_grad():
                outs.append(_out(opt(**inputs)))
            opts.append(opt)
        counters, sites = opts[1]._compiler.counters, len(opts[1].sites)
        kind = "opaque_blocks" if name == "bert" else "opaque_chains"
        want = {kind: sites, "opaque_block_gates": sites}
        err = rel_err(outs[1], outs[0])
        ok = (err <= TOL[dtype] and bool(torch.isfinite(outs[1]).all()) and sites > 0
              and all(counters.get(k) == n for k, n in want.items()))
        rows.append({"model": name, "compiler": compiler, "dtype": str(dtype).split(".")[-1], "rel_err": err,
                     **{k: counters.get(k) for k in want}, "sites": sites, "ok": ok})
    return rows


def _compact_errors(dhp_fx, heads_zeroed, model, inputs, g, device) -> dict:
    """Compact blocks (static gates: every block compacted, whole or as a chain) with half the KV
    groups in the union, shared by the rows (cuBLAS + SDPA on the kept heads) and per row inside it
    (the gated op on the kept heads), against the zeroed-head reference. Raises if a block ran
    every head."""
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
    blocks = [m for s in opt.sites for m in (opt.gate(s).block_module, opt.gate(s).chain_module)]
    if not opt.sites or not all(s.compact_block for s in opt.sites):
        raise AssertionError(f"not every block compacted: {[s.compact_block for s in opt.sites]}")
    from dhp_fx import compact_block

    batch = inputs["input_ids"].shape[0]
    errs = {}
    for label in ("shared", "rows", "apart"):
        keep = {}
        for s in opt.sites:
            group = s.num_heads // s.num_kv_heads  # half the KV groups, every head of each
            perm = torch.randperm(s.num_kv_heads, generator=g)
            halves = [perm[: s.num_kv_heads // 2], perm[s.num_kv_heads // 2:]]
            k = torch.zeros(batch, s.num_heads, dtype=torch.bool)
            for b in range(batch):
                # "apart": each row its own half, so only per-row compaction (compact_rows) leaves heads out
                groups = halves[b % 2] if label == "apart" else halves[0]
                k[b, (groups[:, None] * group + torch.arange(group)).flatten()] = True
            if label == "rows":
                union = k[0].clone()
                k &= torch.rand(batch, s.num_heads, generator=g) < 0.7
                k[0] = union
            keep[s.name] = k.to(device)
        before = sum(b.calls_compact for b in blocks)
        # "apart" forces per-row blocks on this device, whatever the cost test says of its rows
        policy = dict(ROWS_DEVICES=compact_block.ROWS_DEVICES + (device,), ROWS_MIN_SAVED_FLOPS_PER_WEIGHT=0.0)
        with _block_policy(**(policy if label == "apart" else {})), torch.no_grad():
            opt.set_keep_mask(keep)
            got = _out(opt(**inputs))
            opt.set_keep_mask(None)
            with heads_zeroed(model, opt.sites, keep):
                want = _out(model(**inputs))
        if sum(b.calls_compact for b in blocks) - before != len(opt.sites):
            raise AssertionError(f"compact {label}: a block ran every head")
        errs[f"compact_{label}_rel_err"] = rel_err(got, want) if bool(torch.isfinite(got).all()) else float("inf")
    return errs


def check_generate(device, dtype=torch.float32, batch: int = 2, prompt: int = 9, new: int = 4, width: int = 128,
                   heads: int = 8, layers: int = 2, in_place: bool | None = None) -> list[dict]:
    """Greedy generate() with HF's KV cache, static gates pinned to keep two of every three query
    heads (every KV group touched): each block is a query chain, and on a GPU its attention reads
    each kept head's cached K/V in place (the decode kernels' head map). Against the same pruning
    through the head-skipping ops (``compact_heads=False``): the same tokens and logits, each step
    a query-chain call, and each chain's attention a head-map launch where ``in_place`` (default:
    on a GPU), none elsewhere."""
    from unittest import mock

    import dhp_fx
    from dhp_fx.kernels import compact_heads

    rows = []
    for name, model in tiny_models(dtype, device, width, heads, layers).items():
        if name == "bert":
            continue
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(3, 512, (batch, prompt), generator=g).to(device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        chains = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static"), example_inputs=inputs)
        head_ops = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring="static", compact_heads=False),
                                   example_inputs=inputs)
        keep = (torch.arange(heads) % 3 != 1).to(device)
        modules = [chains.gate(s).chain_module for s in chains.sites if s.compact_block]
        before = sum(m.calls_query_heads for m in modules)
        launches = []
        real = compact_heads._in_place_decode

        def spy(*args):
            found = real(*args)
            launches.append(found is not None)
            return found

        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0)
        runs = []
        with torch.no_grad(), mock.patch.object(compact_heads, "_in_place_decode", spy):
            for m in (chains, head_ops):
                m.set_keep_mask(keep)
                runs.append(m.generate(**inputs, **kwargs))
        calls = sum(m.calls_query_heads for m in modules) - before
        # Step i's logits follow from the tokens before it: compared while both runs agree on those.
        # Below fp32 a near tie may pick another token; fp32 must agree throughout.
        new_tokens = [r.sequences[:, prompt:] for r in runs]
        agree = int((new_tokens[0] == new_tokens[1]).all(0).long().cumprod(0).sum())
        same = agree == new
        err = max(rel_err(a, b) for a, b in zip(runs[0].logits[:agree + 1], runs[1].logits[:agree + 1]))
        want = device != "cpu" if in_place is None else in_place
        ok = ((same or dtype != torch.float32) and err <= TOL[dtype] and len(modules) == len(chains.sites) == layers
              and calls == new * layers and len(launches) == calls and all(x == want for x in launches))
        rows.append({"model": name, "dtype": str(dtype).split(".")[-1], "query_chains": len(modules),
                     "chain_calls": calls, "in_place_calls": sum(launches), "same_tokens": same,
                     "logits_rel_err": err, "ok": ok})
    return rows


def check_syncs(device) -> list[dict]:
    """Which gating modes run a forward without a device-to-host sync (CUDA only)."""
    import dhp_fx

    if device != "cuda":
        return []
    model = tiny_models(torch.float16, device)["bert"]
    g = torch.Generator().manual_seed(4)
    inputs = {"input_ids": torch.randint(3, 512, (4, 64), generator=g).to(device),
              "attention_mask": torch.ones(4, 64, dtype=torch.long, device=device)}
    rows = []
    for scoring, granularity in (("probe", "sample"), ("static", "batch"), ("router", "sample"), ("router", "batch")):
        opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring=scoring, granularity=granularity),
                              example_inputs=inputs)
        with torch.no_grad():
            opt(**inputs)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt(**inputs)
                found = None
            except RuntimeError as e:
                found = str(e).splitlines()[0][:200]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        rows.append({"gating": f"{scoring}/{granularity}", "sync": found})
    return rows


def check_training(device) -> dict:
    import dhp_fx
    from dhp_fx.distill import DistillConfig

    teacher = tiny_models(torch.float32, device)["gpt2"]
    student = dhp_fx.optimize(copy.deepcopy(teacher), dhp_fx.DHPConfig(keep_ratio=0.5))
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(3, 512, (4, 32), generator=g).to(device)} for _ in range(2)]
    grads = {}
    hooks = [p.register_hook(lambda grad, n=n: grads.__setitem__(n, float(grad.abs().sum())))
             for n, p in student.model.named_parameters() if "attn" in n]
    result = dhp_fx.distill(student, teacher, data, DistillConfig(steps=2, progress=False))
    for h in hooks:
        h.remove()
    losses = [r["loss"] for r in result.history]
    return {"amp": device == "cuda", "losses": losses, "finite": all(math.isfinite(x) for x in losses),
            "attn_params_with_grad": sum(v > 0 for v in grads.values()), "attn_params": len(grads)}


def _median_ms(fn, reps: int, device) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_encoder(device, dtype, batch, seq, reps, small: bool) -> list[dict]:
    import dhp_fx
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    shape = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256) if small else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    model = BertModel(BertConfig(vocab_size=30522, attn_implementation="sdpa", **shape)).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=g).to(device),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}
    from dhp_fx.cuda_graphs import CUDAGraphRunner

    graphs = device == "cuda"  # CUDA graphs: one host call replays the whole forward
    rows = []
    with torch.no_grad():
        dense = _median_ms(lambda: model(**inputs), reps, device)
        rows.append({"variant": "dense", "p": 1.0, "ms": dense, "vs_dense": 1.0})
        if graphs:
            dense_graphed = CUDAGraphRunner(model)
            ms = _median_ms(lambda: dense_graphed(**inputs), reps, device)
            rows.append({"variant": "dense + cuda graphs", "p": 1.0, "ms": ms, "vs_dense": ms / dense})
        for p in (1.0, 0.75, 0.5, 0.25):
            variants = [("static", "batch", {}), ("router", "sample", {})]
            if p < 1.0:  # a batch-shared router: the union is capped at p, so its blocks compact
                variants.append(("router", "batch", {"union_cap": p}))
            for scoring, granularity, extra in variants:
                label = f"{scoring}/{granularity}" + (f" (union cap {p:g})" if extra else "")
                opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=p, scoring=scoring, granularity=granularity,
                                                              **extra), example_inputs=inputs)
                if scoring == "static" and p < 1.0:
                    dhp_fx.calibrate(opt, [inputs], measure_flops=False)
                    rows.extend(_time_heads_removed(dhp_fx, opt, inputs, p, dense, reps, device, graphs))
                if p in (1.0, 0.5) or not graphs:  # eager forwards are host-bound: two points say enough
                    ms = _median_ms(lambda: opt(**inputs), reps, device)
                    rows.append({"variant": label, "p": p, "ms": ms, "vs_dense": ms / dense})
                    if graphs and p == 0.5:
                        # Where the GPU time goes (device time per kernel; host gaps do not count).
                        rows[-1]["kernels"] = _kernel_table(lambda: opt(**inputs))
                if graphs:
                    runner = opt.cuda_graphed()
                    ms = _median_ms(lambda: runner(**inputs), reps, device)
                    rows.append({"variant": f"{label} + cuda graphs", "p": p, "ms": ms,
                                 "vs_dense": ms / dense, "graphs_captured": runner.num_graphs})
                if graphs and scoring == "static" and p == 0.5:
                    # A/B: the same gates through the head ops, H heads wide (compact_heads=False)
                    rows.append(_time_head_ops(dhp_fx, model, inputs, p, dense, reps, device))
                if graphs and scoring == "router" and not extra and p == 0.5:
                    # A/B: the router as torch ops (DHP_FX_TRITON_ROUTER=0, read per call and so
                    # at capture) against its two Triton launches above.
                    with env_set("DHP_FX_TRITON_ROUTER", "0"):
                        runner = opt.cuda_graphed()
                        ms = _median_ms(lambda: runner(**inputs), reps, device)
                    rows.append({"variant": "router/sample, torch-op router + cuda graphs", "p": p, "ms": ms,
                                 "vs_dense": ms / dense})
                if graphs and scoring == "router" and not extra and p in (0.5, 0.25):
                    rows.append(_time_rows_on_gpu(opt, inputs, p, dense, reps, device))
                    rows.append(_time_rows_on_gpu(opt, inputs, p, dense, reps, device, "masked"))
        if graphs:
            rows[0]["kernels"] = _kernel_table(lambda: model(**inputs))
    return rows


@contextlib.contextmanager
def _block_policy(**settings):
    """compact_block's path switches (and row_cost's bound) set for a with-block, restored after
    (a failed check included)."""
    from dhp_fx import compact_block
    from dhp_fx.kernels import row_cost

    homes = {name: row_cost if hasattr(row_cost, name) else compact_block for name in settings}
    saved = {name: getattr(homes[name], name) for name in settings}
    for name, value in settings.items():
        setattr(homes[name], name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(homes[name], name, value)


def _time_rows_on_gpu(opt, inputs, p, dense, reps, device, path: str = "rows") -> dict:
    """Per-sample router decisions through each row's own heads (kernels/compact_rows), which
    dhp_fx.compact_block takes on CPU only, whatever the cost test says: per-row weight gathers
    against the head ops, graphed. path="masked": the dense block with pruned heads zeroed
    (compact_block.MASKED_DENSE_DEVICES, also CPU only by default) instead."""
    from dhp_fx import compact_block

    if path == "rows":
        policy = dict(ROWS_DEVICES=compact_block.ROWS_DEVICES + (device,), ROWS_MIN_SAVED_FLOPS_PER_WEIGHT=0.0)
        counter, variant = "calls_rows", "router/sample, each row's own heads (compact_rows) + cuda graphs"
    else:
        policy = dict(MASKED_DENSE_DEVICES=compact_block.MASKED_DENSE_DEVICES + (device,))
        counter, variant = "calls_masked", "router/sample, dense block with pruned heads zeroed + cuda graphs"
    with _block_policy(**policy):
        blocks = [opt.gate(s).block_module for s in opt.sites]
        before = sum(getattr(b, counter) for b in blocks)
        runner = opt.cuda_graphed()
        ms = _median_ms(lambda: runner(**inputs), reps, device)
        ran = sum(getattr(b, counter) for b in blocks) > before
    return {"variant": variant, "p": p, "ms": ms, "vs_dense": ms / dense, f"{path}_ran": ran}


def _time_head_ops(dhp_fx, model, inputs, p, dense, reps, device) -> dict:
    """Static gates at p through the head-skipping ops (compact_heads=False), graphed."""
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=p, scoring="static", granularity="batch",
                                                  compact_heads=False), example_inputs=inputs)
    dhp_fx.calibrate(opt, [inputs], measure_flops=False)
    runner = opt.cuda_graphed()
    ms = _median_ms(lambda: runner(**inputs), reps, device)
    return {"variant": "static/batch, head ops (compact_heads=False) + cuda graphs", "p": p, "ms": ms,
            "vs_dense": ms / dense}


def _bert_base_graphed(device, dtype, batch, seq, reps, seed):
    """(BERT-base with random weights, random inputs batch x seq, [its dense row, graphed])."""
    from transformers import BertConfig, BertModel
    from dhp_fx.cuda_graphs import CUDAGraphRunner

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, attn_implementation="sdpa")).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=g).to(device),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}
    with torch.no_grad():
        runner = CUDAGraphRunner(model)
        dense = _median_ms(lambda: runner(**inputs), reps, device)
    return model, inputs, [{"variant": f"dense, {batch} x {seq} + cuda graphs", "p": 1.0, "ms": dense,
                            "vs_dense": 1.0}]


def time_single_input(device, dtype, seq, reps) -> list[dict]:
    """BERT-base on one input (the paper's per-input setting): a per-sample router's blocks run
    the kept heads alone (compact_heads), against dense and against the head ops. Graphed only:
    at batch 1 an eager forward measures the host."""
    import dhp_fx

    model, inputs, rows = _bert_base_graphed(device, dtype, 1, seq, reps, seed=5)
    dense = rows[0]["ms"]
    with torch.no_grad():
        for p, compact in ((0.5, True), (0.5, False), (0.25, True)):
            opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=p, scoring="router", compact_heads=compact),
                                  example_inputs=inputs)
            runner = opt.cuda_graphed()
            ms = _median_ms(lambda: runner(**inputs), reps, device)
            how = "kept heads only" if compact else "head ops, compact_heads=False"
            rows.append({"variant": f"router/sample, 1 x {seq}, {how} + cuda graphs", "p": p, "ms": ms,
                         "vs_dense": ms / dense})
            if compact and p == 0.5:  # session 10 saw 2.2x dense here, with or without compaction: where?
                rows[-1]["kernels"] = _kernel_table(lambda: opt(**inputs))
        rows[0]["kernels"] = _kernel_table(lambda: model(**inputs))
    return rows


def time_small_batch_rows(device, dtype, batch, seq, reps) -> list[dict]:
    """BERT-base, a few inputs (batch 4 x 128): per-sample router decisions, whose union soon
    holds every head, through the head ops (the GPU default) against each row's own heads
    (compact_rows, one Triton gather), graphed: where on the batch axis per-row blocks pay."""
    import dhp_fx

    model, inputs, rows = _bert_base_graphed(device, dtype, batch, seq, reps, seed=7)
    dense = rows[0]["ms"]
    with torch.no_grad():
        for p in (0.5, 0.25):
            opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=p, scoring="router"), example_inputs=inputs)
            runner = opt.cuda_graphed()
            ms = _median_ms(lambda: runner(**inputs), reps, device)
            rows.append({"variant": f"router/sample, {batch} x {seq} + cuda graphs", "p": p, "ms": ms,
                         "vs_dense": ms / dense})
            for path in ("rows", "masked"):
                rows.append(_time_rows_on_gpu(opt, inputs, p, dense, reps, device, path))
                rows[-1]["variant"] += f", {batch} x {seq}"
    return rows


def time_llama_prefill(device, dtype, seq, reps) -> list[dict]:
    """A Llama-shaped decoder (1024 wide, 8 layers, 16 heads over 4 KV heads, RoPE; random
    weights) on one prompt without a cache: static gates' blocks compact as chains (RoPE stays
    in the graph), whole KV groups or the kept query heads over every group, against dense and
    the head ops. Graphed."""
    import dhp_fx
    from transformers import LlamaConfig, LlamaModel
    from dhp_fx.cuda_graphs import CUDAGraphRunner

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, attn_implementation="sdpa")
    model = LlamaModel(config).to(device=device, dtype=dtype).eval()
    inputs = {"input_ids": torch.randint(100, 30000, (1, seq), generator=torch.Generator().manual_seed(6)).to(device),
              "use_cache": False}
    rows = []
    with torch.no_grad():
        runner = CUDAGraphRunner(model)
        dense = _median_ms(lambda: runner(**inputs), reps, device)
        rows.append({"variant": f"llama-like dense, 1 x {seq} + cuda graphs", "p": 1.0, "ms": dense, "vs_dense": 1.0})
        # groups=False: heads decided one by one, so kept heads touch every KV group and the
        # chains run the kept query heads over every group's K/V (session 17, CPU-timed only)
        for p, compact, groups in ((0.5, True, True), (0.5, False, True), (0.25, True, True), (0.5, True, False),
                                   (0.5, False, False)):
            opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=p, scoring="static", prune_kv_groups=groups,
                                                          compact_heads=compact), example_inputs=inputs)
            runner = opt.cuda_graphed()
            ms = _median_ms(lambda: runner(**inputs), reps, device)
            how = ("compact chains" if compact else "head ops") + ("" if groups else ", heads one by one")
            rows.append({"variant": f"llama-like static/sample, 1 x {seq}, {how} + cuda graphs", "p": p, "ms": ms,
                         "vs_dense": ms / dense})
    return rows


def _time_heads_removed(dhp_fx, opt, inputs, p, dense, reps, device, graphs) -> list[dict]:
    """The deployment of a batch-shared keep set: ``static_prune`` cuts the heads calibration
    never kept out of the weights, and the model runs as a plain (smaller) HF model, cuBLAS and
    SDPA, no dhp_fx op left. This is the paper's setting (params and FLOPs both fall)."""
    from dhp_fx.cuda_graphs import CUDAGraphRunner

    pruned = dhp_fx.static_prune(opt)
    params = pruned.params_after / pruned.params_before
    ms = _median_ms(lambda: pruned.model(**inputs), reps, device)
    rows = [{"variant": "static_prune (heads removed)", "p": p, "ms": ms, "vs_dense": ms / dense, "params": params}]
    if graphs:
        runner = CUDAGraphRunner(pruned.model)
        ms = _median_ms(lambda: runner(**inputs), reps, device)
        rows.append({"variant": "static_prune (heads removed) + cuda graphs", "p": p, "ms": ms,
                     "vs_dense": ms / dense, "params": params})
    return rows


def _sibling_scripts_importable() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


def _kernel_table(fn, top: int = 12) -> str:
    _sibling_scripts_importable()
    from profile_overhead import device_kernels

    return device_kernels(torch, fn, top, calls=3)


@contextlib.contextmanager
def env_set(name: str, value: str):
    """The environment variable set for the block (dhp_fx reads these switches per call), restored
    after it, absent again if it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def check_projections(device, dims=(64, 128), lengths=(128, 100), K: int = 256,
                      dtypes=(torch.bfloat16, torch.float16)) -> list[dict]:
    """The head-skipping projection kernels alone, each loading kind forced (pointer loads one
    head per program, two heads per program, TMA descriptors), against float64 references: [H]
    masks and [B, H] masks whose samples (100 rows) straddle row blocks or (128 rows) do not, both
    weight layouts. Outputs land in memory just filled with NaN, so an unwritten element fails.
    ``dims``/``lengths``/``K``/``dtypes`` shrink it for the interpreter (lengths: one a multiple of
    the row block, one not)."""
    from dhp_fx.kernels import triton_head_linear as thl

    g = torch.Generator(device=device).manual_seed(0)
    kinds = [("one head", False, "0"), ("two heads", False, "1"), ("descriptors", True, "0"),
             ("two heads, descriptors", True, "1")]
    masks = (("[H]", lengths[0]), ("[B,H]", lengths[0]), ("[B,H] straddling", lengths[1]))
    rows = []
    for dtype, D, (kind, tma, pairs) in itertools.product(dtypes, dims, kinds):
        if pairs == "1" and D > thl.PAIR_MAX_BLOCK_D:
            continue
        for (mask, L), in_out in itertools.product(masks, (False, True)):
            with env_set("DHP_FX_HEAD_PAIRS", pairs):
                errs = _projection_errors(thl, device, g, dtype, D, K, L, mask != "[H]", in_out, tma)
            rows.append(dict(dtype=str(dtype).split(".")[-1], D=D, loading=kind, mask=mask, in_out=in_out,
                             out_err=errs[0], in_err=errs[1], ok=all(e <= TOL[dtype] for e in errs)))
    return rows


def _projection_errors(thl, device, g, dtype, D, K, L, per_sample, in_out, tma, B=3, H=4):
    """Relative errors of head_linear_out and head_linear_in against float64 (NaN: a non-finite
    output, which fails every tolerance)."""
    from dhp_fx.kernels.head_linear import head_linear_in_reference, head_linear_out_reference

    keep = torch.rand(H, device=device, generator=g) < 0.6
    if per_sample:  # one sample keeps every head, one none, one some but not all
        keep = torch.rand(B, H, device=device, generator=g) < 0.6
        keep[0] = True
        keep[1] = False
        # a block straddling samples 1 and 2 then holds a head none of its rows keeps (the
        # case that went wrong through descriptors) and one that some of them keep
        keep[2, 0], keep[2, -1] = True, False

    def weight(rows, cols):
        w = (torch.randn(rows, cols, device=device, generator=g) / 16).to(dtype)
        return w.t().contiguous() if in_out else w

    x = torch.randn(B, L, K, device=device, generator=g).to(dtype)
    o = torch.randn(B, L, H * D, device=device, generator=g).to(dtype)
    errs = []
    for fn, ref, args in ((thl.head_linear_out_triton, head_linear_out_reference, (x, weight(H * D, K))),
                          (thl.head_linear_in_triton, head_linear_in_reference, (o, weight(K, H * D)))):
        torch.full((1 << 24,), float("nan"), device=device, dtype=dtype)  # freed: the output reuses it
        got = fn(*args, None, keep, D, in_out, tma=tma)
        want = ref(*(a.double() for a in args), None, keep, D, in_out)
        errs.append(rel_err(got, want) if torch.isfinite(got).all() else float("nan"))
    return errs


# Gradients of bf16/fp16 attention against float64: P and dS are rounded to the input dtype for
# their matmuls (about 2^-8 / 2^-11 relative per element), as in any flash backward.
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def check_backward(device, proj_cases=((torch.bfloat16, 128), (torch.float16, 64)), lengths=(128, 100),
                   K: int = 256,
                   attn_cases=((torch.bfloat16, 128, True, "bool"), (torch.float16, 64, False, "additive")),
                   attn_shape=(3, 4, 2, 100)) -> list[dict]:
    """Gradients through the Triton backward on the card against float64 autograd, where the
    interpreter cannot vouch for the compiled code (session 9 found a forward miscompiled by
    triton 3.6 that the interpreter ran right).

    Projections: ``head_linear_{out,in}_backward_triton`` with pointer loads and with TMA
    descriptors forced for the reductions they run, [H] masks and [B, H] masks whose samples
    straddle row blocks. Attention: ``dhp::gated_attention``'s autograd (Triton forward and
    backward on CUDA) with per-sample keeps (one sample keeps none), GQA, a padding mask and
    rows not a multiple of the block, causal and not. ``proj_cases``/``attn_cases`` shrink it for
    the interpreter, whose caller routes the op to the interpreted kernels."""
    from dhp_fx.kernels import triton_head_linear as thl
    from dhp_fx.kernels.head_linear import head_linear_in_reference, head_linear_out_reference

    _sibling_scripts_importable()
    from bench_attention import with_settings

    g = torch.Generator(device="cpu").manual_seed(5)
    rows = []

    def rand(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    B, H = 3, 4
    for (dtype, D), kind, L in itertools.product(proj_cases, ("pointers", "descriptors"), lengths):
        keep = torch.rand(B, H, generator=g) < 0.6
        keep[0], keep[1] = True, False
        keep[2, 0], keep[2, -1] = True, False
        keep = (keep if L != lengths[0] else keep[2]).to(device)  # [H] (some kept) at the aligned length
        tma = kind == "descriptors"
        forced = {(thl, name): _with_tma(getattr(thl, name), tma)
                  for name in ("head_linear_in_triton", "head_linear_out_triton")}
        for name, back, ref, x_shape, w_shape in (
                ("head_linear_out", thl.head_linear_out_backward_triton, head_linear_out_reference,
                 (B, L, K), (H * D, K)),
                ("head_linear_in", thl.head_linear_in_backward_triton, head_linear_in_reference,
                 (B, L, H * D), (K, H * D))):
            x, w = rand(*x_shape, dtype=dtype), rand(*w_shape, dtype=dtype, scale=1 / 16)
            bias = rand(w_shape[0], dtype=dtype)
            grad = rand(B, L, w_shape[0], dtype=dtype)
            got = with_settings(forced, lambda: back(grad, x, w, bias, keep, D, False))()
            xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, bias))
            ref(xd, wd, bd, keep, D, False).backward(grad.double())
            errs = [rel_err(a, b.grad) if torch.isfinite(a).all() else float("nan")
                    for a, b in zip(got, (xd, wd, bd))]
            rows.append(dict(part=name, dtype=str(dtype).split(".")[-1], D=D, loading=kind,
                             mask="[H]" if keep.dim() == 1 else "[B,H] straddling", dx_err=errs[0], dw_err=errs[1],
                             db_err=errs[2], ok=all(e <= TOL[dtype] for e in errs)))
    Ba, Hq, Hkv, La = attn_shape
    for dtype, D, causal, mask_kind in attn_cases:
        q, k, v = (rand(Ba, h, La, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
        keep = torch.rand(Ba, Hq, generator=g) < 0.6
        keep[0], keep[1] = False, True
        keep = keep.to(device)
        lengths_b = [La, La - 17, 1]  # key 0 always valid: no fully masked row
        valid = torch.arange(La)[None, :] < torch.tensor(lengths_b)[:, None]
        mask = valid[:, None, None, :].to(device)
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = torch.ops.dhp.gated_attention(*leaves, keep, mask, 0.0, causal, None)
        grad = rand(*out.shape, dtype=dtype)
        out.backward(grad)
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        _attention_reference(*ref_leaves, keep, valid.to(device), causal).backward(grad.double())
        errs = [rel_err(a.grad, b.grad) if torch.isfinite(a.grad).all() else float("nan")
                for a, b in zip(leaves, ref_leaves)]
        rows.append(dict(part="gated_attention", dtype=str(dtype).split(".")[-1], D=D, causal=causal,
                         mask=mask_kind, dq_err=errs[0], dk_err=errs[1], dv_err=errs[2],
                         ok=all(e <= GRAD_TOL[dtype] for e in errs)))
    return rows


def _with_tma(fn, tma: bool):
    def call(*args, **kwargs):
        kwargs.setdefault("tma", tma)
        return fn(*args, **kwargs)
    return call


def _attention_reference(q, k, v, keep, valid, causal):
    """Softmax attention in q's dtype (float64 here), GQA by repetition, padding keys masked,
    top-left causal, pruned heads zero."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = valid[:, None, None, :]
    if causal:
        L = q.shape[2]
        allowed = allowed & torch.ones(L, k.shape[2], dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return (p @ v) * keep[:, :, None, None].to(q.dtype)


def check_router(device, batch: int = 32, seq: int = 128, d: int = 768, heads: int = 12, width: int = 32) -> list[dict]:
    """The two-launch Triton router (RouterGate's inference path) against the torch router in
    float64: bf16/fp16/fp32 layer inputs, padding (one sample all padding), GELU exact and tanh,
    with and without the hidden layer. Scores are probabilities: absolute error, tolerance 1e-4.
    The fused top-k must equal decide_keep on the same scores."""
    import torch.nn as nn

    from dhp_fx.gates import decide_keep
    from dhp_fx.kernels import triton_router as tr
    from dhp_fx.strategies import _fused_router_args

    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for dtype, approximate, hidden in itertools.product((torch.bfloat16, torch.float16, torch.float32),
                                                        ("none", "tanh"), (width, 0)):
        layers = [nn.LayerNorm(d)] + ([nn.Linear(d, hidden), nn.GELU(approximate=approximate), nn.Linear(hidden, heads)]
                                      if hidden else [nn.Linear(d, heads)])
        router = nn.Sequential(*layers)
        with torch.no_grad():
            for p in router.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        router = router.to(device)
        x = torch.randn(batch, seq, d, generator=g).to(device=device, dtype=dtype)
        valid = torch.rand(batch, seq, generator=g).to(device) > 0.2
        valid[0] = False
        got = tr.router_scores_triton(x, valid, *_fused_router_args(router))
        w = valid.double()[..., None]
        want = torch.sigmoid(router.double()((x.double() * w).sum(1) / w.sum(1).clamp_min(1.0)))
        err = (got.double() - want).abs().max().item() if torch.isfinite(got).all() else float("nan")
        # the fused top-k against the gates' own decision on the same scores
        # (the two launches are separate compiles: their scores may differ in the last bit)
        keep, scores = tr.router_keep_triton(x, valid, heads // 2, *_fused_router_args(router))
        same_keep = torch.equal(keep, decide_keep(scores, heads // 2, 0))
        score_gap = (scores - got).abs().max().item()
        ties = int((scores[:, :, None] == scores[:, None, :]).sum() - scores.numel())
        rows.append(dict(dtype=str(dtype).split(".")[-1], act=approximate, hidden=hidden, abs_err=err,
                         top_k_ok=same_keep, keep_launch_score_gap=score_gap, tied_pairs=ties,
                         ok=err <= 1e-4 and same_keep and score_gap <= 1e-6))
    return rows


def _guarded(part: str, check, device) -> list[dict]:
    """check(device)'s rows, or one failed row naming the exception it raised."""
    try:
        return check(device)
    except Exception as e:  # noqa: BLE001  (a device run reports every part, whatever fails)
        return [{"part": part, "error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}]


def run_exactness(device, dtypes, batch, seq, report) -> bool:
    """Part 1 (gates open, keep masks, compact blocks) into ``report`` and printed; True if it passed."""
    report["exactness"] = _guarded("exactness", lambda d: check_exactness(d, dtypes, batch, seq), device)
    print("\n| model | dtype | sites | gates-open rel err | keep-mask rel err | compact shared | compact rows | "
          "rows apart | ok |\n|---|---|---|---|---|---|---|---|---|")
    for r in report["exactness"]:
        if "error" in r:
            print(f"| exactness check raised {r['error']} | | | | | | | | NO |", flush=True)
            continue
        compact = " | ".join(f"{r[k]:.2e}" if k in r else "-"
                             for k in ("compact_shared_rel_err", "compact_rows_rel_err", "compact_apart_rel_err"))
        print(f"| {r['model']} | {r['dtype']} | {r['sites']} | {r['gates_open_rel_err']:.2e} | "
              f"{r['keep_mask_rel_err']:.2e} | {compact} | {'yes' if r['ok'] else 'NO'} |", flush=True)
    return all(r["ok"] for r in report["exactness"])


def run_checks(device, dtypes, batch, seq, report) -> bool:
    """Parts 1, 1b and 2 into ``report``; True when every one passed."""
    if device != "cpu":
        # Each kernel check in its own guard: one that raises (run 2 of session 9 hit an
        # out-of-resources launch) is reported as failed and the others still run.
        rows = report["projections"] = _guarded("projections", check_projections, device)
        worst = max((max(r["out_err"], r["in_err"]) for r in rows if "out_err" in r), default=float("nan"))
        print(f"projection kernels, {len(rows)} cases (loading kinds x masks x layouts x dtypes x head dims): "
              f"{sum(not r['ok'] for r in rows)} failed, worst rel err {worst:.2e}", flush=True)
        for r in rows:
            if not r["ok"]:
                print("  FAILED", r, flush=True)
        rows = report["router"] = _guarded("router", check_router, device)
        worst = max((r["abs_err"] for r in rows if "abs_err" in r), default=float("nan"))
        print(f"router kernels, {len(rows)} cases: {sum(not r['ok'] for r in rows)} failed, worst abs err "
              f"{worst:.2e}", flush=True)
        for r in rows:  # every row: the tie counts say how much the top-k rule was tested
            print("  " + ("ok" if r["ok"] else "FAILED"), r, flush=True)
        rows = report["backward"] = _guarded("backward", check_backward, device)
        print(f"backward (projections and attention through their Triton backward), {len(rows)} cases: "
              f"{sum(not r['ok'] for r in rows)} failed", flush=True)
        for r in rows:
            print("  " + ("ok" if r["ok"] else "FAILED"), r, flush=True)
    run_exactness(device, dtypes, batch, seq, report)

    # inductor on a GPU; on a CPU (the test's smoke run) aot_eager, which traces the same way and
    # compiles in seconds, on one narrow layer of BERT (tests/test_traced_blocks.py covers the rest)
    cpu = device == "cpu"
    compiler, size, models = (("aot_eager", (64, 4, 1), ("bert",)) if cpu
                              else ("inductor", (128, 8, 2), ("bert", "llama-gqa")))
    rows = report["traced"] = _guarded(
        "traced", lambda d: check_traced(d, dtypes[-1], batch, seq, compiler, *size, models), device)
    for r in rows:
        print(f"static gates under {compiler}: " + ("ok" if r.get("ok") else "FAILED") + f" {r}", flush=True)

    gen_dtypes = (torch.float32,) if cpu else (torch.float32, torch.bfloat16)
    rows = report["generate"] = _guarded(
        "generate", lambda d: [r for dt in gen_dtypes
                               for r in check_generate(d, dt, width=size[0], heads=size[1], layers=size[2])], device)
    for r in rows:
        print("generate() with query chains: " + ("ok" if r.get("ok") else "FAILED") + f" {r}", flush=True)

    report["syncs"] = check_syncs(device)
    for r in report["syncs"]:
        print(f"host sync in a forward, {r['gating']}: {'none' if r['sync'] is None else r['sync']}", flush=True)

    report["training"] = t = check_training(device)
    print(f"\ntraining through the op (amp={t['amp']}): losses {['%.4g' % x for x in t['losses']]}, "
          f"attention params with a gradient {t['attn_params_with_grad']}/{t['attn_params']}", flush=True)
    return (all(r.get("ok", False) for r in report["exactness"] + report.get("projections", [])
                + report.get("router", []) + report.get("backward", []) + report["traced"] + report["generate"])
            and t["finite"]
            and t["attn_params_with_grad"] > 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="directory for gpu_check.json")
    ap.add_argument("--quick", action="store_true", help="small sizes, fp32 only (CPU smoke run)")
    ap.add_argument("--parts", nargs="+", choices=["checks", "exactness", "timing"], default=["checks", "timing"],
                    help="checks (exactness, syncs, training; exactness alone: the models only) and/or "
                         "timing (the encoder table); the "
                         "device script runs the checks beside other compiles and times alone")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --quick for a smoke run)", file=sys.stderr)
        return 2
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.float16, torch.bfloat16]
    batch, seq = (2, 16) if args.quick else (4, 128)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "torch": torch.__version__}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    print(f"gpu_check on {report['device']}, torch {report['torch']}, triton {report['triton']}", flush=True)

    ok = True
    if "checks" in args.parts:
        ok = run_checks(args.device, dtypes, batch, seq, report)
    elif "exactness" in args.parts:
        ok = run_exactness(args.device, dtypes, batch, seq, report)
    if "timing" in args.parts:
        m_dtype = torch.float32 if args.quick or args.device != "cuda" else torch.bfloat16
        m_batch, m_seq, reps = (2, 32, 3) if args.quick else (32, 128, 20)
        report["encoder"] = time_encoder(args.device, m_dtype, m_batch, m_seq, reps, small=args.quick)
        if args.device == "cuda" and not args.quick:
            report["encoder"] += _guarded("single input", lambda d: time_single_input(d, m_dtype, 512, reps),
                                          args.device)
            report["encoder"] += _guarded("llama prefill", lambda d: time_llama_prefill(d, m_dtype, 1024, reps),
                                          args.device)
            report["encoder"] += _guarded("small batch rows",
                                          lambda d: time_small_batch_rows(d, m_dtype, 4, 128, reps), args.device)
        print(f"\nBERT-{'tiny' if args.quick else 'base'} encoder {str(m_dtype).split('.')[-1]}, "
              f"batch {m_batch} x {m_seq}\n| variant | p | ms | vs dense |\n|---|---|---|---|")
        for r in report["encoder"]:
            if "error" in r:
                print(f"| {r['part']} raised {r['error']} | | | |")
                continue
            params = f" (params {r['params']:.3f}x)" if "params" in r else ""
            print(f"| {r['variant']}{params} | {r['p']:g} | {r['ms']:.2f} | {r['vs_dense']:.2f}x |")
        for r in report["encoder"]:
            if "kernels" in r:
                print(f"\nGPU kernels of one forward, {r['variant']} p={r['p']:g} (eager call, device time):\n"
                      + r["kernels"])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"gpu_check_{'_'.join(args.parts)}.json"), "w") as f:
            json.dump(report, f, indent=1)
    if "checks" in args.parts or "exactness" in args.parts:
        print("\nALL CHECKS PASSED" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
