"""Knowledge distillation: buy back, from the unpruned model, the accuracy head pruning costs.

    student = dhp_fx.optimize(copy.deepcopy(model), DHPConfig(keep_ratio=0.5), example_inputs=...)
    result = dhp_fx.distill(student, model, train_batches, DistillConfig(steps=200), eval_data=held_out)

Loss per batch (each term a mean over real, non-padding positions):

    λ_kd · KL(softmax(z_t/T) ‖ softmax(z_s/T)) · T²        models with logits
    λ_kd · hidden_loss(h_s, h_t)                            encoders (last_hidden_state) or bare tensors
  + λ_task · task loss                                     when batches carry "labels"
  + λ_align · mean over align_modules of align_loss(out_s, out_t)
  + λ_attn · mean over attention_sites of KL(P_t ‖ P_s) per query row, kept heads only
  + λ_gate · the router gates' own loss                    DHPConfig(scoring="router")
  + λ_budget · (soft keep fraction − keep budget)²         learned gates under gate_grad="ste"

Gates decide with a hard top-k. ``gate_grad`` lets the distillation loss reach learned gates
(routers) through that decision; while training, every head runs and the gate's tap weights
head h by
  "ste":     hard_h + s_h − detach(s_h)   (s = the router's soft score): forward values exactly
             those of hard gating; backward, each score — pruned heads included — gets
             ⟨∂L/∂out_h, out_h⟩, the first-order effect of switching the head on;
  "relaxed": σ((s_h − boundary)/T), a soft top-k around the budget's boundary: exact gradients
             of a forward that is not the hard one.
Training thus costs dense attention; inference stays gated. The budget term keeps the soft
scores centred on the keep fraction (and sets the count when gates use a score threshold).
The default is "none": on our tests both estimators made the student worse than routers that
only regress S (benchmarks/RESULTS.md, "Learning the keep decision") — switching a head on or
off is far outside the range where the first-order signal holds, and a ranking that keeps
changing leaves the weights no stable head set to adapt to.

The loop itself (checkpoints, exact resume, Ctrl-C) is in ``dhp_fx.distill_trainer``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .distill_io import (BatchStream, CallSpec, check_shapes, device_of, extract, needs_labels_to_decode,
                         run_model, split_batch, to_device, unwrap)
from .distill_loss import position_mask, token_cosine, token_kl

TARGETS = ("auto", "logits", "hidden")
HIDDEN_LOSSES = ("cosine", "mse", "cosine+mse")
GATE_GRADS = ("none", "ste", "relaxed")


@dataclass
class DistillConfig:
    """How to distil. Invalid values raise ValueError naming the field.

    Optimisation: ``steps`` optimizer steps of AdamW (``lr`` for the model's weights, ``gate_lr``
    for learned gates), each over ``grad_accum`` batches; linear warm-up over ``warmup_steps``,
    then constant or linear decay (``lr_schedule``); gradients clipped to ``max_grad_norm``.
    ``dropout``: run the student in train mode (off by default: in short recovery runs the
    dropout noise cost more than it regularised — MiniLM at keep 50 %: cosine 0.870 with it,
    0.873 without; at 90 %: 0.976 vs 0.983). ``amp``: bf16 autocast, on CUDA only ("auto"
    turns it on there; CPU always runs in full precision).

    Loss (see the module doc): ``kd_weight``, ``temperature``, ``task_weight`` (None: 1.0 when a
    batch has labels, else 0; a number > 0 makes labels mandatory), ``align_weight`` with
    ``align_modules`` (None, "auto" = the model's layer list, a list of module names, or a dict
    {student module: teacher module}, names relative to the unwrapped model) and ``align_loss``;
    ``hidden_loss`` for models without logits; ``gate_weight`` for router gates' regression
    loss; ``gate_grad`` ("none", "ste" or "relaxed") and ``budget_weight`` for training
    learned gates through the keep decision; ``attention_weight`` with ``attention_sites`` ("auto": every site
    the student shares with the teacher, or a list of site names) for attention-map alignment.
    ``target``: "auto" distils on ``logits`` when the output has them, else on
    ``last_hidden_state``; a model returning a bare tensor is taken as hidden states unless
    target="logits".

    Data: batches are dicts (keyword inputs; "labels" for the task loss), tuples (positional;
    the last element is the labels if ``tuple_labels``) or tensors. Datasets of single examples
    (HF ``datasets.Dataset``, torch map-style datasets) are batched by ``batch_size``, shuffled
    per epoch from ``seed`` if ``shuffle``. Data is cycled until ``steps`` (a one-shot iterator
    stops the run when it runs out).

    Evaluation on ``eval_data`` every ``eval_every`` steps (and at step 0), at most
    ``eval_batches`` batches: mean KL to the teacher (logits) or 1 − mean cosine (hidden) is the
    objective; ``patience`` evaluations without an improvement of ``min_delta`` stop the run;
    ``restore_best`` puts the best evaluated weights back at the end.

    Checkpoints: every ``checkpoint_every`` steps, at the end and on Ctrl-C, into
    ``checkpoint_dir`` (safetensors + JSON, written atomically), keeping ``keep_checkpoints``.
    ``resume=True`` continues from the newest checkpoint there (a path: from that checkpoint)
    and reproduces the uninterrupted run exactly (same batches, RNG, optimizer state).
    Metrics go to ``log_path`` as JSON lines (default: checkpoint_dir/metrics.jsonl).

    ``skip_nonfinite``: a NaN/inf loss or gradient skips that optimizer step with a logged
    warning instead of raising FloatingPointError.
    """

    steps: int = 100
    lr: float = 5e-5
    gate_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: Optional[float] = 1.0
    grad_accum: int = 1
    kd_weight: float = 1.0
    temperature: float = 2.0
    task_weight: Optional[float] = None
    align_weight: float = 0.0
    align_modules: Union[None, str, list, dict] = None
    align_loss: str = "mse"
    hidden_loss: str = "cosine+mse"
    gate_weight: float = 1.0
    gate_grad: str = "none"
    budget_weight: float = 1.0
    attention_weight: float = 0.0
    attention_sites: Union[str, list] = "auto"
    target: str = "auto"
    train_weights: bool = True
    train_gates: bool = True
    dropout: bool = False
    amp: Union[str, bool] = "auto"
    tuple_labels: bool = False
    batch_size: int = 8
    shuffle: bool = True
    seed: Optional[int] = 0
    eval_every: Optional[int] = None
    eval_batches: Optional[int] = None
    patience: Optional[int] = None
    min_delta: float = 0.0
    restore_best: bool = False
    checkpoint_dir: Optional[str] = None
    checkpoint_every: Optional[int] = None
    keep_checkpoints: int = 2
    resume: Union[bool, str] = False
    log_path: Optional[str] = None
    progress: bool = True
    skip_nonfinite: bool = False

    def __post_init__(self) -> None:
        pos_int = ("steps", "grad_accum", "batch_size", "keep_checkpoints")
        for name in pos_int:
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        for name in ("eval_every", "eval_batches", "patience", "checkpoint_every"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v >= 1), name, "None or an int >= 1")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        for name in ("lr", "gate_lr", "temperature"):
            _check(_is_num(getattr(self, name)) and getattr(self, name) > 0, name, "a number > 0")
        for name in ("weight_decay", "kd_weight", "align_weight", "gate_weight", "min_delta", "budget_weight",
                     "attention_weight"):
            _check(_is_num(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0")
        _check(self.task_weight is None or (_is_num(self.task_weight) and self.task_weight >= 0),
               "task_weight", "None or a number >= 0")
        _check(self.max_grad_norm is None or (_is_num(self.max_grad_norm) and self.max_grad_norm > 0),
               "max_grad_norm", "None or a number > 0")
        _check(self.lr_schedule in ("constant", "linear"), "lr_schedule", "'constant' or 'linear'")
        _check(self.target in TARGETS, "target", f"one of {TARGETS}")
        _check(self.hidden_loss in HIDDEN_LOSSES, "hidden_loss", f"one of {HIDDEN_LOSSES}")
        _check(self.align_loss in HIDDEN_LOSSES, "align_loss", f"one of {HIDDEN_LOSSES}")
        _check(self.align_modules is None or self.align_modules == "auto" or
               (isinstance(self.align_modules, (list, tuple)) and all(isinstance(n, str) for n in self.align_modules)) or
               (isinstance(self.align_modules, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                             for k, v in self.align_modules.items())),
               "align_modules", "None, 'auto', a list of module names or a {student: teacher} dict")
        _check(self.amp in ("auto", True, False), "amp", "'auto', True or False")
        _check(self.gate_grad in GATE_GRADS, "gate_grad", f"one of {GATE_GRADS}")
        _check(self.attention_sites == "auto" or (isinstance(self.attention_sites, (list, tuple)) and self.attention_sites
                                                  and all(isinstance(n, str) for n in self.attention_sites)),
               "attention_sites", "'auto' or a non-empty list of site names")
        _check(isinstance(self.resume, (bool, str)), "resume", "a bool or a checkpoint path")
        _check(self.seed is None or _is_int(self.seed), "seed", "None or an int")
        if self.align_weight > 0 and self.align_modules is None:
            raise ValueError("DistillConfig.align_weight > 0 needs align_modules (e.g. 'auto')")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ValueError("DistillConfig.checkpoint_every / resume need checkpoint_dir")
        if (self.patience or self.restore_best) and not self.eval_every:
            raise ValueError("DistillConfig.patience / restore_best need eval_every (and eval_data)")

    def replace(self, **changes: Any) -> "DistillConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"DistillConfig.{name} must be {expected}")


@dataclass
class DistillResult:
    """What a run did. ``history``: one dict per optimizer step of this call (loss and its terms,
    lr); ``evals``: every evaluation of the run (resumed ones included)."""

    student: nn.Module
    steps: int
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    best_objective: Optional[float] = None
    best_step: Optional[int] = None
    stopped_early: bool = False
    stop_reason: str = "steps"
    skipped_steps: int = 0
    checkpoint: Optional[str] = None
    resumed_from: Optional[int] = None

    @property
    def final_loss(self) -> Optional[float]:
        return self.history[-1]["loss"] if self.history else None


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be a separate, frozen copy: training the student must not move it."""
    hint = ("distil from the original model and optimize a copy: "
            "student = dhp_fx.optimize(copy.deepcopy(model), ...)")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"the teacher must be an nn.Module, got {type(teacher).__name__}")
    inner = (student, unwrap(student), student.__dict__.get("_inner"))
    if any(teacher is m for m in inner if m is not None):
        raise ValueError(f"the teacher is the student itself; {hint}")
    s_ptrs = {p.untyped_storage().data_ptr() for p in student.parameters() if p.numel() and p.device.type != "meta"}
    shared = [n for n, p in teacher.named_parameters()
              if p.numel() and p.device.type != "meta" and p.untyped_storage().data_ptr() in s_ptrs]
    if shared:
        raise ValueError(f"the teacher shares {len(shared)} parameter(s) with the student (e.g. {shared[0]!r}), "
                         f"so training the student would change the teacher; {hint}")


def distill(student: nn.Module, teacher: nn.Module, data: Any, config: Optional[DistillConfig] = None,
            eval_data: Any = None) -> DistillResult:
    """Train ``student`` (what ``dhp_fx.optimize`` returned) to match ``teacher`` (the original).

    The teacher is put in eval mode with gradients off for the run (its flags are restored
    after). The student's weights and learned gates are trained in place; the result carries it.
    """
    from .distill_trainer import Trainer

    config = config or DistillConfig()
    if isinstance(config, dict):
        config = DistillConfig(**config)
    if not isinstance(student, nn.Module):
        raise TypeError(f"the student must be an nn.Module (what dhp_fx.optimize returned), got {type(student).__name__}")
    check_teacher(student, teacher)
    return Trainer(student, teacher, data, config, eval_data).run()


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, data: Any, config: Optional[DistillConfig] = None,
             max_batches: Optional[int] = None) -> dict:
    """Mean agreement of student and teacher on ``data``, both in eval mode.

    Returns {"kl": mean per-position KL(teacher ‖ student) at T = 1} for models with logits or
    {"cosine": mean per-position cosine, "mse": ...} for hidden states, plus "objective" (kl, or
    1 − cosine: lower is better) and "batches". Global RNG state is left untouched.
    """
    config = config or DistillConfig()
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    base = unwrap(student)
    s_spec, t_spec = CallSpec.of(base), CallSpec.of(teacher)
    s_dev, t_dev = device_of(student), device_of(teacher)
    sums = {"kl": 0.0, "cos": 0.0, "mse": 0.0, "n": 0.0}
    batches = 0
    try:
        with torch.random.fork_rng(devices=[]):
            stream = BatchStream(data, config.batch_size, shuffle=False, seed=0, name="eval_data")
            for batch in stream.epoch(0):
                if max_batches is not None and batches >= max_batches:
                    break
                s_call = split_batch(batch, s_spec, config.tuple_labels, "the student")
                t_call = split_batch(batch, t_spec, config.tuple_labels, "the teacher")
                s = extract(run_model(student, s_call, s_spec, s_dev, needs_labels_to_decode(s_spec, s_call)),
                            config.target, "student")
                t = extract(run_model(teacher, t_call, t_spec, t_dev, needs_labels_to_decode(t_spec, t_call)),
                            config.target, "teacher")
                t.logits, t.hidden = to_device(t.logits, s_dev), to_device(t.hidden, s_dev)
                check_shapes(s, t)
                ref = s.logits if s.logits is not None else s.hidden
                mask = position_mask(s_call.kwargs, ref.shape[:-1], s_dev)
                if s.logits is not None:
                    total, n = token_kl(s.logits, t.logits, mask)
                    sums["kl"] += total
                else:
                    total, n = token_cosine(s.hidden, t.hidden, mask)
                    sums["cos"] += total
                    sq = (s.hidden.float() - t.hidden.float()).square().mean(-1)
                    sums["mse"] += float((sq * mask).sum() if mask is not None else sq.sum())
                sums["n"] += n
                batches += 1
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    if batches == 0:
        raise ValueError("eval_data yielded no batches")
    n = max(sums["n"], 1.0)
    if s.logits is not None:
        return {"kl": sums["kl"] / n, "objective": sums["kl"] / n, "batches": batches}
    cos = sums["cos"] / n
    return {"cosine": cos, "mse": sums["mse"] / n, "objective": 1.0 - cos, "batches": batches}
