"""Does letting the distillation loss reach the keep decision help? (CPU, ~2 min on 2 cores)

A 2-layer GPT-2 trained on a copy task (the teacher of tests/test_distill.py), half its heads
pruned per input by router gates, 40 distillation steps. Compares DistillConfig.gate_grad
"none" (routers only regress the head score S), "ste" and "relaxed", with the student's weights
frozen (only the keep decision can move the KL) and trained. Prints held-out KL to the teacher
at steps 0, 20 and 40. Then the same with each router's prior reversed (it starts by keeping
the heads the weight-norm ranking would drop): can the loss alone find the right heads? Last, the
held-out KL of every static choice of half the heads per layer, for scale.

    python benchmarks/bench_gate_learning.py [--steps 40] [--gate-lr 1e-2]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--gate-lr", type=float, default=1e-2)
    parser.add_argument("--budget-weight", type=float, default=1.0)
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    import dhp_fx
    from dhp_fx.distill import DistillConfig
    from test_distill import copy_task, pruned_student, trained_teacher

    teacher = trained_teacher()
    held_out = copy_task(4, 32, seed=2, labels=False)
    train = copy_task(args.steps, 16, seed=1)
    print(f"| router start | weights | gate_grad | KL step 0 | step {args.steps // 2} | step {args.steps} | s |")
    print("|---|---|---|---|---|---|---|")
    import torch

    for start_from, train_weights in (("prior", False), ("prior", True), ("reversed", False)):
        for grad in ("none", "ste", "relaxed"):
            extra = dict(gate_weight=1.0) if grad == "none" else dict(gate_weight=0.0, budget_weight=args.budget_weight)
            student = pruned_student(teacher, keep=0.5, scoring="router")
            if start_from == "reversed":
                with torch.no_grad():
                    for gate in student.gates.values():
                        gate.router[-1].bias.neg_()
            start = time.perf_counter()
            result = dhp_fx.distill(student, teacher, train, DistillConfig(
                steps=args.steps, lr=1e-3, gate_lr=args.gate_lr, gate_grad=grad, train_weights=train_weights,
                eval_every=args.steps // 2, progress=False, **extra), eval_data=held_out)
            kls = " | ".join(f"{e['kl']:.4f}" for e in result.evals)
            print(f"| {start_from} | {'trained' if train_weights else 'frozen'} | {grad} | {kls} | "
                  f"{time.perf_counter() - start:.0f} |",
                  flush=True)
    exhaustive(teacher, held_out)


def exhaustive(teacher, held_out) -> None:
    """KL of every choice of half the heads per layer, pinned: where the prior's choice ranks."""
    import itertools

    import torch
    from dhp_fx.distill import evaluate
    from test_distill import pruned_student

    student = pruned_student(teacher, keep=0.5, scoring="router")
    prior = evaluate(student, teacher, held_out)["kl"]
    names = [s.name for s in student.sites]
    H = student.sites[0].num_heads
    kls = []
    for choice in itertools.product(itertools.combinations(range(H), H // 2), repeat=len(names)):
        masks = {}
        for name, heads in zip(names, choice):
            masks[name] = torch.zeros(H, dtype=torch.bool)
            masks[name][list(heads)] = True
        student.set_keep_mask(masks)
        kls.append(evaluate(student, teacher, held_out)["kl"])
    kls.sort()
    rank = sum(k < prior - 1e-9 for k in kls) + 1
    print(f"\nstatic choices: {len(kls)}; best KL {kls[0]:.4f}, median {kls[len(kls) // 2]:.4f}, worst {kls[-1]:.4f}; "
          f"the prior's choice {prior:.4f} ranks {rank}")


if __name__ == "__main__":
    main()
