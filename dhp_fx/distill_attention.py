"""Attention-map alignment for ``dhp_fx.distill``: KL(P_teacher ‖ P_student) per query row.

The gated op never materialises probabilities, and neither does a teacher running SDPA. Both
sides are therefore read at the gates' taps (``HeadGate.capture_attention``): the student's own
gates, and the gates of a gates-open ``optimize()`` of the teacher (its outputs equal the
teacher's; only the taps are new). Maps are float32 [B, H, Lq, Lk] per aligned site, so memory
grows with Lq·Lk: align a few sites (``DistillConfig.attention_sites``) on long sequences.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .gates import AttentionCapture


def resolve_sites(student: nn.Module, teacher_view: nn.Module, sites: Union[str, list]) -> list[str]:
    """Site names aligned: "auto" = every student site the teacher has with as many heads."""
    s_sites = {s.name: s for s in student.sites}
    t_sites = {s.name: s for s in teacher_view.sites}
    if sites == "auto":
        names = [n for n, s in s_sites.items() if n in t_sites and t_sites[n].num_heads == s.num_heads]
        if not names:
            raise ValueError(
                "attention alignment found no site shared by student and teacher with the same head count "
                f"(student sites: {sorted(s_sites)}; teacher sites: {sorted(t_sites)})"
            )
        return names
    for name in sites:
        where = [who for who, known in (("student", s_sites), ("teacher", t_sites)) if name not in known]
        if where:
            raise ValueError(f"attention site {name!r} is not a rewritten site of the {' and '.join(where)} "
                             f"(student sites: {sorted(s_sites)})")
        if s_sites[name].num_heads != t_sites[name].num_heads:
            raise ValueError(f"attention site {name!r} has {s_sites[name].num_heads} heads in the student and "
                             f"{t_sites[name].num_heads} in the teacher (statically pruned?): maps cannot be paired")
    return list(sites)


class AttentionAlignment:
    """Owns the teacher's tap view and the capture switches of both sides for one run."""

    def __init__(self, student: nn.Module, teacher: nn.Module, sites: Union[str, list]):
        from .config import DHPConfig
        from .optimize import DHPModel, optimize

        if not isinstance(student, DHPModel):
            raise TypeError("attention alignment needs the student returned by dhp_fx.optimize "
                            f"(got {type(student).__name__})")
        self.student = student
        self.sites_spec = sites
        # Gates open, nothing skipped: the view computes exactly what the teacher computes.
        self.teacher_view = optimize(teacher, DHPConfig(keep_ratio=1.0, compiler="eager", skip_projections=False))
        self.names: Optional[list[str]] = None

    def bind(self) -> list[str]:
        """Pair the sites, once both models have been called (gates are created at capture)."""
        self.names = resolve_sites(self.student, self.teacher_view, self.sites_spec)
        return self.names

    def _gates(self, model) -> list:
        return [model.gate(n) for n in self.names]

    def arm(self, model) -> None:
        for g in self._gates(model):
            g.capture_attention, g.last_attention = True, None

    def collect(self, model, who: str) -> dict[str, AttentionCapture]:
        out = {}
        for name, g in zip(self.names, self._gates(model)):
            g.capture_attention = False
            cap, g.last_attention = g.last_attention, None
            if cap is None:
                raise RuntimeError(f"attention site {name!r} of the {who} was not called in this batch "
                                   "(a graph that skips it?): attention alignment needs every aligned site")
            out[name] = cap
        return out

    def disarm(self) -> None:
        for model in (self.student, self.teacher_view):
            for g in model.gates.values():
                g.capture_attention, g.last_attention = False, None


def attention_kl(student: AttentionCapture, teacher: AttentionCapture, query_mask: Optional[torch.Tensor],
                 site: str) -> torch.Tensor:
    """Mean over kept heads and real query rows of KL(P_t ‖ P_s) over keys.

    Pruned heads are left out: they contribute nothing to the student's output, so their maps
    are not the student's to match. query_mask [B, Lq] drops padding queries.
    """
    s_lp = student.log_probs
    t_lp = teacher.log_probs.to(s_lp.device)
    if s_lp.shape != t_lp.shape:
        raise ValueError(f"attention maps of site {site!r} differ: student {tuple(s_lp.shape)}, "
                         f"teacher {tuple(t_lp.shape)}")
    diff = t_lp - s_lp
    allowed = teacher.allowed
    if allowed is not None:
        # keys neither side may attend to are -inf on both sides: their (absent) mass counts 0
        diff = diff.masked_fill(~allowed.to(s_lp.device), 0.0)
    kl = (t_lp.exp() * diff).sum(-1)  # [B, H, Lq]
    weight = student.keep.to(kl.device, torch.float32)[:, :, None] * student.row_valid.to(kl.device, torch.float32)
    if query_mask is not None and query_mask.shape == (kl.shape[0], kl.shape[2]):
        weight = weight * query_mask.to(kl.device, torch.float32)[:, None, :]
    weight = weight.expand_as(kl)
    return (kl * weight).sum() / weight.sum().clamp_min(1.0)
