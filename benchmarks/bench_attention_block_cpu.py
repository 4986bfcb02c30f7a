"""CPU timing of whole attention blocks: dense vs gated core vs gated core + skipped projections.

    python benchmarks/bench_attention_block_cpu.py [--reps 9] [--only block|model] [--p 1 .5]

Models (fp32, inference, no_grad):
  block   HF BertAttention (Q/K/V, SDPA core, output dense, dropout, LayerNorm + residual) at
          BERT-base shape (d=768, 12 heads) and MiniLM shape (d=384, 12 heads), batch 8 x seq 128;
  model   HF BertModel (d=768, 12 heads, FFN 3072) with 2 and 6 layers, batch 8 x seq 128.

For each keep fraction p it prints the median time of
  dense       the unmodified model,
  gated       rewrite_attention: each core through dhp::gated_attention (projections dense),
  gated+skip  rewrite_attention(skip_projections=True): projections through dhp::head_linear_*,
and each one's ratio to dense (best times). The gate is batch-shared: every site keeps the same round(p*H)
randomly chosen heads for every row, decided from ``hidden`` alone (``reads_qkv = False``), as
a per-layer router or a static ranking gives. Variants are timed from their captured graphs,
one call each in turn (see time_rotating).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.nn as nn

import dhp_fx.kernels  # noqa: F401  (registers the dhp ops)
from dhp_fx.passes import rewrite_attention

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class SharedGate(nn.Module):
    """Keeps the heads of ``keep`` ([H] bool) in every row; looks at nothing but the batch size."""

    reads_qkv = False

    def __init__(self, heads: int):
        super().__init__()
        self.keep = torch.ones(heads, dtype=torch.bool)

    def forward(self, q, k, v, attn_mask=None, hidden=None):
        return self.keep.expand(hidden.shape[0], -1)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention

        self.attn = BertAttention(config)

    def forward(self, x):
        return self.attn(x)[0]


def _config(d: int, layers: int = 1):
    from transformers import BertConfig

    config = BertConfig(hidden_size=d, num_attention_heads=12, intermediate_size=4 * d, num_hidden_layers=layers,
                        vocab_size=1000, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return config


def cases(batch: int, seq: int, only: str):
    g = torch.Generator().manual_seed(0)
    if only in ("all", "block"):
        for d, label in ((768, "BERT-base"), (384, "MiniLM")):
            torch.manual_seed(0)
            yield f"attn block {label} d={d}", Block(_config(d)).eval(), {"x": torch.randn(batch, seq, d, generator=g)}
    if only in ("all", "model"):
        from transformers import BertModel

        for layers in (2, 6):
            torch.manual_seed(0)
            ids = torch.randint(5, 1000, (batch, seq), generator=g)
            model = BertModel(_config(768, layers), add_pooling_layer=False).eval()
            yield f"BertModel {layers}L d=768", model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def capture(model, inputs, skip: bool):
    """(graph callable, its inputs, the gates) of the rewritten model."""
    graphs, gates = [], []

    def make_gate(site):
        gates.append(SharedGate(site.num_heads))
        return gates[-1]

    def backend(gm, example_inputs):
        rewrite_attention(gm, make_gate, skip_projections=skip)
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(**inputs)
    if len(graphs) != 1:
        raise RuntimeError(f"expected one captured graph, got {len(graphs)}")
    gm, args = graphs[0]
    return (lambda: gm(*args)), gates


def time_rotating(fns: dict, reps: int, warmup: int) -> dict:
    """Best and median ms per variant, calling the variants in turn (one call each per round).

    The CPU this was written for is small and shared: another process taking a core stretches
    a call by up to several times (a thread waits at an OpenMP barrier). Such stretches only
    add time, so the best call is the estimate reported; turns interleave so that a busy spell
    hits every variant alike.
    """
    times = {n: [] for n in fns}
    names = list(fns)
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                fns[name]()
        for r in range(reps):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return {n: (min(t) * 1e3, statistics.median(t) * 1e3) for n, t in times.items()}


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return _first(out[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=9, help="timed calls per variant (in rotation)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--p", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    ap.add_argument("--only", choices=["all", "block", "model"], default="all")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# {datetime.date.today()}  torch {torch.__version__}  CPU threads {torch.get_num_threads()}  fp32  "
          f"batch {args.batch} x seq {args.seq}  batch-shared gate  best of {args.reps} calls in ms "
          f"(median in brackets)  load average at start {os.getloadavg()[0]:.1f}")
    print(f"{'model':<26} {'p':>4} {'dense':>15} {'gated':>15} {'x':>5} {'gated+skip':>15} {'x':>5}")
    gen = torch.Generator().manual_seed(0)
    for label, model, inputs in cases(args.batch, args.seq, args.only):
        gated, gated_gates = capture(model, inputs, skip=False)
        skipped, skip_gates = capture(model, inputs, skip=True)

        def dense(model=model, inputs=inputs):
            return model(**inputs)

        for p in args.p:
            for a, b in zip(gated_gates, skip_gates):
                keep = torch.zeros(a.keep.numel(), dtype=torch.bool)
                keep[torch.randperm(keep.numel(), generator=gen)[: max(1, round(p * keep.numel()))]] = True
                a.keep = b.keep = keep
            with torch.no_grad():
                ref, got = _first(gated()), _first(skipped())
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)  # the skip is exact
            t = time_rotating({"dense": dense, "gated": gated, "skip": skipped}, args.reps, args.warmup)
            cell = {n: f"{best:.1f} ({med:.1f})" for n, (best, med) in t.items()}
            ratio = {n: t[n][0] / t["dense"][0] for n in t}
            print(f"{label:<26} {p:>4.2f} {cell['dense']:>15} {cell['gated']:>15} {ratio['gated']:>5.2f}"
                  f" {cell['skip']:>15} {ratio['skip']:>5.2f}", flush=True)


if __name__ == "__main__":
    main()
