"""The distillation loop: steps, evaluation, checkpoints and exact resume.

Exact resume rests on one invariant: at every optimizer-step boundary the trainer holds a
snapshot (RNG states, data position, the RNG state its epoch began with) that together with the
weights and optimizer state determines everything after. A checkpoint is that snapshot plus
those tensors, so a run resumed from it replays the very batches, dropout masks and updates.
Ctrl-C between boundaries loses only the partial accumulation, never consistency; Ctrl-C during
the update itself is deferred until the boundary is reached.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Optional

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .distill import DistillConfig, DistillResult, evaluate
from .gates import HeadGate
from .distill_io import (BatchStream, CallSpec, Taps, auto_align_modules, check_shapes, device_of, extract,
                         needs_labels_to_decode, run_model, split_batch, to_device, unwrap)
from .distill_attention import AttentionAlignment, attention_kl
from .distill_loss import hidden_distance, kd_kl, position_mask, task_cross_entropy

log = logging.getLogger("dhp_fx")
CKPT_FORMAT = "dhp_fx.distill_checkpoint/1"
_END = object()


class Trainer:
    def __init__(self, student: nn.Module, teacher: nn.Module, data: Any, config: DistillConfig, eval_data: Any):
        self.student, self.teacher, self.cfg, self.eval_data = student, teacher, config, eval_data
        self.base = unwrap(student)
        # the live ModuleDict, not a copy: gates are created when Dynamo first captures a graph
        self.gates = student.gates if self.base is not student else {}
        self.s_dev, self.t_dev = device_of(student), device_of(teacher)
        self.s_spec, self.t_spec = CallSpec.of(self.base), CallSpec.of(teacher)
        self.stream = BatchStream(data, config.batch_size, config.shuffle, config.seed or 0)
        self.amp = config.amp is True or (config.amp == "auto" and self.s_dev.type == "cuda")
        if self.amp and self.s_dev.type != "cuda":
            log.warning("dhp_fx.distill: bf16 autocast is for GPUs; the %s student runs in full precision", self.s_dev)
            self.amp = False
        self.step, self.epoch, self.batch_in_epoch, self.batches_seen = 0, 0, 0, 0
        self.epoch_rng: Optional[torch.Tensor] = None
        self.it = None
        self.evals: list = []
        self.best, self.best_step, self.bad_evals, self.best_state = None, None, 0, None
        self.skipped, self.resumed_from, self.last_ckpt = 0, None, None
        self.taps = None
        self.attention: Optional[AttentionAlignment] = None
        self.ste_gates: list = []
        self._critical = self._pending_sigint = False

    # ------------------------------------------------------------------ set-up
    def _routers(self) -> list:
        return [g for g in self.gates.values() if getattr(g, "router", None) is not None and hasattr(g, "capture_loss")]

    def _learned_gates(self) -> list:
        """Gates with parameters and a differentiable score: what the straight-through estimator trains."""
        return [g for g in self.gates.values()
                if isinstance(g, HeadGate) and type(g).soft_scores is not HeadGate.soft_scores
                and any(p.requires_grad for p in g.parameters())]

    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.seed is not None:  # a resumed run then restores the checkpoint's generators
            import random

            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            with contextlib.suppress(ImportError):
                import numpy as np

                np.random.seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):  # a shuffling loader draws its order from the global RNG
            first = self.stream.first()
        if first is None:
            raise ValueError("data yielded no batches")
        if cfg.align_modules is not None and cfg.align_weight > 0:
            names = cfg.align_modules
            if names == "auto":
                names = auto_align_modules(self.base)
            pairs = dict(names) if isinstance(names, dict) else {n: n for n in names}
            self.pairs = list(pairs.items())
            self.taps = (Taps(self.base, list(pairs), "student"), Taps(self.teacher, list(pairs.values()), "teacher"))
        else:
            self.pairs = []
        self.teacher_flags = (self.teacher.training, [p.requires_grad for p in self.teacher.parameters()])
        self.teacher.eval().requires_grad_(False)
        self.student_mode = self.student.training
        self.student.train(cfg.dropout)
        self._warm_up(first)
        routers = self._routers()
        compiler = getattr(getattr(self.student, "dhp_config", None), "compiler", "eager")
        self.train_routers = bool(cfg.train_gates and cfg.gate_weight > 0 and routers)
        self.ste_gates = self._learned_gates() if cfg.train_gates and cfg.gate_grad != "none" else []
        if (self.train_routers or self.ste_gates) and compiler != "eager":
            log.warning("dhp_fx.distill: learned gates are only trained with DHPConfig(compiler='eager'); "
                        "with %r their state is traced as constants", compiler)
            self.train_routers, self.ste_gates = False, []
        if cfg.attention_weight > 0:
            self.attention = AttentionAlignment(self.student, self.teacher, cfg.attention_sites)
            self._warm_up_teacher_view(first)
        gate_ids = {id(p) for p in getattr(self.student, "gates", nn.ModuleDict()).parameters()}
        weights = [p for p in self.student.parameters() if p.requires_grad and id(p) not in gate_ids] \
            if cfg.train_weights else []
        trained = {id(g): g for g in (routers if self.train_routers else []) + self.ste_gates}
        gate_params = [p for g in trained.values() for p in g.parameters() if p.requires_grad]
        groups = [g for g in ({"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                              {"params": gate_params, "lr": cfg.gate_lr, "weight_decay": 0.0}) if g["params"]]
        if not groups:
            raise ValueError("nothing to train: the student has no parameters with requires_grad "
                             "(or train_weights/train_gates are off)")
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups)
        self.log_path = cfg.log_path or (os.path.join(cfg.checkpoint_dir, "metrics.jsonl") if cfg.checkpoint_dir else None)
        if cfg.checkpoint_dir:
            os.makedirs(cfg.checkpoint_dir, exist_ok=True)
        if cfg.resume:
            self._resume()
        if self.log_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            self._truncate_log()

    def _warm_up(self, batch: Any) -> None:
        """One training-shaped call, so every graph and gate exists before the optimizer is built.

        A new code path (labels, hooks) can make Dynamo capture new graphs, and gates are built
        at capture; a gate created mid-run would miss the optimizer and the keep budget.
        """
        before = set(self.gates.keys()) if hasattr(self.gates, "keys") else set()
        # with grad enabled like the steps to come: Dynamo guards on grad mode, a no-grad call
        # would capture a graph that training never uses
        with torch.random.fork_rng(devices=[self.s_dev] if self.s_dev.type == "cuda" else []):
            call = split_batch(batch, self.s_spec, self.cfg.tuple_labels, "the student")
            labels = (self._task_weight(call) > 0) or needs_labels_to_decode(self.s_spec, call)
            with self._autocast():
                run_model(self.student, call, self.s_spec, self.s_dev, labels)
        if self.taps:
            self.taps[0].pop()
        new = [k for k in self.gates.keys() if k not in before] if before else []
        for key in new:
            _inherit_budget(self.gates, key, before)

    def _warm_up_teacher_view(self, batch: Any) -> None:
        """Capture the teacher's graph (its gates and sites) once, then pair the sites."""
        with torch.random.fork_rng(devices=[self.t_dev] if self.t_dev.type == "cuda" else []), torch.no_grad():
            call = split_batch(batch, self.t_spec, self.cfg.tuple_labels, "the teacher")
            with self._autocast():
                run_model(self.attention.teacher_view, call, self.t_spec, self.t_dev,
                          needs_labels_to_decode(self.t_spec, call))
        if self.taps:
            self.taps[1].pop()
        self.attention.bind()

    def _task_weight(self, call) -> float:
        w = self.cfg.task_weight
        if w is None:
            return 1.0 if call.labels is not None else 0.0
        if w > 0 and call.labels is None:
            where = ("tuple batches carry labels only with DistillConfig.tuple_labels=True"
                     if not call.kwargs and not self.cfg.tuple_labels else f"batch keys: {call.keys}")
            raise ValueError(f"DistillConfig.task_weight={w} needs a 'labels' key in every batch ({where})")
        return float(w)

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    # ------------------------------------------------------------------ data position
    def _next_batch(self) -> Any:
        while True:
            if self.it is None:
                self.epoch_rng = torch.get_rng_state()
                self.it = self.stream.epoch(self.epoch)
            batch = next(self.it, _END)
            if batch is not _END:
                self.batch_in_epoch += 1
                self.batches_seen += 1
                return batch
            if self.batch_in_epoch == 0:
                if self.batches_seen == 0:
                    raise ValueError("data yielded no batches")
                return _END
            self.epoch, self.batch_in_epoch, self.it = self.epoch + 1, 0, None

    def _snapshot(self) -> dict:
        tensors, meta = ckpt.rng_state()
        if self.epoch_rng is not None:
            tensors["epoch_rng"] = self.epoch_rng.clone()
        return {"rng": tensors, "rng_meta": meta, "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "batches_seen": self.batches_seen}

    # ------------------------------------------------------------------ one step
    def _loss(self, batch: Any) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        s_call = split_batch(batch, self.s_spec, cfg.tuple_labels, "the student")
        t_call = split_batch(batch, self.t_spec, cfg.tuple_labels, "the teacher")
        task_w = self._task_weight(s_call)
        attention = self.attention
        teacher = attention.teacher_view if attention else self.teacher
        try:
            if attention:
                attention.arm(teacher)
            with torch.no_grad(), self._autocast():
                t_raw = run_model(teacher, t_call, self.t_spec, self.t_dev, needs_labels_to_decode(self.t_spec, t_call))
            t_maps = attention.collect(teacher, "teacher") if attention else {}
        finally:
            if attention:
                attention.disarm()
        t_taps = self.taps[1].pop() if self.taps else {}
        routers = self._routers() if self.train_routers else []
        for g in routers:
            g.capture_loss, g.last_router_loss = True, None
        for g in self.ste_gates:
            g.ste, g.last_budget_loss = cfg.gate_grad, None
        try:
            if attention:
                attention.arm(self.student)
            with self._autocast():
                s_raw = run_model(self.student, s_call, self.s_spec, self.s_dev,
                                  task_w > 0 or needs_labels_to_decode(self.s_spec, s_call))
            gate_losses = [g.last_router_loss for g in routers if g.last_router_loss is not None]
            budget_losses = [g.last_budget_loss for g in self.ste_gates if g.last_budget_loss is not None]
            s_maps = attention.collect(self.student, "student") if attention else {}
        finally:
            for g in routers:
                g.capture_loss, g.last_router_loss = False, None
            for g in self.ste_gates:
                g.ste, g.last_budget_loss = False, None
            if attention:
                attention.disarm()
        s_taps = self.taps[0].pop() if self.taps else {}
        s, t = extract(s_raw, cfg.target, "student"), extract(t_raw, cfg.target, "teacher")
        t.logits, t.hidden = to_device(t.logits, self.s_dev), to_device(t.hidden, self.s_dev)
        check_shapes(s, t)
        ref = s.logits if s.logits is not None else s.hidden
        mask = position_mask(s_call.kwargs, ref.shape[:-1], self.s_dev)
        parts: dict = {}
        total = ref.new_zeros((), dtype=torch.float32)
        if cfg.kd_weight > 0:
            if s.logits is not None:
                parts["kd"] = kd_kl(s.logits, t.logits, cfg.temperature, mask)
            else:
                parts["kd"] = hidden_distance(s.hidden, t.hidden, cfg.hidden_loss, mask)
            total = total + cfg.kd_weight * parts["kd"]
        if task_w > 0 and self.cfg.task_weight is None and s.loss is None and s.logits is None:
            task_w = 0.0  # labels came along, but this model has nothing to score them with
        if task_w > 0:
            if s.loss is not None and self.s_spec.takes_labels:
                parts["task"] = s.loss.float()
            elif s.logits is not None:
                parts["task"] = task_cross_entropy(s.logits, s_call.labels)
            else:
                raise ValueError("the task loss needs logits, or a model that computes its loss from labels")
            total = total + task_w * parts["task"]
        if self.pairs:
            terms = []
            for s_name, t_name in self.pairs:
                a, b = s_taps.get(s_name), t_taps.get(t_name)
                if a is None or b is None:
                    raise ValueError(f"align module {s_name if a is None else t_name!r} was not called by the "
                                     f"{'student' if a is None else 'teacher'} (or returned no tensor)")
                b = b.to(self.s_dev)
                if a.shape != b.shape:
                    raise ValueError(f"align modules differ in shape: student {s_name} {tuple(a.shape)}, "
                                     f"teacher {t_name} {tuple(b.shape)}")
                terms.append(hidden_distance(a, b, cfg.align_loss, position_mask(s_call.kwargs, a.shape[:-1], self.s_dev)))
            parts["align"] = torch.stack(terms).mean()
            total = total + cfg.align_weight * parts["align"]
        if gate_losses:
            parts["gate"] = torch.stack([g.float().to(self.s_dev) for g in gate_losses]).mean()
            total = total + cfg.gate_weight * parts["gate"]
        if budget_losses and cfg.budget_weight > 0:
            parts["budget"] = torch.stack([b.float().to(self.s_dev) for b in budget_losses]).mean()
            total = total + cfg.budget_weight * parts["budget"]
        if s_maps:
            query_mask = s_call.kwargs.get("attention_mask")
            query_mask = query_mask if isinstance(query_mask, torch.Tensor) and query_mask.dim() == 2 else None
            parts["attention"] = torch.stack([attention_kl(s_maps[n], t_maps[n], query_mask, n) for n in s_maps]).mean()
            total = total + cfg.attention_weight * parts["attention"]
        return total, parts

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        f = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "linear":
            f *= max(0.0, 1.0 - step / cfg.steps)
        return f

    def _train_step(self) -> Optional[dict]:
        cfg = self.cfg
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * self._lr_factor(self.step)
        losses, parts_sum, bad = [], {}, None
        for micro in range(cfg.grad_accum):
            batch = self._next_batch()
            if batch is _END:
                return None
            loss, parts = self._loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                bad = bad or f"non-finite loss ({value}) at step {self.step + 1}, micro-batch {micro + 1} " \
                             f"(terms: {_floats(parts)})"
                if not cfg.skip_nonfinite:
                    raise FloatingPointError(bad + "; set DistillConfig.skip_nonfinite=True to skip such steps")
                continue
            (loss / cfg.grad_accum).backward()
            losses.append(value)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or float("inf"))
        if bad is None and not math.isfinite(float(norm)):
            bad = f"non-finite gradient norm ({float(norm)}) at step {self.step + 1}"
            if not cfg.skip_nonfinite:
                raise FloatingPointError(bad + "; set DistillConfig.skip_nonfinite=True to skip such steps")
        self._critical = True
        if bad is None:
            self.optimizer.step()
        else:
            self.skipped += 1
            log.warning("dhp_fx.distill: skipped the update: %s", bad)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.boundary = self._snapshot()
        self._critical = False
        if self._pending_sigint:
            raise KeyboardInterrupt
        n = max(len(losses), 1)
        record = {"event": "step", "step": self.step, "loss": sum(losses) / n if losses else float("nan"),
                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(norm),
                  **{k: v / n for k, v in parts_sum.items()}}
        if bad is not None:
            record["skipped"] = bad
        return record

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self) -> dict:
        metrics = evaluate(self.student, self.teacher, self.eval_data, self.cfg, self.cfg.eval_batches)
        if self.taps:
            for tap in self.taps:
                tap.pop()
        metrics = {"event": "eval", "step": self.step, **metrics}
        self.evals.append(metrics)
        obj = metrics["objective"]
        if self.best is None or obj < self.best - self.cfg.min_delta:
            self.best, self.best_step, self.bad_evals = obj, self.step, 0
            if self.cfg.restore_best:
                self.best_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        else:
            self.bad_evals += 1
        self._log(metrics)
        return metrics

    def _due_eval(self) -> bool:
        return bool(self.cfg.eval_every and self.eval_data is not None and self.step % self.cfg.eval_every == 0
                    and not any(e["step"] == self.step for e in self.evals))

    # ------------------------------------------------------------------ the run
    def run(self) -> DistillResult:
        cfg = self.cfg
        history: list = []
        stop_reason = "steps"
        old_handler = self._install_sigint()
        try:
            self._setup()
            self.boundary = self._snapshot()
            if self._due_eval():
                self._evaluate()
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc="distill", unit="step")
            try:
                while self.step < cfg.steps:
                    if cfg.patience and self.bad_evals >= cfg.patience:
                        stop_reason = "early_stopping"
                        break
                    record = self._train_step()
                    if record is None:
                        log.warning("dhp_fx.distill: data ran out after %d steps (one-shot iterator)", self.step)
                        stop_reason = "data_exhausted"
                        break
                    history.append(record)
                    self._log(record)
                    post = {"loss": f"{record['loss']:.4g}"}
                    if self._due_eval():
                        post["eval"] = f"{self._evaluate()['objective']:.4g}"
                    bar.update(1)
                    bar.set_postfix(post)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self._save_checkpoint(self.boundary)
                if cfg.patience and self.bad_evals >= cfg.patience:
                    stop_reason = "early_stopping"
            finally:
                bar.close()
            if cfg.checkpoint_dir and (self.last_ckpt is None or not self.last_ckpt.endswith(ckpt.step_dir(self.step))):
                self._save_checkpoint(self.boundary)
        except KeyboardInterrupt:
            if cfg.checkpoint_dir and hasattr(self, "boundary") and hasattr(self, "optimizer"):
                path = self._save_checkpoint(self.boundary)
                log.warning("dhp_fx.distill: interrupted; saved step %d to %s (resume=True continues)",
                            self.boundary["step"], path)
            raise
        finally:
            self._restore_sigint(old_handler)
            self._teardown()
        if cfg.restore_best and self.best_state is not None:
            self.student.load_state_dict(self.best_state)
        return DistillResult(student=self.student, steps=self.step, history=history, evals=list(self.evals),
                             best_objective=self.best, best_step=self.best_step,
                             stopped_early=stop_reason == "early_stopping", stop_reason=stop_reason,
                             skipped_steps=self.skipped, checkpoint=self.last_ckpt, resumed_from=self.resumed_from)

    def _teardown(self) -> None:
        for g in self.ste_gates:
            g.ste, g.last_budget_loss = False, None
        if self.attention:
            self.attention.disarm()
        if self.taps:
            for tap in self.taps:
                tap.remove()
        if hasattr(self, "teacher_flags"):
            mode, flags = self.teacher_flags
            self.teacher.train(mode)
            for p, flag in zip(self.teacher.parameters(), flags):
                p.requires_grad_(flag)
            self.student.train(self.student_mode)

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            # inside the optimizer update the weights are half-written: finish it first
            if self._critical:
                self._pending_sigint = True
            else:
                raise KeyboardInterrupt

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:
            return None

    @staticmethod
    def _restore_sigint(old) -> None:
        if old is not None:
            signal.signal(signal.SIGINT, old)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, snap: dict) -> str:
        opt_tensors, opt_meta = ckpt.optimizer_state(self.optimizer)
        files = {"optimizer.safetensors": opt_tensors, "rng.safetensors": snap["rng"]}
        if self.best_state is not None:
            files["best.safetensors"] = self.best_state
        masks = {k: g.fixed_keep for k, g in self.gates.items()
                 if isinstance(getattr(g, "fixed_keep", None), torch.Tensor) and g.fixed_keep.numel()}
        if masks:
            files["gate_masks.safetensors"] = masks
        state = {"format": CKPT_FORMAT, "step": snap["step"], "epoch": snap["epoch"],
                 "batch_in_epoch": snap["batch_in_epoch"], "batches_seen": snap["batches_seen"],
                 "rng_meta": snap["rng_meta"], "optimizer": opt_meta,
                 "gates": {k: ckpt.gate_runtime_state(g) for k, g in self.gates.items()},
                 "evals": self.evals, "best": self.best, "best_step": self.best_step,
                 "bad_evals": self.bad_evals, "skipped": self.skipped, "config": _jsonable(self.cfg.to_dict())}
        final = ckpt.write_training_checkpoint(self.cfg.checkpoint_dir, snap["step"], self.student, files,
                                               state, self.cfg.keep_checkpoints)
        self.last_ckpt = final
        self._log({"event": "checkpoint", "step": snap["step"], "path": final})
        return final

    def _resume(self) -> None:
        path = ckpt.find_training_checkpoint(self.cfg.checkpoint_dir, self.cfg.resume)
        if path is None:
            log.info("dhp_fx.distill: no checkpoint in %s; starting fresh", self.cfg.checkpoint_dir)
            return
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        if state.get("format") != CKPT_FORMAT:
            raise ValueError(f"{path}: not a dhp_fx distillation checkpoint")
        ckpt.load_module(self.student, os.path.join(path, "model.safetensors"))
        ckpt.load_optimizer_state(self.optimizer, ckpt.load_tensors(os.path.join(path, "optimizer.safetensors"),
                                                                    self.s_dev), state["optimizer"])
        masks_path = os.path.join(path, "gate_masks.safetensors")
        masks = ckpt.load_tensors(masks_path) if os.path.exists(masks_path) else {}
        for key, runtime in state["gates"].items():
            if key in self.gates:
                ckpt.apply_gate_runtime_state(self.gates[key], runtime, masks.get(key))
        if os.path.exists(os.path.join(path, "best.safetensors")):
            self.best_state = ckpt.load_tensors(os.path.join(path, "best.safetensors"), self.s_dev)
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.batches_seen = state["batch_in_epoch"], state["batches_seen"]
        self.evals, self.best, self.best_step = state["evals"], state["best"], state["best_step"]
        self.bad_evals, self.skipped = state["bad_evals"], state["skipped"]
        rng = ckpt.load_tensors(os.path.join(path, "rng.safetensors"))
        if "epoch_rng" in rng:
            # replay the epoch from the state it began with, so a shuffling loader draws the same order
            self.epoch_rng = rng.pop("epoch_rng")
            torch.set_rng_state(self.epoch_rng)
            self.it = self.stream.epoch(self.epoch, skip=self.batch_in_epoch)
        ckpt.set_rng_state(rng, state["rng_meta"])
        self.resumed_from = self.step
        log.info("dhp_fx.distill: resumed from %s (step %d)", path, self.step)

    # ------------------------------------------------------------------ metrics log
    def _log(self, record: dict) -> None:
        if not self.log_path:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **_jsonable(record)}) + "\n")

    def _truncate_log(self) -> None:
        """After a resume, drop what the lost steps logged past the checkpoint."""
        if not self.resumed_from or not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= self.resumed_from]
        tmp = self.log_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.log_path)


def _floats(parts: dict) -> dict:
    return {k: float(v.detach()) for k, v in parts.items()}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def _inherit_budget(gates, key: str, known: set) -> None:
    """A gate captured under another name for a known site (a nested frame after a graph break)
    takes that site's keep budget rather than running at the config default."""
    source = next((k for k in known if k.endswith("__" + key) or key.endswith("__" + k)), None)
    log.warning("dhp_fx.distill: the training call captured a new gate %r%s", key,
                f"; it takes the budget of {source!r}" if source else "")
    if source is not None:
        g, src = gates[key], gates[source]
        ckpt.apply_gate_runtime_state(g, ckpt.gate_runtime_state(src),
                                      src.fixed_keep if getattr(src, "fixed_keep", torch.ones(0)).numel() else None)
