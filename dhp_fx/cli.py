"""Command line: ``dhp-fx demo`` (the built-in default job) and ``dhp-fx report``."""
from __future__ import annotations

import argparse
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


def demo(args) -> int:
    import dhp_fx

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
            t_dense = _time(lambda: model(**inputs))
            t_pruned = _time(lambda: optimized(**inputs))
        print(f"\n=== {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params ===")
        print(optimized.report())
        print(f"capture + rewrite: {capture_s:.2f} s")
        print(f"gates open:  max |optimized - original| = {open_diff:.2e}")
        print(f"keep {args.keep_ratio:.0%} of heads: output cosine to original = {cos:.4f} (no distillation)")
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
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    inputs = dict(tokenizer(["dhp_fx finds every attention head.", "Short."], padding=True, return_tensors="pt"))
    optimized = dhp_fx.optimize(model, example_inputs=inputs)
    print(optimized.report())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dhp-fx", description="Dynamic attention-head pruning for PyTorch models.")
    sub = parser.add_subparsers(dest="command")
    p_demo = sub.add_parser("demo", help="optimize built-in tiny BERT / GPT-2 / Llama models and show what changed")
    p_demo.add_argument("--keep-ratio", type=float, default=0.5)
    p_demo.add_argument("--batch", type=int, default=8)
    p_demo.add_argument("--seq", type=int, default=128)
    p_demo.set_defaults(func=demo)
    p_report = sub.add_parser("report", help="list the attention sites of a local Hugging Face model directory")
    p_report.add_argument("model_dir")
    p_report.set_defaults(func=report)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
