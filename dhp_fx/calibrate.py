"""``dhp_fx.calibrate``: run sample batches through an optimized model and record, per head, its
score distribution and how often its gate kept it."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

log = logging.getLogger("dhp_fx")


@dataclass
class SiteStats:
    """What calibration saw at one site; per-head lists (None where nothing was recorded)."""

    name: str
    num_heads: int
    num_kv_heads: int
    samples: int
    keep_freq: Optional[list] = None
    score_mean: Optional[list] = None
    score_std: Optional[list] = None
    score_min: Optional[list] = None
    score_max: Optional[list] = None
    entropy_mean: Optional[list] = None
    weight_norm: Optional[list] = None  # ŵ, normalised per site
    keep_ratio: Optional[float] = None


@dataclass
class CalibrationStats:
    sites: dict = field(default_factory=dict)  # site name -> SiteStats, in model order
    batches: int = 0
    samples: int = 0
    flops_before: Optional[int] = None  # first batch, original model
    flops_after: Optional[int] = None  # first batch, gated model at the calibrated budget

    def keep_frequency(self) -> dict:
        return {name: s.keep_freq for name, s in self.sites.items()}

    def prunable(self, max_keep_freq: float = 0.01, min_heads: int = 1) -> dict:
        """{site: [heads]} kept at most ``max_keep_freq`` of the time; every site keeps at least
        ``min_heads`` heads (its most often kept ones). See ``static_prune.prune_plan`` for GQA."""
        out = {}
        for name, s in self.sites.items():
            if not s.keep_freq:
                continue
            freq = torch.tensor(s.keep_freq)
            rare = freq <= max_keep_freq
            spare = freq.argsort(descending=True, stable=True)[: min(min_heads, s.num_heads)]
            rare[spare] = False
            heads = torch.nonzero(rare).flatten().tolist()
            if heads:
                out[name] = heads
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sites"] = [dataclasses.asdict(s) for s in self.sites.values()]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationStats":
        d = dict(d)
        d["sites"] = {s["name"]: SiteStats(**s) for s in d.get("sites", [])}
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "CalibrationStats":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _site_gates(model) -> list:
    out = []
    for site in model.sites:
        try:
            out.append((site, model.gate(site.name)))
        except KeyError:
            pass
    return [(s, g) for s, g in out if hasattr(g, "start_recording")]


def calibrate(
    model,
    batches: Iterable[Any],
    keep_ratio: Optional[float] = None,
    measure_flops: bool = True,
    install_static: bool = True,
) -> CalibrationStats:
    """Run ``batches`` (dicts of keyword args, tuples of positional args, or single tensors)
    through an optimized model under no_grad and record per-head statistics.

    keep_ratio: the budget to calibrate at (restored afterwards); keep frequencies only mean
    something below 1.0. measure_flops: count FLOPs of the first batch on the original and the
    gated model (``report.count_flops``). install_static: "static" gates get the mean scores as
    their ranking. The stats are also kept on the model as ``calibration_stats`` for ``report``.
    """
    from .optimize import DHPModel

    if not isinstance(model, DHPModel):
        raise TypeError(f"calibrate expects a model returned by dhp_fx.optimize, got {type(model).__name__}")
    # Gates read their budget and recording flag at every call, in compiled graphs too
    # (dhp::run_gate), so nothing here needs a recompile; CUDA graphs replay none of that Python.
    model._drop_cuda_graphs()
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("calibrate needs at least one batch") from None
    with torch.no_grad():
        if not model.graphs_compiled:
            _call(model, first)  # captures the graph and creates the gates
        gates = _site_gates(model)
        if not gates:
            log.warning("dhp_fx.calibrate: %s has no gated attention sites", type(model.model).__name__)
        saved = {g.site_name: g.keep_ratio for _, g in gates}
        stats = CalibrationStats()
        try:
            for _, g in gates:
                if keep_ratio is not None:
                    g.set_keep_ratio(keep_ratio)
                g.start_recording()
            for batch in _chain(first, iterator):
                _call(model, batch)
                stats.batches += 1
        finally:
            for _, g in gates:
                g.stop_recording()
        for site, g in gates:
            rec = g.recorded()
            stats.sites[site.name] = SiteStats(
                name=site.name, num_heads=site.num_heads, num_kv_heads=site.num_kv_heads,
                weight_norm=g.w_hat.tolist() if hasattr(g, "w_hat") else None, keep_ratio=g.keep_ratio, **rec,
            )
            if install_static and hasattr(g, "set_static_scores") and rec["score_mean"] is not None:
                g.set_static_scores(rec["score_mean"])
        stats.samples = max((s.samples for s in stats.sites.values()), default=0)
        if measure_flops and gates:
            from .report import count_flops

            stats.flops_before = count_flops(model.model, first)
            stats.flops_after = count_flops(model, first)
        for _, g in gates:
            if keep_ratio is not None:
                g.set_keep_ratio(saved[g.site_name])
    model.calibration_stats = stats
    return stats


def _chain(first, rest):
    yield first
    yield from rest
