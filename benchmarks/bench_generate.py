"""Generation with a KV cache: what ``dhp_fx.optimize`` gives ``model.generate()``.

    python benchmarks/bench_generate.py [--model llama|gpt2|gpt-neox] [--batch 8] [--prompt 128] [--new 32]
                                         [--kv-heads 8]

Model: a random-init ``LlamaForCausalLM`` (RoPE; hidden 512, 8 heads, ``--kv-heads``, ``--layers``),
or GPT-2 (one Conv1D for q, k and v) or GPT-NeoX (one projection laid out head by head, partial
RoPE) of the same width, heads and depth; HF's default cache on. The cache reads every head's K
and V, so each block runs as a query chain:
the kept query heads' Q rows and W_o columns, attention over their own K/V, K and V projected
whole. Rows: the unmodified model; a copy whose forward runs under ``torch.compile(backend="eager")``
(what graph capture alone costs a decoding step: Dynamo's guards and the graph's Python);
``optimize()`` with static gates at each ``--p`` (calibrated on the prompt batch); at the first
p < 1 also the head-skipping ops instead of the chain (``compact_heads=False``); on a GPU (on a
CPU with ``--gathered-row``), also the chain with its attention not reading the kept heads' K/V
in place: gathered per step on a GPU (``compact_heads.IN_PLACE_DECODE = False``), every head
with the others' q zero on a CPU (``compact_heads.HEAD_BANDS = False``). Greedy decoding,
``--new`` tokens forced. Columns: the prompt's forward
(``max_new_tokens=1``) and each further token, ``(T(new) - T(1)) / (new - 1)``; medians of
``--reps`` interleaved runs after one warm-up each. ``--device cuda`` synchronises each run.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_end_to_end_cpu import load_llama  # noqa: E402


def load_decoder(name: str, kv_heads: int, layers: int):
    """A random-init causal LM, hidden 512, 8 heads, vocabulary 1000, HF's default cache."""
    if name == "llama":
        return load_llama(kv_heads, layers, causal_lm=True)
    import transformers as T

    tokens = dict(vocab_size=1000, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "gpt2":
        config = T.GPT2Config(n_embd=512, n_head=8, n_layer=layers, n_positions=2048, **tokens)
        model_cls = T.GPT2LMHeadModel
    else:
        config = T.GPTNeoXConfig(hidden_size=512, num_attention_heads=8, num_hidden_layers=layers,
                                 intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25, **tokens)
        model_cls = T.GPTNeoXForCausalLM
    config._attn_implementation = "sdpa"
    return model_cls(config).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama", "gpt2", "gpt-neox"], default="llama")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--p", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--gathered-row", action="store_true",
                        help="the A/B row without K/V read in place on a CPU too (every head there)")
    args = parser.parse_args(argv)
    if args.new < 2:
        parser.error("--new must be at least 2 (per-token time needs a step after the prompt's)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    import dhp_fx
    from dhp_fx.kernels import compact_heads

    torch.manual_seed(0)
    if args.model != "llama" and args.kv_heads != 8:
        parser.error(f"--kv-heads: {args.model} has one KV head per query head")
    model = load_decoder(args.model, args.kv_heads, args.layers).to(device=device, dtype=dtype)
    ids = torch.randint(3, 1000, (args.batch, args.prompt), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # generate() calls the model's own forward: compiling a copy's forward is what puts a step under Dynamo
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="eager")
    variants = {"dense": model, "dense, torch.compile eager": compiled}
    head_ops_done = False
    for p in args.p:
        forms = [True] if p == 1.0 or head_ops_done else [True, False]
        for compact in forms:
            opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=p, scoring="static", compact_heads=compact),
                                  example_inputs=inputs)
            if p < 1.0:
                dhp_fx.calibrate(opt, [inputs], measure_flops=False)
            variants[f"static p={p:g}" + ("" if compact else " head ops")] = opt
            if compact and p < 1.0 and (device.type == "cuda" or args.gathered_row):
                variants[f"static p={p:g} K/V not in place"] = opt
        head_ops_done = head_ops_done or len(forms) == 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(name: str, new: int) -> float:
        m = variants[name]
        compact_heads.IN_PLACE_DECODE = compact_heads.HEAD_BANDS = not name.endswith("K/V not in place")
        sync()
        start = time.perf_counter()
        m.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    prompt = {name: [] for name in variants}
    total = {name: [] for name in variants}
    with torch.no_grad():
        for name in variants:
            run(name, args.new)  # compiles the prompt's and the steps' graphs
        for _ in range(args.reps):
            for name in variants:
                prompt[name].append(run(name, 1))
                total[name].append(run(name, args.new))
    compact_heads.IN_PLACE_DECODE = compact_heads.HEAD_BANDS = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} {args.layers} layers, hidden 512, 8 heads, {args.kv_heads} KV heads, {args.dtype}; batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens (greedy, KV cache); torch {torch.__version__}, {where}")
    print("| variant | prompt ms | vs dense | per token ms | vs dense |")
    print("|---|---|---|---|---|")
    base = None
    for name in variants:
        t1, tn = statistics.median(prompt[name]), statistics.median(total[name])
        step = (tn - t1) / (args.new - 1)
        base = base or (t1, step)
        print(f"| {name} | {t1 * 1e3:.1f} | {t1 / base[0]:.2f}× | {step * 1e3:.2f} | {step / base[1]:.2f}× |")
    for name, m in variants.items():
        if name.endswith("K/V not in place"):
            continue  # its model's counters are the in-place row's
        chains = [g.chain_module for g in getattr(m, "gates", {}).values()]
        if chains and any(c.calls_query_heads for c in chains):
            print(f"{name}: {sum(c.calls_query_heads for c in chains)} query-chain calls, "
                  f"{sum(c.gathers for c in chains)} gathers")


if __name__ == "__main__":
    main()
